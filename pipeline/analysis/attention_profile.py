"""The stored teacher's own attention, per layer and segment: mass on the first token and entropy.

    python -m pipeline.analysis.attention_profile stores/default.zarr [--samples 16] [--json]
    python -m pipeline.analysis.attention_profile stores/default.zarr --head-scores [--samples 64]  (pipeline/analysis/head_scores.py)

Shape glossary: L_sel stored layers, H query heads, G KV heads, T tokens, D head dim.

Why: the attention-KL target is built from these maps. A map dominated by the first token (an "attention
sink") or spread thinly teaches the student little about *where* to look; the result pages (docs/results/) trace the
default task's negative result to exactly that (23-59% first-token mass at the mapped layers). Rebuilt
from the stored post-RoPE Q/K with the teacher's own geometry as the store records it (per-layer scaling,
softcap, sliding windows: pipeline/models/geometry.py, alignment/geometry/attention_probs.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.analysis.head_scores import attention_maps, format_head_scores, head_scores, write_sidecar
from pipeline.cli import command_parser, run_command
from pipeline.config.kvmap import SEGMENTS
from pipeline.models.geometry import store_logit_spec
from pipeline.store.reader import KVStore


def attention_profile(path: str | Path, split: str = "train", num_samples: int = 16) -> dict:
    """Mean first-token attention mass and entropy (nats) over query rows of each segment, per stored layer.

    Returns {"layers": [...], "samples": n, "rows": {segment: count}, "sink": {segment: [per layer]},
    "entropy": {segment: [per layer]}}; means are over every (head, query row) of that segment.
    """
    store = KVStore(path, require_complete=True)
    if "q" not in store.components or "k" not in store.components:
        raise ValueError(f"store '{path}' holds {store.components}: the attention profile needs q and k")
    n = min(num_samples, store.num_samples(split))
    if n < 1:
        raise ValueError(f"num_samples={num_samples}: expected >= 1 (split {split!r} has {n} samples)")
    spec = store_logit_spec(store)
    L = len(store.layers)
    sums = {s: torch.zeros(2, L, dtype=torch.float64) for s in SEGMENTS}  # rows: sink, entropy
    rows = dict.fromkeys(SEGMENTS, 0)
    for i in range(n):
        x = store.read_sample(i, split, components=("q", "k"))
        p = attention_maps(x["q"], x["k"], spec)  # (L, H, T, T)
        ent = -(p * p.clamp_min(1e-30).log()).sum(-1)  # (L, H, T)
        for name, sid in SEGMENTS.items():
            m = x["segment_ids"] == sid  # (T,)
            if m.any():
                sums[name][0] += p[:, :, m, 0].double().sum(dim=(1, 2))
                sums[name][1] += ent[:, :, m].double().sum(dim=(1, 2))
                rows[name] += int(m.sum()) * p.shape[1]
    out = {"layers": list(store.layers), "samples": n, "rows": rows, "sink": {}, "entropy": {}}
    for name in SEGMENTS:
        d = max(rows[name], 1)
        out["sink"][name] = (sums[name][0] / d).tolist()
        out["entropy"][name] = (sums[name][1] / d).tolist()
    return out


def format_profile(r: dict) -> str:
    """Markdown table of an `attention_profile` result: per stored layer, first-token mass and entropy by segment."""
    segs = [s for s in SEGMENTS if r["rows"][s]]
    head = "| layer | " + " | ".join(f"first-token mass {s}" for s in segs)
    head += " | " + " | ".join(f"entropy {s} (nats)" for s in segs) + " |"
    lines = [f"teacher attention over {r['samples']} samples (mean over heads and query rows)", "", head]
    lines.append("|" + "---|" * (1 + 2 * len(segs)))
    for j, layer in enumerate(r["layers"]):
        cells = [f"{r['sink'][s][j]:.3f}" for s in segs] + [f"{r['entropy'][s][j]:.2f}" for s in segs]
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.analysis.attention_profile`: see the module docstring."""
    p = command_parser(
        "python -m pipeline.analysis.attention_profile",
        __doc__,
        examples=[
            "python -m pipeline.analysis.attention_profile stores/default.zarr --samples 16",
            "python -m pipeline.analysis.attention_profile stores/default.zarr --head-scores --top 10",
        ],
        config=False,
    )
    p.add_argument("store", help="store folder (*.zarr) holding q and k")
    p.add_argument("--split", default="train")
    p.add_argument("--samples", type=int, default=16, help="first N samples of the split")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")
    p.add_argument(
        "--head-scores",
        action="store_true",
        help="score every teacher query head (retrieval / answer mass / sink, pipeline/analysis/head_scores.py) on the "
        "first --samples samples and write STORE.head_scores.json next to the store",
    )
    p.add_argument("--top", type=int, default=10, help="--head-scores: heads in the printed table")
    a = p.parse_args(argv)
    # KeyError: a split the store does not hold
    return run_command(
        "attention_profile",
        lambda: _head_scores_main(a) if a.head_scores else _profile_main(a),
        extra=(KeyError,),
    )


def _profile_main(a) -> int:
    """Print the attention profile of `a.store` (a table, or JSON with --json)."""
    r = attention_profile(a.store, a.split, a.samples)
    print(json.dumps(r, indent=1) if a.json else format_profile(r))
    return 0


def _head_scores_main(a) -> int:
    """`--head-scores`: score every teacher head, print the top ones and write the sidecar beside the store."""
    s = head_scores(a.store, a.split, a.samples)
    out = write_sidecar(s, a.store)
    print(json.dumps(s, indent=1) if a.json else format_head_scores(s, a.top))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
