"""Extraction throughput vs teacher-forward-only, stored bytes vs raw 16-bit, and codec ratios, in one run.

    python benchmarks/bench_extract.py --config configs/default.yaml [--samples 192] [--repeats 3] [key=value ...]

Bars (issue 3): extraction >= 0.85x the forward-only throughput on the same batches (capture, encoding,
compression and writing overlapped with compute), and with the default lossless codec stored state bytes
<= 0.75x the raw 16-bit bytes of the real tokens. Timings are medians over `--repeats` interleaved runs
(the machine may be shared). Forward-only runs the very batches extraction runs (the same chunk-determined,
length-sorted, right-padded batches, including samples forwarded twice because they straddle a chunk
boundary) through the plain model (sdpa, no capture) and computes logits, as extraction does.
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

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from pipeline.config import KVMapConfig  # noqa: E402
from pipeline.configlib import load_config  # noqa: E402
from pipeline.extract import generate_default_data, load_split, resolve_layers, run_extraction  # noqa: E402
from pipeline.extract_chunk import chunk_batches, pad_batch  # noqa: E402
from pipeline.models import load_model, model_geometry  # noqa: E402
from pipeline.store import CODECS, KVStore, make_compressors, quiet_codecs  # noqa: E402


def forward_only(model, packed, chunk_tokens: int, batch_size: int, pad_id: int):
    """Run every extraction batch through the plain model: (wall s, CPU s, real tokens, padded tokens)."""
    n = packed.num_tokens
    real = padded = 0
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for start in range(0, n, chunk_tokens):
            for batch in chunk_batches(packed, start, min(start + chunk_tokens, n), batch_size):
                ids, seg, _ = pad_batch(packed, batch, pad_id)
                _ = model(input_ids=ids, attention_mask=(seg >= 0).long(), use_cache=False).logits
                real += int((seg >= 0).sum())
                padded += ids.numel()
    return time.perf_counter() - t0, time.process_time() - c0, real, padded


def _encode_once(codec: str, arrays, data: dict, workdir: Path, level: int) -> tuple[int, float, float]:
    """Write every array with `codec` into a fresh store: (stored bytes, write s, read s)."""
    root = workdir / f"codec_{codec}.zarr"
    with quiet_codecs():
        g = zarr.open_group(str(root), mode="w", zarr_format=3)
        made = {
            name: g.create_array(
                name.replace("/", "_"),
                shape=a.shape,
                dtype=a.dtype,
                chunks=a.chunks,
                shards=a.shards,
                compressors=make_compressors(codec, level, a.dtype.itemsize),
                fill_value=0,
            )
            for name, a in arrays
        }
    t0 = time.perf_counter()
    for name, dst in made.items():
        dst[:] = data[name]
    write_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for name, dst in made.items():
        assert np.array_equal(dst[:], data[name]), f"{codec}: round trip differs on {name}"
    read_s = time.perf_counter() - t0
    stored = sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "zarr.json")
    shutil.rmtree(root)
    return stored, write_s, read_s


def codec_table(store: KVStore, workdir: Path, level: int, repeats: int = 3) -> list[dict]:
    """Re-encode the extracted state arrays with each codec: ratio vs raw, write and read MB/s (medians of
    `repeats` rounds, codecs interleaved within a round so that load swings hit them alike)."""
    arrays = [(f"{layer}/{c}", store.array(layer, c)) for layer in store.layers for c in store.components]
    data = {name: np.asarray(a[:]) for name, a in arrays}
    raw = sum(d.nbytes for d in data.values())
    runs = {codec: [] for codec in CODECS}
    for _ in range(repeats):
        for codec in CODECS:
            runs[codec].append(_encode_once(codec, arrays, data, workdir, level))
    rows = []
    for codec, got in runs.items():
        stored = got[0][0]
        write_s = statistics.median(g[1] for g in got)
        read_s = statistics.median(g[2] for g in got)
        rows.append(
            {
                "codec": codec,
                "ratio": raw / stored,
                "stored_over_raw": stored / raw,
                "write_MBps": raw / write_s / 1e6,
                "read_MBps": raw / read_s / 1e6,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--samples", type=int, default=192, help="train samples to extract per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("overrides", nargs="*", help="dotted config overrides (extract.batch_size=16 ...)")
    args = p.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    base = [f"data.max_train_samples={args.samples}", "data.eval_path=null", *args.overrides]
    cfg = load_config(KVMapConfig, args.config, base)
    generate_default_data(cfg)
    model, tok = load_model(cfg.teacher)
    packed, _ = load_split(cfg, "train", tok)
    layers = resolve_layers(cfg, model_geometry(model.config)["layers"])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    ex = cfg.extract
    print(
        f"teacher {cfg.teacher.path}, {packed.num_tokens} tokens in {len(packed.lengths)} samples, layers "
        f"{layers}, batch {ex.batch_size}, chunk {ex.chunk_tokens}, dtype {ex.dtype}, codec {ex.codec}, "
        f"torch threads {torch.get_num_threads()}, writer threads {ex.writer_threads}",
        flush=True,
    )
    fwd_s, ext_s, fwd_cpu, ext_cpu, summary = [], [], [], [], None
    for r in range(args.repeats):
        s, cpu, real, padded = forward_only(model, packed, ex.chunk_tokens, ex.batch_size, pad_id)
        fwd_s.append(s)
        fwd_cpu.append(cpu)
        store = workdir / f"run{r}.zarr"
        summary = run_extraction(load_config(KVMapConfig, args.config, [*base, f"extract.store={store}"]))
        ext_s.append(summary["extract_loop_s_last_run"])
        ext_cpu.append(summary["extract_loop_cpu_s_last_run"])
        print(
            f"repeat {r}: forward-only {fwd_s[-1]:.2f} s ({fwd_cpu[-1]:.2f} CPU s), extraction {ext_s[-1]:.2f} s "
            f"({ext_cpu[-1]:.2f} CPU s, writer threads included)",
            flush=True,
        )
        if r < args.repeats - 1:
            shutil.rmtree(store)
    n = packed.num_tokens
    fwd, ext = statistics.median(fwd_s), statistics.median(ext_s)
    geo = model_geometry(model.config)
    raw_fp16 = (
        n
        * len(layers)
        * geo["head_dim"]
        * 2
        * (
            ("q" in ex.components) * geo["heads"]
            + (("k" in ex.components) + ("v" in ex.components)) * geo["kv_heads"]
        )
    )
    stored = summary["stored_state_bytes"]
    result = {
        "tokens": n,
        "forward_tokens": summary["forward_tokens"],
        "padding_fraction": 1 - real / padded,
        "forward_only_tok_s": n / fwd,
        "extraction_tok_s": n / ext,
        "throughput_ratio": fwd / ext,
        # CPU seconds are less sensitive to other load on a shared machine; extraction's include the writers
        "cpu_ratio": statistics.median(fwd_cpu) / statistics.median(ext_cpu),
        "stored_bytes_per_token": stored / n,
        "raw_fp16_bytes_per_token": raw_fp16 / n,
        "stored_over_raw_fp16": stored / raw_fp16,
        "codecs": codec_table(
            KVStore(workdir / f"run{args.repeats - 1}.zarr"), workdir, ex.compression_level
        ),
        "forward_s": fwd_s,
        "extract_s": ext_s,
        "forward_cpu_s": fwd_cpu,
        "extract_cpu_s": ext_cpu,
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    print(
        f"\nextraction {result['extraction_tok_s']:.0f} tok/s vs forward-only {result['forward_only_tok_s']:.0f} "
        f"tok/s: ratio {result['throughput_ratio']:.3f} (bar >= 0.85) [medians of {args.repeats}]; CPU-time "
        f"ratio {result['cpu_ratio']:.3f}; load average {result['load_avg_1min_at_end']:.1f}\n"
        f"stored {result['stored_bytes_per_token']:.0f} B/token vs raw fp16 {result['raw_fp16_bytes_per_token']:.0f}"
        f" B/token: {result['stored_over_raw_fp16']:.3f}x (bar <= 0.75)\n"
        f"forwarded tokens {result['forward_tokens']} for {n} stored (chunk-boundary samples run twice); "
        f"padding {100 * result['padding_fraction']:.1f}% of batch tokens"
    )
    print(f"{'codec':>13} {'ratio':>7} {'stored/raw':>10} {'write MB/s':>11} {'read MB/s':>10}")
    for row in result["codecs"]:
        print(
            f"{row['codec']:>13} {row['ratio']:>7.3f} {row['stored_over_raw']:>10.3f} {row['write_MBps']:>11.0f} "
            f"{row['read_MBps']:>10.0f}"
        )
    print("JSON " + json.dumps(result))
    shutil.rmtree(workdir)
    ok = result["throughput_ratio"] >= 0.85 and result["stored_over_raw_fp16"] <= 0.75
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
