"""Cross-tokenizer alignment: a sparse soft map W (T_s x T_t) from the character overlap of token spans.

Shape glossary: T_s student tokens, T_t teacher tokens (of one sample), B batch, K taps (the most teacher
tokens one student token overlaps), C content characters.

Each side tokenises the same row content, possibly rendered with its own chat template. A side is given as
its tokens' character spans in its own rendered text, (T, 2) [start, end), and the character ranges of its
text that hold the row's content, in order (`content`; None = the whole text). Both renderings must hold
the same content in the same order, so a character's position inside the concatenated content (its
"content coordinate") is the same on both sides; template characters have none. Then

    W[i, j] = |chars of student token i  &  chars of teacher token j| (in content coordinates) / row total

Rows are normalised to 1. A token with no content character (a template token, a special token the
tokenizer added, span (-1, -1) or empty) has no row (student) or no column (teacher); such student rows are
masked from every loss. Identical tokenisations (equal spans, equal content) give the identity on every
token (template ones too) by definition, even where a byte-fallback tokenizer gives several tokens the
same character, so the cross-tokenizer path then reads exactly what the same-tokenizer path reads.

W is returned as a `WarpPlan` (alignment/mapping/time_warping.py) on the student axis: out[i] =
sum_k weight[i, k] * x[index[i, k]], so `SegmentTimeWarper.apply(x_t, plan)` warps any teacher tensor
(B, ..., T_t, D) onto the student's tokens; `plan.mask` (B, T_s) marks the rows W has.

Limits (docs/guides/cross-tokenizer.md): a template that reorders or rewrites content breaks the shared
content coordinates (`content_text` of both sides must be equal; `token_alignment` checks it when given
the texts); a token whose characters cross a segment boundary takes the segment of its first character.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alignment.mapping.time_warping import PAD_ID, WarpPlan

Ranges = Sequence[tuple[int, int]]


def _check_spans(spans: np.ndarray, name: str) -> np.ndarray:
    spans = np.asarray(spans, dtype=np.int64)
    if spans.ndim != 2 or spans.shape[1] != 2:
        raise ValueError(f"{name}: got shape {spans.shape}, expected (T, 2) [start, end) character spans")
    return spans


def content_coordinates(spans: np.ndarray, content: Ranges | None) -> list[list[tuple[int, int]]]:
    """Each token's characters as intervals of content coordinates (empty for a template token).

    spans (T, 2) in the side's own text; content: its content ranges in order (None = the whole text).
    """
    spans = _check_spans(spans, "spans")
    if content is None:
        return [[(int(s), int(e))] if e > s >= 0 else [] for s, e in spans]
    starts = np.cumsum([0] + [b - a for a, b in content])  # content coordinate of each range's start
    out = []
    for s, e in spans:
        pieces = []
        for (a, b), c0 in zip(content, starts):
            lo, hi = max(int(s), a), min(int(e), b)
            if s >= 0 and hi > lo:
                pieces.append((int(c0 + lo - a), int(c0 + hi - a)))
        out.append(pieces)
    return out


def content_text(text: str, content: Ranges | None) -> str:
    """The row's content of one rendering: its content ranges concatenated (both sides must agree)."""
    return text if content is None else "".join(text[a:b] for a, b in content)


def _overlaps(s_iv: list[list[tuple[int, int]]], t_iv: list[list[tuple[int, int]]]):
    """Sparse overlaps: per student token, a list of (teacher token, shared characters)."""
    flat = [(a, b, j) for j, ivs in enumerate(t_iv) for a, b in ivs]
    flat.sort()
    starts = np.array([a for a, _, _ in flat], dtype=np.int64)
    # running max of the ends: every interval before the first index whose max end > a ends at or before a
    cmax = np.maximum.accumulate(np.array([b for _, b, _ in flat], dtype=np.int64)) if flat else starts
    rows = []
    for ivs in s_iv:
        acc: dict[int, int] = {}
        for a, b in ivs:
            i0 = int(np.searchsorted(cmax, a, side="right"))
            i1 = int(np.searchsorted(starts, b, side="left"))
            for ta, tb, j in flat[i0:i1]:
                shared = min(b, tb) - max(a, ta)
                if shared > 0:
                    acc[j] = acc.get(j, 0) + shared
        rows.append(sorted(acc.items()))
    return rows


def token_alignment(
    s_spans: np.ndarray,
    t_spans: np.ndarray,
    s_content: Ranges | None = None,
    t_content: Ranges | None = None,
    s_text: str | None = None,
    t_text: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One sample's W as taps: index (T_s, K) long into the teacher axis, weight (T_s, K) float32 (rows sum to
    1 where a row exists, else 0), has_row (T_s,) bool.

    Args:
        s_spans, t_spans: (T_s, 2) / (T_t, 2) character spans in each side's rendered text ((-1, -1): template).
        s_content, t_content: each side's content ranges (None: the whole text).
        s_text, t_text: the rendered texts; when both are given, their contents must be equal (one-line error).
    """
    s_spans, t_spans = _check_spans(s_spans, "s_spans"), _check_spans(t_spans, "t_spans")
    if s_text is not None and t_text is not None:
        a, b = content_text(s_text, s_content), content_text(t_text, t_content)
        if a != b:
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise ValueError(
                f"student and teacher content differ at content character {at} ({a[at : at + 20]!r} vs "
                f"{b[at : at + 20]!r}): expected both renderings to hold the same content in the same order"
            )
    if s_content == t_content and np.array_equal(s_spans, t_spans):
        return _identity_taps(s_spans)
    rows = _overlaps(content_coordinates(s_spans, s_content), content_coordinates(t_spans, t_content))
    K = max((len(r) for r in rows), default=0) or 1
    index = torch.zeros(len(rows), K, dtype=torch.long)
    weight = torch.zeros(len(rows), K, dtype=torch.float64)
    for i, r in enumerate(rows):
        if r:
            index[i, : len(r)] = torch.tensor([j for j, _ in r])
            weight[i, : len(r)] = torch.tensor([n for _, n in r], dtype=torch.float64)
    total = weight.sum(1, keepdim=True)
    has_row = total[:, 0] > 0
    return index, (weight / total.clamp_min(1)).float(), has_row


def _identity_taps(spans: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """W = I on every token, template tokens included: identical tokenisations pair each token with itself,
    so every loss reads exactly what the same-tokenizer path reads."""
    T = len(spans)
    return torch.arange(T)[:, None], torch.ones(T, 1), torch.ones(T, dtype=torch.bool)


def alignment_plan(
    taps: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    student_segment_ids: torch.Tensor,
    T_t: int,
) -> WarpPlan:
    """Batch per-sample `token_alignment` taps into one WarpPlan on the student axis.

    Args:
        taps: B tuples (index (T_s_b, K_b), weight (T_s_b, K_b), has_row (T_s_b,)).
        student_segment_ids: (B, T_s) the student's segment ids, -1 on padding.
        T_t: the (padded) teacher length the plan reads.
    Returns: WarpPlan with index / weight (B, T_s, K), mask (B, T_s) = real student tokens with a row,
        segment_ids = student_segment_ids, T_in = T_t (never `is_identity`: the axes differ in general).
    """
    B, T_s = student_segment_ids.shape
    if len(taps) != B:
        raise ValueError(f"alignment_plan: got {len(taps)} samples' taps, expected B={B}")
    K = max((int(i.shape[1]) for i, _, _ in taps), default=1)
    index = torch.zeros(B, T_s, K, dtype=torch.long)
    weight = torch.zeros(B, T_s, K)
    mask = torch.zeros(B, T_s, dtype=torch.bool)
    for b, (i, w, r) in enumerate(taps):
        n, k = i.shape
        if n > T_s or (n and int(i.max()) >= T_t):
            raise ValueError(
                f"sample {b}: taps ({n} rows, max column {int(i.max())}) exceed (T_s={T_s}, T_t={T_t})"
            )
        index[b, :n, :k], weight[b, :n, :k], mask[b, :n] = i, w, r
    mask &= student_segment_ids.cpu() != PAD_ID
    dev = student_segment_ids.device
    return WarpPlan(index.to(dev), weight.to(dev), mask.to(dev), student_segment_ids.clone(), T_t)


def dense_alignment(plan: WarpPlan) -> torch.Tensor:
    """W as a dense (B, T_s, T_t) float32 matrix (tests, small inputs, the warped attention target)."""
    B, T_s, _ = plan.index.shape
    W = torch.zeros(B, T_s, plan.T_in, dtype=plan.weight.dtype, device=plan.weight.device)
    return W.scatter_add_(2, plan.index, plan.weight * plan.mask[..., None])


def kd_positions(plan: WarpPlan) -> torch.Tensor:
    """(B, T_s) long: per student position, the last teacher token it overlaps (-1 without a row).

    Why the last: position i predicts the token after student token i; the teacher position whose next token
    starts where the student's does is the one covering the student token's end.
    """
    last = torch.where(plan.weight > 0, plan.index, torch.full_like(plan.index, -1)).amax(-1)
    return torch.where(plan.mask, last, torch.full_like(last, -1))
