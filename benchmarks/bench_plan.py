"""Stage-1 bytes per token per component: all teacher layers vs the 8 mapped ones, default and 7B geometry.

    python benchmarks/bench_plan.py                      # geometry only (seconds, no weights)
    python benchmarks/bench_plan.py --measure            # + the default config's `kvmap-extract --plan`

Raw bytes per token come from the geometry (`pipeline.extraction.plan.raw_bytes_per_token`): the default
config's teacher (SmolLM2-135M, read from its config) and Qwen2.5-7B (28 layers, 28 query heads, 4 KV heads,
head_dim 128, vocab 152064; a config dict, no weights), with the default config's extraction settings
(bf16, top-128 log-probs). `--measure` also runs the default config's plan (the teacher on the first chunk,
compressed with the configured codec) and applies its measured ratios to both geometries: an assumption for
7B (its states are not the default teacher's), labelled as such.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # kvmap packages without a pip install
    sys.path.insert(0, str(REPO))

from pipeline.config.configlib import load_config  # noqa: E402
from pipeline.config.kvmap import KVMapConfig  # noqa: E402
from pipeline.extraction.plan import raw_bytes_per_token  # noqa: E402
from pipeline.models.load import load_hf_config, model_geometry  # noqa: E402
from pipeline.store.encoding import index_dtype  # noqa: E402

QWEN25_7B = {"layers": 28, "heads": 28, "kv_heads": 4, "head_dim": 128, "vocab": 152064}
MAPPED = 8  # the default config stores 8 teacher layers (extract.layers)


def geometry_rows(cfg: KVMapConfig, geo: dict) -> dict[str, tuple[float, float]]:
    """component -> (raw B/token over all layers, over the 8 mapped layers) at the config's settings."""
    comps = [c for c in ("q", "k", "v") if c in cfg.extract.components]
    k = cfg.extract.logits_top_k if "logits" in cfg.extract.components else 0
    args = (comps, cfg.extract.dtype, k, index_dtype(geo["vocab"]), cfg.extract.chunk_tokens)
    full = raw_bytes_per_token(geo, geo["layers"], *args)
    mapped = raw_bytes_per_token(geo, MAPPED, *args)
    return {name: (full[name], mapped[name]) for name in full}


def print_table(title: str, rows: dict, ratios: dict | None, layers: int) -> None:
    """One geometry's table; with `ratios` (measured raw / stored) also the compressed bytes per token."""
    print(title)
    head = f"  {'component':<16}{f'all {layers} layers':>16}{f'{MAPPED} mapped':>12}"
    print(head + (f"{'ratio':>8}{'stored, all':>14}{'stored, 8':>12}" if ratios else ""))
    tot = [0.0, 0.0, 0.0, 0.0]
    for name, (full, mapped) in rows.items():
        line = f"  {name:<16}{full:>16,.0f}{mapped:>12,.0f}"
        tot[0], tot[1] = tot[0] + full, tot[1] + mapped
        if ratios:
            r = ratios.get(name, 1.0)
            line += f"{r:>8.3f}{full / r:>14,.0f}{mapped / r:>12,.0f}"
            tot[2], tot[3] = tot[2] + full / r, tot[3] + mapped / r
        print(line)
    print(
        f"  {'total':<16}{tot[0]:>16,.0f}{tot[1]:>12,.0f}"
        + (f"{'':>8}{tot[2]:>14,.0f}{tot[3]:>12,.0f}" if ratios else "")
    )


def main(argv: list[str] | None = None) -> int:
    """Print the tables (raw bytes per token; with --measure the default plan's ratios applied)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    p.add_argument("--measure", action="store_true", help="run the config's --plan and apply its ratios")
    args = p.parse_args(argv)
    cfg = load_config(KVMapConfig, args.config, [])
    ratios = None
    if args.measure:
        from pipeline.extract import plan_extraction  # loads the teacher: only when asked for

        plan = plan_extraction(cfg)
        ratios = {name: c["ratio"] for name, c in plan["components"].items() if name != "metadata"}
        print(
            f"measured on the default config's first chunk ({plan['probe']['tokens']} tokens, codec "
            f"{cfg.extract.codec}): {plan['bytes_total']:,} bytes for {plan['tokens']:,} tokens, "
            f"{plan['seconds_estimate']:.0f} s estimated\n"
        )
    default = model_geometry(load_hf_config(cfg.teacher))
    note = f"dtype {cfg.extract.dtype}, top-{cfg.extract.logits_top_k} log-probs"
    print_table(
        f"default teacher ({cfg.teacher.path}), raw B/token, {note}:",
        geometry_rows(cfg, default),
        ratios,
        default["layers"],
    )
    print()
    title = f"Qwen2.5-7B geometry (config dict, no weights), raw B/token, {note}"
    title += ":" if ratios is None else " (ratios: the default teacher's, an assumption):"
    print_table(title, geometry_rows(cfg, QWEN25_7B), ratios, QWEN25_7B["layers"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
