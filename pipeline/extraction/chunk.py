"""Compute one write chunk of teacher states: batch the samples overlapping it, forward, check, pack.

Shape glossary: B batch, T tokens (padded batch length), X heads of a component (H for q, G for k/v),
D head dim, V vocab, K stored top-k log-probs, N real tokens of a batch that land in the chunk; a chunk
covers packed tokens [start, end) of one split (see pipeline/store/reader.py; eval chunks hold logits only).

Why per chunk: a chunk is the unit of writing, resuming and rank ownership (pipeline/extract.py). The
batches are a function of the chunk alone (the overlapping samples, longest first), so the stored bits do
not depend on the number of processes or on where a previous run was killed.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.extraction.host_copy import HostCopier
from pipeline.extraction.teacher_outputs import (
    accumulate_teacher_metrics,
    metrics_into,
    row_lse,
    topk_logprobs,
)
from pipeline.store.encoding import LOGPROB_FLOOR
from pipeline.store.int8 import INT8_SCHEMES, quantize
from pipeline.store.packed_split import PackedSplit
from pipeline.store.schema import scale_key

# int8: None = gather in the teacher's own dtype; the chunk is quantised once whole (`_quantize_chunk`)
TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "int8": None}

# Page-locked host staging buffers, one per (layer, component), reused across batches and chunks and grown
# to the largest batch: allocating pinned memory costs about as much as the copy it speeds up.
_PINNED: dict[tuple, torch.Tensor] = {}


def _pinned(key: tuple, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    n = shape[0]
    buf = _PINNED.get(key)
    if buf is None or buf.shape[1:] != shape[1:] or buf.dtype != dtype or buf.shape[0] < n:
        buf = _PINNED[key] = torch.empty((max(n, 1), *shape[1:]), dtype=dtype, pin_memory=True)
    return buf[:n]


def _bad_sample_error(kind, x, y, valid, batch, packed, layer, comp) -> ValueError:
    """One-line error naming the first sample of `batch` whose (real-token) states are not storable."""
    j = int(kind.nonzero()[0, 0])
    i = int(batch[j])
    where = f"train sample {i} (dataset row {int(packed.rows[i])}), teacher layer {layer}, component {comp}"
    xs = x[j].transpose(0, 1)[valid[j]]  # (T_real, X, D) the raw teacher values of that sample
    if not torch.isfinite(xs).all():
        return ValueError(f"teacher states contain NaN/inf: {where}")
    return ValueError(
        f"teacher states overflow float16 (|x| max {xs.abs().max().item():.4g} > 65504): {where}; "
        "use extract.dtype=bfloat16"
    )


def chunk_batches(packed: PackedSplit, start: int, end: int, batch_size: int) -> list[np.ndarray]:
    """Sample-index batches covering packed tokens [start, end): every overlapping sample, longest first
    (batches of similar length pad little). Depends only on the chunk, never on the rank count."""
    idx = packed.samples_in(start, end)
    idx = idx[np.argsort(-packed.lengths[idx], kind="stable")]
    return [idx[b : b + batch_size] for b in range(0, len(idx), batch_size)]


def pad_batch(packed: PackedSplit, batch: np.ndarray, pad_id: int):
    """Right-padded (B, T) input_ids, segment_ids (-1 on padding) and answer_mask (bool) of `batch`."""
    lens = packed.lengths[batch]
    ids = torch.full((len(batch), int(lens.max())), pad_id, dtype=torch.long)  # (B, T)
    seg = torch.full_like(ids, -1)
    ans = torch.zeros_like(ids, dtype=torch.bool)
    # one read per array for the whole batch: the token arrays may be staged on disk (split_shards.py)
    lo = int(packed.offsets[batch].min())
    hi = int((packed.offsets[batch] + lens).max())
    win_ids, win_seg, win_ans = (
        packed.input_ids[lo:hi],
        packed.segment_ids[lo:hi],
        packed.answer_mask[lo:hi],
    )
    for j, i in enumerate(batch):
        o, n = int(packed.offsets[i]) - lo, int(lens[j])
        ids[j, :n] = torch.from_numpy(win_ids[o : o + n].astype(np.int64))
        seg[j, :n] = torch.from_numpy(win_seg[o : o + n].astype(np.int64))
        ans[j, :n] = torch.from_numpy(win_ans[o : o + n].astype(bool))
    return ids, seg, ans


def _chunk_rows(packed: PackedSplit, batch: np.ndarray, start: int, end: int):
    """Which (sample, position) of the padded batch lands on which chunk row: each real token of the chunk
    exactly once (a sample crossing a chunk edge contributes only its tokens inside).

    Returns jj, tt (N,) batch row / position of each gathered token and runs [(gathered rows, chunk rows)].
    """
    jj, tt, runs, n = [], [], [], 0
    for j, i in enumerate(batch):
        o = int(packed.offsets[i])
        s0, s1 = max(o, start), min(o + int(packed.lengths[i]), end)
        jj.append(np.full(s1 - s0, j))
        tt.append(np.arange(s0 - o, s1 - o))
        runs.append((slice(n, n + s1 - s0), slice(s0 - start, s1 - start)))
        n += s1 - s0
    return np.concatenate(jj), np.concatenate(tt), runs


def _gather_states(
    cap, layers, components, sdt, jj_d, tt_d, heads=None
) -> tuple[dict, torch.Tensor | None, dict]:
    """Real tokens of every (layer, component), gathered on the device (token-major, as the store) and
    converted to the storage dtype, with their finiteness as ONE device flag vector read later with the copy
    (a read here would stall the GPU until the batch is done; per-layer syncs and padded pageable copies
    cost 8.6x the forward on an H100).

    Returns ys {(layer, comp): (N, X, D)}, finite (L_sel * C,) bool on the device (None without states) and
    raw {(layer, comp): (B, X, T, D)} the captured tensors (kept to name a bad sample). `heads`
    {(layer, comp): (X,) long device tensor of the teacher heads held}: only those are kept; None = all."""
    ys, raw = {}, {}
    for layer in layers:
        for comp in components:
            x = getattr(cap, comp)[layer]  # (B, X, T, D) teacher dtype
            if heads is not None:  # a head-subset store: the held heads only, ascending
                x = x[:, heads[(layer, comp)]]
            raw[(layer, comp)] = x
            y = x[jj_d, :, tt_d]  # (N, X, D)
            ys[(layer, comp)] = y if sdt is None else y.to(sdt)  # fp16: inf where |x| overflows
    if not ys:
        return ys, None, raw
    finite = torch.stack([torch.isfinite(y).all() for y in ys.values()])  # (L_sel * C,)
    return ys, finite, raw


def _check_finite(finite: np.ndarray, meta: dict, sdt) -> None:
    """Raise the one-line error naming the first bad sample when a state of the batch is not storable."""
    if finite is None or bool(finite.all()):
        return
    for (layer, comp), ok in zip(meta["raw"], finite.tolist()):
        if not ok:
            x = meta["raw"][(layer, comp)]  # (B, X, T, D)
            y = x if sdt is None else x.to(sdt)
            valid = meta["valid"]
            bad = (~torch.isfinite(y).all(dim=3).all(dim=1) & valid.to(y.device)).any(dim=1)  # (B,)
            batch, packed = meta["batch"], meta["packed"]
            raise _bad_sample_error(bad.cpu(), x.float().cpu(), y, valid, batch, packed, layer, comp)


def _to_host(ys: dict, device: torch.device) -> dict[tuple, np.ndarray]:
    """Gathered device tensors -> numpy (bf16 as uint16 words); pinned + async on CUDA."""
    pinned = device.type == "cuda"
    host = {}
    for key, y in ys.items():  # on CPU the gathered tensor already is the host copy
        host[key] = _pinned(key, tuple(y.shape), y.dtype).copy_(y, non_blocking=True) if pinned else y
    if pinned:
        torch.cuda.synchronize(device)
    out = {}
    for key, h in host.items():
        out[key] = (h.view(torch.uint16) if h.dtype == torch.bfloat16 else h).numpy()
    return out


def _quantize_chunk(dev: dict, schemes: dict, device: torch.device) -> dict[tuple, np.ndarray]:
    """int8 words and scales of whole-chunk state buffers, quantised on the device the states live on (so
    only int8 + scales cross to the host: 2x fewer bytes than bf16 to copy and compress).

    Shapes: dev[(layer, comp)] (end - start, X, D) teacher dtype -> (layer, comp) (end - start, X, D) int8 and
    (layer, comp + "_scale") (1, X, D) | (end - start, X) float32 (pipeline/store/int8.py).
    """
    out = {}
    for (layer, comp), x in dev.items():
        q, scale = quantize(x, schemes[comp])
        out[(layer, comp)], out[(layer, scale_key(comp))] = q, scale
    host = _to_host(out, device)
    # on CUDA these are views of the reused pinned buffers: the async writer needs its own copy
    return {k: v.copy() for k, v in host.items()} if device.type == "cuda" else host


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device without stalling the CPU: a pageable copy waits for every queued kernel (the previous
    forward), a pinned non-blocking one does not."""
    if device.type != "cuda":
        return x
    return x.pin_memory().to(device, non_blocking=True)


def _forward(model, cap, ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """One teacher forward (B, T) -> logits (B, T, V) on the device, capturing into `cap` afresh."""
    if cap is not None:
        cap.clear()
    return model(input_ids=ids, attention_mask=attention_mask, use_cache=False).logits  # (B, T, V)


def _topk_entries(
    sums: dict, logits: torch.Tensor, lse: torch.Tensor, top_k: int
) -> dict[tuple, torch.Tensor]:
    """The stored top-k log-probs of the gathered tokens' logits (N, V); adds their probability mass to
    `sums[("topk_mass", "")]` (a device tensor)."""
    vals, idx = topk_logprobs(logits, top_k, lse)  # (N, K), (N, K)
    mass = vals.exp().sum(dim=-1).double().sum()
    key = ("topk_mass", "")
    sums[key] = sums[key] + mass if key in sums else mass
    return {
        ("logits", "values"): vals.clamp_min(LOGPROB_FLOOR).to(torch.float16),  # (N, K)
        ("logits", "indices"): idx.to(torch.int32),  # (N, K); stored as `index_dtype`
    }


def _keep_on_device(dev: dict, ys: dict, runs: list, n: int) -> None:
    """int8: move the batch's states out of `ys` into the chunk's device buffers (n rows each), to be
    quantised once the whole chunk is in."""
    for key in [k for k in ys if k[0] != "logits"]:
        y = ys.pop(key)
        buf = dev.get(key)
        if buf is None:
            buf = dev[key] = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=y.device)
        for src, dst in runs:
            buf[dst] = y[src]


def _place_on_host(bufs: dict, host: dict, runs: list, n: int, index_dtype: str) -> None:
    """Copy a batch's host arrays into the chunk's buffers (n rows each) in their stored dtypes."""
    for key, yn in host.items():
        if key == ("logits", "values"):
            yn = yn.view(np.uint16)  # float16 words (pipeline/store/reader.py)
        elif key == ("logits", "indices"):
            yn = yn.astype(index_dtype)
        buf = bufs.get(key)
        if buf is None:
            buf = bufs[key] = np.empty((n, *yn.shape[1:]), dtype=yn.dtype)
        for src, dst in runs:  # one contiguous copy per sample
            buf[dst] = yn[src]


def extract_chunk(
    model,
    cap,
    packed: PackedSplit,
    start: int,
    end: int,
    layers: list[int],
    components: list[str],
    dtype: str,
    batch_size: int,
    pad_id: int,
    top_k: int = 0,
    index_dtype: str = "uint16",
    on_batch: Callable[[int], None] | None = None,
    heads: dict[tuple, list[int]] | None = None,
) -> tuple[dict[tuple, np.ndarray], dict]:
    """Teacher states (and top-k log-probs) of packed tokens [start, end) of `packed`.

    Args:
        model: the teacher (eval mode), running inside `cap = capture_qkv(model, layers, components)`
            (None for a logits-only store).
        layers / components: the states to store (empty for a held-out chunk: logits only).
        dtype: storage dtype "bfloat16" | "float16" | "int8" (quantised per chunk, `INT8_SCHEMES`);
            non-finite or fp16-overflowing states at real tokens raise a one-line ValueError naming the
            sample, its dataset row, the layer and the component.
        top_k: > 0 also stores the teacher's top-k log-probs at every token (`topk_logprobs`).
        index_dtype: storage dtype of the top-k token ids.
        on_batch: called after every forward batch with the chunk tokens it produced (a progress bar's
            `update`; the calls add up to end - start).
        heads: {(layer, comp): the teacher heads to keep, ascending} for a head-subset store (None: all).
    Returns:
        ({(layer, comp): (end - start, X, D) array in the storage dtype (bf16 as uint16 words),
          ("logits", "values"): (end - start, K) float16 words, ("logits", "indices"): (end - start, K)},
         stats {"tokens", "forward_tokens", "acc": answer-token accuracy counts, "ce": teacher CE sums per
         target segment, "topk_mass": summed top-k probability mass, of the samples starting here})
    """
    sdt = TORCH_DTYPES[dtype]
    bufs: dict[tuple, np.ndarray] = {}
    dev: dict[tuple, torch.Tensor] = {}  # int8: the chunk's states on the device, quantised at the end
    stats = {"tokens": end - start, "forward_tokens": 0, "acc": {}, "ce": {}, "topk_mass": 0.0}
    sums: dict = {}  # metric sums on the device, read once at the end of the chunk
    device = next(model.parameters()).device
    copier = HostCopier(device)
    pending = None  # the previous batch, its host copy in flight while this batch's forward runs
    if heads is not None:  # index tensors on the device once per chunk, not once per batch
        heads = {key: _to_device(torch.as_tensor(h, dtype=torch.long), device) for key, h in heads.items()}
    for i, batch in enumerate(chunk_batches(packed, start, end, batch_size)):
        ids, seg, ans = pad_batch(packed, batch, pad_id)  # (B, T) on the CPU
        jj, tt, runs = _chunk_rows(packed, batch, start, end)
        own = (packed.offsets[batch] >= start) & (packed.offsets[batch] < end)  # (B,)
        on_dev = [_to_device(x, device) for x in (ids, seg, ans, torch.from_numpy(jj), torch.from_numpy(tt))]
        ids_d, seg_d, ans_d, jj_d, tt_d = on_dev
        own_idx = None if own.all() else _to_device(torch.from_numpy(np.flatnonzero(own)), device)
        # no mask when nothing is padded: transformers then skips reading the mask on the host (a sync)
        padded = bool((packed.lengths[batch] < ids.shape[1]).any())
        logits = _forward(model, cap, ids_d, (seg_d >= 0).long() if padded else None)
        if pending is not None:  # the previous batch's copy ran beside this forward: place it while it runs
            _finish(copier, pending, bufs, end - start, index_dtype, sdt, on_batch)
            pending = None
        stats["forward_tokens"] += int(packed.lengths[batch].sum())
        lse = row_lse(logits)  # (B, T) fp32: one pass over the vocabulary for CE and the top-k
        accumulate_teacher_metrics(sums, logits, lse, ids_d, ans_d, seg_d, own_idx)
        ys, finite, raw = _gather_states(cap, layers, components, sdt, jj_d, tt_d, heads)
        if top_k:
            ys.update(_topk_entries(sums, logits[jj_d, tt_d], lse[jj_d, tt_d], top_k))
        logits = lse = None
        if sdt is None:  # int8: keep the chunk's states on the device until every batch is in
            _keep_on_device(dev, ys, runs, end - start)
        meta = dict(runs=runs, raw=raw, valid=seg >= 0, batch=batch, packed=packed, tokens=len(jj))
        pending = copier.start(ys, finite, i % 2, meta)
        if not copier.cuda:  # nothing to overlap on the CPU: place now and keep one batch alive, not two
            _finish(copier, pending, bufs, end - start, index_dtype, sdt, on_batch)
            pending = None
    if pending is not None:
        _finish(copier, pending, bufs, end - start, index_dtype, sdt, on_batch)
    metrics_into(stats, sums)
    if dev:
        bufs.update(_quantize_chunk(dev, INT8_SCHEMES, device))
    return bufs, stats


def _finish(copier: HostCopier, job, bufs: dict, n: int, index_dtype: str, sdt, on_batch) -> None:
    """Wait for a batch's host copy, check its states are storable, place its rows in the chunk's buffers."""
    host = copier.wait(job)
    _check_finite(None if job.finite is None else job.finite.numpy(), job.meta, sdt)
    job.meta["raw"] = None  # release the batch's captured tensors
    _place_on_host(bufs, host, job.meta["runs"], n, index_dtype)
    if on_batch is not None:
        on_batch(job.meta["tokens"])


def extract_writer_chunk(cfg, model, cap, writer, splits: dict, c: int, pad_id: int, on_batch=None):
    """`extract_chunk` of write chunk `c` of a `StoreWriter`: states on train chunks only (held-out chunks
    store logits only), top-k log-probs where the store keeps logits for the chunk's split. The one place
    that turns a chunk number into extract_chunk's arguments (the extraction loop and the plan's probe)."""
    start, end = writer.chunk_range(c)
    split = writer.chunk_split(c)
    on_train = split == "train"
    logits = writer.attrs.get("logits") or {}
    return extract_chunk(
        model,
        cap,
        splits[split],
        start,
        end,
        writer.layers if on_train else [],
        writer.components if on_train else [],
        cfg.extract.dtype,
        cfg.extract.batch_size,
        pad_id,
        top_k=int(logits.get("top_k", 0)) if split in writer.logit_splits else 0,
        index_dtype=logits.get("index_dtype", "uint16"),
        on_batch=on_batch,  # called per batch
        heads=writer.held_heads() if on_train else None,
    )
