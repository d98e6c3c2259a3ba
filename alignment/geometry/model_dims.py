"""The one reader of a model's attention geometry: an HF config object, or the HF-config-like dict stage 2
rebuilds from a store's `teacher` attributes (`pipeline.models.geometry.teacher_config_from_attrs`).

Shapes: inv_freq (P,) rotary inverse frequencies, P = rotary pairs per head (HF rotate_half layout:
pair i = dims (i, i + D/2)); per-layer tuples have L entries.

Per-layer attention (what `alignment.geometry.attention_probs` needs to rebuild a layer's probabilities from Q/K):
the values stage 1 measured from the running model (`kvmap_attention`: {"scaling", "softcap",
"sliding_window"} lists, pipeline/models/geometry.py) when present, else the config's own rule: scaling =
query_pre_attn_scalar**-0.5 if set, else head_dim**-0.5; softcap = attn_logit_softcapping; window =
sliding_window on layers whose layer_types entry is "sliding_attention" (every layer when the config has a
window but no layer_types, e.g. Mistral; none when use_sliding_window is false, e.g. Qwen2's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from alignment.geometry.attention_probs import LogitSpec


@dataclass(frozen=True)
class AttentionDims:
    """num_layers L, query heads H, KV heads G, head dim D, attention scaling, and rotary settings."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    rope_type: str | None
    rope_theta: float | None
    rotary_dim: int | None  # dims that rotate (head_dim * partial_rotary_factor)
    layer_scaling: tuple[float, ...] = ()  # (L,) softmax scale per layer
    softcap: float | None = None  # tanh attention-logit cap (every layer), None = none
    layer_window: tuple[int | None, ...] = ()  # (L,) sliding window per layer, None = full causal
    hidden_size: int | None = None
    vocab_size: int | None = None
    measured: bool = False  # per-layer values measured by stage 1's capture (else the config's rule)

    def logit_spec(self, layers: Sequence[int] | None = None) -> LogitSpec:
        """LogitSpec of `layers` (default all) in that order: scale float if equal on all of them, else (L,)."""
        layers = range(self.num_layers) if layers is None else list(layers)
        return LogitSpec.per_layer(
            [self.layer_scaling[i] for i in layers],
            [self.softcap] * len(layers),
            [self.layer_window[i] for i in layers],
        )


def _get(cfg: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        v = cfg.get(n) if isinstance(cfg, dict) else getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def _text_config(cfg: Any) -> Any:
    if not isinstance(cfg, dict) and hasattr(cfg, "get_text_config"):
        return cfg.get_text_config(decoder=True)
    return cfg


def _rope_params(cfg: Any) -> dict:
    rp = _get(cfg, "rope_parameters", "rope_scaling")
    rp = dict(rp) if isinstance(rp, dict) else {}
    if isinstance(rp.get("full_attention"), dict):  # per layer type (Gemma 3): the global layers' rotary
        rp = dict(rp["full_attention"])
    if "rope_theta" not in rp and _get(cfg, "rope_theta") is not None:
        rp["rope_theta"] = _get(cfg, "rope_theta")
    rp.setdefault("rope_type", rp.get("type", "default"))
    return rp


def attention_dims(cfg: Any, name: str = "config") -> AttentionDims:
    """AttentionDims of an HF config (object or dict).

    Fallbacks: layers from num_hidden_layers | n_layer | num_layers; heads from num_attention_heads |
    n_head; KV heads from num_key_value_heads, else 1 if multi_query, else the query head count; head_dim,
    else hidden_size // heads; scaling = query_pre_attn_scalar**-0.5 if set, else head_dim**-0.5.
    """
    cfg = _text_config(cfg)
    L = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    H = _get(cfg, "num_attention_heads", "n_head")
    if L is None or H is None:
        raise ValueError(f"{name}: no num_hidden_layers / num_attention_heads: expected a decoder HF config")
    G = _get(cfg, "num_key_value_heads", default=1 if _get(cfg, "multi_query", default=False) else H)
    D = _get(cfg, "head_dim")
    if D is None:
        hidden = _get(cfg, "hidden_size", "n_embd")
        if hidden is None:
            raise ValueError(f"{name}: no head_dim and no hidden_size: cannot infer the head dim")
        D = hidden // H
    if H % G:
        raise ValueError(f"{name}: num_attention_heads={H} is not a multiple of num_key_value_heads={G}")
    pre = _get(cfg, "query_pre_attn_scalar")
    scaling = float(pre) ** -0.5 if pre is not None else float(D) ** -0.5
    rp = _rope_params(cfg)
    theta = rp.get("rope_theta")
    partial = float(_get(cfg, "partial_rotary_factor", default=rp.get("partial_rotary_factor", 1.0)))
    layer_scaling, softcap, windows, measured = _layer_attention(cfg, int(L), scaling, name)
    hidden, vocab = _get(cfg, "hidden_size", "n_embd"), _get(cfg, "vocab_size")
    return AttentionDims(
        num_layers=int(L),
        num_heads=int(H),
        num_kv_heads=int(G),
        head_dim=int(D),
        scaling=layer_scaling[0] if measured else scaling,  # the uniform (or first layer's) scale
        rope_type=rp.get("rope_type") if theta is not None else None,
        rope_theta=float(theta) if theta is not None else None,
        rotary_dim=int(D * partial) if theta is not None else None,
        layer_scaling=layer_scaling,
        softcap=softcap,
        layer_window=windows,
        hidden_size=None if hidden is None else int(hidden),
        vocab_size=None if vocab is None else int(vocab),
        measured=measured,
    )


def _config_windows(cfg: Any, L: int) -> tuple[int | None, ...]:
    """Sliding window per layer by the config's rule (module docstring)."""
    win = _get(cfg, "sliding_window")
    if win is None or _get(cfg, "use_sliding_window") is False:
        return (None,) * L
    types = _get(cfg, "layer_types")
    if types:
        return tuple(int(win) if t == "sliding_attention" else None for t in types)
    return (int(win),) * L


def _layer_attention(cfg: Any, L: int, scaling: float, name: str):
    """(per-layer scaling, softcap, per-layer windows, measured) from `kvmap_attention`, else the config."""
    m = _get(cfg, "kvmap_attention")
    if not m:
        cap = _get(cfg, "attn_logit_softcapping")
        return (scaling,) * L, None if cap is None else float(cap), _config_windows(cfg, L), False
    sc, caps, wins = m.get("scaling"), m.get("softcap"), m.get("sliding_window")
    if not all(isinstance(x, list) and len(x) == L for x in (sc, caps, wins)):
        raise ValueError(
            f"{name}: kvmap_attention={m!r}: expected scaling / softcap / sliding_window lists of {L} layers"
        )
    if len(set(caps)) > 1:
        raise ValueError(f"{name}: attention softcap per layer {caps}: expected one value for all layers")
    cap = caps[0]
    return (
        tuple(float(x) for x in sc),
        None if cap is None else float(cap),
        tuple(None if w is None else int(w) for w in wins),
        True,
    )


def rope_inv_freq(cfg: Any, name: str = "config") -> torch.Tensor:
    """(P,) float64 rotary inverse frequencies of an HF config (transformers' own init for non-default types)."""
    dims = attention_dims(cfg, name)
    if dims.rope_theta is None:
        raise ValueError(
            f"{name}: no rope_theta / rope_parameters: expected a RoPE model for rope_consistent"
        )
    if dims.rope_type in (None, "default"):
        r = dims.rotary_dim
        return 1.0 / (dims.rope_theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    # Lazy: only scaled rotary types need transformers' own init, and importing transformers (~0.6 s here)
    # would otherwise load with `alignment`, which is torch-only tensor math.
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if dims.rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"{name}: rope_type={dims.rope_type!r}: expected one of {sorted(ROPE_INIT_FUNCTIONS)}"
        )
    inv_freq, _ = ROPE_INIT_FUNCTIONS[dims.rope_type](_text_config(cfg), None)
    return inv_freq.double()
