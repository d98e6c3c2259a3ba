"""Stage-2 cost in one run: CE-only step vs this trainer's cached distillation step vs an online step.

    python benchmarks/bench_train.py --config configs/default.yaml [--store PATH] [--batch_size 16]
        [--steps 8] [--warmup 2] [--threads 2] [key=value ...]

Shape glossary: B batch, T tokens (longest sample of the batch), L_sel teacher layers the layer map reads.

Step variants (every step includes fetching its batch from the trainer's DataLoader):
  ce      CE-only student step (lambda_kv = 0: tokens only, no aligner, no capture).
  cached  this trainer's step: teacher Q/K/V of the mapped layers read from the store by the DataLoader
          (workers + prefetch), aligner + StructuralKVLoss + CE, backward, AdamW (trainer.objective.step.forward_step).
  online  the same student step, but the teacher states come from a teacher forward with capture inside
          the loop (the teacher is loaded in the process: what offline extraction saves). Written only here.
How it is measured (one invocation, subprocesses):
  timing  one process runs ce / cached / online steps interleaved (own student, optimizer and loader each);
          medians of `--steps` steps after `--warmup`: a load swing on a shared machine hits all three alike.
  rss_*   one process per variant (`--rss_steps` steps): peak RSS of that variant alone (ru_maxrss), plus
          its finished DataLoader workers' peak (forked: they share pages with the parent, so not additive).
  loader  the trainer's DataLoader alone (same workers/prefetch, teacher states included): samples/s.
Bars (cached training cost): cached <= 0.5x online step time; cached peak RSS <= 0.8x online; cached <= 1.3x CE-only;
loader samples/s >= 3x what the cached step consumes.

    python benchmarks/bench_train.py --config configs/default.yaml --arms configs/ablations/structural_signals_next_to_kd.yaml
        [--only kd_heads_top,kd_relation] [--steps 8] [--warmup 2] [--threads 2] [key=value ...]
  arms    instead of the above: a CE-only step and one cached step per arm of an ablation YAML (its
          base_overrides + the arm's overrides on top of --config), interleaved in one process; prints each
          arm's median step time and its ratio to CE-only. A staged arm is timed in its "on" stage.

    python benchmarks/bench_train.py --config configs/default.yaml --stores BF16_STORE[,INT8_STORE]
        [--rounds 3] [--workers 2] [--steps 8] [--warmup 2] [--threads 1] [key=value ...]
  stores  instead of the above (stores at scale): the trainer's DataLoader on a bf16 store, on an int8 store of the
          same extraction (`bench_extract.py --int8 --out DIR`; optional) and on the bf16 store copied to a
          local S3 server (moto, own process) in the global and the shard-window order, rounds interleaved;
          and the cached step's consumption (benchmarks/loader_stores.py).
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

STEP_VARIANTS = ("ce", "cached", "online")


def _args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/bench_train.py")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--store", default=None, help="store to read (default: train.store or extract.store)")
    ap.add_argument("--batch_size", type=int, default=None, help="default: train.batch_size")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    ap.add_argument("--rss_steps", type=int, default=3, help="steps of each peak-RSS process")
    ap.add_argument("--arms", default=None, help="ablation YAML: time each arm's step next to CE-only")
    ap.add_argument("--only", default=None, help="--arms: comma-separated arm names")
    ap.add_argument("--stores", default=None, help="BF16[,INT8] store folders: compare loaders (docstring)")
    ap.add_argument("--rounds", type=int, default=3, help="--stores: interleaved rounds")
    ap.add_argument("--workers", type=int, default=2, help="--stores: DataLoader workers")
    ap.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    return ap.parse_known_args(argv)


def _peak_rss_mb() -> tuple[float, float]:
    """(this process, its largest finished child, i.e. a DataLoader worker once shut down) peak RSS in MB
    (Linux ru_maxrss is in KB; a forked worker's RSS counts the pages it shares with its parent too)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def _setup(args, overrides):
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from pipeline.config.configlib import load_config
    from pipeline.config.kvmap import KVMapConfig
    from trainer.run.setup import store_path_of
    from trainer.run.store_checks import open_store

    cfg = load_config(KVMapConfig, args.config, overrides)
    if args.store:
        cfg.train.store = args.store
    if cfg.lambda_kv == 0 and cfg.loss_config.alpha_logit == 0:
        cfg.lambda_kv = 1.0  # the distillation variants need a distillation term
    return cfg, open_store(store_path_of(cfg)), args.batch_size or cfg.train.batch_size


class Stepper:
    """One benchmark variant: its own student (same seed), aligner, optimizer and trainer DataLoader.

    `step()` runs one full training step (batch fetch included) and returns its wall time in seconds.
    """

    def __init__(self, variant: str, cfg, store, B: int, total_batches: int, teacher=None):
        import torch

        from alignment import create_structural_loss
        from pipeline.config.train import segment_ids_of
        from pipeline.models.load import load_model, pad_token_id
        from trainer.data.loader import make_loader
        from trainer.objective.step import DistillModel
        from trainer.run.run_setup import train_dataset, train_sampler
        from trainer.run.setup import build_aligner, build_kd, needed_components, param_groups
        from trainer.run.store_checks import check_layers

        torch.manual_seed(cfg.seed)
        student, tok = load_model(cfg.student, for_training=True)
        self.aligner = build_aligner(cfg, store, student) if variant != "ce" else None
        self.layers = list(self.aligner.teacher_layers) if self.aligner is not None else []
        comps = needed_components(cfg) if variant in ("cached", "loader") and self.aligner else ()
        if comps:
            check_layers(store, self.layers, comps)
        vocab = int(student.get_input_embeddings().weight.shape[0])
        self.kd = build_kd(cfg, store, vocab) if variant != "ce" else None  # logit KD (alpha_logit > 0)
        if self.kd is not None:
            comps = (*comps, "logits")
        self.ce_ids = segment_ids_of(cfg.train.ce_segments, "train.ce_segments")
        # as the trainer reads it: `train.preload` (the default config) holds the split's arrays in RAM; the
        # loader variant measures the store reads themselves
        pre = cfg.train.preload and variant != "loader"
        ds = train_dataset(cfg, store, self.layers, comps, pre)  # as the trainer: train.shuffle honoured
        pad_id = pad_token_id(tok)
        sampler = train_sampler(cfg, ds, total_batches * B, batch=B)
        self.loader = make_loader(ds, B, pad_id, sampler, cfg.train.num_workers, cfg.train.prefetch_factor)
        self.batches = iter(self.loader)
        self.loss_fn = create_structural_loss(**dataclasses.asdict(cfg.loss_config)) if self.aligner else None
        self.model = DistillModel(student, self.aligner).train()
        self.opt = torch.optim.AdamW(param_groups(student, self.aligner, cfg), betas=(0.9, 0.95))
        self.cfg, self.teacher, self.tokens = cfg, teacher, []

    def step(self) -> float:
        import torch

        from pipeline.models.capture import capture_qkv
        from trainer.objective.step import forward_step

        t0 = time.perf_counter()
        batch = next(self.batches)
        if self.teacher is not None:  # online: teacher forward + capture inside the loop
            with torch.no_grad(), capture_qkv(self.teacher, layers=self.layers) as cap:
                self.teacher(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
                )
            for c in ("q", "k", "v"):
                batch[f"{c}_t"] = cap.stack(c, self.layers).float()  # (B, L_sel, H|G, T, D_t)
        res = forward_step(
            self.model, batch, ce_ids=self.ce_ids, struct_ids=[0, 1, 2], lambda_kv=self.cfg.lambda_kv,
            loss_fn=self.loss_fn, lambda_auto_range=self.cfg.train.lambda_auto_range, kd=self.kd,
            ce_weight=self.cfg.loss_config.ce_weight,
        )  # fmt: skip
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.clip_grad)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.tokens.append(int(batch["attention_mask"].sum()))
        return time.perf_counter() - t0

    def close(self) -> None:
        del self.batches, self.loader  # shut the persistent workers down so RUSAGE_CHILDREN counts them
        gc.collect()


def _teacher(cfg):
    from pipeline.models.load import load_model

    return load_model(cfg.teacher)[0]


def run_timing(args, overrides) -> dict:
    """CE / cached / online steps interleaved in one process: load swings on a shared machine hit all alike."""
    cfg, store, B = _setup(args, overrides)
    n = args.warmup + args.steps
    steppers = {
        v: Stepper(v, cfg, store, B, n, _teacher(cfg) if v == "online" else None) for v in STEP_VARIANTS
    }
    times = {v: [] for v in STEP_VARIANTS}
    for i in range(n):
        for v, st in steppers.items():
            dt = st.step()
            if i >= args.warmup:
                times[v].append(dt)
    import torch

    out = {"variant": "timing", "batch_size": B, "steps": args.steps, "threads": torch.get_num_threads()}
    for v in STEP_VARIANTS:
        out[f"{v}_step_s"] = statistics.median(times[v])
        out[f"{v}_tokens_per_batch"] = statistics.median(steppers[v].tokens[args.warmup :])
    return out


def run_memory(variant: str, args, overrides) -> dict:
    """Peak RSS of one variant alone (its own process): model(s), optimizer, activations, loader buffers."""
    cfg, store, B = _setup(args, overrides)
    n = args.warmup + args.rss_steps
    st = Stepper(variant, cfg, store, B, n, _teacher(cfg) if variant == "online" else None)
    for _ in range(n):
        st.step()
    st.close()
    own, kids = _peak_rss_mb()
    return {"variant": variant, "rss_mb": own, "worker_rss_mb": kids}


def run_loader(args, overrides) -> dict:
    """The trainer's DataLoader alone (teacher states of the mapped layers included): samples/s."""
    cfg, store, B = _setup(args, overrides)
    st = Stepper("loader", cfg, store, B, args.warmup + args.steps + 1)
    next(st.batches)  # worker start-up is not throughput
    t0, n = time.perf_counter(), 0
    for batch in st.batches:
        n += batch["input_ids"].shape[0]
    elapsed = time.perf_counter() - t0
    st.close()
    own, kids = _peak_rss_mb()
    return {"variant": "loader", "samples_per_s": n / elapsed, "rss_mb": own, "worker_rss_mb": kids}


def _arm_overrides(path: str, only: str | None) -> dict[str, list[str]]:
    """{arm name: dotted overrides (base_overrides first)} of an ablation YAML, CE-only arms left out."""
    import yaml

    from trainer.ablation.config import flatten_overrides

    spec = yaml.safe_load(Path(path).read_text())
    base = flatten_overrides(spec.get("base_overrides") or [], f"{path}: base_overrides")
    keep = set(only.split(",")) if only else None
    arms = {}
    for arm in spec["arms"]:
        ov = base + flatten_overrides(arm.get("overrides") or [], f"{path}: arm {arm['name']!r}")
        ce_only = "lambda_kv=0" in ov and not any(o.startswith("loss_config.alpha_logit=") for o in ov)
        if (keep is None or arm["name"] in keep) and not ce_only:
            arms[arm["name"]] = ov
    return arms


def run_arms(args, overrides) -> dict:
    """CE-only step and every arm's cached step, interleaved in one process (medians, ratio to CE-only)."""
    cfg, store, B = _setup(args, overrides)
    n = args.warmup + args.steps
    steppers = {"ce": Stepper("ce", cfg, store, B, n)}
    for name, ov in _arm_overrides(args.arms, args.only).items():
        acfg, astore, _ = _setup(args, list(overrides) + ov)
        steppers[name] = Stepper("cached", acfg, astore, B, n)
    times = {v: [] for v in steppers}
    for i in range(n):
        for v, st in steppers.items():
            dt = st.step()
            if i >= args.warmup:
                times[v].append(dt)
    return {"variant": "arms", "batch_size": B, "steps": args.steps,
            "step_s": {v: statistics.median(t) for v, t in times.items()}}  # fmt: skip


def _print_arms(r: dict) -> None:
    ce = r["step_s"]["ce"]
    print(f"step time, median of {r['steps']} interleaved steps, batch {r['batch_size']}:")
    for v, t in r["step_s"].items():
        print(f"  {v:<24} {t:.3f} s  {t / ce:5.2f}x CE-only")


def _sub(variant: str, base: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, __file__, *base, "--variant", variant], env=env, capture_output=True, text=True
    )
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(f"variant {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = _args(argv)
    if args.variant:
        if args.variant == "timing":
            r = run_timing(args, overrides)
        elif args.variant == "arms":
            r = run_arms(args, overrides)
        elif args.variant == "loader":
            r = run_loader(args, overrides)
        else:
            r = run_memory(args.variant.removeprefix("rss_"), args, overrides)
        print("RESULT " + json.dumps(r), flush=True)
        return 0
    if args.arms:
        _print_arms(_sub("arms", argv))
        return 0
    if args.stores:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling loader_stores.py
        import loader_stores

        r = loader_stores.run_stores(args, overrides, Stepper, _setup)
        loader_stores.print_stores(r)
        print("RESULT " + json.dumps(r))
        return 0
    t = _sub("timing", argv)
    print(f"step time (median of {t['steps']}, interleaved): " + "  ".join(
        f"{v} {t[f'{v}_step_s']:.3f} s" for v in STEP_VARIANTS) + f"  | tokens/batch {t['cached_tokens_per_batch']:.0f}",
        flush=True)  # fmt: skip
    mem = {v: _sub(f"rss_{v}", argv) for v in STEP_VARIANTS}
    print("peak RSS (own process, MB): " + "  ".join(f"{v} {mem[v]['rss_mb']:.0f}" for v in STEP_VARIANTS)
          + "  | loader workers: " + "  ".join(f"{v} {mem[v]['worker_rss_mb']:.0f}" for v in STEP_VARIANTS), flush=True)  # fmt: skip
    loader = _sub("loader", argv)
    cached_sps = t["batch_size"] / t["cached_step_s"]
    print(
        f"loader alone {loader['samples_per_s']:.1f} samples/s; cached step consumes {cached_sps:.1f} samples/s"
    )
    bars = [
        ("cached / online step time", t["cached_step_s"] / t["online_step_s"], "<=", 0.5),
        ("cached / online peak RSS", mem["cached"]["rss_mb"] / mem["online"]["rss_mb"], "<=", 0.8),
        ("cached / CE-only step time", t["cached_step_s"] / t["ce_step_s"], "<=", 1.3),
        ("loader / cached consumption (samples/s)", loader["samples_per_s"] / cached_sps, ">=", 3.0),
    ]
    print(f"batch {t['batch_size']} samples, threads {t['threads']}")
    for name, value, op, bar in bars:
        ok = value <= bar if op == "<=" else value >= bar
        print(f"  {name:<42} {value:6.3f}  (bar {op} {bar})  {'PASS' if ok else 'MISS'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
