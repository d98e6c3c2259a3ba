"""Needle attention (trainer/eval/needle.py): the needle found in P, and each head's mass / pointing checked
against attention weights recomputed by hand from the layer's own q/k projections."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from tests.conftest import tiny_llama_config
from trainer.eval.needle import (
    best_head,
    head_needle_stats,
    needle_agreement,
    needle_positions,
    use_eager_attention,
)


def _sample(prompt, r, a, ans):
    ids = torch.tensor(prompt + r + a)
    seg = torch.tensor([0] * len(prompt) + [1] * len(r) + [2] * len(a))
    mask = torch.zeros(len(ids), dtype=torch.bool)
    for j in ans:
        mask[len(prompt) + len(r) + j] = True
    return ids, seg, mask


def test_needle_positions_find_the_single_run_in_the_prompt():
    # P holds the answer run [7, 8] once at positions 3-4; A's answer tokens are at A[2:4]
    ids, seg, mask = _sample([5, 6, 9, 7, 8, 9], [11, 12], [13, 14, 7, 8], ans=[2, 3])
    q, needle = needle_positions(ids, seg, mask)
    assert needle == [3, 4]
    assert q == 6 + 2 + 2 - 1  # no answer in R: the row before A's first answer token
    # R quotes the answer: the row before R's first answer token (where it is looked up)
    ids4, seg4, mask4 = _sample([5, 6, 9, 7, 8, 9], [11, 7, 8], [13, 7, 8], ans=[1, 2])
    mask4[6 + 1], mask4[6 + 2] = True, True
    assert needle_positions(ids4, seg4, mask4) == (6, [3, 4])
    # twice in P (ambiguous) or absent: no needle
    ids2, seg2, mask2 = _sample([7, 8, 9, 7, 8], [11], [7, 8], ans=[0, 1])
    assert needle_positions(ids2, seg2, mask2) is None
    ids3, seg3, mask3 = _sample([5, 6], [11], [7, 8], ans=[0, 1])
    assert needle_positions(ids3, seg3, mask3) is None


def _naive_rows(model, ids, query):
    """Every head's attention row at `query`, recomputed from each layer's q/k projections (hooks)."""
    cfg = model.config
    inputs = {}
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda m, a, kw, i=i: inputs.__setitem__(i, (kw["hidden_states"], kw["position_embeddings"])),
            with_kwargs=True,
        )
        for i, layer in enumerate(model.model.layers)
    ]
    model(input_ids=ids[None], use_cache=False)
    for h in hooks:
        h.remove()
    rows = []
    d, T = cfg.head_dim, ids.shape[0]
    for i, layer in enumerate(model.model.layers):
        x, (cos, sin) = inputs[i]
        att = layer.self_attn
        q = att.q_proj(x).view(1, T, -1, d).transpose(1, 2)
        k = att.k_proj(x).view(1, T, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, cfg.num_attention_heads // cfg.num_key_value_heads)
        s = torch.einsum("hd,htd->ht", q[0, :, query], k[0, :, : query + 1]) / math.sqrt(d)  # (H, query+1)
        w = torch.zeros(s.shape[0], T)
        w[:, : query + 1] = s.softmax(-1)
        rows.append(w)
    return torch.cat(rows)  # (N, T)


@pytest.mark.parametrize("seed", [0, 1])
def test_head_needle_stats_match_attention_recomputed_by_hand(seed):
    torch.manual_seed(seed)
    model = use_eager_attention(LlamaForCausalLM(tiny_llama_config()).eval())
    ids = torch.randint(3, 100, (21,))
    query, needle = 17, [4, 5, 6]
    mass, points = head_needle_stats(model, ids, query, needle)
    with torch.no_grad():
        rows = _naive_rows(model, ids, query)
    assert mass.shape == (4 * 6,) and points.shape == (24,)
    torch.testing.assert_close(mass, rows[:, needle].sum(-1), rtol=1e-5, atol=1e-6)
    assert torch.equal(points, torch.isin(rows.argmax(-1), torch.tensor(needle)))
    m, p = best_head(mass, points)
    assert m == pytest.approx(float(rows[:, needle].sum(-1).max()), rel=1e-5)
    assert p == bool(points[int(mass.argmax())])


def test_needle_agreement_conditions_on_the_teacher():
    assert needle_agreement([True, False, True, False], [True, True, False, False]) == 0.5
    assert math.isnan(needle_agreement([True], [False]))
