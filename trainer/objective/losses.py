"""Token-level cross-entropy restricted to segments, and per-layer cosine diagnostics.

Shape glossary: B batch, T tokens, V vocab, L layers, X heads (H or G), D head dim.

Convention: the logit at position t predicts token t+1, and a prediction belongs to the segment of its
*target* token (so the first answer token's loss counts for A even though it is predicted from R).
Padding (segment id -1) never counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from pipeline.config.kvmap import SEGMENTS


def shifted_targets(input_ids: torch.Tensor, segment_ids: torch.Tensor):
    """The target of every position (token t+1) and its segment; the last position and padding get -100 / -1.

    Shapes: input_ids / segment_ids (B, T) -> target (B, T), target_seg (B, T).
    """
    target_seg = F.pad(segment_ids[:, 1:], (0, 1), value=-1)  # (B, T)
    target = F.pad(input_ids[:, 1:], (0, 1), value=-100).masked_fill(target_seg < 0, -100)  # (B, T)
    return target, target_seg


def token_ce(logits: torch.Tensor, input_ids: torch.Tensor, segment_ids: torch.Tensor):
    """Per-prediction CE (float32) and the target segment of each prediction.

    Why no `logits[:, :-1]`: the backward of a slice allocates and zero-fills a second (B, T, V) tensor
    (measured ~5% of a default-student step); shifting the *targets* instead (the last position gets
    ignore_index, CE 0, segment -1) gives the same values without it.
    Shapes: logits (B, T, V), input_ids / segment_ids (B, T) -> ce (B, T), target_seg (B, T); position t
    holds the prediction of token t+1 (the last position holds nothing: ce 0, segment -1).
    """
    B, T, V = logits.shape
    assert input_ids.shape == (B, T) and segment_ids.shape == (B, T), (input_ids.shape, segment_ids.shape)
    target, target_seg = shifted_targets(input_ids, segment_ids)  # padding targets are ignored too
    ce = F.cross_entropy(
        logits.float().reshape(-1, V), target.reshape(-1), reduction="none", ignore_index=-100
    )
    return ce.view(B, T), target_seg


def segment_mask(target_seg: torch.Tensor, ids: Sequence[int]) -> torch.Tensor:
    """(B, T') bool: targets whose segment is in `ids` (padding, -1, is never in it)."""
    return torch.isin(target_seg, torch.as_tensor(list(ids), device=target_seg.device))


def masked_ce(logits: torch.Tensor, input_ids: torch.Tensor, segment_ids: torch.Tensor, ids: Sequence[int]):
    """Mean CE over the predictions whose target token lies in segments `ids` (0 if there is none).

    Shapes: logits (B, T, V), input_ids / segment_ids (B, T) -> scalar.
    """
    ce, target_seg = token_ce(logits, input_ids, segment_ids)
    keep = segment_mask(target_seg, ids).float()  # (B, T)
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


def ce_targets(input_ids: torch.Tensor, segment_ids: torch.Tensor, ids: Sequence[int]):
    """Which positions' predictions count for CE, and their target tokens (for logits at those rows only).

    Same convention as `token_ce`: position t predicts token t+1 and counts when that target's segment is in
    `ids`. `F.cross_entropy(logits[keep], targets)` equals `masked_ce(logits, ...)` in value and gradient.
    Shapes: input_ids / segment_ids (B, T) -> keep (B, T) bool, targets (N,) long with N = keep.sum().
    """
    target, target_seg = shifted_targets(input_ids, segment_ids)
    keep = segment_mask(target_seg, ids)  # (B, T); never a padding or last position (segment -1)
    return keep, target[keep]  # (B, T), (N,)


def ce_sums_by_segment(
    logits: torch.Tensor, input_ids: torch.Tensor, segment_ids: torch.Tensor
) -> torch.Tensor:
    """Summed CE and prediction counts per segment, for exact aggregation across batches and ranks.

    Shapes: logits (B, T, V) -> (2, S) float64 with S = len(SEGMENTS): row 0 CE sums, row 1 counts,
    column j = segment id j.
    """
    ce, target_seg = token_ce(logits, input_ids, segment_ids)
    out = torch.zeros(2, len(SEGMENTS), dtype=torch.float64, device=logits.device)
    for j in range(len(SEGMENTS)):
        m = target_seg == j  # (B, T)
        out[0, j] = ce[m].double().sum()
        out[1, j] = m.sum()
    return out


def per_layer_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine over real tokens and heads, per layer (a diagnostic, computed without gradients).

    Shapes: a, b (B, L, X, T, D), mask (B, T) bool -> (L,) float32.
    """
    assert a.shape == b.shape and a.dim() == 5, (a.shape, b.shape)
    with torch.no_grad():
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1, eps=1e-8)  # (B, L, X, T)
        w = mask[:, None, None, :].float()  # (B, 1, 1, T)
        denom = (w.sum() * a.shape[2]).clamp_min(1.0)
        return (cos * w).sum(dim=(0, 2, 3)) / denom  # (L,)
