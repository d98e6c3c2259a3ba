"""Inspect a kvmap store: schema, sizes (stored vs raw bytes) and per-layer statistics of the teacher states.

    kvmap-inspect stores/default.zarr [--max-tokens N] [--json] [--check]

Shape glossary: N packed tokens of the train split, X heads of a component (H for q, G for k/v), D head dim.
Statistics stream the arrays shard by shard (float64 accumulators), so memory stays at one shard;
`--max-tokens` limits them to the first N tokens of the packed axis for a quick look at a large store.
Exit status: 0 when the statistics saw only finite states, 1 when they counted NaN/inf (the count is
printed) or `--check` (every chunk of every array read back: files, checksums, finiteness;
pipeline/store/verify.py) found a bad chunk (one line naming the array and chunk), 2 for a missing or
unreadable store.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from pipeline.cli import CommandFailed, command_parser, run_command
from pipeline.data.trained_tokens import segment_token_counts
from pipeline.store.encoding import decode_logprobs
from pipeline.store.reader import KVStore
from pipeline.store.schema import SAMPLE_ARRAYS, TOKEN_ARRAYS
from pipeline.store.verify import verify_store


def component_stats(store: KVStore, layer: int, comp: str, max_tokens: int | None = None) -> dict:
    """mean / std / absmax / NaN and inf counts of one stored (layer, component) array, as float32 values."""
    arr = store.array(layer, comp)
    n = arr.shape[0] if max_tokens is None else min(arr.shape[0], max_tokens)
    step = int(store.attrs.get("chunk_tokens", 4096))
    total = s1 = s2 = 0.0
    absmax, nans, infs = 0.0, 0, 0
    for a in range(0, n, step):
        x = store.read_states(layer, comp, a, min(a + step, n)).double()  # (n_chunk, X, D), int8 dequantised
        nan, inf = x.isnan(), x.isinf()
        nans, infs = nans + int(nan.sum()), infs + int(inf.sum())
        x = x[~(nan | inf)]
        total += x.numel()
        s1 += float(x.sum())
        s2 += float((x * x).sum())
        if x.numel():
            absmax = max(absmax, float(x.abs().max()))
    mean = s1 / total if total else float("nan")
    var = max(s2 / total - mean * mean, 0.0) if total else float("nan")
    return {
        "tokens": n,
        "mean": mean,
        "std": var**0.5,
        "absmax": absmax,
        "nan": nans,
        "inf": infs,
        "stored_bytes": store.location.size(f"train/layers/{layer}/{comp}"),
        "raw_bytes": int(arr.nbytes),
    }


def logits_report(store: KVStore, max_tokens: int | None = None) -> dict | None:
    """Per split: shape, dtypes, stored bytes per token and the mean captured mass sum(p_topk) of the
    teacher's top-k log-probs (streamed shard by shard); None for a store without logits."""
    if store.logits is None:
        return None
    out = {"top_k": store.logits["top_k"], "splits": {}}
    for split in store.logits["splits"]:
        vals, idx = store.logit_array("values", split), store.logit_array("indices", split)
        n = vals.shape[0] if max_tokens is None else min(vals.shape[0], max_tokens)
        step = int(store.attrs.get("chunk_tokens", 4096))
        mass = 0.0
        for a in range(0, n, step):
            mass += float(decode_logprobs(vals[a : min(a + step, n)]).double().exp().sum())
        stored = store.location.size(f"{split}/logits")
        out["splits"][split] = {
            "shape": list(vals.shape),
            "values_dtype": "float16 words (uint16)",
            "indices_dtype": str(idx.dtype),
            "stored_bytes": stored,
            "stored_bytes_per_token": stored / max(vals.shape[0], 1),
            "mean_topk_mass": mass / max(n, 1),
        }
    return out


def inspect_store(path: str | Path, max_tokens: int | None = None) -> dict:
    """Everything the report prints, as a dict (schema, per-split sizes, per-array bytes, per-layer stats)."""
    store = KVStore(path)
    report = {
        "path": str(store.path),
        "fingerprint": store.fingerprint,
        "attrs": store.attrs,
        "splits": {},
        "stats": {},
    }
    for split in store.splits:
        arrays = {}
        for name in (*TOKEN_ARRAYS, *SAMPLE_ARRAYS):
            a = store.token_array(name, split)
            arrays[name] = {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks)}
        lengths = store.lengths(split)
        report["splits"][split] = {
            "samples": int(len(lengths)),
            "tokens": store.num_tokens(split),
            "length_min_mean_max": [int(lengths.min()), float(lengths.mean()), int(lengths.max())]
            if len(lengths)
            else None,
            "segment_tokens": segment_token_counts(store.token_array("segment_ids", split)[:]),
            "arrays": arrays,
            "stored_bytes": store.location.size(split),
        }
    total_stored = total_raw = 0
    for layer in store.layers:
        for comp in store.components:
            s = component_stats(store, layer, comp, max_tokens)
            a = store.array(layer, comp)
            s.update(shape=list(a.shape), chunks=list(a.chunks), shards=list(a.shards or a.chunks))
            report["stats"][f"{layer}/{comp}"] = s
            total_stored += s["stored_bytes"]
            total_raw += s["raw_bytes"]
    n = max(store.num_tokens("train"), 1)
    report["logits"] = logits_report(store, max_tokens)
    report["sizes"] = {
        "store_bytes": store.stored_bytes(),
        "state_stored_bytes": total_stored,
        "state_raw_bytes": total_raw,
        "compression_ratio": total_raw / max(total_stored, 1),
        "stored_bytes_per_token": total_stored / n,
        "raw_bytes_per_token": total_raw / n,
    }
    return report


def format_report(r: dict) -> str:
    """The human-readable `kvmap-inspect` report of an `inspect_store` result."""
    a = r["attrs"]
    t = a.get("teacher", {})
    lines = [
        f"kvmap store {r['path']}  schema v{a.get('schema_version')}  complete={a.get('complete')}  "
        f"fingerprint={r['fingerprint']}",
        f"teacher {t.get('path')} ({t.get('model_type')}, config {t.get('config_hash')}): {t.get('num_layers')} "
        f"layers, H={t.get('num_heads')} G={t.get('num_kv_heads')} D={t.get('head_dim')}, rope {t.get('rope')}",
        f"tokenizer {a.get('tokenizer')}",
        f"stored layers {a.get('layers')} components {a.get('components')} dtype {a.get('dtype')} "
        f"(as {a.get('storage_dtype')}) codec {a.get('codec')}/{a.get('compression_level')} "
        f"chunk {a.get('chunk_tokens')} tokens (read chunk {a.get('inner_chunk_tokens')})",
        f"dataset {json.dumps(a.get('dataset'))}",
    ]
    for split, s in r["splits"].items():
        lines.append(
            f"[{split}] {s['samples']} samples, {s['tokens']} tokens, lengths min/mean/max "
            f"{s['length_min_mean_max']}, {s['stored_bytes'] / 1e6:.2f} MB on disk; tokens per segment "
            + ", ".join(f"{k} {n}" for k, n in s["segment_tokens"].items())
        )
    z = r["sizes"]
    lines.append(
        f"states: {z['state_stored_bytes'] / 1e6:.2f} MB stored vs {z['state_raw_bytes'] / 1e6:.2f} MB raw "
        f"(ratio {z['compression_ratio']:.3f}x; {z['stored_bytes_per_token']:.0f} vs "
        f"{z['raw_bytes_per_token']:.0f} B/token); whole store {z['store_bytes'] / 1e6:.2f} MB"
    )
    lines.append(
        f"{'layer/comp':>10} {'shape':>18} {'mean':>10} {'std':>10} {'absmax':>10} {'nan':>5} {'inf':>5} {'ratio':>6}"
    )
    for key, s in r["stats"].items():
        ratio = s["raw_bytes"] / max(s["stored_bytes"], 1)
        lines.append(
            f"{key:>10} {str(tuple(s['shape'])):>18} {s['mean']:>10.4f} {s['std']:>10.4f} {s['absmax']:>10.3f} "
            f"{s['nan']:>5d} {s['inf']:>5d} {ratio:>6.3f}"
        )
    if r.get("logits"):
        for split, s in r["logits"]["splits"].items():
            lines.append(
                f"logits [{split}] top-{r['logits']['top_k']} log-probs {tuple(s['shape'])}, ids "
                f"{s['indices_dtype']}: {s['stored_bytes'] / 1e6:.2f} MB ({s['stored_bytes_per_token']:.0f} "
                f"B/token), mean captured probability mass sum(p_topk) {s['mean_topk_mass']:.4f}"
            )
    if "summary" in a:
        lines.append(f"extraction summary: {json.dumps(a['summary'], default=str)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`kvmap-inspect`: see the module docstring (its exit statuses too)."""
    p = command_parser(
        "kvmap-inspect",
        __doc__,
        examples=[
            "kvmap-inspect stores/default.zarr",
            "kvmap-inspect stores/default.zarr --json --max-tokens 4096",
        ],
        config=False,
    )
    p.add_argument("store", help="store folder (*.zarr)")
    p.add_argument("--max-tokens", type=int, default=None, help="statistics over the first N tokens only")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument(
        "--check",
        action="store_true",
        help="also read every chunk of every array (files, checksums, finite values); exit 1 at the first bad one",
    )
    args = p.parse_args(argv)
    return run_command("inspect", lambda: _inspect(args))


def _inspect(args) -> int:
    """The command's body: a missing or unreadable store is a usage error (exit 2, from KVStore), a bad
    chunk or non-finite statistics a failure (CommandFailed, exit 1)."""
    store = KVStore(args.store)
    if args.check:
        _check(store)
    try:
        r = inspect_store(args.store, args.max_tokens)
    except ValueError as e:  # a damaged chunk (pipeline/store/chunk_read.py names it)
        raise CommandFailed(str(e)) from e
    print(
        json.dumps(r, indent=1, default=lambda o: o.tolist() if isinstance(o, np.ndarray) else str(o))
        if args.json
        else format_report(r)
    )
    bad = non_finite_counts(r)
    if bad:
        raise CommandFailed(non_finite_message(r, bad))
    return 0


def non_finite_counts(r: dict) -> dict[str, int]:
    """{layer/comp: NaN + inf count} of the arrays whose statistics saw non-finite values."""
    return {k: s["nan"] + s["inf"] for k, s in r["stats"].items() if s["nan"] + s["inf"]}


def non_finite_message(r: dict, bad: dict[str, int]) -> str:
    """The one error line for NaN/inf counted by the statistics: how many, where first, what to run next."""
    first = next(iter(bad))
    return (
        f"store '{r['path']}': {sum(bad.values())} non-finite teacher-state values in {len(bad)} array(s), "
        f"first layer/component {first} ({bad[first]}), over the tokens the statistics read: run "
        "kvmap-inspect --check to name the chunk, then re-extract"
    )


def _check(store: KVStore) -> None:
    """`--check`: every chunk of every array; CommandFailed (exit 1, one line) at the first bad one."""
    try:
        n = verify_store(store)
    except ValueError as e:
        raise CommandFailed(str(e)) from e
    print(f"check: all {n} chunks of every array read back: files present, checksums and values finite")


if __name__ == "__main__":
    sys.exit(main())
