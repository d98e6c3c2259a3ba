"""Cross-tokenizer alignment W, warped attention KL and cross-vocabulary KD against references.

The synthetic pair: the teacher tokenises a text character by character, the student by pairs of characters,
so W is known by construction (each student row: 1/2 on each of its two characters).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alignment.losses.attention_kl import attention_kl
from alignment.losses.cross_attention import naive_warped_attention_kl, teacher_attention, warped_attention_kl
from alignment.losses.cross_vocab import CrossVocabKD, cross_vocab_kd, exact_match_map, naive_cross_vocab_kd
from alignment.mapping.char_alignment import alignment_plan, dense_alignment, kd_positions, token_alignment

torch.set_num_threads(1)
# dtype -> (value rtol, gradient atol) of the fast paths against their float64 references
TOL = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}


def char_spans(n: int) -> np.ndarray:
    return np.stack([np.arange(n), np.arange(n) + 1], 1)


def pair_spans(n: int) -> np.ndarray:
    starts = np.arange(0, n, 2)
    return np.stack([starts, np.minimum(starts + 2, n)], 1)


def pair_plan(B: int, n: int):
    taps = [token_alignment(pair_spans(n), char_spans(n)) for _ in range(B)]
    seg = torch.zeros(B, len(pair_spans(n)), dtype=torch.long)
    return alignment_plan(taps, seg, n)


def test_w_of_the_synthetic_pair_is_known_by_construction():
    W = dense_alignment(pair_plan(1, 7))[0]  # (4, 7)
    expected = torch.zeros(4, 7)
    for i in range(3):
        expected[i, 2 * i : 2 * i + 2] = 0.5
    expected[3, 6] = 1.0
    assert torch.equal(W, expected)


def test_w_rows_sum_to_one_and_follow_overlaps_with_templates_and_gaps():
    # teacher "<t>hello world</t>" (content 3..14), student "[[hello world]]" (content 2..13)
    t_text, s_text = "<t>hello world</t>", "[[hello world]]"
    t_spans = np.array([[-1, -1], [3, 6], [6, 8], [8, 14], [-1, -1]])  # "<t>", "hel", "lo", " world", "</t>"
    s_spans = np.array([[0, 2], [2, 4], [4, 9], [9, 13], [13, 15]])  # "[[", "he", "llo w", "orld", "]]"
    index, weight, has_row = token_alignment(s_spans, t_spans, [(2, 13)], [(3, 14)], s_text, t_text)
    assert has_row.tolist() == [False, True, True, True, False]
    plan = alignment_plan([(index, weight, has_row)], torch.zeros(1, 5, dtype=torch.long), 5)
    W = dense_alignment(plan)[0]
    assert torch.allclose(W[has_row].sum(1), torch.ones(3))
    assert torch.allclose(W[2], torch.tensor([0, 1 / 5, 2 / 5, 2 / 5, 0]))  # "llo w": l | lo | " w"
    assert torch.equal(W[3], torch.tensor([0.0, 0, 0, 1, 0]))
    assert kd_positions(plan)[0].tolist() == [-1, 1, 3, 3, -1]


def test_identical_tokenisations_give_the_identity_and_content_mismatch_is_refused():
    spans = np.array([[-1, -1], [0, 3], [3, 5], [3, 5]])  # a template token and two byte pieces of one char
    index, weight, has_row = token_alignment(spans, spans)
    assert index[:, 0].tolist() == [0, 1, 2, 3] and weight[:, 0].tolist() == [1, 1, 1, 1] and has_row.all()
    with pytest.raises(ValueError, match="content differ at content character 3"):
        token_alignment(spans, spans, None, None, "abcd", "abce")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warped_attention_of_the_synthetic_pair_is_exact(dtype):
    g = torch.Generator().manual_seed(0)
    B, L, H, n, D = 2, 1, 2, 6, 4
    q_t, k_t = (
        torch.randn(B, L, H, n, D, generator=g, dtype=dtype),
        torch.randn(B, L, H, n, D, generator=g, dtype=dtype),
    )
    t_mask = torch.ones(B, n, dtype=torch.bool)
    from alignment.geometry.attention_probs import LogitSpec

    A = teacher_attention(q_t, k_t, t_mask, LogitSpec(D**-0.5), None)  # (B, L, H, 6, 6)
    from alignment.losses.cross_attention import warped_target

    P, _ = warped_target(A, dense_alignment(pair_plan(B, n)).to(dtype), torch.ones(B, 3, dtype=torch.bool))
    # by hand: P[i, i'] ~ sum of the 2x2 block of A, causal on pairs, renormalised
    block = A.reshape(B, L, H, 3, 2, 3, 2).sum((4, 6)) * 0.25
    block = block * torch.ones(3, 3, dtype=dtype).tril()
    expected = block / block.sum(-1, keepdim=True)
    assert torch.allclose(P, expected, rtol=0, atol=1e-12 if dtype == torch.float64 else 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_warped_attention_kl_matches_the_naive_reference_on_values_and_gradients(dtype):
    g = torch.Generator().manual_seed(1)
    B, L, H_t, G_t, H_s, G_s, n, D_t, D_s = 2, 2, 4, 2, 2, 1, 6, 5, 3
    q_t = torch.randn(B, L, H_t, n, D_t, generator=g, dtype=dtype)
    k_t = torch.randn(B, L, G_t, n, D_t, generator=g, dtype=dtype)
    q_s = torch.randn(B, L, H_s, 3, D_s, generator=g, dtype=dtype, requires_grad=True)
    k_s = torch.randn(B, L, G_s, 3, D_s, generator=g, dtype=dtype, requires_grad=True)
    mix = torch.softmax(torch.randn(H_s, H_t, generator=g, dtype=dtype), -1)
    plan = pair_plan(B, n)
    s_mask, t_mask = torch.ones(B, 3, dtype=torch.bool), torch.ones(B, n, dtype=torch.bool)
    s_mask[1, 2], t_mask[1, 4:] = False, False  # sample 1: a shorter pair of sequences (padding)
    fast = warped_attention_kl(q_s, k_s, q_t, k_t, plan, s_mask, t_mask, head_mix=mix)
    ref = naive_warped_attention_kl(q_s, k_s, q_t, k_t, dense_alignment(plan), s_mask, t_mask, head_mix=mix)
    rtol, atol = TOL[dtype]
    assert fast.dtype == dtype and torch.allclose(fast.double(), ref, rtol=rtol)
    g_fast = torch.autograd.grad(fast, (q_s, k_s))
    g_ref = torch.autograd.grad(ref, (q_s, k_s))
    for a, b in zip(g_fast, g_ref):
        assert torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol)


def test_identity_w_gives_todays_attention_kl():
    g = torch.Generator().manual_seed(2)
    B, L, H, T, D = 2, 2, 3, 7, 4
    q_s, k_s, q_t, k_t = (torch.randn(B, L, H, T, D, generator=g) for _ in range(4))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 5:] = False
    taps = [token_alignment(char_spans(T), char_spans(T)) for _ in range(B)]
    seg = torch.where(mask, 0, -1)
    plan = alignment_plan(taps, seg, T)
    q_s.requires_grad_(True)
    today = attention_kl(q_s, k_s, q_t, k_t, mask, drop_keys=[0])
    cross = warped_attention_kl(q_s, k_s, q_t, k_t, plan, mask, mask, drop_keys=[0])
    assert torch.allclose(cross, today, rtol=1e-6, atol=1e-7)
    ga, gb = torch.autograd.grad(today, q_s)[0], torch.autograd.grad(cross, q_s)[0]
    assert torch.allclose(ga, gb, atol=1e-6)


@pytest.mark.parametrize("mode", ["exact_uld", "uld"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cross_vocab_kd_matches_the_naive_reference_on_values_and_gradients(mode, dtype):
    g = torch.Generator().manual_seed(3)
    N, V_s, V_t, K = 5, 11, 17, 4
    logits = torch.randn(N, V_s, generator=g, dtype=dtype, requires_grad=True)
    t_full = torch.log_softmax(torch.randn(N, V_t, generator=g, dtype=torch.float64) * 2, -1)
    t_logp, t_idx = t_full.topk(K, -1)
    t_logp = t_logp.to(dtype)
    # teacher ids 0..5 map onto student ids, 2 and 3 onto the same one (their mass adds up)
    vocab_map = torch.full((V_t,), -1, dtype=torch.long)
    vocab_map[:6] = torch.tensor([4, 0, 7, 7, 2, 9])
    vm = vocab_map if mode == "exact_uld" else None
    fast = cross_vocab_kd(logits, t_logp, t_idx, vm)
    ref = naive_cross_vocab_kd(logits, t_logp, t_idx, vm)
    rtol, atol = TOL[dtype]
    assert torch.allclose(fast.double(), ref.double(), rtol=rtol if dtype == torch.float64 else 1e-5)
    ga = torch.autograd.grad(fast, logits)[0]
    gb = torch.autograd.grad(ref, logits)[0]
    assert torch.allclose(ga.double(), gb.double(), atol=1e-6)
    assert float(CrossVocabKD(mode, vocab_map)(logits, t_logp, t_idx).detach()) == pytest.approx(
        float(fast.detach())
    )


def test_exact_match_map_and_bad_mode():
    m = exact_match_map(["a", "b", None, "", "c", "a"], ["c", "a", "a", "x"])
    assert m.tolist() == [1, -1, -1, -1, 0, 1]
    with pytest.raises(ValueError, match="loss_config.kd_cross='kl'"):
        CrossVocabKD("kl")
