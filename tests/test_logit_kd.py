"""LogitKDLoss against naive full-vocabulary / explicit-partition references, in value and gradient.

Fresh random inputs per case; tolerances per dtype (the student's logits dtype; the loss computes in fp32).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from alignment.losses.logit_kd import LogitKDLoss, lse_gather, teacher_fidelity_sums

# dtype of the student's logits -> (value rtol, gradient rtol): the loss computes in fp32 (fp64 kept), and
# a bf16 input gets its gradient back in bf16 (8 mantissa bits: relative rounding 2^-8).
TOL = {torch.float64: (1e-10, 1e-9), torch.float32: (2e-5, 2e-4), torch.bfloat16: (2e-5, 8e-3)}
LOSSES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.2), ("jsd", 0.0), ("jsd", 1.0)]


def naive_divergence(lp: torch.Tensor, lq: torch.Tensor, loss: str, beta: float) -> torch.Tensor:
    """Per-row divergence written out with probabilities (float64), no masking tricks."""
    p, q = lp.exp(), lq.exp()
    fwd = (p * (lp - lq)).sum(-1)
    rev = (q * (lq - lp)).sum(-1)
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return fwd
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return rev
    m = beta * p + (1 - beta) * q
    return beta * (p * (lp - m.log())).sum(-1) + (1 - beta) * (q * (lq - m.log())).sum(-1)


def _inputs(n, v, k, dtype, seed, sharp=1.0):
    g = torch.Generator().manual_seed(seed)
    t_logits = torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0 * sharp
    z = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2.0).to(dtype).requires_grad_(True)
    t_lp_full = torch.log_softmax(t_logits, -1)
    vals, idx = t_lp_full.topk(k, dim=-1)
    return z, t_logits, t_lp_full, vals.float(), idx


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("loss,beta", LOSSES)
def test_k_equal_v_matches_full_vocabulary(dtype, tail, loss, beta):
    """With K = V both tails are the full-vocabulary divergence at any temperature (x tau^2)."""
    n, v = 9, 13
    for seed, tau in ((0, 1.0), (1, 2.0), (2, 0.7)):
        z, t_logits, _, vals, idx = _inputs(n, v, v, dtype, seed)
        got = LogitKDLoss(loss, tail, tau, beta)(z, vals, idx)
        (g_got,) = torch.autograd.grad(got, z)
        z64 = z.detach().double().requires_grad_(True)
        # the teacher as stored: its fp32 top-k at temperature 1, re-tempered
        lp = torch.log_softmax(vals.double() / tau, -1)
        lq = torch.log_softmax(z64 / tau, -1).gather(1, idx)
        ref = naive_divergence(lp, lq, loss, beta).mean() * tau**2
        (g_ref,) = torch.autograd.grad(ref, z64)
        vtol, gtol = TOL[dtype]
        assert got.item() == pytest.approx(ref.item(), rel=vtol, abs=vtol)
        torch.testing.assert_close(g_got.double(), g_ref, rtol=gtol, atol=gtol * 0.1)


def _partition_reference(z64, vals, idx, loss, beta):
    """Explicit K + 1 partition per row with a Python loop: {each top-k token, everything else}."""
    rows = []
    for r in range(z64.shape[0]):
        q_full = torch.softmax(z64[r], -1)
        inside = torch.zeros_like(q_full, dtype=torch.bool)
        inside[idx[r]] = True
        p_top = vals[r].double().exp()
        p = torch.cat([p_top, (1 - p_top.sum()).reshape(1)])
        q = torch.cat([q_full[idx[r]], q_full[~inside].sum().reshape(1)])
        rows.append(naive_divergence(p.log()[None], q.log()[None], loss, beta))
    return torch.cat(rows).mean()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("loss,beta", LOSSES)
def test_bucket_is_the_exact_partition_divergence(dtype, loss, beta):
    z, _, _, vals, idx = _inputs(7, 40, 6, dtype, seed=3, sharp=1.5)
    got = LogitKDLoss(loss, "bucket", 1.0, beta)(z, vals, idx)
    (g_got,) = torch.autograd.grad(got, z)
    z64 = z.detach().double().requires_grad_(True)
    ref = _partition_reference(z64, vals, idx, loss, beta)
    (g_ref,) = torch.autograd.grad(ref, z64)
    vtol, gtol = TOL[dtype]
    assert got.item() == pytest.approx(ref.item(), rel=vtol, abs=vtol)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=gtol, atol=gtol * 0.1)


@pytest.mark.parametrize("loss,beta", LOSSES)
def test_renormalize_is_the_divergence_restricted_to_the_top_k(loss, beta):
    z, _, _, vals, idx = _inputs(7, 40, 6, torch.float64, seed=4)
    for tau in (1.0, 1.5):
        got = LogitKDLoss(loss, "renormalize", tau, beta)(z, vals, idx)
        (g_got,) = torch.autograd.grad(got, z)
        z64 = z.detach().requires_grad_(True)
        lp = torch.log_softmax(vals.double() / tau, -1)
        lq = torch.log_softmax(z64.gather(1, idx) / tau, -1)
        ref = naive_divergence(lp, lq, loss, beta).mean() * tau**2
        (g_ref,) = torch.autograd.grad(ref, z64)
        assert got.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
        torch.testing.assert_close(g_got, g_ref, rtol=1e-6, atol=1e-8)
        # tokens outside the teacher's top-k get no gradient in this mode
        outside = torch.ones_like(z, dtype=torch.bool).scatter(1, idx, False)
        assert g_got[outside].abs().max() == 0


@pytest.mark.parametrize(
    "tail,loss,beta", [(t, lo, b) for t in ("bucket", "renormalize") for lo, b in LOSSES]
)
def test_zero_when_student_equals_teacher_and_nonnegative(tail, loss, beta):
    n, v, k = 6, 30, 5
    z, t_logits, t_lp_full, vals, idx = _inputs(n, v, k, torch.float64, seed=5)
    same = LogitKDLoss(loss, tail, 1.0, beta)(t_logits.clone().requires_grad_(True), vals.double(), idx)
    assert abs(same.item()) < 1e-6
    for seed in range(6, 11):
        z, _, _, vals, idx = _inputs(n, v, k, torch.float32, seed)
        assert LogitKDLoss(loss, tail, 1.0, beta)(z, vals, idx).item() >= -1e-6


def test_chunked_rows_equal_one_pass():
    z, _, _, vals, idx = _inputs(23, 50, 8, torch.float32, seed=12)
    for loss, tail in itertools.product(("forward_kl", "jsd"), ("bucket", "renormalize")):
        a = LogitKDLoss(loss, tail, 1.3, 0.3)(z, vals, idx)
        (ga,) = torch.autograd.grad(a, z)
        b = LogitKDLoss(loss, tail, 1.3, 0.3, chunk_rows=5)(z, vals, idx)
        (gb,) = torch.autograd.grad(b, z)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga, gb, rtol=1e-6, atol=1e-8)


def test_temperature_scaling_as_documented():
    """loss(tau) = tau^2 * divergence of the tau-softened distributions (K = V: plain softmaxes)."""
    z, t_logits, _, vals, idx = _inputs(5, 11, 11, torch.float64, seed=13)
    for tau in (0.5, 1.0, 3.0):
        got = LogitKDLoss("forward_kl", "bucket", tau)(z, vals.double(), idx)
        p = torch.softmax(t_logits / tau, -1)
        q = torch.softmax(z.detach() / tau, -1)
        assert got.item() == pytest.approx(tau**2 * (p * (p.log() - q.log())).sum(-1).mean().item(), rel=1e-6)


def test_fp16_rounded_mass_above_one_is_rescaled_and_empty_rows_are_zero():
    z = torch.randn(2, 8, requires_grad=True)
    vals = torch.log(torch.tensor([[0.6, 0.4005], [0.5, 0.3]]))  # row 0 sums to 1.0005 by rounding
    idx = torch.tensor([[0, 1], [2, 3]])
    loss = LogitKDLoss("forward_kl", "bucket")(z, vals, idx)
    assert torch.isfinite(loss)
    (g,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(g).all()
    empty = LogitKDLoss()(z[:0], vals[:0], idx[:0])
    assert empty.item() == 0.0


def test_bad_values_are_one_line_errors():
    for kw, key in (
        (dict(loss="kl"), "kd_loss"),
        (dict(tail="uniform"), "kd_tail"),
        (dict(temperature=0.0), "kd_temperature"),
        (dict(beta=1.5), "kd_beta"),
    ):
        with pytest.raises(ValueError, match=key) as e:
            LogitKDLoss(**kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="K=9 > student vocabulary 8"):
        LogitKDLoss()(torch.randn(2, 8), torch.randn(2, 9), torch.zeros(2, 9, dtype=torch.long))


def test_teacher_fidelity_sums():
    z, t_logits, _, vals, idx = _inputs(6, 20, 20, torch.float64, seed=14)
    s = teacher_fidelity_sums(z.detach(), vals, idx)
    agree = (z.argmax(-1) == t_logits.argmax(-1)).sum().item()
    p, q = torch.softmax(t_logits, -1), torch.softmax(z.detach(), -1)
    kl = (p * (p.log() - q.log())).sum().item()
    assert s[0].item() == agree and s[2].item() == 6
    assert s[1].item() == pytest.approx(kl, rel=1e-5)
    assert math.isfinite(s[1].item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_bucket_exact_when_the_student_puts_almost_all_mass_on_the_top_k(dtype):
    """Rows whose outside mass is tiny take the exact log-sum-exp path; mixed with ordinary rows."""
    z, _, _, vals, idx = _inputs(6, 40, 6, dtype, seed=21)
    boost = torch.zeros_like(z).scatter(1, idx, 25.0)  # rest mass ~1e-10 in rows 0-2
    boost[3:] = 0.0
    z = (z.detach() + boost).requires_grad_(True)
    got = LogitKDLoss("forward_kl", "bucket")(z, vals, idx)
    (g_got,) = torch.autograd.grad(got, z)
    z64 = z.detach().double().requires_grad_(True)
    ref = _partition_reference(z64, vals, idx, "forward_kl", 0.5)
    (g_ref,) = torch.autograd.grad(ref, z64)
    vtol, gtol = TOL[dtype]
    assert got.item() == pytest.approx(ref.item(), rel=vtol, abs=vtol)
    torch.testing.assert_close(g_got.double(), g_ref, rtol=gtol, atol=gtol * 0.1)


def test_a_shared_log_sum_exp_gives_the_same_loss_and_gradient():
    z, _, _, vals, idx = _inputs(9, 50, 7, torch.float32, seed=22)
    for loss, tail in itertools.product(("forward_kl", "reverse_kl", "jsd"), ("bucket", "renormalize")):
        a = LogitKDLoss(loss, tail)(z, vals, idx)
        (ga,) = torch.autograd.grad(a, z)
        lse, z_top = lse_gather(z, idx)
        b = LogitKDLoss(loss, tail)(z, vals, idx, lse=lse, z_top=z_top)
        (gb,) = torch.autograd.grad(b, z)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-8)


def test_lse_gather_matches_autograd_and_gradcheck():
    g = torch.Generator().manual_seed(23)
    z = torch.randn(5, 17, generator=g, dtype=torch.float64, requires_grad=True)
    idx = torch.randint(
        0, 17, (5, 4), generator=g
    )  # repeated ids in a row are allowed (CE target = a top-k id)
    assert torch.autograd.gradcheck(lambda x: lse_gather(x, idx), (z,))
    w1, w2 = (
        torch.randn(5, 1, generator=g, dtype=torch.float64),
        torch.randn(5, 4, generator=g, dtype=torch.float64),
    )
    lse, sel = lse_gather(z, idx)
    (ga,) = torch.autograd.grad((lse * w1).sum() + (sel * w2).sum(), z)
    ref = (torch.logsumexp(z, -1, keepdim=True) * w1).sum() + (z.gather(1, idx) * w2).sum()
    (gb,) = torch.autograd.grad(ref, z)
    torch.testing.assert_close(ga, gb)
