"""Extraction throughput vs teacher-forward-only, stored bytes vs raw 16-bit, and codec ratios, in one run.

    python benchmarks/bench_extract.py --config configs/default.yaml [--samples 192] [--repeats 3] [key=value ...]
    python benchmarks/bench_extract.py --int8 [--samples 48] [--repeats 3] [--kl_samples 16] [--out DIR]

--int8: the same extraction as bf16 and as int8, interleaved `--repeats` times: int8 stored bytes /
bf16 stored bytes (bar <= 0.55), cosine and mean attention KL of the dequantised int8 states vs the bf16
states of the same tokens (bar: cos >= 0.9999, KL <= 1e-3; benchmarks/int8_fidelity.py), extraction
throughput int8 / bf16 (medians; bar >= 0.95), and both int8 schemes on every component (how the stored
schemes were chosen). `--out DIR` keeps the two stores (DIR/bf16.zarr, DIR/int8.zarr) for bench_train.py.

Bars (extraction cost): extraction >= 0.85x the forward-only throughput on the same batches (capture, encoding,
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

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # the sibling int8_fidelity.py by its own name (--int8)
    sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from pipeline.config.configlib import load_config  # noqa: E402
from pipeline.config.kvmap import KVMapConfig  # noqa: E402
from pipeline.data.default_data import generate_default_data  # noqa: E402
from pipeline.data.split_shards import remove_staging  # noqa: E402
from pipeline.extract import resolve_layers, run_extraction  # noqa: E402
from pipeline.extraction.chunk import chunk_batches, pad_batch  # noqa: E402
from pipeline.extraction.inputs import load_split  # noqa: E402
from pipeline.models.load import load_model, model_geometry, pad_token_id  # noqa: E402
from pipeline.store.codecs import CODECS, make_compressors, quiet_codecs  # noqa: E402
from pipeline.store.reader import KVStore  # noqa: E402


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


def int8_fidelity(bf16: KVStore, int8: KVStore, num_samples: int) -> dict:
    """Mean per-sample fidelity of the int8 store's dequantised states vs the bf16 store's (same tokens)."""
    from int8_fidelity import sample_metrics  # the sibling module (HERE on sys.path)

    rows = []
    for i in range(min(num_samples, bf16.num_samples())):
        rows.append(
            sample_metrics(bf16.read_sample(i), int8.read_sample(i), int(bf16.attrs["teacher"]["head_dim"]))
        )
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]} | {"samples": len(rows)}


def run_int8(args, base: list[str]) -> int:
    """bf16 vs int8 extraction of the same samples: bytes, fidelity, throughput (see the module docstring)."""
    from int8_fidelity import levels_table, scheme_table  # the sibling module (HERE on sys.path)

    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench_int8_"))
    out.mkdir(parents=True, exist_ok=True)
    loop_s = {"bfloat16": [], "int8": []}
    summaries = {}
    for r in range(args.repeats):
        for dtype in list(loop_s)[:: 1 if r % 2 == 0 else -1]:  # interleaved, alternating which goes first
            store = out / ("bf16.zarr" if dtype == "bfloat16" else "int8.zarr")
            shutil.rmtree(store, ignore_errors=True)
            over = [*base, f"extract.store={store}", f"extract.dtype={dtype}"]
            summaries[dtype] = run_extraction(load_config(KVMapConfig, args.config, over))
            loop_s[dtype].append(summaries[dtype]["extract_loop_s_last_run"])
            print(f"repeat {r} {dtype}: extraction loop {loop_s[dtype][-1]:.2f} s", flush=True)
    bf, q8 = KVStore(out / "bf16.zarr"), KVStore(out / "int8.zarr")
    fid = int8_fidelity(bf, q8, args.kl_samples)
    layers = bf.layers[:: max(1, len(bf.layers) // 2)]  # two layers for the scheme table (time)
    states = {c: torch.cat([bf.read_states(layer, c, 0, bf.num_tokens()) for layer in layers]).numpy()
              for c in ("q", "k", "v")}  # fmt: skip
    res = {
        "tokens": bf.num_tokens(),
        "bytes_ratio": summaries["int8"]["stored_state_bytes"] / summaries["bfloat16"]["stored_state_bytes"],
        "int8_bytes_per_token": summaries["int8"]["bytes_per_token"],
        "bf16_bytes_per_token": summaries["bfloat16"]["bytes_per_token"],
        "throughput_ratio": statistics.median(loop_s["bfloat16"]) / statistics.median(loop_s["int8"]),
        "loop_s": loop_s,
        "fidelity": fid,
        "schemes": scheme_table(states, int(bf.attrs["chunk_tokens"])),
        "levels": levels_table(bf, args.kl_samples),
        "load_avg_1min_at_end": os.getloadavg()[0],
    }
    print(f"\n{res['tokens']} tokens, layers {bf.layers}, OMP/torch threads {torch.get_num_threads()}, "
          f"load average {res['load_avg_1min_at_end']:.1f}")  # fmt: skip
    print(f"{'scheme table (layers ' + str(layers) + ')':<34} {'rel RMS':>8} {'cos':>10} {'bytes/bf16':>10}")
    for row in res["schemes"]:
        print(f"  {row['component']} {row['scheme']:<29} {row['rel_rms']:>8.4f} {row['cos']:>10.7f} "
              f"{row['bytes_over_bf16']:>10.3f}")  # fmt: skip
    print(f"{'fewer levels (first chunk, all layers)':<40} {'bytes/bf16':>10} {'min cos':>10} {'attn KL':>9}")
    for row in res["levels"]:
        print(
            f"  qmax {row['qmax']:<33} {row['bytes_over_bf16']:>10.3f} {row['min_cos']:>10.7f} {row['kl']:>9.2e}"
        )
    bars = [
        ("int8 / bf16 stored state bytes", res["bytes_ratio"], "<=", 0.55),
        ("cosine q (dequantised vs bf16)", fid["cos_q"], ">=", 0.9999),
        ("cosine k", fid["cos_k"], ">=", 0.9999),
        ("cosine v", fid["cos_v"], ">=", 0.9999),
        ("mean attention KL", fid["kl"], "<=", 1e-3),
        ("attention-output cosine (report)", fid["out_cos"], ">=", 0.0),
        (
            f"extraction throughput int8 / bf16 (median of {args.repeats})",
            res["throughput_ratio"],
            ">=",
            0.95,
        ),
    ]
    ok = True
    for name, value, op, bar in bars:
        good = value <= bar if op == "<=" else value >= bar
        ok &= good
        print(f"  {name:<58} {value:10.6g}  (bar {op} {bar})  {'PASS' if good else 'MISS'}")
    print("JSON " + json.dumps(res))
    if not args.out:
        shutil.rmtree(out)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--samples", type=int, default=192, help="train samples to extract per run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--int8", action="store_true", help="int8 vs bf16 (see the module docstring)")
    p.add_argument("--kl_samples", type=int, default=16, help="--int8: samples for cosine / attention KL")
    p.add_argument("--out", default=None, help="--int8: keep the two stores in this folder")
    p.add_argument("overrides", nargs="*", help="dotted config overrides (extract.batch_size=16 ...)")
    args = p.parse_args(argv)
    base = [f"data.max_train_samples={args.samples}", "data.eval_path=null", *args.overrides]
    if args.int8:
        return run_int8(args, base)
    workdir = Path(tempfile.mkdtemp(prefix="bench_extract_"))
    cfg = load_config(KVMapConfig, args.config, base)
    generate_default_data(cfg)
    model, tok = load_model(cfg.teacher)
    packed, _ = load_split(cfg, "train", tok)
    layers = resolve_layers(cfg, model_geometry(model.config)["layers"])
    pad_id = pad_token_id(tok)
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
    remove_staging(cfg.extract.store, cfg.extract.storage_options)  # load_split's staged tokens
    ok = result["throughput_ratio"] >= 0.85 and result["stored_over_raw_fp16"] <= 0.75
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
