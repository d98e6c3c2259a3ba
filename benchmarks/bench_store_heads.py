"""Store only what the recipe reads: bytes/token and stage-1 time of an all-heads store, a selected-heads store
and the minimal store of `kd_heads_top`, at the default teacher's geometry (measured) and at Qwen2.5-7B's
(the plan's arithmetic on the measured codec ratios).

    python benchmarks/bench_store_heads.py [--samples 256] [--config configs/default.yaml]

What runs (one run, one table):
- the default teacher (SmolLM2-135M) over the first `--samples` train samples of the config's data, into three
  stores of the teacher layers `kd_heads_top` maps ([6, 17, 18, 23] in
  configs/ablations/structure_vs_kd_random_student.yaml), each with the top-128 logits:
    all       every head, q k v + logits (what stage 1 stored before `extract.heads`)
    selected  `extract.heads: selected` (top-4 retrieval heads, 64 probe samples), q k v + logits
    minimal   the union `kvmap-ablate --plan-store only_arms=[kd_heads_top]` prints (trainer/ablation/store_plan.py):
              the selected heads' q and k, and the logits
  For each: the plan's estimate (`kvmap-extract --plan`, chunk 0 measured), the bytes the finished store holds
  per token (train + held-out tokens, metadata included), the extraction loop's seconds (wall and CPU of all
  threads) and the whole `run_extraction` call's (model load, tokenising, the head probe of the selected
  stores, the plan's probe).
- 7B geometry (28 query heads, 4 KV heads, head dim 128, a vocabulary over 65,536 ids: uint32 top-k indices):
  no 7B teacher runs here; per component, the raw bytes of the geometry (`raw_bytes_per_token`, the plan's own
  function, with the held heads: 4 query heads and, at worst, 4 distinct KV groups) over the compression
  ratio the same component measured above; tokens and metadata as measured. Stage-1 time at 7B is not measured
  (the forward dominates it and is the same for the three stores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.config.configlib import load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import plan_extraction, run_extraction
from pipeline.extraction.plan import raw_bytes_per_token
from pipeline.store.reader import KVStore
from trainer.ablation.config import load_ablation, plan_runs
from trainer.ablation.store_plan import arm_needs, union_needs

RECIPE = "configs/ablations/structure_vs_kd_random_student.yaml"
GEO_7B = {"heads": 28, "kv_heads": 4, "head_dim": 128}
SELECT = ["extract.heads=selected", "extract.head_select.top=4", "extract.head_select.samples=64"]


def minimal_overrides(recipe: str, arm: str) -> list[str]:
    """The extract section `--plan-store` derives for one arm of a recipe, as dotted overrides."""
    abl = load_ablation(recipe, [f"only_arms=[{arm}]", "seeds=[0]"])
    spec = next(s for s in plan_runs(abl) if s.arm == arm)
    u = union_needs([arm_needs(spec.cfg)])
    out = [f"extract.components=[{','.join(u['components'])}]", f"extract.layers={json.dumps(u['layers'])}"]
    out.append(f"extract.heads={json.dumps(u['heads'])}")
    for k, v in u.get("head_select", {}).items():
        out.append(f"extract.head_select.{k}={json.dumps(v)}")
    return out


def measure(name: str, cfg: KVMapConfig) -> dict:
    """Plan, then extract; the plan's and the store's bytes per token and the seconds."""
    plan = plan_extraction(cfg)
    t0 = time.perf_counter()
    summary = run_extraction(cfg)
    wall = time.perf_counter() - t0
    store = KVStore(cfg.extract.store, require_complete=True)
    tokens = store.num_tokens("train") + (store.num_tokens("eval") if "eval" in store.splits else 0)
    return {
        "store": name,
        "layers": store.layers,
        "components": store.components + (["logits"] if store.logits else []),
        "held": plan["heads"],
        "plan_bytes_per_token": plan["bytes_per_token"],
        "stored_bytes_per_token": store.stored_bytes() / tokens,
        "loop_s": summary["extract_loop_s_last_run"],
        "loop_cpu_s": summary["extract_loop_cpu_s_last_run"],  # less sensitive to a shared machine's load
        "wall_s": wall,
        "ratios": {c: v["ratio"] for c, v in plan["components"].items()},
        # token arrays and zarr metadata: the same at any geometry
        "fixed_bytes_per_token": plan["components"]["tokens"]["bytes_per_token"]
        + plan["components"]["metadata"]["bytes"] / plan["tokens"],
    }


def at_7b(row: dict) -> float:
    """Bytes per token of the same store at 7B geometry: raw bytes / the measured ratio per component."""
    comps = [c for c in row["components"] if c != "logits"]
    held = None
    if row["store"] != "all":  # 4 query heads, at worst 4 distinct KV groups
        held = {c: 4 for c in comps}
    raw = raw_bytes_per_token(GEO_7B, len(row["layers"]), comps, "bfloat16", 128, "uint32", 4096, held)
    return sum(v / row["ratios"][c] for c, v in raw.items()) + row["fixed_bytes_per_token"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--samples", type=int, default=256, help="train samples per store")
    p.add_argument("--recipe", default=RECIPE)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="bench_store_heads_"))
    base = [f"data.max_train_samples={args.samples}", "data.max_eval_samples=64"]
    base += ["extract.layers=[6,17,18,23]", "extract.components=[q,k,v,logits]"]
    stores = {"all": [], "selected": SELECT, "minimal": minimal_overrides(args.recipe, "kd_heads_top")}
    print(f"minimal store of kd_heads_top (--plan-store): {' '.join(stores['minimal'])}", flush=True)
    rows = []
    try:
        for name, over in stores.items():
            cfg = load_config(KVMapConfig, args.config, [*base, *over, f"extract.store={work / name}.zarr"])
            rows.append(measure(name, cfg))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    all_default, all_7b = rows[0]["stored_bytes_per_token"], at_7b(rows[0])
    head = f"{'geometry':<9}{'store':<10}{'held heads q/k/v':<18}{'plan B/tok':>11}{'stored B/tok':>13}"
    print(f"\n{head}{'x smaller':>10}{'loop s':>8}{'loop CPU s':>11}{'wall s':>8}")
    for r in rows:
        held = "/".join(str(r["held"].get(c, 0)) for c in ("q", "k", "v"))
        print(
            f"{'default':<9}{r['store']:<10}{held:<18}{r['plan_bytes_per_token']:>11,.0f}"
            f"{r['stored_bytes_per_token']:>13,.0f}{all_default / r['stored_bytes_per_token']:>10.2f}"
            f"{r['loop_s']:>8.1f}{r['loop_cpu_s']:>11.1f}{r['wall_s']:>8.1f}"
        )
    for r in rows:
        held = "4/4/4" if r["store"] != "all" else "112/16/16"
        held = held if "v" in r["components"] else held.rsplit("/", 1)[0] + "/0"
        b = at_7b(r)
        print(
            f"{'7B':<9}{r['store']:<10}{held:<18}{'':>11}{b:>13,.0f}{all_7b / b:>10.2f}{'-':>8}{'-':>11}{'-':>8}"
        )
    ok = True
    for geo, full, small in (
        ("default", all_default, rows[2]["stored_bytes_per_token"]),
        ("7B", all_7b, at_7b(rows[2])),
    ):
        good = small * 8 <= full
        ok &= good
        print(
            f"bar at {geo} geometry: minimal {small:,.0f} <= all / 8 = {full / 8:,.0f} B/token: {'PASS' if good else 'MISS'}"
        )
    print("JSON " + json.dumps({"rows": rows, "7b": {r["store"]: at_7b(r) for r in rows}}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
