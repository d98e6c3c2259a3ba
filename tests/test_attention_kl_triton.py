"""The fused Triton attention KL against the references, on values and gradients.

Runs where Triton can: on a CUDA device, or on the CPU under Triton's interpreter
(`TRITON_INTERPRET=1 pytest tests/test_attention_kl_triton.py`, fp32 only, slow). Skipped otherwise.

Tolerances (max |diff| / max |reference|), fused vs fp32 naive on the same (dtype-rounded) inputs:

    dtype     value   gradients   why
    float32   1e-5    1e-4        IEEE fp32 dots; online softmax reorders the sums
    bfloat16  2e-2    6e-2        bf16 dots (8-bit mantissa) as flash attention; fp32 softmax
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from alignment.losses.attention_kl import attention_kl, naive_attention_kl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not (torch.cuda.is_available() or INTERPRET),
    reason="needs Triton and a CUDA device (or TRITON_INTERPRET=1)",
)
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (2e-2, 6e-2)}
DTYPES = [torch.float32] + ([torch.bfloat16] if DEV == "cuda" else [])


def _inputs(seed, dtype, B=2, L=2, H_s=4, G_s=2, H_t=4, G_t=1, T=37, D_s=8, D_t=24):
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, L, H_s, T, D_s), (B, L, G_s, T, D_s), (B, L, H_t, T, D_t), (B, L, G_t, T, D_t)]
    xs = [torch.randn(*s, generator=g).to(dtype).to(DEV).requires_grad_() for s in shapes]
    mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
    mask[-1, T - 6 :] = False  # right padding on the last sample
    query_mask = (torch.rand(B, T, generator=g) > 0.3).to(DEV)
    return xs, mask, query_mask


def _compare(a, ga, b, gb, dtype) -> None:
    tv, tg = TOL[dtype]
    assert torch.isfinite(a) and abs(float(a) - float(b)) <= tv * max(abs(float(b)), 1e-6)
    for name, x, y in zip(("q_s", "k_s", "q_t", "k_t"), ga, gb):
        err = float((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-12))
        assert err <= tg, f"{name}: relative gradient error {err:.2e} > {tg}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_fused_matches_naive(seed, dtype):
    """Padding, a query mask, the sink dropped, per-layer teacher scale, a temperature, GQA on both sides
    with different head dims: the fused kernels equal the full-map reference."""
    xs, mask, qm = _inputs(seed, dtype)
    kw = dict(query_mask=qm, drop_keys=[0], temperature=1.3, scale_t=torch.tensor([0.3, 0.2], device=DEV))
    a = attention_kl(*xs, mask, impl="triton", **kw)
    ga = torch.autograd.grad(a, xs)
    ref = [x.detach().float().requires_grad_() for x in xs]  # the same rounded inputs, fp32 reference
    b = naive_attention_kl(*ref, mask, **kw)
    _compare(a, ga, b, torch.autograd.grad(b, ref), dtype)


@pytest.mark.parametrize("T", [1, 5, 70])
def test_fused_lengths(T):
    """Lengths below, at and across block edges (T = 1: one row, its KL is 0 with the sink kept)."""
    xs, mask, _ = _inputs(3, torch.float32, B=1, L=1, T=T)
    a = attention_kl(*xs, mask, impl="triton")
    b = naive_attention_kl(*xs, mask)
    _compare(a, torch.autograd.grad(a, xs), b, torch.autograd.grad(b, xs), torch.float32)


def test_fused_one_hot_heads_match_streaming():
    """Selected teacher heads one-to-one (a one-hot mix) under a head mask: equal to the PyTorch stream."""
    xs, mask, qm = _inputs(4, torch.float32, H_t=6, G_t=3)
    L, H_s, H_t = 2, 4, 6
    mix = torch.zeros(L, H_s, H_t)
    g = torch.Generator().manual_seed(5)
    for layer in range(L):
        mix[layer, torch.arange(H_s), torch.randperm(H_t, generator=g)[:H_s]] = 1.0
    head_mask = torch.tensor([[True, False, True, True], [False, True, False, False]], device=DEV)
    kw = dict(head_mix=mix.to(DEV), head_mask=head_mask, query_mask=qm, drop_keys=[0])
    a = attention_kl(*xs, mask, impl="triton", **kw)
    ga = torch.autograd.grad(a, xs)
    b = attention_kl(*xs, mask, impl="torch", **kw)
    _compare(a, ga, b, torch.autograd.grad(b, xs), torch.float32)
    assert float(ga[0][:, ~head_mask].abs().max()) == 0.0  # heads without a KL term get no gradient


def test_fused_refuses_soft_mix_and_auto_falls_back():
    xs, mask, _ = _inputs(6, torch.float32, H_t=6, G_t=3)
    mix = torch.softmax(torch.randn(4, 6), -1).to(DEV)
    with pytest.raises(ValueError, match="not one-hot"):
        attention_kl(*xs, mask, head_mix=mix, impl="triton")
    a = attention_kl(*xs, mask, head_mix=mix, impl="auto")
    b = attention_kl(*xs, mask, head_mix=mix, impl="torch")
    assert torch.equal(a, b)
    none = torch.zeros(2, 4, dtype=torch.bool, device=DEV)  # no head counted: nothing for the kernels
    with pytest.raises(ValueError, match="batch x counted heads = 0"):
        attention_kl(*xs, mask, head_mix=mix, head_mask=none, impl="triton")
    with pytest.raises(ValueError, match="impl='cuda'"):
        attention_kl(*xs, mask, head_mix=mix, impl="cuda")
