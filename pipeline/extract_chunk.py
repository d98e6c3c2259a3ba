"""Compute one write chunk of teacher states: batch the samples overlapping it, forward, check, pack.

Shape glossary: B batch, T tokens (padded batch length), X heads of a component (H for q, G for k/v),
D head dim; a chunk covers packed tokens [start, end) of the train split (see pipeline/store.py).

Why per chunk: a chunk is the unit of writing, resuming and rank ownership (pipeline/extract.py). The
batches are a function of the chunk alone (the overlapping samples, longest first), so the stored bits do
not depend on the number of processes or on where a previous run was killed.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.store import PackedSplit

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}

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
    for j, i in enumerate(batch):
        o, n = int(packed.offsets[i]), int(lens[j])
        ids[j, :n] = torch.from_numpy(packed.input_ids[o : o + n].astype(np.int64))
        seg[j, :n] = torch.from_numpy(packed.segment_ids[o : o + n].astype(np.int64))
        ans[j, :n] = torch.from_numpy(packed.answer_mask[o : o + n].astype(bool))
    return ids, seg, ans


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
) -> tuple[dict[tuple[int, str], np.ndarray], dict]:
    """Teacher states of packed tokens [start, end) of `packed`.

    Args:
        model: the teacher (eval mode), running inside `cap = capture_qkv(model, layers, components)`.
        dtype: storage dtype "bfloat16" | "float16"; non-finite or fp16-overflowing states at real tokens
            raise a one-line ValueError naming the sample, its dataset row, the layer and the component.
    Returns:
        ({(layer, comp): (end - start, X, D) array in the storage dtype (bf16 as uint16 words)},
         stats {"tokens", "forward_tokens", "acc": answer-token accuracy counts of the samples starting here})
    """
    from pipeline.metrics import answer_token_accuracy

    sdt = TORCH_DTYPES[dtype]
    bufs: dict[tuple[int, str], np.ndarray] = {}
    stats = {"tokens": end - start, "forward_tokens": 0, "acc": {}}
    device = next(model.parameters()).device
    for batch in chunk_batches(packed, start, end, batch_size):
        lens = packed.lengths[batch]
        ids, seg, ans = pad_batch(packed, batch, pad_id)
        valid = seg >= 0  # (B, T)
        cap.clear()
        logits = model(
            input_ids=ids.to(device), attention_mask=valid.long().to(device), use_cache=False
        ).logits
        stats["forward_tokens"] += int(lens.sum())
        # Accuracy counts each sample once: in the chunk where it starts.
        own = (packed.offsets[batch] >= start) & (packed.offsets[batch] < end)
        if own.any():
            if own.all():  # the usual case: no copy of the (B, T, V) logits
                acc = answer_token_accuracy(logits, ids, ans, seg)
            else:
                o = torch.from_numpy(own)
                acc = answer_token_accuracy(logits[o.to(logits.device)], ids[o], ans[o], seg[o])
            for k in (
                "n_R",
                "correct_R",
                "n_A",
                "correct_A",
                "n_all",
                "correct_all",
            ):  # counts sum over chunks
                stats["acc"][k] = stats["acc"].get(k, 0) + int(acc[k])
        # Which (sample, position) of the padded batch lands on which chunk row: each real token of the
        # chunk exactly once (a sample crossing a chunk edge contributes only its tokens inside).
        jj, tt, runs, n = [], [], [], 0  # runs: (rows of the gathered batch, rows of the chunk buffer)
        for j, i in enumerate(batch):
            o = int(packed.offsets[i])
            s0, s1 = max(o, start), min(o + int(lens[j]), end)
            jj.append(np.full(s1 - s0, j))
            tt.append(np.arange(s0 - o, s1 - o))
            runs.append((slice(n, n + s1 - s0), slice(s0 - start, s1 - start)))
            n += s1 - s0
        jj_d = torch.from_numpy(np.concatenate(jj)).to(device)  # (N,)
        tt_d = torch.from_numpy(np.concatenate(tt)).to(device)  # (N,)
        # Gather the real tokens on the device (token-major, as the store), convert, and check them all with
        # ONE reduction and one sync per batch; then one host copy per layer/component (pinned + async on
        # CUDA). The per-layer syncs and padded pageable copies this replaces cost 8.6x the forward on an H100.
        ys = {}
        for layer in layers:
            for comp in components:
                x = getattr(cap, comp)[layer]  # (B, X, T, D) teacher dtype
                ys[(layer, comp)] = x[jj_d, :, tt_d].to(sdt)  # (N, X, D); fp16: inf where |x| overflows
        finite = torch.stack([torch.isfinite(y).all() for y in ys.values()])  # (L_sel * C,)
        if not bool(finite.all()):
            for (layer, comp), ok in zip(ys, finite.tolist()):
                if not ok:
                    x = getattr(cap, comp)[layer]  # (B, X, T, D)
                    y = x.to(sdt)
                    bad = (~torch.isfinite(y).all(dim=3).all(dim=1) & valid.to(y.device)).any(dim=1)  # (B,)
                    raise _bad_sample_error(bad.cpu(), x.float().cpu(), y, valid, batch, packed, layer, comp)
        pinned = device.type == "cuda"
        host = {}
        for key, y in ys.items():  # on CPU the gathered tensor already is the host copy
            host[key] = _pinned(key, tuple(y.shape), y.dtype).copy_(y, non_blocking=True) if pinned else y
        if pinned:
            torch.cuda.synchronize(device)
        for key, h in host.items():
            yn = (h.view(torch.uint16) if sdt == torch.bfloat16 else h).numpy()  # (N, X, D)
            buf = bufs.get(key)
            if buf is None:
                buf = bufs[key] = np.empty((end - start, *yn.shape[1:]), dtype=yn.dtype)
            for src, dst in runs:  # one contiguous copy per sample
                buf[dst] = yn[src]
    return bufs, stats
