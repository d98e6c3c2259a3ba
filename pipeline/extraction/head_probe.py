"""Stage 1 stores only the heads a recipe reads (`extract.heads`): the probe that picks them, the record.

Shapes: none stored here beyond the probe store; H query heads, G KV heads of the teacher.

Why a probe: a selected-head arm (`align.head_select: top_retrieval`, trainer side) reads the teacher's best
retrieval heads. Those are known only from the teacher's own attention, so before extraction the same scorer
stage 2 uses (pipeline/analysis/head_scores.py) runs once on the first `extract.head_select.samples` train
samples. To give exactly the scores stage 2 would compute from an all-heads store, the probe extracts the
write chunks holding those samples with the extraction's own code (`extract_writer_chunk`: same batches,
same storage dtype) into an in-memory store, which the scorer then reads like any store.

Record (the schema's `heads` attribute): per stored component the held [layer, head] pairs: query heads for
q; for k and v the KV groups of the held query heads (query head h reads KV head h // (H / G)). The stored
layers are those of the held heads.
"""

from __future__ import annotations

import uuid

import torch

from pipeline.config.configlib import ConfigError
from pipeline.extraction.chunk import extract_writer_chunk
from pipeline.models.capture import capture_qkv
from pipeline.store.location import StoreLocation
from pipeline.store.packed_split import PackedSplit
from pipeline.store.writer import StoreWriter


def probe_samples(train: PackedSplit, samples: int | None) -> int:
    """How many train samples the probe scores: the first `samples` (None: all)."""
    total = len(train.lengths)
    return total if samples is None else min(int(samples), total)


def write_probe_store(cfg, model, train: PackedSplit, attrs: dict, shapes: dict, pad_id: int, n: int):
    """Extract every head of q and k of `attrs["layers"]` for the write chunks holding train samples 0..n-1
    into a complete in-memory store (the probe's); returns its StoreLocation (the caller deletes it)."""
    ct = cfg.extract.chunk_tokens
    end = int(train.offsets[n - 1] + train.lengths[n - 1])
    hi = len(train.samples_in(0, min(-(-end // ct) * ct, train.num_tokens)))  # samples of those chunks
    last = int(train.offsets[hi - 1] + train.lengths[hi - 1])
    head = PackedSplit(
        input_ids=train.input_ids[:last],
        segment_ids=train.segment_ids[:last],
        answer_mask=train.answer_mask[:last],
        offsets=train.offsets[:hi],
        lengths=train.lengths[:hi],
        rows=train.rows[:hi],
    )
    probe = {k: v for k, v in attrs.items() if k not in ("logits", "heads", "head_select", "quantization")}
    probe["components"] = ["q", "k"]
    if cfg.extract.dtype == "int8":
        probe["quantization"] = {c: attrs["quantization"][c] for c in ("q", "k")}
    loc = StoreLocation(f"memory://kvmap-head-probe/{uuid.uuid4().hex}.zarr")
    writer = StoreWriter.create(
        loc,
        attrs=probe,
        train=head,
        eval=None,
        state_shapes={c: shapes[c] for c in ("q", "k")},
        chunk_tokens=ct,
        inner_chunk_tokens=cfg.extract.inner_chunk_tokens,
    )
    with torch.inference_mode(), capture_qkv(model, writer.layers, ("q", "k")) as cap:
        for c in writer.todo_chunks():
            bufs, stats = extract_writer_chunk(cfg, model, cap, writer, {"train": head}, c, pad_id)
            writer.write_chunk(c, bufs, stats)
    writer.mark_complete({})
    return loc


def heads_record(query_heads, num_heads: int, num_kv_heads: int, components) -> dict[str, list[list[int]]]:
    """The schema's `heads` attribute for held query heads [(layer, head)]: q holds them, k and v their KV
    groups (query head h reads KV head h // (H / G)), each sorted.

    Example:
        >>> heads_record([(17, 5), (6, 0)], 9, 3, ["q", "k"])
        {'q': [[6, 0], [17, 5]], 'k': [[6, 0], [17, 1]]}
    """
    q = sorted({(int(layer), int(h)) for layer, h in query_heads})
    group = num_heads // num_kv_heads
    kv = sorted({(layer, h // group) for layer, h in q})
    return {c: [list(p) for p in (q if c == "q" else kv)] for c in components}


def listed_heads(spec: list, layers: list[int], num_heads: int) -> list[tuple[int, int]]:
    """`extract.heads: [[layer, head], ...]` checked against the candidate layers and the teacher's heads."""
    out = []
    for pair in spec:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, int) for x in pair)
        if not ok or pair[0] not in layers or not 0 <= pair[1] < num_heads:
            raise ConfigError(
                f"extract.heads: {pair!r}: expected [teacher layer in {layers}, query head in [0, {num_heads})]"
            )
        out.append((int(pair[0]), int(pair[1])))
    if len(set(out)) != len(out):
        raise ConfigError(f"extract.heads={spec!r}: expected no repeated head")
    return out


def top_heads(ranked: list[tuple[int, int, float]], top: int) -> list[tuple[int, int]]:
    """The `top` best (layer, head) of `ranked_heads` (best first); a `top` beyond the candidates is an error."""
    if not 1 <= top <= len(ranked):
        raise ConfigError(
            f"extract.head_select.top={top!r}: expected an int in [1, {len(ranked)}] (query heads of the "
            "candidate layers extract.layers names)"
        )
    return [(layer, h) for layer, h, _ in ranked[:top]]
