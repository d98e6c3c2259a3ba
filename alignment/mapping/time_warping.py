"""Segment-aware time warping of per-token teacher states, built per sample.

Shapes: B batch, T teacher tokens, T_out warped tokens, K taps per output position, `...` any middle axes
(layers, heads), D feature dim. Segment ids: P=0 (prompt), R=1 (reasoning), A=2 (answer), -1 padding.

Each contiguous run of one segment id is resampled on its own: a run of n input positions becomes m
output positions, output j covering the input window [j*n/m, (j+1)*n/m). `alpha` blends the nearest input
position (alpha=0: a real teacher vector) with the overlap-weighted average of the window (alpha=1:
smoother, but averages post-RoPE vectors of neighbouring positions).

Two uses:
  (a) teacher and student saw the same tokens: `m = ceil(ratio * n)` per run; the *same* plan is applied
      to teacher and student states (focus the loss on some segments / make it cheaper). Output tokens are
      packed to the left and right-padded; `plan.mask` marks real outputs.
  (b) the student's timeline differs (e.g. a compressed reasoning segment): given `student_segment_ids`
      (B, T_s), the k-th run of the teacher is resampled onto the k-th run of the student, so the output is
      on the student's time axis (T_out = T_s, `plan.mask` = student non-padding). The run sequences
      must agree (same segment order), which is checked per sample.

The identity warp (all ratios 1, no student timeline) returns its input tensor itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

SEGMENT_IDS = {"P": 0, "R": 1, "A": 2}
PAD_ID = -1
_ID_TO_NAME = {v: k for k, v in SEGMENT_IDS.items()}


@dataclass
class WarpPlan:
    """A per-sample time warp: out[b, j] = sum_k weight[b, j, k] * x[b, index[b, j, k]].

    Attributes:
        index: (B, T_out, K) long, source positions on the input axis.
        weight: (B, T_out, K) float32, zero on padded outputs.
        mask: (B, T_out) bool, True on real output positions.
        segment_ids: (B, T_out) long, segment id of each output (-1 on padding).
        T_in: input time length the plan expects.
        is_identity: the plan returns its input unchanged.
    """

    index: torch.Tensor
    weight: torch.Tensor
    mask: torch.Tensor
    segment_ids: torch.Tensor
    T_in: int
    is_identity: bool = False

    @property
    def T_out(self) -> int:
        return self.mask.shape[1]


def validate_segment_ids(segment_ids: torch.Tensor, name: str = "segment_ids") -> None:
    """Raise a one-line ValueError unless `segment_ids` is an integer (B, T) tensor of P/R/A/pad ids."""
    if not isinstance(segment_ids, torch.Tensor) or segment_ids.dim() != 2:
        shape = (
            tuple(segment_ids.shape) if isinstance(segment_ids, torch.Tensor) else type(segment_ids).__name__
        )
        raise ValueError(f"{name}: got shape {shape}, expected a (B, T) integer tensor")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"{name}.dtype={segment_ids.dtype}: expected an integer dtype")
    allowed = torch.tensor([PAD_ID, *SEGMENT_IDS.values()], device=segment_ids.device)
    bad = ~torch.isin(segment_ids, allowed)
    if bool(bad.any()):
        v = int(segment_ids[bad][0])
        raise ValueError(f"{name} contains {v}: expected P=0, R=1, A=2 or -1 (padding)")


def _runs(row: torch.Tensor) -> list[tuple[int, int, int]]:
    """(segment id, start, end) of each contiguous non-padding run in a (T,) row."""
    T = row.shape[0]
    if T == 0:
        return []
    cuts = (torch.nonzero(row[1:] != row[:-1]).flatten() + 1).tolist()
    starts, ends = [0, *cuts], [*cuts, T]
    vals = row[starts].tolist()
    return [(v, s, e) for v, s, e in zip(vals, starts, ends) if v != PAD_ID]


def _resample(n: int, m: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Taps mapping n input positions onto m outputs: index (m, K) in [0, n), weight (m, K), rows sum to 1."""
    j = torch.arange(m, dtype=torch.float64)
    width = n / m
    lo, hi = j * width, (j + 1) * width
    K = math.ceil(width) + 1
    idx = torch.floor(lo).long()[:, None] + torch.arange(K)[None, :]  # (m, K)
    overlap = (torch.minimum(hi[:, None], idx + 1.0) - torch.maximum(lo[:, None], idx.double())).clamp_min(0)
    overlap = torch.where(idx < n, overlap, torch.zeros_like(overlap)) / width
    nearest = torch.floor((j + 0.5) * width).long().clamp(max=n - 1)  # the window's centre position
    w = alpha * overlap + (1.0 - alpha) * (idx == nearest[:, None]).double()
    return idx.clamp(max=n - 1), w.float()


# One resampled run: (first output position, index (m, K) into the input axis, weight (m, K)).
_Piece = tuple[int, torch.Tensor, torch.Tensor]


def _identity_plan(segment_ids: torch.Tensor) -> WarpPlan:
    """The plan that returns its input: every position kept, one tap of weight 1."""
    B, T = segment_ids.shape
    dev = segment_ids.device
    idx = torch.arange(T, device=dev).expand(B, T)[..., None].contiguous()  # (B, T, 1)
    return WarpPlan(idx, torch.ones(B, T, 1, device=dev), segment_ids >= 0, segment_ids.clone(), T, True)


def _pack(rows: list[list[_Piece]], T_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """index (B, T_out, K) long and weight (B, T_out, K) from each sample's pieces; zero where none lands."""
    K = max((i.shape[1] for row in rows for _, i, _ in row), default=1)
    index = torch.zeros(len(rows), T_out, K, dtype=torch.long)
    weight = torch.zeros(len(rows), T_out, K)
    for b, row in enumerate(rows):
        for start, i, w in row:
            index[b, start : start + i.shape[0], : i.shape[1]] = i
            weight[b, start : start + w.shape[0], : w.shape[1]] = w
    return index, weight


def _check_map(name: str, mp: Mapping[str, float], lo_open: bool) -> dict[int, float]:
    if not isinstance(mp, Mapping):
        raise ValueError(f"{name}={mp!r}: expected a mapping from 'P'/'R'/'A' to a float")
    out = {}
    for key, v in mp.items():
        if key not in SEGMENT_IDS:
            raise ValueError(f"{name} key {key!r}: expected one of 'P', 'R', 'A'")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}[{key!r}]={v!r}: expected a number")
        if lo_open and not 0 < v <= 1:
            raise ValueError(f"{name}[{key!r}]={v!r}: expected a value in (0, 1]")
        if not lo_open and not 0 <= v <= 1:
            raise ValueError(f"{name}[{key!r}]={v!r}: expected a value in [0, 1]")
        out[SEGMENT_IDS[key]] = float(v)
    return out


class SegmentTimeWarper:
    """Per-sample, per-segment time warp (see module docstring for the two uses).

    Args:
        ratio_map: fraction of each segment's positions kept, in (0, 1]; missing segments keep 1.0.
        alpha_map: smoothing in [0, 1] per segment (0 = nearest position, 1 = window average); default 0.
    Example:
        >>> warper = SegmentTimeWarper({"P": 1.0, "R": 0.5, "A": 1.0})
        >>> plan = warper.plan(segment_ids)            # (B, T) -> plan.mask (B, T_out)
        >>> k_w = warper.apply(k_t, plan)               # (B, L, G, T, D) -> (B, L, G, T_out, D)
        >>> s_w = warper.apply(k_s, plan)               # same plan for the student in use (a)
    """

    def __init__(
        self, ratio_map: Mapping[str, float] | None = None, alpha_map: Mapping[str, float] | None = None
    ):
        self.ratio = {i: 1.0 for i in SEGMENT_IDS.values()} | _check_map("ratio_map", ratio_map or {}, True)
        self.alpha = {i: 0.0 for i in SEGMENT_IDS.values()} | _check_map("alpha_map", alpha_map or {}, False)

    @property
    def keeps_everything(self) -> bool:
        return all(r == 1.0 for r in self.ratio.values())

    def __repr__(self) -> str:
        r = {_ID_TO_NAME[k]: v for k, v in self.ratio.items()}
        a = {_ID_TO_NAME[k]: v for k, v in self.alpha.items()}
        return f"SegmentTimeWarper(ratio_map={r}, alpha_map={a})"

    def plan(
        self,
        segment_ids: torch.Tensor,
        T_s: int | None = None,
        student_segment_ids: torch.Tensor | None = None,
    ) -> WarpPlan:
        """Build the per-sample warp for teacher `segment_ids` (B, T).

        Args:
            segment_ids: (B, T) teacher segment ids (P=0, R=1, A=2, -1 pad).
            T_s: output length. Use (a): pad the output to T_s (a sample whose warped length exceeds it is
                an error). Use (b): must equal student_segment_ids.shape[1] if given.
            student_segment_ids: (B, T_s) student segment ids for use (b); None for use (a).
        """
        validate_segment_ids(segment_ids)
        if T_s is not None and (isinstance(T_s, bool) or not isinstance(T_s, int) or T_s < 1):
            raise ValueError(f"T_s={T_s!r}: expected a positive int or None")
        if student_segment_ids is not None:
            return self._plan_onto_student(segment_ids, student_segment_ids, T_s)
        if self.keeps_everything and T_s in (None, segment_ids.shape[1]):
            return _identity_plan(segment_ids)
        return self._plan_by_ratio(segment_ids, T_s)

    def _plan_onto_student(
        self, segment_ids: torch.Tensor, student_segment_ids: torch.Tensor, T_s: int | None
    ) -> WarpPlan:
        """Use (b): the k-th teacher run resampled onto the k-th student run (output on the student's axis)."""
        validate_segment_ids(student_segment_ids, "student_segment_ids")
        B, T = segment_ids.shape
        if student_segment_ids.shape[0] != B:
            raise ValueError(
                f"student_segment_ids batch {student_segment_ids.shape[0]} != segment_ids batch {B}"
            )
        T_out = student_segment_ids.shape[1]
        if T_s is not None and T_s != T_out:
            raise ValueError(f"T_s={T_s}: expected student_segment_ids.shape[1]={T_out} (or None)")
        rows = [
            self._onto_student_row(b, segment_ids[b].cpu(), student_segment_ids[b].cpu()) for b in range(B)
        ]
        index, weight = _pack(rows, T_out)
        seg_out = student_segment_ids.clone()
        dev = segment_ids.device
        return WarpPlan(index.to(dev), weight.to(dev), seg_out >= 0, seg_out, T)

    def _onto_student_row(self, b: int, t_row: torch.Tensor, s_row: torch.Tensor) -> list[_Piece]:
        """Sample b's pieces for use (b); its teacher and student runs must have the same segment order."""
        t_runs, s_runs = _runs(t_row), _runs(s_row)
        if [r[0] for r in t_runs] != [r[0] for r in s_runs]:
            raise ValueError(
                f"sample {b}: teacher segment runs {[_ID_TO_NAME[r[0]] for r in t_runs]} != student runs "
                f"{[_ID_TO_NAME[r[0]] for r in s_runs]}: expected the same segment order"
            )
        pieces = []
        for (seg, t0, t1), (_, s0, s1) in zip(t_runs, s_runs):
            i, w = _resample(t1 - t0, s1 - s0, self.alpha[seg])
            pieces.append((s0, i + t0, w))
        return pieces

    def _plan_by_ratio(self, segment_ids: torch.Tensor, T_s: int | None) -> WarpPlan:
        """Use (a): each run keeps ceil(ratio * n) positions, packed to the left and right-padded to T_s
        (default: the longest warped sample)."""
        B, T = segment_ids.shape
        rows = [self._ratio_row(segment_ids[b].cpu()) for b in range(B)]
        lengths = [int(seg.shape[0]) for _, seg in rows]
        longest = max(lengths, default=0)
        if T_s is not None and longest > T_s:
            b = max(range(B), key=lambda i: lengths[i])
            raise ValueError(f"T_s={T_s}: sample {b} warps to {lengths[b]} positions; expected T_s >= that")
        T_out = longest if T_s is None else T_s
        index, weight = _pack([pieces for pieces, _ in rows], T_out)
        seg_out = torch.full((B, T_out), PAD_ID, dtype=torch.long)
        for b, (_, seg) in enumerate(rows):
            seg_out[b, : seg.shape[0]] = seg
        dev = segment_ids.device
        seg_out = seg_out.to(dev)
        return WarpPlan(index.to(dev), weight.to(dev), seg_out >= 0, seg_out, T)

    def _ratio_row(self, row: torch.Tensor) -> tuple[list[_Piece], torch.Tensor]:
        """One sample's pieces for use (a), runs packed one after another, and its output segment ids."""
        pieces, segs, pos = [], [], 0
        for seg, t0, t1 in _runs(row):
            n = t1 - t0
            m = max(1, math.ceil(self.ratio[seg] * n - 1e-9))  # 1e-9: 0.1*30 must give 3, not 4
            i, w = _resample(n, m, self.alpha[seg])
            pieces.append((pos, i + t0, w))
            segs.append(torch.full((m,), seg, dtype=torch.long))
            pos += m
        return pieces, torch.cat(segs) if segs else torch.zeros(0, dtype=torch.long)

    @staticmethod
    def apply(x: torch.Tensor, plan: WarpPlan) -> torch.Tensor:
        """Warp x (B, ..., T, D) along its time axis (dim -2) -> (B, ..., T_out, D); differentiable in x."""
        if x.dim() < 3 or x.shape[0] != plan.index.shape[0] or x.shape[-2] != plan.T_in:
            raise ValueError(
                f"warp input shape {tuple(x.shape)}: expected (B={plan.index.shape[0]}, ..., T={plan.T_in}, D)"
            )
        if plan.is_identity:
            return x
        B, T_out, K = plan.index.shape
        xt = x.movedim(-2, 1)  # (B, T, ..., D)
        mid = xt.shape[2:]
        flat = xt.reshape(B, plan.T_in, -1)  # (B, T, F)
        idx = plan.index.reshape(B, T_out * K, 1).expand(-1, -1, flat.shape[-1])
        taps = torch.gather(flat, 1, idx).view(B, T_out, K, -1)  # (B, T_out, K, F)
        out = (taps * plan.weight.to(x.dtype)[..., None]).sum(2)  # (B, T_out, F)
        return out.view(B, T_out, *mid).movedim(1, -2)  # (B, ..., T_out, D)

    def __call__(
        self,
        x: torch.Tensor,
        segment_ids: torch.Tensor,
        T_s: int | None = None,
        student_segment_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`warper.apply(x, warper.plan(segment_ids, T_s, student_segment_ids))`; x (B, ..., T, D)."""
        return self.apply(x, self.plan(segment_ids, T_s, student_segment_ids))


def create_reasoning_focused_warper(
    reasoning_ratio: float = 0.5, reasoning_alpha: float = 0.0
) -> SegmentTimeWarper:
    """Keep P and A whole and `reasoning_ratio` of R (nearest positions by default, so warped teacher
    vectors are real post-RoPE teacher vectors rather than averages across rotary phases)."""
    return SegmentTimeWarper(
        ratio_map={"P": 1.0, "R": reasoning_ratio, "A": 1.0},
        alpha_map={"P": 0.0, "R": reasoning_alpha, "A": 0.0},
    )
