"""Plan a stage-1 run before it starts: the bytes the store will hold and the hours the loop will take.

Shape glossary: N train tokens, E held-out tokens, L stored layers, H query heads, G KV heads, D head dim,
K stored top-k log-probs, C write chunks of the train split.

How the estimate is made (why it holds for a real store):
- Raw bytes per token come from the geometry alone (`raw_bytes_per_token`: L x heads x D x bytes of the
  storage dtype per state component; K x 2 + K x index bytes for the top-k log-probs).
- The codec ratio is MEASURED, never assumed: `probe_first_chunk` runs the teacher on write chunk 0 (the
  same batches, capture and encoding as the extraction loop: `extract_writer_chunk`), writes it with
  `StoreWriter` into an in-memory store created with the store's own attributes (same codecs, shards,
  int8 scales), and reads back the compressed size of every array. Bytes per token of chunk 0 x the
  dataset's tokens = the estimate per component; the zarr metadata objects are measured the same way.
- The time is the probe's own: tokens of chunk 0 / seconds of its forward (or of its write, spread over the
  writer threads, if that is slower: the loop overlaps the two), over all forwarded tokens and processes.
The first chunk's forward includes warm-up (first kernels, caches), so the time errs on the long side.
"""

from __future__ import annotations

import time
import uuid
from contextlib import nullcontext

import numpy as np
import torch

from pipeline.extraction.chunk import extract_writer_chunk
from pipeline.extraction.plan_report import free_space, needed_bytes
from pipeline.models.capture import capture_qkv
from pipeline.store.int8 import INT8_SCHEMES
from pipeline.store.location import StoreLocation
from pipeline.store.packed_split import PackedSplit
from pipeline.store.schema import (
    SAMPLE_ARRAYS,
    STORAGE_DTYPES,
    TEXT_ARRAYS,
    TOKEN_ARRAYS,
    held_heads,
    scale_key,
)
from pipeline.store.writer import StoreWriter

# The `summary` attribute a finished store adds to its root metadata (measured: 2.5-3.5 KB with and
# without logits / eval); it does not exist when the probe writes chunk 0.
SUMMARY_BYTES = 3000
TOKEN_BYTES = sum(
    np.dtype(d).itemsize for d in TOKEN_ARRAYS.values()
)  # input_ids + segment_ids + answer_mask
SAMPLE_BYTES = sum(np.dtype(d).itemsize for d in SAMPLE_ARRAYS.values())  # offsets + lengths + rows


def state_shapes(geo: dict) -> dict[str, tuple[int, int]]:
    """Per state component the (heads, head_dim) of one token, from `model_geometry`."""
    kv = (geo["kv_heads"], geo["head_dim"])
    return {"q": (geo["heads"], geo["head_dim"]), "k": kv, "v": kv}


def raw_bytes_per_token(
    geo: dict,
    num_layers: int,
    components: list[str],
    dtype: str,
    top_k: int = 0,
    index_dtype: str = "uint16",
    chunk_tokens: int = 4096,
    held: dict[str, int] | None = None,
) -> dict[str, float]:
    """Uncompressed bytes per token of every stored component, from the geometry alone (pure).

    Args:
        geo: `model_geometry` of the teacher (heads, kv_heads, head_dim).
        components: the state components (subset of q, k, v); top_k > 0 adds logits_values / logits_indices.
        dtype: "bfloat16" | "float16" | "int8" (int8 adds {comp}_scale: float32 per (chunk, head, channel)).
        held: per component the heads stored over all layers (a head-subset store, `held_head_counts`);
            None = num_layers x the geometry's heads.
    Example:
        raw_bytes_per_token({"heads": 28, "kv_heads": 4, "head_dim": 128}, 8, ["q", "k", "v"], "bfloat16")
        # -> {"q": 57344, "k": 8192, "v": 8192}
    """
    word = np.dtype(STORAGE_DTYPES[dtype]).itemsize
    shapes = state_shapes(geo)
    out: dict[str, float] = {}
    count = {c: held[c] if held is not None else num_layers * shapes[c][0] for c in components}
    for comp in components:
        out[comp] = count[comp] * shapes[comp][1] * word
    if dtype == "int8":
        for comp in components:
            dim = shapes[comp][1]
            per_chunk = INT8_SCHEMES[comp] == "channel"
            out[scale_key(comp)] = count[comp] * (dim / chunk_tokens if per_chunk else 1) * 4
    if top_k:
        out["logits_values"] = top_k * 2  # float16 words
        out["logits_indices"] = top_k * np.dtype(index_dtype).itemsize
    return out


def held_head_counts(attrs: dict, geo: dict) -> dict[str, int]:
    """Per stored component the heads its arrays hold over all stored layers (schema `held_heads`)."""
    totals = {c: x for c, (x, _) in state_shapes(geo).items()}
    return {
        c: sum(len(held_heads(attrs, lay, c, totals[c])) for lay in attrs["layers"])
        for c in attrs["components"]
    }


def head_split(packed: PackedSplit, end: int) -> PackedSplit:
    """The samples of `packed` overlapping tokens [0, end), whole: a split whose write chunk 0 (of `end`
    tokens) is the original's chunk 0, for the probe store."""
    hi = len(packed.samples_in(0, end))
    n = int(packed.offsets[hi - 1] + packed.lengths[hi - 1])
    return PackedSplit(
        input_ids=packed.input_ids[:n],
        segment_ids=packed.segment_ids[:n],
        answer_mask=packed.answer_mask[:n],
        offsets=packed.offsets[:hi],
        lengths=packed.lengths[:hi],
        rows=packed.rows[:hi],
        texts=packed.texts[:hi] if packed.texts is not None else None,
        char_spans=packed.char_spans[:n] if packed.char_spans is not None else None,
    )


def _raw_text_bytes(packed: PackedSplit) -> int:
    """Uncompressed bytes of a split's texts (UTF-8) and char spans; 0 when it keeps none."""
    if packed.texts is None:
        return 0
    return sum(len(t.encode()) for t in packed.texts) + packed.char_spans.nbytes


def _component_keys(writer: StoreWriter, texts: bool) -> dict[str, list[str]]:
    """Plan component -> the array paths (under the store root) that hold it."""
    keys: dict[str, list[str]] = {}
    for comp in writer.components:
        keys[comp] = [f"train/layers/{layer}/{comp}" for layer in writer.layers]
    for comp in writer.quantization:
        keys[scale_key(comp)] = [f"train/layers/{layer}/{scale_key(comp)}" for layer in writer.layers]
    if writer.logit_splits:
        keys["logits_values"], keys["logits_indices"] = ["train/logits/values"], ["train/logits/indices"]
    keys["tokens"] = [f"train/{name}" for name in (*TOKEN_ARRAYS, *SAMPLE_ARRAYS)]
    if texts:
        keys["texts"] = [f"train/{name}" for name in TEXT_ARRAYS]
    return keys


def _metadata_bytes(loc: StoreLocation, keys: dict[str, list[str]], eval_logits: bool, has_eval: bool) -> int:
    """zarr.json bytes of the finished store: the probe's own, plus the held-out group's (its token
    arrays, and its logits when stored: copies of the train ones), plus the end summary."""
    total = loc.size(skip_metadata=False) - loc.size()
    if has_eval:
        extra = ["train/zarr.json"] + [f"{k}/zarr.json" for k in keys["tokens"] + keys.get("texts", [])]
        if eval_logits:
            extra += [
                "train/logits/zarr.json",
                "train/logits/values/zarr.json",
                "train/logits/indices/zarr.json",
            ]
        total += sum(len(loc.read_bytes(k) or b"") for k in extra)
    return total + SUMMARY_BYTES


def _probe_attrs(attrs: dict) -> dict:
    """The store's attributes for the probe store: train logits only (it has no held-out split)."""
    out = dict(attrs)
    if attrs.get("logits"):
        out["logits"] = {**attrs["logits"], "splits": ["train"]}
    return out


def probe_first_chunk(cfg, model, train: PackedSplit, attrs: dict, shapes: dict, pad_id: int) -> dict:
    """Extract write chunk 0 and write it into an in-memory store made like the real one; measure.

    Returns {"tokens": chunk 0's tokens, "split_tokens": the probe split's tokens, "compute_s", "write_s",
    "stored": {component: compressed bytes of chunk 0}, "metadata": estimated zarr.json bytes of the
    finished store, "chunk": (bufs, stats) of chunk 0, exactly what the extraction loop would compute}.
    """
    end = min(cfg.extract.chunk_tokens, train.num_tokens)
    head = head_split(train, end)
    loc = StoreLocation(f"memory://kvmap-plan/{uuid.uuid4().hex}.zarr")
    try:
        writer = StoreWriter.create(
            loc,
            attrs=_probe_attrs(attrs),
            train=head,
            eval=None,
            state_shapes=shapes,
            chunk_tokens=cfg.extract.chunk_tokens,
            inner_chunk_tokens=cfg.extract.inner_chunk_tokens,
        )
        capture = capture_qkv(model, writer.layers, tuple(writer.components)) if writer.components else None
        t0 = time.perf_counter()
        with torch.inference_mode(), capture or nullcontext() as cap:
            bufs, stats = extract_writer_chunk(cfg, model, cap, writer, {"train": head}, 0, pad_id)
        t1 = time.perf_counter()
        writer.write_chunk(0, bufs, stats)
        t2 = time.perf_counter()
        keys = _component_keys(writer, head.texts is not None)
        stored = {name: sum(loc.size(k) for k in paths) for name, paths in keys.items()}
        logits = attrs.get("logits") or {}
        metadata = _metadata_bytes(loc, keys, "eval" in logits.get("splits", []), "eval" in attrs["dataset"])
    finally:
        loc.delete()
    return {
        "tokens": end,
        "split_tokens": head.num_tokens,
        "split_samples": len(head.lengths),
        "text_bytes": _raw_text_bytes(head),
        "compute_s": t1 - t0,
        "write_s": t2 - t1,
        "stored": stored,
        "metadata": metadata,
        "chunk": (bufs, stats),
    }


def _units(name: str, raw: dict, probe: dict, n: dict) -> tuple[int, int, float, int]:
    """(units in the store, units in the probe, raw bytes per unit, tokens it covers) of one component.

    A unit is a token, except for per-chunk int8 scales (one row per write chunk); `n` holds the counts
    train / forward / all_tokens / chunks / chunk_tokens (`dataset_counts`)."""
    if name == "tokens":
        per = (TOKEN_BYTES * probe["split_tokens"] + SAMPLE_BYTES * probe["split_samples"]) / probe[
            "split_tokens"
        ]
        return n["all_tokens"], probe["split_tokens"], per, n["all_tokens"]
    if name == "texts":  # char spans per token + the texts, scaled by tokens like the token arrays
        return (
            n["all_tokens"],
            probe["split_tokens"],
            probe["text_bytes"] / probe["split_tokens"],
            n["all_tokens"],
        )
    if name.startswith("logits_"):
        return n["forward"], probe["tokens"], raw[name], n["forward"]
    if name.endswith("_scale") and INT8_SCHEMES[name[: -len("_scale")]] == "channel":
        return n["chunks"], 1, raw[name] * n["chunk_tokens"], n["train"]
    return n["train"], probe["tokens"], raw[name], n["train"]


def dataset_counts(train: PackedSplit, eval: PackedSplit | None, attrs: dict, chunk_tokens: int) -> dict:
    """{"train": N, "eval": E, "forward": tokens the loop forwards (N, + E when the store keeps held-out
    logits: those chunks hold logits only), "all_tokens": N + E, "chunks": C, "chunk_tokens"}."""
    e = eval.num_tokens if eval is not None else 0
    eval_logits = "eval" in (attrs.get("logits") or {}).get("splits", [])
    return {
        "train": train.num_tokens,
        "eval": e,
        "forward": train.num_tokens + (e if eval_logits else 0),
        "all_tokens": train.num_tokens + e,
        "chunks": -(-train.num_tokens // chunk_tokens),
        "chunk_tokens": chunk_tokens,
    }


def estimate(probe: dict, raw: dict, n: dict, writer_threads: int = 2, processes: int = 1) -> dict:
    """The plan (pure): per component and in total, bytes / token, bytes, tokens and the loop's seconds.

    Args:
        probe: `probe_first_chunk`'s measurement; raw: `raw_bytes_per_token`.
        n: `dataset_counts`.
    Returns: {"tokens", "train_tokens", "eval_tokens", "bytes_total", "bytes_per_token" (total / tokens),
    "seconds_estimate", "components": {name: {tokens, raw_bytes_per_token, ratio, bytes_per_token, bytes}},
    "probe": {tokens, seconds, write_seconds, tokens_per_s}}.
    """
    comps = {}
    for name, stored in probe["stored"].items():
        units, probe_units, raw_unit, tokens = _units(name, raw, probe, n)
        comps[name] = {
            "tokens": tokens,
            "raw_bytes_per_token": raw_unit * units / max(tokens, 1),
            "ratio": raw_unit * probe_units / max(stored, 1),  # raw / compressed, as the store summary's
            "bytes_per_token": stored / probe_units * units / max(tokens, 1),
            "bytes": round(stored / probe_units * units),
        }
    meta = probe["metadata"]
    comps["metadata"] = {
        "tokens": 0,
        "raw_bytes_per_token": 0,
        "ratio": 1.0,
        "bytes_per_token": 0,
        "bytes": meta,
    }
    total = sum(c["bytes"] for c in comps.values())
    step_s = max(probe["compute_s"], probe["write_s"] / max(writer_threads, 1))  # the loop overlaps the two
    return {
        "tokens": n["all_tokens"],
        "train_tokens": n["train"],
        "eval_tokens": n["eval"],
        "bytes_total": total,
        "bytes_per_token": total / max(n["all_tokens"], 1),
        "seconds_estimate": n["forward"] * step_s / max(probe["tokens"], 1) / max(processes, 1),
        "processes": processes,
        "components": comps,
        "probe": {
            "tokens": probe["tokens"],
            "seconds": probe["compute_s"],
            "write_seconds": probe["write_s"],
            "tokens_per_s": probe["tokens"] / max(step_s, 1e-9),
        },
    }


def make_plan(cfg, model, train, eval, attrs: dict, geo: dict, pad_id: int, processes: int = 1) -> dict:
    """Probe chunk 0 and estimate the whole store (`estimate`), plus the free space of its filesystem.

    Returns the plan dict, with "chunk": chunk 0's (bufs, stats) for the loop to reuse (not JSON)."""
    logits = attrs.get("logits") or {}
    raw = raw_bytes_per_token(
        geo,
        len(attrs["layers"]),
        attrs["components"],
        cfg.extract.dtype,
        int(logits.get("top_k", 0)),
        logits.get("index_dtype", "uint16"),
        cfg.extract.chunk_tokens,
        held_head_counts(attrs, geo),
    )
    probe = probe_first_chunk(cfg, model, train, attrs, state_shapes(geo), pad_id)
    n = dataset_counts(train, eval, attrs, cfg.extract.chunk_tokens)
    plan = estimate(probe, raw, n, cfg.extract.writer_threads, processes)
    loc = StoreLocation(cfg.extract.store, cfg.extract.storage_options)
    existing = loc.size(skip_metadata=False) if loc.exists() else 0  # a resumed store holds part already
    plan["bytes_needed"] = needed_bytes(plan, existing)
    plan["free_space"] = free_space(loc)
    plan["layers"] = list(attrs["layers"])
    plan["heads"] = held_head_counts(attrs, geo)  # per component, over the stored layers
    plan["chunk"] = probe["chunk"]
    return plan
