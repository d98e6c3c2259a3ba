"""The report's gradient-probe table (`train.grad_probe_every`, trainer/objective/grad_probe.py), when runs logged one.

Per arm, over its seeds' probe steps: the structural term's gradient norm relative to KD's (and to CE's), and
the cosines between the terms' gradients on the student: first probe, mean over the run, last probe.
"""

from __future__ import annotations

import math
from pathlib import Path

from trainer.ablation.results import read_curve, resolve_run_dir

PROBE_KEYS = (
    "gprobe/norm_ce",
    "gprobe/norm_kd",
    "gprobe/norm_struct",
    "gprobe/cos_ce_kd",
    "gprobe/cos_ce_struct",
    "gprobe/cos_kd_struct",
)


def _ratio(a: dict, b: dict) -> dict[int, float]:
    return {s: a[s] / b[s] for s in a if s in b and b[s] > 0}


def seed_quantities(c: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    """{quantity: {probe step: value}} of one run from its `gprobe/*` curves: norm ratios and cosines."""
    return {
        "struct ÷ KD norm": _ratio(c["gprobe/norm_struct"], c["gprobe/norm_kd"]),
        "struct ÷ CE norm": _ratio(c["gprobe/norm_struct"], c["gprobe/norm_ce"]),
        "KD ÷ CE norm": _ratio(c["gprobe/norm_kd"], c["gprobe/norm_ce"]),
        "cos(CE, KD)": c["gprobe/cos_ce_kd"],
        "cos(CE, struct)": c["gprobe/cos_ce_struct"],
        "cos(KD, struct)": c["gprobe/cos_kd_struct"],
    }


def arm_probe(out_dir: Path, rows: list[dict]) -> dict[str, tuple[float, float]] | None:
    """{quantity: (first probe step, mean over every probe step, last probe step)}, each averaged over seeds."""
    per_seed = []
    for row in rows:
        run = resolve_run_dir(out_dir, row)
        c = {k: read_curve(run, (k,)) for k in PROBE_KEYS}
        if not c["gprobe/norm_ce"]:
            continue
        per_seed.append(seed_quantities(c))
    if not per_seed:
        return None
    out = {}
    for q in per_seed[0]:
        firsts = [d[q][min(d[q])] for d in per_seed if d[q]]
        means = [sum(d[q].values()) / len(d[q]) for d in per_seed if d[q]]
        lasts = [d[q][max(d[q])] for d in per_seed if d[q]]
        out[q] = tuple(sum(v) / len(v) for v in (firsts, means, lasts)) if firsts else (math.nan,) * 3
    return out


def probe_table(out_dir: Path, groups: dict[str, list[dict]]) -> str:
    """Markdown table 'first / mean / last probe' per arm and quantity; '' when no run probed."""
    probes = {a: arm_probe(out_dir, rs) for a, rs in groups.items()}
    probes = {a: p for a, p in probes.items() if p}
    if not probes:
        return ""
    qs = list(next(iter(probes.values())))
    lines = ["| arm | " + " | ".join(qs) + " |", "|---|" + "---|" * len(qs)]
    for arm, p in probes.items():
        cells = ["–" if math.isnan(p[q][0]) else " / ".join(f"{v:.3f}" for v in p[q]) for q in qs]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
