"""Attention geometry in the tensor math: per-layer scaling, logit softcapping and sliding windows.

The streaming KL (analytic gradients) against the naive full-map reference on values and gradients (fresh
random inputs, dtype -> tolerance table of tests/test_align_loss.py), and the shared probability builder
against a by-hand loop.
"""

import pytest
import torch

from alignment import attention_kl
from alignment.geometry.attention_probs import NO_WINDOW, LogitSpec, attention_probs
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)
from tests.test_align_loss import L, _compare, _mask, _states


def _seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("target", ["teacher_mix", "projected"])
def test_softcap_window_and_per_layer_scale_match_the_naive_reference(dtype, target):
    seed = _seed()
    win_t = torch.tensor([4, NO_WINDOW, 9])  # (L,) a sliding layer narrower than T, a full one
    if (
        target == "teacher_mix"
    ):  # the teacher's own heads (no teacher gradient needed in training, tested anyway)
        q_s, k_s, q_t, k_t = _states(4, 2, 8, 6, 3, 16, dtype, seed, scale=3.0)
        mix = torch.softmax(torch.randn(L, 4, 6, generator=torch.Generator().manual_seed(seed)), -1)
        mix = mix.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
        kw = dict(scale_s=8**-0.5, scale_t=torch.tensor([24**-0.5, 0.3, 0.2]), softcap_t=2.5, window_t=win_t)
        kw["head_mix"] = mix
        head_mask = torch.ones(L, 4, dtype=torch.bool)
        head_mask[0] = False  # layer 0 is sliced away: the per-layer scale and window must follow
        head_mask[2, 1] = False
        kw["head_mask"] = head_mask
    else:  # both sides capped and windowed (student windows at least as wide as the teacher's)
        q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, dtype, seed, scale=3.0)
        kw = dict(scale_s=0.3, scale_t=0.4, softcap_s=4.0, softcap_t=2.5, window_t=win_t)
        kw["window_s"] = torch.tensor([6, NO_WINDOW, 9])
    kw["temperature"] = 1.3
    _compare((q_s, k_s, q_t, k_t, _mask()), dict(kw, chunk_size=5), kw, dtype)


def test_softcap_and_window_change_the_kl_and_defaults_are_the_plain_path():
    q_s, k_s, q_t, k_t = _states(4, 2, 8, 4, 2, 8, torch.float64, _seed(), scale=3.0)
    plain = attention_kl(q_s, k_s, q_t, k_t, _mask(), scale_t=0.4)
    same = attention_kl(q_s, k_s, q_t, k_t, _mask(), scale_t=torch.full((L,), 0.4, dtype=torch.float64),
                        window_t=torch.full((L,), NO_WINDOW))  # fmt: skip
    torch.testing.assert_close(same, plain, rtol=1e-12, atol=0)
    for extra in (dict(softcap_t=1.0), dict(window_t=torch.tensor([3, 3, 3]))):
        assert (
            abs(attention_kl(q_s, k_s, q_t, k_t, _mask(), scale_t=0.4, **extra).item() - plain.item()) > 1e-3
        )


def test_attention_probs_matches_a_by_hand_loop():
    g = torch.Generator().manual_seed(_seed())
    Lx, H, G, n, D = 2, 4, 2, 11, 8
    q, k = (
        torch.randn(Lx, H, n, D, generator=g, dtype=torch.float64),
        torch.randn(Lx, G, n, D, generator=g, dtype=torch.float64),
    )
    spec = LogitSpec(
        torch.tensor([0.5, 0.25], dtype=torch.float64), softcap=1.5, window=torch.tensor([3, NO_WINDOW])
    )
    got = attention_probs(q, k, spec)  # (L, H, n, n)
    for layer, (scale, win) in enumerate([(0.5, 3), (0.25, n + 1)]):
        for h in range(H):
            for r in range(n):
                keys = [j for j in range(r + 1) if r - j < win]
                z = torch.stack([q[layer, h, r] @ k[layer, h // 2, j] * scale for j in keys])
                p = torch.softmax(1.5 * torch.tanh(z / 1.5), 0)
                want = torch.zeros(n, dtype=torch.float64)
                want[keys] = p
                torch.testing.assert_close(got[layer, h, r], want, rtol=1e-12, atol=1e-14)
    # batch layout with a key mask: a padding key gets no mass, a row without a visible key is all zeros
    qb, kb = q[None, 0], k[None, 0]  # (1, H, n, D)
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, 0] = False
    p = attention_probs(qb, kb, 0.3, key_mask=mask)
    assert torch.all(p[..., 0] == 0) and torch.all(p[0, :, 0] == 0)
    torch.testing.assert_close(p[0, :, 1:].sum(-1), torch.ones(H, n - 1, dtype=torch.float64))
