"""Stage-2 cost in one run: CE-only step vs this trainer's cached distillation step vs an online step.

    python benchmarks/bench_train.py --config configs/default.yaml [--store PATH] [--batch_size 16]
        [--steps 8] [--warmup 2] [--threads 2] [key=value ...]

Shape glossary: B batch, T tokens (longest sample of the batch), L_sel teacher layers the layer map reads.

Variants (each in its own subprocess, so that peak RSS is per variant; medians of `--steps` timed steps
after `--warmup` untimed ones; every step includes fetching its batch from the trainer's DataLoader):
  ce      CE-only student step (lambda_kv = 0: tokens only, no aligner, no capture).
  cached  this trainer's step: teacher Q/K/V of the mapped layers read from the store by the DataLoader
          (workers + prefetch), aligner + StructuralKVLoss + CE, backward, AdamW (trainer.step.forward_step).
  online  the same student step, but the teacher states come from a teacher forward with capture inside
          the loop (the teacher is loaded in the process: what offline extraction saves). Written only here.
  loader  the trainer's DataLoader alone (same workers/prefetch, teacher states included): samples/s.
Bars (issue 4): cached <= 0.5x online step time; cached peak RSS <= 0.8x online; cached <= 1.3x CE-only;
loader samples/s >= 3x what the cached step consumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("ce", "cached", "online", "loader")


def _args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/bench_train.py")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--store", default=None, help="store to read (default: train.store or extract.store)")
    ap.add_argument("--batch_size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    ap.add_argument("--variant", choices=VARIANTS, default=None, help=argparse.SUPPRESS)
    return ap.parse_known_args(argv)


def _peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest finished child, i.e. a DataLoader worker once shut down) peak RSS in MB
    (Linux ru_maxrss is in KB; a forked worker's RSS counts the pages it shares with its parent too)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def run_variant(variant: str, args, overrides: list[str]) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.capture import capture_qkv
    from pipeline.config import KVMapConfig
    from pipeline.configlib import load_config
    from pipeline.models import load_model
    from trainer.data import ResumableSampler, StoreDataset, make_loader
    from trainer.setup import build_aligner, needed_components, param_groups, store_path_of
    from trainer.step import DistillModel, forward_step
    from trainer.store_checks import check_layers, open_store

    cfg = load_config(KVMapConfig, args.config, overrides)
    if args.store:
        cfg.train.store = args.store
    B = args.batch_size or cfg.train.batch_size
    store = open_store(store_path_of(cfg))
    torch.manual_seed(cfg.seed)
    student, tok = load_model(cfg.student, for_training=True)
    distill = variant != "ce"
    if cfg.lambda_kv == 0:
        cfg.lambda_kv = 1.0  # the distillation variants need the structural term
    aligner = build_aligner(cfg, store, student) if distill else None
    layers = list(aligner.teacher_layers) if aligner is not None else []
    comps = needed_components(cfg) if variant in ("cached", "loader") else ()
    if comps:
        check_layers(store, layers, comps)
    teacher = None
    if variant == "online":
        teacher, _ = load_model(cfg.teacher)
    ds = StoreDataset(store.path, "train", layers=layers, components=comps)
    total = (args.warmup + args.steps) * B
    pad_id = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    loader = make_loader(
        ds,
        B,
        pad_id,
        ResumableSampler(len(ds), cfg.seed, total),
        cfg.train.num_workers,
        cfg.train.prefetch_factor,
    )
    batches = iter(loader)
    times, tokens = [], []
    if variant == "loader":
        next(batches)  # worker start-up is not throughput
        t0 = time.perf_counter()
        n = 0
        for batch in batches:
            n += batch["input_ids"].shape[0]
            tokens.append(int(batch["attention_mask"].sum()))
        elapsed = time.perf_counter() - t0
        del batch, batches, loader  # shut the persistent workers down so RUSAGE_CHILDREN counts them
        gc.collect()
        own, kids = _peak_rss_mb()
        return {"variant": variant, "samples_per_s": n / elapsed, "batches": len(tokens), "rss_mb": own,
                "worker_rss_mb": kids, "tokens_per_batch": statistics.median(tokens)}  # fmt: skip
    loss_fn = None
    if distill:
        from alignment import create_structural_loss

        loss_fn = create_structural_loss(**dataclasses.asdict(cfg.loss_config))
    model = DistillModel(student, aligner).train()
    opt = torch.optim.AdamW(param_groups(student, aligner, cfg), betas=(0.9, 0.95))
    ce_ids, st_ids = [0, 1, 2], [0, 1, 2]
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        if teacher is not None:
            with torch.no_grad(), capture_qkv(teacher, layers=layers) as cap:
                teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            for c in ("q", "k", "v"):
                batch[f"{c}_t"] = cap.stack(c, layers).float()  # (B, L_sel, H|G, T, D_t)
        res = forward_step(
            model,
            batch,
            ce_ids=ce_ids,
            struct_ids=st_ids,
            lambda_kv=cfg.lambda_kv,
            loss_fn=loss_fn,
        )
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(int(batch["attention_mask"].sum()))
    del batch, batches, loader
    gc.collect()
    own, kids = _peak_rss_mb()
    return {"variant": variant, "step_s": statistics.median(times), "steps": len(times), "rss_mb": own,
            "worker_rss_mb": kids, "tokens_per_batch": statistics.median(tokens), "batch_size": B,
            "samples_per_s": B / statistics.median(times), "threads": torch.get_num_threads()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args, overrides = _args(sys.argv[1:] if argv is None else argv)
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args, overrides)), flush=True)
        return 0
    res = {}
    base = [a for a in (sys.argv[1:] if argv is None else argv)]
    for v in VARIANTS:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, __file__, *base, "--variant", v], env=env, capture_output=True, text=True
        )
        line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"variant {v} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        res[v] = json.loads(line[-1][7:])
        r = res[v]
        what = f"step {r['step_s']:.3f} s" if "step_s" in r else f"{r['samples_per_s']:.1f} samples/s"
        print(f"{v:>7}: {what}  peak RSS {r['rss_mb']:.0f} MB (workers {r['worker_rss_mb']:.0f} MB)  "
              f"tokens/batch {r['tokens_per_batch']:.0f}", flush=True)  # fmt: skip
    ce, cached, online, loader = (res[v] for v in VARIANTS)
    bars = [
        ("cached / online step time", cached["step_s"] / online["step_s"], "<=", 0.5),
        ("cached / online peak RSS", cached["rss_mb"] / online["rss_mb"], "<=", 0.8),
        ("cached / CE-only step time", cached["step_s"] / ce["step_s"], "<=", 1.3),
        (
            "loader / cached consumption (samples/s)",
            loader["samples_per_s"] / cached["samples_per_s"],
            ">=",
            3.0,
        ),
    ]
    print(
        f"batch {cached['batch_size']} samples, {cached['steps']} timed steps (median), threads {cached['threads']}"
    )
    for name, value, op, bar in bars:
        ok = value <= bar if op == "<=" else value >= bar
        print(f"  {name:<42} {value:6.3f}  (bar {op} {bar})  {'PASS' if ok else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
