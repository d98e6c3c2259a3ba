"""Head mixers and projectors: init properties, identity start, 5-D enforcement, gradients, parameter counts."""

import pytest
import torch

from alignment.mapping.head_maps import gqa_query_mixer, pair_selection, uniform_mixer
from alignment.projection.projectors import HeadwiseMapProjector, KVDimensionProjector
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize("H_t, H_s", [(28, 12), (9, 8), (3, 2), (12, 14), (6, 4), (2, 2), (1, 5)])
def test_uniform_mixer_rows_sum_to_one_and_use_every_teacher_head(H_t, H_s):
    M = uniform_mixer(H_t, H_s)
    assert M.shape == (H_s, H_t) and (M >= 0).all()
    torch.testing.assert_close(M.sum(1), torch.ones(H_s))
    assert (M.sum(0) > 0).all(), "every teacher head must feed some student head"
    # total weight per teacher head is H_s / H_t: the teacher heads are spread evenly
    torch.testing.assert_close(M.sum(0), torch.full((H_t,), H_s / H_t))


def test_uniform_mixer_fractional_overlaps():
    torch.testing.assert_close(uniform_mixer(3, 2), torch.tensor([[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]]))
    assert (uniform_mixer(12, 14) > 0).sum(1).tolist() == [1, 2, 2, 2, 2, 2, 1, 1, 2, 2, 2, 2, 2, 1]


def test_gqa_query_mixer_stays_inside_the_kv_groups():
    H_t, G_t, H_s, G_s = 9, 3, 4, 2
    kv = uniform_mixer(G_t, G_s)  # (2, 3)
    Mq = gqa_query_mixer(kv, H_t, G_t, H_s, G_s)
    torch.testing.assert_close(Mq.sum(1), torch.ones(H_s))
    assert (Mq.sum(0) > 0).all()
    for s in range(H_s):
        for h in range(H_t):
            if Mq[s, h] > 0:  # the teacher head's KV group feeds the student head's KV group
                assert kv[s // (H_s // G_s), h // (H_t // G_t)] > 0
    # one-to-one groups (teacher 6/2 -> student 4/2): student heads of group g read only teacher group g
    Mq2 = gqa_query_mixer(uniform_mixer(2, 2), 6, 2, 4, 2)
    assert Mq2[:2, 3:].abs().sum() == 0 and Mq2[2:, :3].abs().sum() == 0


def test_pair_selection_keeps_rotary_pairs_and_is_semi_orthogonal():
    S = pair_selection(16, 8)  # student pair i <- teacher pair 2i, both halves
    assert S[0, 0] == 1 and S[8, 4] == 1 and S[2, 1] == 1 and S[10, 5] == 1
    torch.testing.assert_close(S.T @ S, torch.eye(8))
    S2 = pair_selection(8, 12)
    torch.testing.assert_close(S2 @ S2.T, torch.eye(8))


def test_identity_start_with_identical_teacher_heads():
    head = torch.randn(2, 3, 1, 7, 16)
    for H_t, H_s in [(6, 4), (2, 2), (3, 5)]:
        x = head.expand(2, 3, H_t, 7, 16)
        proj = HeadwiseMapProjector(H_t, H_s, 16, 16)
        torch.testing.assert_close(proj(x), head.expand(2, 3, H_s, 7, 16), rtol=1e-5, atol=1e-5)


def test_structured_init_selects_even_pairs_when_halving_dims():
    proj = HeadwiseMapProjector(2, 2, 16, 8, constraint="frozen")
    x = torch.randn(1, 1, 2, 5, 16)
    expected = torch.cat([x[..., 0:8:2], x[..., 8:16:2]], -1) * _gain(proj, x)  # both halves of each pair
    # 1e-5: the simplex keeps a 1e-6 floor on the other head's weight
    torch.testing.assert_close(proj(x), expected, rtol=1e-4, atol=1e-5)


def _gain(proj, x):
    """Norm-preserving rescale factor of a one-to-one map (see projectors module doc)."""
    y = x @ pair_selection(16, 8)
    return x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize(
    "bad", [torch.randn(2, 6, 5, 16), torch.randn(1, 2, 3, 6, 5, 16), torch.randn(1, 2, 5, 7, 16)]
)
def test_projectors_refuse_wrong_shapes(bad):
    for proj in (HeadwiseMapProjector(6, 4, 16, 8), KVDimensionProjector(6, 4, 16, 8)):
        with pytest.raises(ValueError, match="projector input: got shape") as e:
            proj(bad)
        assert "\n" not in str(e.value)


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="constraint='loose'"):
        HeadwiseMapProjector(6, 4, 16, 8, constraint="loose")
    with pytest.raises(ValueError, match="H_s=0"):
        HeadwiseMapProjector(6, 0, 16, 8)
    with pytest.raises(ValueError, match="num_layers=None"):
        HeadwiseMapProjector(6, 4, 16, 8, per_layer=True)


@pytest.mark.parametrize("constraint", ["constrained", "unconstrained"])
@pytest.mark.parametrize("share, per_layer", [(True, False), (False, True)])
def test_gradients_reach_every_parameter(constraint, share, per_layer):
    proj = HeadwiseMapProjector(6, 4, 16, 8, share_dim_proj=share, per_layer=per_layer, num_layers=3,
                                constraint=constraint, init_uniform=False)  # fmt: skip
    flat = KVDimensionProjector(6, 4, 16, 8, per_layer=per_layer, num_layers=3, constraint=constraint)
    x = torch.randn(2, 3, 6, 5, 16)
    for p in (proj, flat):
        (p(x) * torch.randn(2, 3, 4, 5, 8)).sum().backward()
        for name, param in p.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_frozen_has_no_trainable_parameters():
    proj = HeadwiseMapProjector(6, 4, 16, 8, constraint="frozen")
    assert not any(p.requires_grad for p in proj.parameters())


def test_parameter_counts_structured_vs_flat():
    H_t, H_s, D_t, D_s, L = 6, 4, 16, 8, 3
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(HeadwiseMapProjector(H_t, H_s, D_t, D_s)) == H_s * H_t + D_t * D_s
    assert (
        count(HeadwiseMapProjector(H_t, H_s, D_t, D_s, share_dim_proj=False)) == H_s * H_t + H_s * D_t * D_s
    )
    assert count(HeadwiseMapProjector(H_t, H_s, D_t, D_s, per_layer=True, num_layers=L)) == L * (
        H_s * H_t + D_t * D_s
    )
    assert count(KVDimensionProjector(H_t, H_s, D_t, D_s)) == H_t * D_t * H_s * D_s
    assert (
        count(KVDimensionProjector(H_t, H_s, D_t, D_s, per_layer=True, num_layers=L))
        == L * H_t * D_t * H_s * D_s
    )


def test_constrained_maps_stay_on_their_manifolds_after_updates():
    proj = HeadwiseMapProjector(6, 4, 16, 8, share_dim_proj=False)
    opt = torch.optim.SGD(proj.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        proj(torch.randn(2, 1, 6, 5, 16)).pow(3).sum().backward()
        opt.step()
    M, W = proj.head_mix(), proj.dim_map.matrix()
    assert (M >= 0).all()
    torch.testing.assert_close(M.sum(-1), torch.ones(4))
    torch.testing.assert_close(W.transpose(-1, -2) @ W, torch.eye(8).expand(4, 8, 8), atol=1e-5, rtol=0)


def test_flat_keeps_mean_head_norm_and_shapes():
    flat = KVDimensionProjector(6, 4, 16, 8)
    x = torch.randn(2, 3, 6, 5, 16)
    y = flat(x)
    assert y.shape == (2, 3, 4, 5, 8)
    torch.testing.assert_close(y.pow(2).sum(-1).mean(2), x.pow(2).sum(-1).mean(2), rtol=1e-4, atol=1e-6)
