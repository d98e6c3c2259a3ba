"""Head-level loss paths vs naive references: sink-free attention KL, head-masked KL, MiniLMv2 relation KL."""

import pytest
import torch

from alignment import attention_kl, create_structural_loss, naive_attention_kl
from alignment.losses.relation import naive_relation_kl, relation_kl, selected_relation_kl
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)
from tests.test_align_loss import TOL, B, L, T, _compare, _mask, _states


def _fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run


def _head_mask(seed):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(L, 4, generator=g) < 0.4
    m[1] = False  # a layer without any selected head is sliced away
    m[0, 0] = True
    return m


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", ["projected", "teacher_mix"])
def test_sink_drop_and_head_mask_match_the_naive_reference(dtype, target):
    seed = _fresh_seed()
    if target == "projected":
        q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, dtype, seed)
        kw = dict(scale_s=0.3, scale_t=0.4)
    else:  # GQA on both sides, a per-layer one-hot selection mix (head_select) and the teacher's own heads
        q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 3, 16, dtype, seed)
        mix = torch.zeros(L, 4, 6, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        mix[:, torch.arange(4), torch.tensor([5, 0, 3, 2])] = 1.0
        kw = dict(scale_s=8**-0.5, scale_t=16**-0.5, head_mix=mix.requires_grad_())
    mask = _mask()
    mask[1, :2] = False  # sample 1 left-padded too: key 0 is padding there, key 2 its first real token
    kw.update(drop_keys=[0, 2], head_mask=_head_mask(seed))
    _compare((q_s, k_s, q_t, k_t, mask), dict(kw, chunk_size=5), kw, dtype)


def test_sink_drop_really_removes_key_zero_and_head_mask_is_a_selected_mean():
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, torch.float64, _fresh_seed())
    base = attention_kl(q_s, k_s, q_t, k_t, drop_keys=[0])
    # Changing only what key 0 gets (its logits on both sides) cannot change the sink-free KL.
    k_s2, k_t2 = k_s.detach().clone(), k_t.detach().clone()
    k_s2[..., 0, :] *= 7.0
    k_t2[..., 0, :] *= -3.0
    torch.testing.assert_close(attention_kl(q_s, k_s2, q_t, k_t2, drop_keys=[0]), base)
    assert abs(attention_kl(q_s, k_s2, q_t, k_t2).item() - attention_kl(q_s, k_s, q_t, k_t).item()) > 1e-3
    # head mask = mean over the selected (layer, head) pairs of the per-pair KL
    m = torch.zeros(L, 4, dtype=torch.bool)
    m[0, 1] = m[2, 3] = True
    one = lambda li, h: attention_kl(q_s[:, li : li + 1, h : h + 1], k_s[:, li : li + 1, h // 2 : h // 2 + 1],  # noqa: E731
                                     q_t[:, li : li + 1, h : h + 1], k_t[:, li : li + 1, h // 2 : h // 2 + 1])  # fmt: skip
    want = (one(0, 1) + one(2, 3)) / 2
    torch.testing.assert_close(attention_kl(q_s, k_s, q_t, k_t, head_mask=m), want)


def test_all_true_head_mask_with_the_uniform_mixer_reproduces_the_plain_loss_exactly():
    """head_select 'all' + selection matrix = the uniform GQA mixer: today's arm, bit for bit (value and grads)."""
    from alignment.mapping.head_maps import gqa_query_mixer, uniform_mixer

    q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 2, 16, torch.float32, _fresh_seed())
    mix = gqa_query_mixer(uniform_mixer(2, 2), 6, 2, 4, 2)
    fn = create_structural_loss(alpha_k=0.0, alpha_v=0.0, alpha_attn=1.0, attn_target="teacher", chunk_size=8)
    kw = dict(attention_mask=_mask(), t_q_raw=q_t, t_k_raw=k_t, head_mix=mix, teacher_scale=0.25)
    a, _ = fn(k_s, None, q_s, None, None, None, **kw)
    ga = torch.autograd.grad(a, [q_s, k_s])
    b, _ = fn(k_s, None, q_s, None, None, None, head_mask=torch.ones(L, 4, dtype=torch.bool), **kw)
    gb = torch.autograd.grad(b, [q_s, k_s])
    assert a.item() == b.item()
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [1, 4])
def test_relation_kl_matches_the_naive_reference(dtype, heads):
    rtol, gtol = TOL[dtype]
    g = torch.Generator().manual_seed(_fresh_seed())
    mk = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype).requires_grad_()  # noqa: E731
    x_s, x_t = mk(B, L, 2, T, 8), mk(B, L, 3, T, 16)  # student 2 KV heads x 8, teacher 3 x 16: any widths
    mask, rows = _mask(), torch.zeros(B, T, dtype=torch.bool)
    rows[:, 10:25] = True
    fast = relation_kl(x_s, x_t, heads, mask, query_mask=rows, chunk_size=6)
    ref_in = [x.detach().double().requires_grad_() for x in (x_s, x_t)]
    ref = naive_relation_kl(*ref_in, heads, mask, query_mask=rows)
    assert abs(fast.item() - ref.item()) <= rtol * abs(ref.item()) + 1e-12, (fast.item(), ref.item())
    for a, b, x in zip(torch.autograd.grad(fast, [x_s, x_t]), torch.autograd.grad(ref, ref_in), (x_s, x_t)):
        assert a.dtype == x.dtype
        assert (a.double() - b).abs().max().item() <= gtol * b.abs().max().item() + 1e-12


def test_relation_is_zero_for_identical_relations_and_in_the_loss():
    x = torch.randn(B, L, 4, T, 8, dtype=torch.float64)
    assert relation_kl(x, x, 4, _mask()).item() == pytest.approx(0.0, abs=1e-10)
    # re-splitting makes head count irrelevant: the same (T, 32) features as 2 heads of 16 compare equal
    x2 = x.transpose(2, 3).reshape(B, L, T, 2, 16).transpose(2, 3)
    assert relation_kl(x, x2, 4, _mask()).item() == pytest.approx(0.0, abs=1e-10)
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 2, 16, torch.float64, _fresh_seed())
    v_s, v_t = torch.randn_like(k_s), torch.randn_like(k_t)
    rel = {"components": ["q", "v"], "heads": 2, "weight": 0.5}
    fn = create_structural_loss(alpha_k=0.0, alpha_v=0.0, alpha_attn=0.0, relation=rel)
    loss, m = fn(
        k_s, v_s, q_s, None, None, None, attention_mask=_mask(), t_q_raw=q_t, t_k_raw=k_t, t_v_raw=v_t
    )
    want = 0.5 * (naive_relation_kl(q_s, q_t, 2, _mask()) + naive_relation_kl(v_s, v_t, 2, _mask()))
    assert loss.item() == pytest.approx(want.item(), rel=1e-8)
    assert set(m) == {"rel_q", "rel_v", "loss_struct"}


def _one_to_one(seed, H_s, H_t):
    """A random head selection: head_mask (L, H_s) with every layer but one holding a head, and a one-hot
    head_mix (L, H_s, H_t) sending each selected student head to a random teacher head."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(L, H_s, generator=g) < 0.5
    mask[0, 1], mask[1] = True, False
    mix = torch.zeros(L, H_s, H_t, dtype=torch.float64)
    mix[torch.arange(L)[:, None], torch.arange(H_s)[None], torch.randint(0, H_t, (L, H_s), generator=g)] = 1
    return mix, mask


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("component", ["q", "k"])
def test_selected_relation_matches_a_relation_per_selected_head_pair(dtype, component):
    """heads: selected = the plain one-head relation of each (student head, its teacher head) pair, averaged
    over the selected pairs; K pairs compare the KV groups the two heads read (student 4 q / 2 kv heads,
    teacher 6 q / 3 kv heads)."""
    rtol, gtol = TOL[dtype]
    seed = _fresh_seed()
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 3, 16, dtype, seed)
    x_s, x_t = (q_s, q_t) if component == "q" else (k_s, k_t)
    mix, head_mask = _one_to_one(seed + 1, 4, 6)
    mask, rows = _mask(), torch.zeros(B, T, dtype=torch.bool)
    rows[:, 8:27] = True
    fast = selected_relation_kl(x_s, x_t, mix.to(dtype), head_mask, mask, query_mask=rows, chunk_size=7)
    ref_in = [x.detach().double().requires_grad_() for x in (x_s, x_t)]
    per_pair = []
    for layer, s in head_mask.nonzero().tolist():
        h = int(mix[layer, s].argmax())
        a, b = (s, h) if component == "q" else (s // 2, h // 2)  # the KV group each head reads
        x_a, x_b = ref_in[0][:, layer : layer + 1, a : a + 1], ref_in[1][:, layer : layer + 1, b : b + 1]
        per_pair.append(naive_relation_kl(x_a, x_b, 1, mask, query_mask=rows))
    ref = torch.stack(per_pair).mean()
    assert abs(fast.item() - ref.item()) <= rtol * abs(ref.item()) + 1e-12, (fast.item(), ref.item())
    for a, b, x in zip(torch.autograd.grad(fast, [x_s, x_t]), torch.autograd.grad(ref, ref_in), (x_s, x_t)):
        assert a.dtype == x.dtype
        assert (a.double() - b).abs().max().item() <= gtol * b.abs().max().item() + 1e-12


def test_selected_relation_in_the_loss_reads_the_head_selection():
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 3, 16, torch.float64, _fresh_seed())
    mix, head_mask = _one_to_one(_fresh_seed(), 4, 6)
    rel = {"components": ["q", "k"], "heads": "selected", "weight": 0.5}
    fn = create_structural_loss(alpha_k=0.0, alpha_v=0.0, alpha_attn=0.0, relation=rel)
    kw = dict(attention_mask=_mask(), t_q_raw=q_t, t_k_raw=k_t, head_mix=mix, head_mask=head_mask)
    loss, m = fn(k_s, None, q_s, None, None, None, **kw)
    want = sum(selected_relation_kl(x, y, mix, head_mask, _mask()) for x, y in ((q_s, q_t), (k_s, k_t)))
    assert loss.item() == pytest.approx(0.5 * want.item(), rel=1e-10)
    assert set(m) == {"rel_q", "rel_k", "loss_struct"}
    x = torch.randn(B, L, 4, T, 8, dtype=torch.float64)  # a student head equal to its teacher head: zero
    assert selected_relation_kl(
        x, x, torch.eye(4)[None].expand(L, 4, 4), None, _mask()
    ).item() == pytest.approx(0.0, abs=1e-10)
    with pytest.raises(ValueError, match="head_mix is None, expected the aligner's head mixer") as e:
        fn(k_s, None, q_s, None, None, None, attention_mask=_mask(), t_q_raw=q_t, t_k_raw=k_t)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: relation_kl(torch.randn(1, 1, 2, 5, 6), torch.randn(1, 1, 3, 5, 16), 5),
            r"relation.heads=5: expected a positive int dividing the student x width 12",
        ),  # fmt: skip
        (
            lambda: create_structural_loss(relation={"components": ["o"], "heads": 2, "weight": 1}),
            r"relation.components=\['o'\]",
        ),  # fmt: skip
        (
            lambda: create_structural_loss(relation={"components": ["q"], "heads": "some", "weight": 1}),
            r"relation.heads='some': expected a positive int or 'selected'",
        ),  # fmt: skip
        (
            lambda: selected_relation_kl(
                torch.randn(1, 1, 3, 5, 6), torch.randn(1, 1, 4, 5, 6), torch.eye(4), None
            ),
            r"student x: got shape \(1, 1, 3, 5, 6\), expected \(B, L, H, T, D\) with H dividing the 4 query heads",
        ),  # fmt: skip
        (lambda: create_structural_loss(sink="cut"), r"loss_config.sink='cut'"),
        (lambda: create_structural_loss(sink="drop", sink_keys=[-1]), r"loss_config.sink_keys=\[-1\]"),
        (
            lambda: attention_kl(*_states(4, 2, 8, 4, 2, 8, torch.float32, 0), head_mask=torch.ones(2, 4)),
            r"head_mask shape \(2, 4\)",
        ),  # fmt: skip
    ],
)
def test_bad_structural_settings_are_one_line_errors(make, match):
    with pytest.raises(ValueError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_naive_reference_with_drop_keys_renormalises_explicitly():
    """The naive path is an independent check: KL of explicitly renormalised maps, computed by hand here."""
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, torch.float64, _fresh_seed())
    got = naive_attention_kl(q_s, k_s, q_t, k_t, drop_keys=[0])

    def probs(q, k):
        z = (q @ k.repeat_interleave(2, dim=2).transpose(-1, -2)) * 8**-0.5
        p = z.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)[..., 1:, 1:]
        return p / p.sum(-1, keepdim=True)  # rows 1.., keys 1..

    ps, pt = probs(q_s, k_s), probs(q_t, k_t)
    kl = torch.where(pt > 0, pt * (pt.clamp_min(1e-300).log() - ps.clamp_min(1e-300).log()), 0.0).sum(-1)
    assert got.item() == pytest.approx(kl.mean().item(), rel=1e-10)
