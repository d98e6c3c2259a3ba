"""SegmentTimeWarper: identity, ratios, alpha smoothing, per-sample plans, compressed-student timeline, errors."""

import pytest
import torch

from alignment.mapping.time_warping import SegmentTimeWarper, create_reasoning_focused_warper
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)

P, R, A, PAD = 0, 1, 2, -1


def _seg(*rows):
    T = max(len(r) for r in rows)
    return torch.tensor([list(r) + [PAD] * (T - len(r)) for r in rows])


def _positions(B, T, extra=(3, 2)):
    """x[b, ..., t, d] = t (so warped values read back as source positions)."""
    return torch.arange(T, dtype=torch.float32).view(1, 1, 1, T, 1).expand(B, *extra, T, 1).contiguous()


def test_identity_returns_input_itself():
    seg = _seg([P, P, R, R, R, A], [P, R, R, A])
    x = torch.randn(2, 3, 2, 6, 5)
    w = SegmentTimeWarper()
    out = w(x, seg)
    assert out is x
    plan = w.plan(seg)
    assert plan.is_identity and torch.equal(plan.mask, seg >= 0) and torch.equal(plan.segment_ids, seg)


def test_ratio_keeps_whole_segments_and_halves_reasoning_per_sample():
    seg = _seg([P, P, R, R, R, R, R, R, A, A], [P, R, R, R, R, A])
    w = create_reasoning_focused_warper()
    plan = w.plan(seg)
    assert plan.mask.sum(1).tolist() == [2 + 3 + 2, 1 + 2 + 1]
    assert plan.segment_ids[0].tolist() == [P, P, R, R, R, A, A]
    assert plan.segment_ids[1].tolist() == [P, R, R, A, PAD, PAD, PAD]
    out = w.apply(_positions(2, 10), plan)[:, 0, 0, :, 0]  # (B, T_out) source positions
    assert out.shape == (2, 7)
    # nearest (alpha=0): R run [2, 8) -> 3 windows of 2 with centres 2 + {1, 3, 5}
    assert out[0].tolist() == [0, 1, 3, 5, 7, 8, 9]
    assert out[1].tolist() == [0, 2, 4, 5, 0, 0, 0]  # padded outputs are zero


def test_alpha_one_averages_the_window_and_rows_sum_to_one():
    seg = _seg([P, R, R, R, R, A])
    w = SegmentTimeWarper({"R": 0.5}, {"R": 1.0})
    plan = w.plan(seg)
    out = w.apply(_positions(1, 6), plan)[0, 0, 0, :, 0]
    assert out.tolist() == pytest.approx([0.0, 1.5, 3.5, 5.0])
    torch.testing.assert_close(plan.weight.sum(-1)[plan.mask], torch.ones(int(plan.mask.sum())))
    half = SegmentTimeWarper({"R": 0.5}, {"R": 0.5})(_positions(1, 6), seg)  # blend of nearest and mean
    assert half[0, 0, 0, 1, 0].item() == pytest.approx(0.5 * 1.5 + 0.5 * 2.0)


def test_fractional_windows_and_T_s_padding():
    seg = _seg([R] * 7)
    w = SegmentTimeWarper({"R": 3 / 7}, {"R": 1.0})
    out = w(_positions(1, 7), seg, T_s=5)[0, 0, 0, :, 0]
    # windows [0, 7/3), [7/3, 14/3), [14/3, 7): overlap-weighted means of the cells (cell t holds t)
    # e.g. [0, 7/3) = cells 0 and 1 whole + 1/3 of cell 2: (0 + 1 + 2/3) / (7/3) = 5/7
    assert out[:3].tolist() == pytest.approx([5 / 7, 3.0, 37 / 7], abs=1e-5)
    assert out[3:].tolist() == [0, 0]
    with pytest.raises(ValueError, match="T_s=2"):
        w(_positions(1, 7), seg, T_s=2)


def test_left_padding_and_gradients():
    seg = _seg([PAD, PAD, P, R, R, R, R, A])
    w = create_reasoning_focused_warper(reasoning_alpha=1.0)
    x = torch.randn(1, 2, 8, 4, requires_grad=True)
    out = w(x, seg)
    assert out.shape == (1, 2, 4, 4)
    out.sum().backward()
    assert x.grad[0, :, :2].abs().sum() == 0 and x.grad[0, :, 2:].abs().sum() > 0


def test_compressed_student_timeline():
    t_seg = _seg([P, P, R, R, R, R, R, R, A], [P, R, R, R, R, A, A])
    s_seg = _seg([P, P, R, R, A], [P, R, R, R, R, R, R, R, A, A])  # sample 1: student R is *longer*
    w = SegmentTimeWarper(alpha_map={"R": 1.0})
    plan = w.plan(t_seg, student_segment_ids=s_seg)
    assert plan.T_out == s_seg.shape[1] and torch.equal(plan.mask, s_seg >= 0)
    out = w.apply(_positions(2, 9), plan)[:, 0, 0, :, 0]
    assert out[0, :5].tolist() == pytest.approx([0, 1, 3, 6, 8])  # R cells 2..7 -> means of {2,3,4}, {5,6,7}
    assert out[0, 5:].abs().sum() == 0
    assert out[1, 0].item() == 0 and out[1, -2:].tolist() == [5, 6]
    with pytest.raises(ValueError, match="same segment order"):
        w.plan(_seg([P, R, A]), student_segment_ids=_seg([P, A]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ratio_map={"R": 0.0}), r"ratio_map\['R'\]=0.0: expected a value in \(0, 1\]"),
        (dict(ratio_map={"R": 1.5}), r"ratio_map\['R'\]=1.5"),
        (dict(ratio_map={"X": 0.5}), "ratio_map key 'X'"),
        (dict(alpha_map={"A": -0.1}), r"alpha_map\['A'\]=-0.1"),
    ],
)
def test_bad_maps(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SegmentTimeWarper(**kwargs)


def test_bad_segment_ids_and_shapes():
    w = SegmentTimeWarper({"R": 0.5})
    with pytest.raises(ValueError, match="segment_ids contains 3: expected P=0, R=1, A=2 or -1"):
        w.plan(torch.tensor([[0, 1, 3]]))
    with pytest.raises(ValueError, match="expected a \\(B, T\\) integer tensor"):
        w.plan(torch.tensor([0, 1, 2]))
    plan = w.plan(_seg([P, R, R, A]))
    with pytest.raises(ValueError, match="warp input shape"):
        w.apply(torch.randn(1, 2, 5, 3), plan)
