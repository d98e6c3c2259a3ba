"""The teacher's attention geometry in the store: measured and written by stage 1, read back by stage 2 and the
stage-1 tools, so that the teacher's own attention can be rebuilt from the stored Q/K without the teacher.

Shapes: none (metadata); per-layer lists have L = num_layers entries (every teacher layer, stored or not).

Store attributes (`teacher` group attribute, docs/concepts/store.md "Teacher attention geometry"), beside num_layers / num_heads / ...:
  rope                    the HF config's own rotary keys (rope_parameters / rope_theta / rope_scaling)
  query_pre_attn_scalar   Gemma's scale base (scaling = its **-0.5), or null
  partial_rotary_factor   fraction of head dims that rotate, or null
  attn_logit_softcapping  tanh cap of the attention logits (Gemma 2), or null
  sliding_window          window size of the sliding layers, or null
  layer_types             per layer "sliding_attention" | "full_attention" ..., or null
  attention               what the capture measured on a probe forward (pipeline/models/capture.py), per layer:
                          {"scaling": [L floats], "softcap": [L float|null], "sliding_window": [L int|null]}

Stage 2 reads them with `teacher_config_from_attrs` (an HF-config-like dict, `attention` under the key
`kvmap_attention`) and `alignment.geometry.model_dims.attention_dims` (the one geometry reader), whose per-layer values
`alignment.geometry.attention_probs` uses. A store written before these attributes (no `teacher.attention`) reads by
this rule: scaling = head_dim**-0.5, no softcap, no sliding window, with a one-time warning naming the store;
refused (re-extract) when its model_type is in NEEDS_GEOMETRY, where that rule is known to be wrong.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from alignment.geometry.attention_probs import LogitSpec
from alignment.geometry.model_dims import AttentionDims, attention_dims
from pipeline.models.capture import capture_qkv, num_layers

# Teacher attributes that only describe attention geometry: derived from the teacher's config (already in the
# store's config hash), so they are left out of the extraction fingerprint and old stores stay resumable.
GEOMETRY_KEYS = (
    "query_pre_attn_scalar",
    "partial_rotary_factor",
    "attn_logit_softcapping",
    "sliding_window",
    "layer_types",
    "attention",
)
# model types whose attention is not head_dim**-0.5 / no softcap / no window: an old store of one is refused
NEEDS_GEOMETRY = ("gemma2", "gemma3", "gemma3_text", "gemma3n", "gemma3n_text", "cohere2", "gpt_oss")
NEEDS_GEOMETRY += ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid")
_warned: set[str] = set()


def _text_config(hf_config):
    return hf_config.get_text_config(decoder=True) if hasattr(hf_config, "get_text_config") else hf_config


def measure_attention(model) -> dict[str, list]:
    """Per-layer scaling / softcap / sliding window as the model's attention layers receive them (probe
    forward of two tokens through `capture_qkv`)."""
    device = next(model.parameters()).device
    with torch.no_grad(), capture_qkv(model, components=("k",)) as cap:
        model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False)
    layers = range(num_layers(model))
    return {
        "scaling": [cap.scaling[i] for i in layers],
        "softcap": [cap.softcap[i] for i in layers],
        "sliding_window": [cap.sliding_window[i] for i in layers],
    }


def teacher_geometry_attrs(model) -> dict[str, Any]:
    """The geometry keys of the store's `teacher` attributes (module docstring) for a loaded teacher."""
    cfg = _text_config(model.config)
    rope = getattr(cfg, "rope_parameters", None)
    partial = getattr(cfg, "partial_rotary_factor", None)
    if partial is None and isinstance(rope, dict):
        partial = rope.get("partial_rotary_factor")
    types = getattr(cfg, "layer_types", None)
    return {
        "query_pre_attn_scalar": getattr(cfg, "query_pre_attn_scalar", None),
        "partial_rotary_factor": partial,
        "attn_logit_softcapping": getattr(cfg, "attn_logit_softcapping", None),
        "sliding_window": getattr(cfg, "sliding_window", None),
        "layer_types": list(types) if types is not None else None,
        "attention": measure_attention(model),
    }


def _old_store(t: dict, store: str) -> None:
    """The documented rule for a store without `teacher.attention` (module docstring)."""
    mt = t.get("model_type")
    if mt in NEEDS_GEOMETRY:
        raise ValueError(
            f"store '{store}' has no teacher.attention (written before attention geometry was stored) and its "
            f"teacher model_type={mt!r} needs it (scaling / softcap / sliding window): re-extract the store"
        )
    if store not in _warned:
        _warned.add(store)
        warnings.warn(
            f"store '{store}' has no teacher.attention (written before attention geometry was stored): assuming "
            "scaling head_dim**-0.5, no softcap, no sliding window (right for Llama/Qwen2-style teachers)",
            stacklevel=3,
        )


def teacher_config_from_attrs(attrs: dict[str, Any], store: str = "store") -> dict[str, Any]:
    """An HF-config-like dict of the teacher's attention geometry, from the store's `teacher` attributes.

    The teacher itself is never loaded in stage 2; the aligner, the loss and the tools only need its geometry
    (layers, heads, KV heads, head dim, rotary settings, per-layer scaling / softcap / window).
    Example:
        >>> attention_dims(teacher_config_from_attrs(store.attrs, store.path)).logit_spec(store.layers)
    """
    t = attrs.get("teacher")
    if not isinstance(t, dict):
        raise ValueError(f"store attrs 'teacher'={t!r}: expected a mapping with the teacher's geometry")
    need = ("num_layers", "num_heads", "num_kv_heads", "head_dim")
    missing = [k for k in need if t.get(k) is None]
    if missing:
        raise ValueError(
            f"store attrs 'teacher' lacks {missing}: expected {list(need)} (re-extract the store)"
        )
    cfg: dict[str, Any] = {
        "model_type": t.get("model_type"),
        "num_hidden_layers": int(t["num_layers"]),
        "num_attention_heads": int(t["num_heads"]),
        "num_key_value_heads": int(t["num_kv_heads"]),
        "head_dim": int(t["head_dim"]),
        "hidden_size": t.get("hidden_size"),
        "vocab_size": t.get("vocab_size"),
    }
    rope = t.get("rope")
    if isinstance(rope, dict):
        # extract.py records the teacher HF config's own rotary keys (rope_parameters / rope_theta /
        # rope_scaling), so they merge back into an HF-config-like dict as they were.
        cfg.update({k: v for k, v in rope.items() if v is not None})
    elif isinstance(rope, (int, float)):
        cfg["rope_theta"] = float(rope)
    cfg.update({k: t[k] for k in GEOMETRY_KEYS[:-1] if t.get(k) is not None})
    if t.get("attention"):
        cfg["kvmap_attention"] = t["attention"]
    else:
        _old_store(t, str(store))
    return cfg


def store_teacher_dims(store) -> AttentionDims:
    """AttentionDims of a store's teacher (a `pipeline.store.reader.KVStore`)."""
    return attention_dims(teacher_config_from_attrs(store.attrs, store.path), f"store '{store.path}' teacher")


def store_logit_spec(store) -> LogitSpec:
    """LogitSpec of the store's stored layers, in `store.layers` order (scale / softcap / window per layer)."""
    return store_teacher_dims(store).logit_spec(store.layers)


def model_geometry(hf_config) -> dict[str, Any]:
    """Shape summary of an HF config: layers, heads, kv_heads, head_dim, hidden, rope_theta, vocab.

    A dict view of `alignment.geometry.model_dims.attention_dims` (same fallbacks: the text sub-config of multimodal
    configs; kv_heads = heads (MHA); head_dim = hidden // heads; rope_theta from rope_parameters, then
    rope_theta, else None).
    """
    d = attention_dims(hf_config)
    return dict(
        layers=d.num_layers,
        heads=d.num_heads,
        kv_heads=d.num_kv_heads,
        head_dim=d.head_dim,
        hidden=d.hidden_size,
        rope_theta=d.rope_theta,
        vocab=d.vocab_size,
    )
