"""Capture parity: Q/K/V recorded through the registered attention rebuild the eager attention
probabilities, equal an independent per-layer recomputation, and leave the logits unchanged."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from pipeline.models.capture import capture_qkv
from tests.conftest import tiny_llama_config, tiny_qwen2_config

CONFIGS = {"llama": tiny_llama_config, "qwen2": tiny_qwen2_config}


def _model(arch: str, impl: str = "sdpa", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(CONFIGS[arch](), attn_implementation=impl).eval()


def _batch(seed: int = 1, B: int = 3, T: int = 11, left_pad: tuple[int, ...] = (0, 4, 7)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 101, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, p in enumerate(left_pad[:B]):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


def _rebuild_probs(q, k, scaling, mask):
    """Naive reference: softmax(q k^T * scale) with causal + padding mask.  q (B,H,T,D), k (B,G,T,D)."""
    B, H, T, _ = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)  # (B, H, T, D)
    scores = torch.einsum("bhtd,bhsd->bhts", q.double(), k.double()) * scaling  # (B, H, T, T)
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None] & mask.bool()[:, None, :]  # (B, T, T)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return torch.softmax(scores, dim=-1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_rebuilt_attention_matches_eager_output_attentions(arch, impl):
    ids, mask = _batch()
    eager = _model(arch, "eager")
    with torch.no_grad():
        ref = eager(ids, attention_mask=mask, output_attentions=True, use_cache=False).attentions
    model = _model(arch, impl)
    with torch.no_grad(), capture_qkv(model) as cap:
        model(ids, attention_mask=mask, use_cache=False)
    real = mask.bool()  # compare rows of real query tokens (padding rows are undefined)
    for layer in range(model.config.num_hidden_layers):
        H, G = model.config.num_attention_heads, model.config.num_key_value_heads
        D = getattr(model.config, "head_dim", None) or model.config.hidden_size // H
        assert cap.q[layer].shape == (3, H, 11, D)
        assert cap.k[layer].shape == (3, G, 11, D) and cap.v[layer].shape == cap.k[layer].shape
        probs = _rebuild_probs(cap.q[layer], cap.k[layer], cap.scaling[layer], mask)
        diff = (probs.float() - ref[layer]).abs().permute(0, 2, 1, 3)[real]  # (N_real, H, T)
        assert diff.max() < 1e-5, (arch, impl, layer, diff.max())


def test_captured_states_equal_independent_recomputation():
    """Q/K post-RoPE and V recomputed from each layer's input hidden states (naive reference)."""
    ids, mask = _batch()
    model = _model("llama")
    with torch.no_grad(), capture_qkv(model) as cap:
        out = model(ids, attention_mask=mask, use_cache=False, output_hidden_states=True)
    position_ids = torch.arange(ids.shape[1])[None].expand_as(ids)  # forward() default without position_ids
    for layer_idx, layer in enumerate(model.model.layers):
        h = layer.input_layernorm(out.hidden_states[layer_idx])  # (B, T, hidden)
        attn = layer.self_attn
        B, T, _ = h.shape
        q = attn.q_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = attn.k_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, G, T, D)
        v = attn.v_proj(h).view(B, T, -1, attn.head_dim).transpose(1, 2)  # (B, G, T, D)
        cos, sin = model.model.rotary_emb(h, position_ids)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        for name, ref in (("q", q), ("k", k), ("v", v)):
            got = getattr(cap, name)[layer_idx]
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logits_unchanged_including_left_padding(arch):
    ids, mask = _batch()
    model = _model(arch)
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits
        with capture_qkv(model, layers=[0, 2]):
            got = model(ids, attention_mask=mask, use_cache=False).logits
        torch.testing.assert_close(got, ref, atol=0, rtol=0)
        # The padded rows must equal the same sequence run alone without padding: this fails if the
        # capture attention were registered without its mask function (transformers then passes None).
        for b, p in enumerate((0, 4, 7)):
            with capture_qkv(model):
                alone = model(ids[b : b + 1, p:], use_cache=False).logits
            torch.testing.assert_close(got[b, p:], alone[0], atol=1e-5, rtol=1e-4)


def test_layer_and_component_selection_and_stack_order():
    ids, mask = _batch()
    model = _model("llama")
    with torch.no_grad(), capture_qkv(model, layers=[3, 1], components=("k",)) as cap:
        model(ids, attention_mask=mask, use_cache=False)
    assert cap.layers == [1, 3]
    assert sorted(cap.k) == [1, 3] and not cap.q and not cap.v
    st = cap.stack("k", [3, 1])  # (B, L, G, T, D), order as requested
    assert st.shape == (3, 2, 2, 11, 16)
    assert torch.equal(st[:, 0], cap.k[3]) and torch.equal(st[:, 1], cap.k[1])
    with pytest.raises(ValueError, match="component='q'"):
        cap.stack("q")
    with pytest.raises(KeyError, match=r"\[2\]"):
        cap.stack("k", [2])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(layers=[4]), r"layers=\[4\]"),
        (dict(layers=[-1]), r"layers=\[-1\]"),
        (dict(layers=[]), r"layers=\[\]"),
        (dict(components=("q", "x")), "components="),
    ],
)
def test_bad_arguments_raise(kw, match):
    model = _model("llama")
    with pytest.raises(ValueError, match=match), capture_qkv(model, **kw):
        pass
    assert model.config._attn_implementation == "sdpa"


def test_restores_implementation_and_registry_even_on_error():
    model = _model("llama", "eager")
    before_attn = set(AttentionInterface._global_mapping)
    before_mask = set(AttentionMaskInterface._global_mapping)
    with pytest.raises(RuntimeError, match="boom"), capture_qkv(model):
        assert model.config._attn_implementation.startswith("kvmap_capture_")
        with pytest.raises(RuntimeError, match="already inside"), capture_qkv(model):
            pass
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "eager"
    assert set(AttentionInterface._global_mapping) == before_attn
    assert set(AttentionMaskInterface._global_mapping) == before_mask
    with capture_qkv(model):  # usable again after the failure
        pass


def test_detach_false_keeps_graph_and_detach_true_does_not():
    ids, mask = _batch()
    model = _model("llama").train()
    with capture_qkv(model, layers=[2], detach=False) as cap:
        model(ids, attention_mask=mask, use_cache=False)
    loss = cap.stack("q").pow(2).mean() + cap.stack("k").pow(2).mean() + cap.stack("v").pow(2).mean()
    loss.backward()
    attn = model.model.layers[2].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert model.model.layers[3].self_attn.q_proj.weight.grad is None  # downstream layer not involved
    with capture_qkv(model, layers=[2]) as cap:
        model(ids, attention_mask=mask, use_cache=False)
    assert not cap.q[2].requires_grad and cap.q[2].grad_fn is None


def test_detach_false_under_activation_checkpointing_gives_the_same_gradients():
    """Non-reentrant checkpointing recomputes attention in backward (records are overwritten then), but
    the gradients through the captured tensors equal those without checkpointing."""
    ids, mask = _batch()

    def grads(checkpointing: bool):
        model = _model("llama").train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        with capture_qkv(model, layers=[1, 2], detach=False) as cap:
            out = model(ids, attention_mask=mask, labels=ids, use_cache=False)
            loss = out.loss + cap.stack("k").pow(2).mean() + cap.stack("q").pow(2).mean()
            loss.backward()
        return [p.grad for p in model.parameters()]

    for a, b in zip(grads(False), grads(True)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
