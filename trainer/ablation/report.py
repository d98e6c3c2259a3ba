"""The ablation report: per-arm tables (mean ± std over seeds), deltas vs the control, and plots.

    python -m trainer.ablation.report RUN_DIR [--control ARM] [--no-plots]

RUN_DIR is an ablation out_dir (trainer/ablate.py calls this at the end of a sweep). Reads
RUN_DIR/results.jsonl (one row per finished (arm, seed)), RUN_DIR/ablation.yaml when present (arm order,
descriptions, control, planned seeds) and each run's metrics.jsonl (curves); writes RUN_DIR/report.md,
loss_curves.png, cos_layers.png, deltas.png and prints the markdown.

Statistics (stated once): std is the sample std over seeds (ddof=1; blank for one seed). A delta is
mean(arm) - mean(control) with the standard error of that difference, SE = sqrt(s_a^2/n_a + s_c^2/n_c);
a delta is marked better/worse only when |delta| > 2 SE, i.e. when it exceeds the seed-to-seed noise.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
from pathlib import Path

import yaml

from pipeline.cli import command_parser, parse_args, run_command
from trainer.ablation.plots import write_plots
from trainer.ablation.probe_report import probe_table
from trainer.ablation.results import RESULTS_NAME, read_results
from trainer.ablation.stats import arm_stats, delta, group_rows, number_or_none, verdict

# (metric key in metrics.json, column header, format, which direction is better (None = no direction))
QUALITY_COLUMNS = [
    ("eval/ce_trained", "CE trained segs", ".4f", "lower"),
    ("eval/ce", "CE all", ".4f", "lower"),
    ("eval/ce_P", "CE P", ".4f", "lower"),
    ("eval/ce_R", "CE R", ".4f", "lower"),
    ("eval/ce_A", "CE A", ".4f", "lower"),
    ("eval/acc_R", "acc R", ".3f", "higher"),
    ("eval/acc_A", "acc A", ".3f", "higher"),
    ("eval/exact_match", "exact match", ".3f", "higher"),
    # Teacher fidelity on held-out rows (stores with logits): top-1 agreement, KL(teacher || student).
    ("eval/agree_top1", "agree top-1", ".3f", "higher"),
    ("eval/kl_teacher", "KL(t||s)", ".4f", "lower"),
]
ALIGN_COLUMNS = [
    ("train/cos_k", "cos K", ".3f", None),
    ("train/cos_v", "cos V", ".3f", None),
    ("train/attn_kl", "attn KL", ".4f", None),
    ("align/eff_rank_q", "eff rank Q", ".2f", None),
    ("align/eff_rank_k", "eff rank K", ".2f", None),
    ("align/eff_rank_v", "eff rank V", ".2f", None),
    ("align/params", "aligner params", ",.0f", None),
    ("train/step_s", "step s", ".3f", None),
    ("wall_s", "wall s", ".1f", None),
    ("steps", "steps", ".0f", None),
]
DELTA_KEYS = [
    "eval/ce_trained",
    "eval/ce",
    "eval/ce_R",
    "eval/ce_A",
    "eval/acc_R",
    "eval/acc_A",
    "eval/exact_match",
    "eval/agree_top1",
    "eval/kl_teacher",
]


def load_ablation_meta(run_dir: Path) -> dict:
    """RUN_DIR/ablation.yaml (arms, control, planned seeds), or {} when absent."""
    p = run_dir / "ablation.yaml"
    return (yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}


def fmt_ms(m: float, s: float, n: int, spec: str) -> str:
    """'mean ± std' in `spec`; just the mean for one seed, '–' for none."""
    if n == 0:
        return "–"
    if n == 1 or math.isnan(s):
        return format(m, spec)
    return f"{format(m, spec)} ± {format(s, spec)}"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def stats_table(groups: dict, stats: dict, columns: list) -> str:
    """Markdown table: one row per arm, 'mean ± std' per column."""
    headers = ["arm", "n"] + [c[1] for c in columns]
    body = []
    for arm, rs in groups.items():
        cells = [fmt_ms(*stats[arm][k], spec) for k, _, spec, _ in columns]
        # counts fixed by the config (parameter count, steps) read better without a "± 0"
        cells = [
            c.removesuffix(" ± 0") if k in ("align/params", "steps") else c
            for c, (k, *_) in zip(cells, columns)
        ]
        if any(r.get("resumed") for r in rs):  # wall time of a resumed run covers its last attempt only
            cells = [c + " †" if k == "wall_s" else c for c, (k, *_) in zip(cells, columns)]
        body.append([arm, str(len(rs))] + cells)
    return _table(headers, body)


def delta_table(groups: dict, stats: dict, control: str) -> str:
    """Markdown table: each arm's delta vs the control ± its SE, marked better/worse beyond 2 SE."""
    cols = [c for c in QUALITY_COLUMNS if c[0] in DELTA_KEYS]
    headers = ["arm"] + [f"Δ {c[1]}" for c in cols]
    body = []
    for arm in groups:
        if arm == control:
            continue
        cells = [arm]
        for key, _, spec, better in cols:
            d, se = delta(stats, arm, control, key)
            if math.isnan(d):
                cells.append("–")
                continue
            dspec = "+" + spec.lstrip(",")
            txt = format(d, dspec) + ("" if math.isnan(se) else f" ± {format(se, spec.lstrip(','))}")
            v = verdict(d, se, better)
            cells.append(f"{txt} **{v}**" if v in ("better", "worse") else txt)
        body.append(cells)
    return _table(headers, body)


def cost_line(stats: dict, ref: str | None) -> str:
    """'Step cost ÷ `ref`: arm 1.00x, ...' from the mean seconds per optimiser step; '' without step times."""
    base = stats.get(ref, {}).get("train/step_s") if ref else None  # (mean, std, n)
    if base is None or base[2] == 0 or not base[0] > 0:
        return ""
    cells = [
        f"`{a}` {st['train/step_s'][0] / base[0]:.2f}x"
        for a, st in stats.items()
        if st["train/step_s"][2] > 0
    ]
    return (
        f"Step cost ÷ `{ref}` (mean seconds per optimiser step, evaluation excluded): "
        + ", ".join(cells)
        + "."
    )


def choose_control(
    control: str | None, meta: dict, groups: dict, arms_meta: dict
) -> tuple[str | None, str | None]:
    """(the arm deltas are taken against or None, a planned control that has no finished runs yet or None).

    `control` None = ablation.yaml's `control`, else the first arm whose rows all have lambda_kv == 0.
    """
    if control is None:
        control = meta.get("control") or next(
            (a for a, rs in groups.items() if all(number_or_none(r.get("lambda_kv")) == 0.0 for r in rs)),
            None,
        )
    if control is None or control in groups:
        return control, None
    if control not in arms_meta:
        raise ValueError(f"control={control!r}: not an arm of this ablation (arms with rows: {list(groups)})")
    return None, control  # planned but not run yet (e.g. only_arms): no deltas


def summary_lines(
    run_dir: Path, rows: list[dict], groups: dict, stats: dict, control: str | None
) -> list[str]:
    """The title, provenance, the quality and the alignment/cost tables, the step-cost line."""
    fps = sorted({str(r.get("store_fingerprint")) for r in rows})
    shas = sorted({str(r.get("git_sha")) for r in rows})
    built = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        f"# Ablation report: {run_dir}",
        "",
        f"{len(rows)} runs, {len(groups)} arms; store fingerprint {', '.join(fps)}; git {', '.join(shas)}; "
        f"built {built}.",
        "Cells: mean ± sample std over seeds (n = seeds finished).",
        "",
        "## Held-out quality",
        "",
        stats_table(groups, stats, QUALITY_COLUMNS),
        "",
        "## Alignment and cost (final training-batch values; eff rank = effective rank of the projected teacher)",
        "",
        stats_table(groups, stats, ALIGN_COLUMNS),
    ]
    cost = cost_line(stats, "ce_only" if "ce_only" in groups else control)
    if cost:
        out += ["", cost]
    if any(r.get("resumed") for r in rows):
        out += [
            "",
            "† some runs of this arm were resumed after an interruption: their wall time is the last attempt's.",
        ]
    return out


def delta_lines(groups: dict, stats: dict, control: str | None, unrun_control: str | None) -> list[str]:
    """The delta table vs the control, or why there is none."""
    out = []
    if control is not None and len(groups) > 1:
        out += [
            "",
            f"## Delta vs the control `{control}`",
            "",
            "Δ = mean(arm) − mean(control) ± its standard error over seeds; **better**/**worse** only when "
            "|Δ| > 2 SE (beyond the seed-to-seed noise).",
            "",
            delta_table(groups, stats, control),
        ]
    if unrun_control:
        out += ["", f"No deltas: the control `{unrun_control}` has no finished runs yet."]
    return out


def incomplete_lines(meta: dict, arms_meta: dict, groups: dict) -> list[str]:
    """Arms with fewer finished seeds than ablation.yaml plans."""
    planned = meta.get("seeds") or []
    missing = [
        f"`{a}` ({len(groups.get(a, []))}/{len(planned)} seeds)"
        for a in arms_meta
        if planned and len(groups.get(a, [])) < len(planned)
    ]
    return ["", "Incomplete arms: " + ", ".join(missing) + "."] if missing else []


def probe_lines(run_dir: Path, groups: dict) -> list[str]:
    """The gradient-probe section, when any run logged probes."""
    probes = probe_table(run_dir, groups)
    if not probes:
        return []
    return [
        "",
        "## Gradient probe (`train.grad_probe_every`; first / mean / last probe step, mean over seeds)",
        "",
        "Each weighted term's gradient on the student alone (trainer/objective/grad_probe.py): norm ratios and cosines.",
        "",
        probes,
    ]


def arm_lines(groups: dict, arms_meta: dict) -> list[str]:
    """One line per arm: its description, overrides and finished seeds."""
    out = ["", "## Arms", ""]
    for arm, rs in groups.items():
        desc = arms_meta.get(arm, {}).get("description") or ""
        ovr = " ".join(rs[0].get("overrides") or []) or "(base config)"
        seeds = ", ".join(str(r["seed"]) for r in rs)
        out.append(f"- `{arm}`{': ' + desc if desc else ''} — `{ovr}` — seeds {seeds}")
    return out


def build_report(run_dir: str | Path, control: str | None = None, plots: bool = True) -> str:
    """Write RUN_DIR/report.md (+ PNG plots) from RUN_DIR/results.jsonl and return the markdown.

    Args:
        run_dir: an ablation out_dir holding results.jsonl.
        control: the arm deltas are taken against; None = ablation.yaml's `control`, else the first arm
            whose rows have lambda_kv == 0, else no delta table.
        plots: also write loss_curves.png, cos_layers.png, deltas.png (matplotlib, Agg backend).
    """
    run_dir = Path(run_dir)
    results = run_dir / RESULTS_NAME
    rows = read_results(results)
    if not rows:
        raise FileNotFoundError(f"{results}: no results rows (run trainer/ablate.py first)")
    meta = load_ablation_meta(run_dir)
    arms_meta = {a["name"]: a for a in meta.get("arms", []) if isinstance(a, dict) and "name" in a}
    groups = group_rows(rows, list(arms_meta))
    stats = arm_stats(groups, [c[0] for c in QUALITY_COLUMNS + ALIGN_COLUMNS])
    control, unrun_control = choose_control(control, meta, groups, arms_meta)
    out = summary_lines(run_dir, rows, groups, stats, control)
    out += delta_lines(groups, stats, control, unrun_control)
    out += incomplete_lines(meta, arms_meta, groups)
    out += probe_lines(run_dir, groups)
    out += arm_lines(groups, arms_meta)
    written = write_plots(run_dir, groups, stats, control) if plots else []
    if written:
        out += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in written]
    text = "\n".join(out) + "\n"
    (run_dir / "report.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    """`kvmap-report RUN_DIR`: write the report and print its markdown; a bad RUN_DIR or control exits 2."""
    ap = command_parser(
        "kvmap-report",
        __doc__,
        examples=[
            "kvmap-report runs/ablations/demo --control kd_only",
            "kvmap-report runs/ablations/x --no-plots",
        ],
        config=False,
    )
    ap.add_argument("run_dir", help="an ablation out_dir holding results.jsonl")
    ap.add_argument("--control", default=None, help="arm the deltas are taken against")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    args = parse_args(ap, argv)
    return run_command(
        "report", lambda: print(build_report(args.run_dir, control=args.control, plots=not args.no_plots))
    )


if __name__ == "__main__":
    sys.exit(main())
