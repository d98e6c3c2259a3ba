"""Read the attention geometry the aligner needs from an HF config (with the usual fallbacks).

Shapes: inv_freq (P,) rotary inverse frequencies, P = rotary pairs per head (HF rotate_half layout:
pair i = dims (i, i + D/2)).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


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
    return AttentionDims(
        num_layers=int(L),
        num_heads=int(H),
        num_kv_heads=int(G),
        head_dim=int(D),
        scaling=scaling,
        rope_type=rp.get("rope_type") if theta is not None else None,
        rope_theta=float(theta) if theta is not None else None,
        rotary_dim=int(D * partial) if theta is not None else None,
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
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if dims.rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(
            f"{name}: rope_type={dims.rope_type!r}: expected one of {sorted(ROPE_INIT_FUNCTIONS)}"
        )
    inv_freq, _ = ROPE_INIT_FUNCTIONS[dims.rope_type](_text_config(cfg), None)
    return inv_freq.double()
