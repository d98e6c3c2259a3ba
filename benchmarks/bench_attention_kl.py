"""Naive vs streaming attention KL: forward+backward peak memory and time (issue: alignment core).

Each (T, kind, measurement) runs in a fresh subprocess so one run's allocator state cannot leak into the next;
each first does one tiny pass so lazy one-time initialisation is not counted.
- Memory: rise of peak RSS (ru_maxrss) over the RSS after the inputs exist, with MALLOC_MMAP_THRESHOLD_=65536
  set for both kinds (glibc otherwise keeps freed chunks and RSS hides what the algorithm really holds).
- Time: without that variable; one warm-up, then the median of --repeats timed forward+backward passes.
Shapes: B=1, L=1, H=9 query heads, G=3 KV heads, D=64 (SmolLM2-like), both sides trainable (projected target).
Kinds: "naive" = the same per-row math on whole T x T maps through autograd, no chunking or recomputation
(what a direct implementation keeps alive for backward); "stream" = `alignment.losses.attention_kl` (query-row chunks,
custom autograd Function recomputing each chunk in backward); "reference" (opt-in via --naive-kind reference) = `naive_attention_kl`, the test reference, which
masks by selection and holds even more.

    python benchmarks/bench_attention_kl.py                 # T in 512 1024 2048 4096, 3 timing repeats
    python benchmarks/bench_attention_kl.py --T 1024 --repeats 5 --chunk 128 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def child(kind: str, T: int, what: str, repeats: int, chunk: int, threads: int) -> dict:
    import torch

    from alignment.geometry.attention_probs import LogitSpec, attention_logits
    from alignment.losses.attention_kl import attention_kl, naive_attention_kl

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    B, L, H, G, D = 1, 1, 9, 3, 64
    mk = lambda h: torch.randn(B, L, h, T, D, generator=g).requires_grad_()  # noqa: E731
    q_s, k_s, q_t, k_t = mk(H), mk(G), mk(H), mk(G)

    def dense_kl(q_s, k_s, q_t, k_t):
        """The same per-row math on whole (B, L, H, T, T) maps, autograd keeping them all for backward."""
        T = q_s.shape[3]
        allowed = torch.ones(T, T, dtype=torch.bool).tril()
        logp_s = torch.log_softmax(
            attention_logits(q_s, k_s, LogitSpec(D**-0.5))[0].masked_fill(~allowed, -1e30), dim=-1
        )
        logp_t = torch.log_softmax(
            attention_logits(q_t, k_t, LogitSpec(D**-0.5))[0].masked_fill(~allowed, -1e30), dim=-1
        )
        return torch.where(allowed, logp_t.exp() * (logp_t - logp_s), 0.0).sum() / (T * H)

    def run(q_s, k_s, q_t, k_t):
        if kind == "naive":
            kl = dense_kl(q_s, k_s, q_t, k_t)
        elif kind == "reference":  # the test reference (selection-based masking: heavier still)
            kl = naive_attention_kl(q_s, k_s, q_t, k_t)
        else:
            kl = attention_kl(q_s, k_s, q_t, k_t, chunk_size=chunk)
        kl.backward()
        return kl.item()

    # One tiny pass first: lazy one-time initialisation (autograd engine, checkpoint machinery) is not
    # memory the algorithm holds, and would otherwise dominate the small sizes.
    tiny = [torch.randn(B, L, h, 16, D).requires_grad_() for h in (H, G, H, G)]
    run(*tiny)
    del tiny
    if what == "memory":
        base = max(_rss_kb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        value = run(q_s, k_s, q_t, k_t)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return {"rise_mb": (peak - base) / 1024, "kl": value}
    run(q_s, k_s, q_t, k_t)  # warm-up at full size
    times = []
    for _ in range(repeats):
        for x in (q_s, k_s, q_t, k_t):
            x.grad = None
        t0 = time.perf_counter()
        run(q_s, k_s, q_t, k_t)
        times.append(time.perf_counter() - t0)
    return {"time_s": statistics.median(times), "times": times}


def spawn(kind: str, T: int, what: str, args) -> dict:
    env = dict(os.environ)
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    else:
        env.pop("MALLOC_MMAP_THRESHOLD_", None)
    cmd = [sys.executable, __file__, "--child", kind, str(T), what, "--repeats", str(args.repeats),
           "--chunk", str(args.chunk), "--threads", str(args.threads)]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--naive-kind", choices=["naive", "reference"], default="naive")
    p.add_argument("--child", nargs=3, metavar=("KIND", "T", "WHAT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, T, what = args.child
        print(json.dumps(child(kind, int(T), what, args.repeats, args.chunk, args.threads)))
        return
    print(f"attention KL fwd+bwd, B=1 L=1 H=9 G=3 D=64, chunk={args.chunk}, threads={args.threads}, "
          f"time = median of {args.repeats}")  # fmt: skip
    header = f"{'T':>5} | {'naive MB':>9} {'stream MB':>9} {'mem ratio':>9} | {'naive s':>8} {'stream s':>8} {'time ratio':>10}"
    print(header)
    print("-" * len(header))
    rows = []
    for T in args.T:
        r = {
            kind: {**spawn(kind, T, "memory", args), **spawn(kind, T, "time", args)}
            for kind in ("naive", "stream")
        }
        mem_ratio = r["stream"]["rise_mb"] / max(r["naive"]["rise_mb"], 1e-9)
        time_ratio = r["stream"]["time_s"] / r["naive"]["time_s"]
        rows.append((T, mem_ratio, time_ratio))
        print(f"{T:>5} | {r['naive']['rise_mb']:>9.1f} {r['stream']['rise_mb']:>9.1f} {mem_ratio:>9.3f} | "
              f"{r['naive']['time_s']:>8.3f} {r['stream']['time_s']:>8.3f} {time_ratio:>10.2f}", flush=True)  # fmt: skip
        assert abs(r["naive"]["kl"] - r["stream"]["kl"]) <= 1e-4 * abs(r["naive"]["kl"]), "values differ"
    T, mem_ratio, time_ratio = rows[-1]
    print(f"bar at T={T}: memory ratio {mem_ratio:.3f} (<= 0.125: {'ok' if mem_ratio <= 0.125 else 'MISSED'}), "
          f"time ratio {time_ratio:.2f} (<= 1.5: {'ok' if time_ratio <= 1.5 else 'MISSED'})")  # fmt: skip


if __name__ == "__main__":
    main()
