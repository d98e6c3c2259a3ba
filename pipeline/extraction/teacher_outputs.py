"""The teacher's output side of a stage-1 batch: its top-k log-probs (what logit KD reads) and its own
answer accuracy and CE per segment (how well it fits the data), summed on the device and read once per
chunk.

Shape glossary: B batch, T tokens, V vocab, K stored top-k, B' the rows of samples starting in the chunk.
May import pipeline.config only.
"""

from __future__ import annotations

import torch

from pipeline.config.kvmap import SEGMENTS


def topk_logprobs(
    logits: torch.Tensor, k: int, lse: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-softmax (fp32, temperature 1) reduced to its top k, sorted descending.

    Shapes: logits (..., V) -> values (..., k) float32, indices (..., k) int64.
    """
    # top-k of the raw logits in their own dtype (bf16 -> fp32 is exact and log-softmax is monotone: the same
    # ids), then minus the fp32 log-sum-exp: no (N, V) fp32 log-softmax written, a 16-bit radix select on GPU
    vals, idx = logits.topk(k, dim=-1, sorted=True)
    lse = row_lse(logits) if lse is None else lse  # (...) fp32, when the caller already has it
    return vals.float() - lse[..., None], idx


def row_lse(z: torch.Tensor, rows: int = 2048) -> torch.Tensor:
    """log-sum-exp over the vocabulary in fp32, (..., V) -> (...), a block of rows at a time (the fp32 copy
    of a 150k-vocabulary batch would be GBs)."""
    flat = z.reshape(-1, z.shape[-1])
    out = torch.cat(
        [torch.logsumexp(flat[i : i + rows].float(), dim=-1) for i in range(0, flat.shape[0], rows)]
    )
    return out.view(z.shape[:-1])


def accumulate_teacher_metrics(sums: dict, logits, lse, ids, ans, seg, own_idx) -> None:
    """Answer-token accuracy counts and per-segment teacher CE sums of the samples starting in this chunk,
    added to `sums` as device tensors: no host sync per batch (`metrics_into` reads them once per chunk).
    Shapes: logits (B, T, V), lse (B, T) its fp32 log-sum-exp, ids / ans / seg (B, T) on the device; own_idx (B',) device rows to count or None
    (all)."""
    if own_idx is not None:  # a sample crossing into this chunk was counted where it starts
        if own_idx.numel() == 0:
            return
        logits, lse, ids, ans, seg = (x.index_select(0, own_idx) for x in (logits, lse, ids, ans, seg))
    z, target = logits[:, :-1], ids[:, 1:]  # (B, T-1, V), (B, T-1): position t-1 predicts token t
    hit = z.argmax(-1) == target
    tgt_seg, scored = seg[:, 1:], ans[:, 1:]
    # Teacher-forced CE per target segment: how well the teacher's own distribution fits the data (a
    # teacher that does not write like the data is a poor logit-KD target). CE = lse - z[target].
    ce = lse[:, :-1].double() - z.gather(-1, target[..., None]).squeeze(-1).double()  # (B, T-1)
    add = {}
    for name in ("R", "A"):
        m = scored & (tgt_seg == SEGMENTS[name])
        add[("acc", f"n_{name}")], add[("acc", f"correct_{name}")] = m.sum(), (hit & m).sum()
    for name in ("P", "R", "A"):
        m = tgt_seg == SEGMENTS[name]
        add[("ce", f"sum_{name}")] = torch.where(m, ce, 0.0).sum()
        add[("ce", f"n_{name}")] = m.sum()
    for key, v in add.items():
        sums[key] = sums[key] + v if key in sums else v


def metrics_into(stats: dict, sums: dict) -> None:
    """Device sums {(group, key): 0-dim tensor} -> the chunk's stats (one host read for all of them)."""
    if not sums:
        return
    values = torch.stack([v.double() for v in sums.values()]).tolist()
    for (group, key), v in zip(sums, values):
        if group == "topk_mass":
            stats["topk_mass"] = v
        else:
            stats[group][key] = v if key.startswith("sum_") else int(v)
    acc = stats["acc"]
    if acc:  # the summed R + A counts, for code keyed by segment name
        acc["n_all"], acc["correct_all"] = acc["n_R"] + acc["n_A"], acc["correct_R"] + acc["correct_A"]
