"""StructuralKVLoss and the streaming attention KL vs the naive reference (values and gradients)."""

import pytest
import torch

import alignment.losses.structural as loss_mod
from alignment import StructuralKVLoss, attention_kl, create_structural_loss, naive_attention_kl
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)

# dtype -> (value rtol, gradient tolerance relative to the largest gradient entry); the reference runs in
# float64 on the same (rounded) inputs; the streaming path computes in float32 for float32/bfloat16 inputs and
# returns gradients in the input dtype.
TOL = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-3, 2e-2)}
B, L, T = 2, 3, 29


def _mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[0, :4] = False  # left padding
    m[1, -6:] = False  # right padding
    return m


def _states(H_s, G_s, D_s, H_t, G_t, D_t, dtype, seed, scale=1.5):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: (scale * torch.randn(*s, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()  # noqa: E731
    return mk(B, L, H_s, T, D_s), mk(B, L, G_s, T, D_s), mk(B, L, H_t, T, D_t), mk(B, L, G_t, T, D_t)


def _compare(fast_inputs, kw_fast, kw_ref, dtype):
    rtol, gtol = TOL[dtype]
    fast = attention_kl(*fast_inputs, **kw_fast)
    ref_inputs = [x.detach().double().requires_grad_() for x in fast_inputs[:4]] + [fast_inputs[4]]
    hm = kw_ref.get("head_mix")
    if hm is not None:
        kw_ref = dict(kw_ref, head_mix=hm.detach().double().requires_grad_())
    ref = naive_attention_kl(*ref_inputs, **kw_ref)
    assert abs(fast.item() - ref.item()) <= rtol * abs(ref.item()) + 1e-12, (fast.item(), ref.item())
    wrt = list(fast_inputs[:4]) + ([kw_fast["head_mix"]] if kw_fast.get("head_mix") is not None else [])
    wrt_ref = ref_inputs[:4] + ([kw_ref["head_mix"]] if hm is not None else [])
    g_fast = torch.autograd.grad(fast, wrt)
    g_ref = torch.autograd.grad(ref, wrt_ref)
    for x, a, b in zip(wrt, g_fast, g_ref):
        assert a.dtype == x.dtype
        err = (a.double() - b).abs().max().item()
        assert err <= gtol * b.abs().max().item() + 1e-12, err


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [3, 7, 64])  # 29 rows: uneven last chunk, and one chunk
def test_streaming_kl_matches_naive_projected(dtype, chunk):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())  # fresh inputs every run; the seed is in the report
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, dtype, seed)
    kw = dict(temperature=1.7, scale_s=0.3, scale_t=0.4)
    _compare((q_s, k_s, q_t, k_t, _mask()), dict(kw, chunk_size=chunk), kw, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_layer_mix", [False, True])
def test_streaming_kl_matches_naive_teacher_target_gqa_both_sides(dtype, per_layer_mix):
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 3, 16, dtype, seed)  # student 4/2 heads, teacher 6/3 heads
    shape = (L, 4, 6) if per_layer_mix else (4, 6)
    mix_dtype = torch.float64 if dtype == torch.float64 else torch.float32  # a parameter: fp32 unless fp64
    mix = torch.softmax(torch.randn(*shape, dtype=torch.float64), -1).to(mix_dtype).requires_grad_()
    kw = dict(scale_s=8**-0.5, scale_t=16**-0.5, head_mix=mix)
    _compare((q_s, k_s, q_t, k_t, _mask()), dict(kw, chunk_size=5), kw, dtype)


def test_kl_is_zero_for_identical_attention_and_masked_keys_do_not_matter():
    q, k, _, _ = _states(4, 2, 8, 4, 2, 8, torch.float32, 0)
    mask = _mask()
    assert attention_kl(q, k, q, k, mask, chunk_size=4).item() == pytest.approx(0.0, abs=1e-6)
    q_t, k_t = q + 0.5 * torch.randn_like(q), k + 0.5 * torch.randn_like(k)
    base = attention_kl(q, k, q_t, k_t, mask, chunk_size=4)
    junk = lambda x: torch.where(mask[:, None, None, :, None], x, 1e3 * torch.randn_like(x))  # noqa: E731
    moved = attention_kl(junk(q), junk(k), junk(q_t), junk(k_t), mask, chunk_size=4)
    torch.testing.assert_close(moved, base)


def test_loss_is_zero_for_identical_inputs_and_metrics_are_floats():
    q_s, k_s, _, _ = _states(4, 2, 8, 4, 2, 8, torch.float32, 1)
    v = torch.randn(B, L, 2, T, 8)
    loss, m = create_structural_loss()(k_s, v, q_s, k_s, v, q_s, attention_mask=_mask())
    assert loss.item() == pytest.approx(0.0, abs=1e-5)
    assert set(m) == {"loss_k", "cos_k", "loss_v", "cos_v", "attn_kl", "loss_struct"}
    assert all(isinstance(x, float) for x in m.values()) and m["cos_k"] == pytest.approx(1.0, abs=1e-5)


def test_masked_positions_change_nothing_in_value_or_real_gradients():
    mask = _mask()
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, torch.float64, 2)
    v_s, v_t = (
        torch.randn(B, L, 2, T, 8, dtype=torch.float64),
        torch.randn(B, L, 2, T, 8, dtype=torch.float64),
    )
    fn = create_structural_loss(alpha_attn=0.7)
    loss, _ = fn(k_s, v_s, q_s, k_t, v_t, q_t, attention_mask=mask)
    grads = torch.autograd.grad(loss, [q_s, k_s])
    noise = lambda x: torch.where(mask[:, None, None, :, None], x, torch.randn_like(x) * 50)  # noqa: E731
    q2, k2 = noise(q_s.detach()).requires_grad_(), noise(k_s.detach()).requires_grad_()
    loss2, _ = fn(k2, noise(v_s), q2, noise(k_t), noise(v_t), noise(q_t), attention_mask=mask)
    grads2 = torch.autograd.grad(loss2, [q2, k2])
    torch.testing.assert_close(loss2, loss)
    sel = mask[:, None, None, :, None]
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(torch.where(sel, b, 0.0), torch.where(sel, a, 0.0))
        assert torch.where(sel, 0.0, b).abs().max() == 0


def test_cosine_terms_against_a_direct_formula():
    k_s, k_t = torch.randn(B, L, 2, T, 8), torch.randn(B, L, 2, T, 8)
    mask = _mask()
    fn = StructuralKVLoss(alpha_k=1.0, alpha_v=0.0, alpha_attn=0.0, per_layer_metrics=True)
    loss, m = fn(k_s, k_s, None, k_t, k_t, None, attention_mask=mask)
    cos = (k_s * k_t).sum(-1) / (k_s.norm(dim=-1) * k_t.norm(dim=-1))  # (B, L, G, T)
    sel = mask[:, None, None, :].expand_as(cos)
    assert loss.item() == pytest.approx((1 - cos[sel]).mean().item(), rel=1e-5, abs=1e-6)
    assert m["cos_k_layer"] == pytest.approx([cos[:, i][sel[:, i]].mean().item() for i in range(L)], abs=1e-6)


def test_alpha_zero_skips_the_term(monkeypatch):
    k, v = torch.randn(B, L, 2, T, 8), torch.randn(B, L, 2, T, 8)
    calls = []
    real = StructuralKVLoss._cosine_term
    monkeypatch.setattr(
        StructuralKVLoss, "_cosine_term", staticmethod(lambda s, t, w: calls.append(s) or real(s, t, w))
    )
    monkeypatch.setattr(
        loss_mod, "attention_kl", lambda *a, **k: pytest.fail("attention KL computed with alpha 0")
    )
    loss, m = StructuralKVLoss(alpha_k=0.0, alpha_v=1.0, alpha_attn=0.0)(k, v, None, k, v, None)
    assert len(calls) == 1 and calls[0] is v
    assert set(m) == {"loss_v", "cos_v", "loss_struct"}


def test_teacher_target_uses_raw_teacher_states_and_a_fixed_head_mix():
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 2, 16, torch.float32, 3)
    mix = torch.softmax(torch.randn(4, 6), -1).requires_grad_()
    fn = create_structural_loss(alpha_k=0.0, alpha_v=0.0, alpha_attn=1.0, attn_target="teacher", chunk_size=8)
    # attention-only: the K/V cosine inputs may be None
    loss, m = fn(k_s, None, q_s, None, None, None, attention_mask=_mask(), t_q_raw=q_t, t_k_raw=k_t,
                 head_mix=mix, teacher_scale=0.25, student_scale=8**-0.5)  # fmt: skip
    ref = naive_attention_kl(q_s, k_s, q_t, k_t, _mask(), scale_s=8**-0.5, scale_t=0.25, head_mix=mix)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5) and m["attn_kl"] == pytest.approx(
        ref.item(), rel=1e-5
    )
    loss.backward()
    assert mix.grad is None, "the target head mix must be detached (nothing learned reshapes the target)"
    assert q_t.grad is None or q_t.grad.abs().sum() > 0  # teacher states may carry grads; student must
    assert q_s.grad.abs().sum() > 0 and k_s.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda f, x5, x4: f(x4, x5, x5, x4, x5, x5), r"s_k: got shape \(2, 3, 29, 8\), expected a 5-D"),
        (lambda f, x5, x4: f(x5, x5, x5, x5[:, :, :1], x5, x5), r"s_k shape .* != t_k shape"),
        (lambda f, x5, x4: f(x5, x5, None, x5, x5, x5), "s_q is None"),
        (
            lambda f, x5, x4: f(x5, x5, x5, x5, x5, x5, attention_mask=torch.ones(2, 29)),
            r"attention_mask shape \(2, 29\) dtype torch.float32",
        ),
    ],
)
def test_bad_loss_inputs(call, match):
    x5, x4 = torch.randn(B, L, 2, T, 8), torch.randn(B, L, T, 8)
    with pytest.raises(ValueError, match=match) as e:
        call(create_structural_loss(), x5, x4)
    assert "\n" not in str(e.value)


def test_bad_loss_settings_and_kl_head_counts():
    with pytest.raises(ValueError, match="alpha_k=-1"):
        create_structural_loss(alpha_k=-1)
    with pytest.raises(ValueError, match="attn_target='student'"):
        create_structural_loss(attn_target="student")
    with pytest.raises(ValueError, match="temperature=0"):
        create_structural_loss(temperature=0)
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 2, 8, torch.float32, 4)
    with pytest.raises(ValueError, match="teacher query heads 6 != student query heads 4"):
        attention_kl(q_s, k_s, q_t, k_t)
    with pytest.raises(ValueError, match=r"head_mix shape \(6, 4\)"):
        attention_kl(q_s, k_s, q_t, k_t, head_mix=torch.ones(6, 4))


def test_query_mask_narrows_rows_not_keys():
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, torch.float64, 5)
    mask = _mask()
    rows = torch.zeros(B, T, dtype=torch.bool)
    rows[:, 15:22] = True  # e.g. the reasoning segment
    _compare(
        (q_s, k_s, q_t, k_t, mask), dict(chunk_size=6, query_mask=rows), dict(query_mask=rows), torch.float64
    )
    narrowed = attention_kl(q_s, k_s, q_t, k_t, mask, query_mask=rows)
    keys_cut = attention_kl(q_s, k_s, q_t, k_t, mask & rows)  # restricting keys too is a different quantity
    assert abs(narrowed.item() - keys_cut.item()) > 1e-3
    v = torch.randn(B, L, 2, T, 8, dtype=torch.float64)
    fn = create_structural_loss(alpha_attn=1.0)
    _, m = fn(k_s, v, q_s, k_t, v, q_t, attention_mask=mask, query_mask=rows)
    assert m["attn_kl"] == pytest.approx(narrowed.item()) and m["cos_v"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="query_mask shape"):
        fn(k_s, v, q_s, k_t, v, q_t, attention_mask=mask, query_mask=rows[:, :5])
