"""Stored top-k teacher log-probs in one run: bytes per token, extraction throughput with vs without logits,
a codec table for the two logits arrays, and the fidelity of the stored top-k to the full distribution.

    python benchmarks/bench_logits.py --config configs/default.yaml [--samples 96] [--repeats 3]
        [--fidelity_samples 64] [key=value ...]

Bars (stored logits): logits at K = 128 <= 450 stored bytes per token on the default teacher (DistillKit's lossy
coding is ~300); extraction with logits >= 0.95x the throughput without them (medians of `--repeats`
interleaved runs, the same samples and layers; the machine may be shared).

Fidelity, on `--fidelity_samples` held-out samples (the teacher's full fp32 distribution p at every token vs
what the store keeps, float16 top-K log-probs):
- bucket: reconstruction = the stored top-K probabilities + the missing mass 1 - sum(p_topk) spread uniformly
  over the other V - K tokens; prints mean KL(p || reconstruction) per token.
- renormalize: reconstruction = the stored top-K renormalised, zero elsewhere, so KL(p || it) is infinite
  whenever the teacher has mass outside the top K; prints that missing mass and the KL on the top-K support
  (p restricted to the top K and renormalised vs the stored top K renormalised: the float16 rounding alone).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repo root, not benchmarks/

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from pipeline.config.configlib import load_config  # noqa: E402
from pipeline.config.kvmap import KVMapConfig  # noqa: E402
from pipeline.data.default_data import generate_default_data  # noqa: E402
from pipeline.data.split_shards import remove_staging  # noqa: E402
from pipeline.extract import run_extraction  # noqa: E402
from pipeline.extraction.inputs import load_split  # noqa: E402
from pipeline.models.load import load_model  # noqa: E402
from pipeline.store.codecs import make_compressors, quiet_codecs  # noqa: E402
from pipeline.store.encoding import decode_logprobs, encode_logprobs  # noqa: E402
from pipeline.store.reader import KVStore  # noqa: E402


def _time_extractions(args, base: list[str], workdir: Path) -> dict:
    """Interleaved extractions of the same samples, with and without `logits` (medians of loop seconds)."""
    with_logits = [*base, "extract.components=[q,k,v,logits]"]
    without = [*base, "extract.components=[q,k,v]"]
    times = {"with": [], "without": []}
    summary = None
    for r in range(args.repeats):
        for name, ov in (("without", without), ("with", with_logits)):
            store = workdir / f"{name}{r}.zarr"
            s = run_extraction(load_config(KVMapConfig, args.config, [*ov, f"extract.store={store}"]))
            times[name].append(s["extract_loop_s_last_run"])
            summary = s if name == "with" else summary
            if r < args.repeats - 1:
                shutil.rmtree(store)
            print(f"repeat {r} {name} logits: {times[name][-1]:.2f} s", flush=True)
    return {"times": times, "summary": summary, "store": workdir / f"with{args.repeats - 1}.zarr"}


def _codec_table(store: KVStore, workdir: Path) -> list[dict]:
    """Re-encode the stored logits arrays with candidate codecs: B/token, ratio, write / read MB/s."""
    from zarr.codecs.numcodecs import Delta, Shuffle

    vals, idx = (np.asarray(store.logit_array(n)[:]) for n in ("values", "indices"))
    n = vals.shape[0]
    z = zarr.codecs.ZstdCodec
    cands = [
        ("values", vals, "delta + blosc-zstd (default)", [Delta(dtype="u2")], make_compressors("blosc-zstd")),
        ("values", vals, "delta + shuffle + zstd", [Delta(dtype="u2")], [Shuffle(elementsize=2), z(level=1)]),
        ("values", vals, "blosc-zstd (v3 spec only)", [], make_compressors("blosc-zstd")),
        ("values", vals, "blosc-zstd-bit (v3 spec only)", [], make_compressors("blosc-zstd-bit")),
        ("values", vals, "shuffle + zstd", [], [Shuffle(elementsize=2), z(level=1)]),
        ("values", vals, "zstd", [], [z(level=1)]),
        ("indices", idx, "zstd (default)", [], [z(level=1)]),
        ("indices", idx, "shuffle + zstd", [], [Shuffle(elementsize=idx.itemsize), z(level=1)]),
    ]  # fmt: skip
    rows = []
    for i, (array, data, name, filters, comps) in enumerate(cands):
        path = workdir / f"codec{i}.zarr"
        with quiet_codecs():
            a = zarr.create_array(str(path), shape=data.shape, dtype=data.dtype, chunks=(256, data.shape[1]),
                                  filters=filters, compressors=comps)  # fmt: skip
            t0 = time.perf_counter()
            a[:] = data
            w = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = a[:]
            r = time.perf_counter() - t0
        assert np.array_equal(back, data)
        stored = sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != "zarr.json")
        rows.append({"array": array, "codec": name, "bytes_per_token": stored / n, "ratio": data.nbytes / stored,
                     "write_MBps": data.nbytes / w / 1e6, "read_MBps": data.nbytes / r / 1e6})  # fmt: skip
    return rows


@torch.no_grad()
def _fidelity(cfg, k: int, samples: int) -> dict:
    """Mean per-token KL(full || top-k reconstruction) under each tail rule on held-out samples."""
    model, tok = load_model(cfg.teacher)
    packed, _ = load_split(cfg, "eval", tok)
    kl_bucket, kl_support, missing, n = 0.0, 0.0, 0.0, 0
    for i in range(min(samples, len(packed.lengths))):
        a, b = int(packed.offsets[i]), int(packed.offsets[i] + packed.lengths[i])
        ids = torch.from_numpy(packed.input_ids[a:b].astype(np.int64))[None]
        lp = torch.log_softmax(model(ids, use_cache=False).logits[0].double(), -1)  # (T, V)
        vals, idx = lp.topk(k, -1)
        stored = decode_logprobs(encode_logprobs(vals)).double()  # (T, K) as the store keeps them
        p_top, s_top = vals.exp(), stored.exp()
        rest = (1 - s_top.sum(-1, keepdim=True)).clamp_min(1e-12) / (
            lp.shape[1] - k
        )  # (T, 1) per other token
        recon = torch.full_like(lp, 0.0) + rest.log()
        recon.scatter_(1, idx, stored)
        recon = recon - torch.logsumexp(recon, -1, keepdim=True)
        kl_bucket += float((lp.exp() * (lp - recon)).sum())
        p_r = torch.log_softmax(vals, -1)
        s_r = torch.log_softmax(stored, -1)
        kl_support += float((p_r.exp() * (p_r - s_r)).sum())
        missing += float((1 - p_top.sum(-1)).sum())
        n += lp.shape[0]
    remove_staging(cfg.extract.store, cfg.extract.storage_options)  # load_split's staged tokens
    return {
        "tokens": n,
        "kl_bucket": kl_bucket / n,
        "kl_topk_support": kl_support / n,
        "missing_mass": missing / n,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--samples", type=int, default=96, help="train samples extracted per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--fidelity_samples", type=int, default=64)
    p.add_argument("overrides", nargs="*", help="dotted config overrides")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_logits_"))
    base = [f"data.max_train_samples={args.samples}", "data.eval_path=null", *args.overrides]
    cfg = load_config(KVMapConfig, args.config, list(args.overrides))
    generate_default_data(cfg)
    t = _time_extractions(args, base, workdir)
    store = KVStore(t["store"])
    s = t["summary"]
    with_s, without_s = statistics.median(t["times"]["with"]), statistics.median(t["times"]["without"])
    result = {
        "top_k": store.logits["top_k"],
        "tokens": s["tokens"],
        "logits_bytes_per_token": s["logits_bytes_per_token"],
        "topk_mass_mean": s["topk_mass_mean"],
        "throughput_ratio_with_over_without": without_s / with_s,
        "extract_s": t["times"],
        "codecs": _codec_table(store, workdir),
        "fidelity": _fidelity(cfg, store.logits["top_k"], args.fidelity_samples),
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    f = result["fidelity"]
    print(
        f"\ntop-{result['top_k']} log-probs: {result['logits_bytes_per_token']:.0f} stored B/token (bar <= 450), "
        f"mean captured mass {result['topk_mass_mean']:.4f}\nextraction throughput with / without logits: "
        f"{result['throughput_ratio_with_over_without']:.3f} (bar >= 0.95) [medians of {args.repeats}; load "
        f"{result['load_avg_1min_at_end']:.1f}]\nfidelity on {f['tokens']} held-out tokens: bucket KL(full || "
        f"top-k + uniform rest) {f['kl_bucket']:.5f}; renormalize: infinite (missing mass {f['missing_mass']:.4f}"
        f"), KL on the top-k support {f['kl_topk_support']:.2e} (float16 rounding)"
    )
    print(f"{'array':>8} {'codec':>34} {'B/token':>8} {'ratio':>6} {'write MB/s':>10} {'read MB/s':>9}")
    for r in result["codecs"]:
        print(f"{r['array']:>8} {r['codec']:>34} {r['bytes_per_token']:>8.1f} {r['ratio']:>6.2f} "
              f"{r['write_MBps']:>10.0f} {r['read_MBps']:>9.0f}")  # fmt: skip
    print("JSON " + json.dumps(result, default=str))
    shutil.rmtree(workdir)
    ok = result["logits_bytes_per_token"] <= 450 and result["throughput_ratio_with_over_without"] >= 0.95
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
