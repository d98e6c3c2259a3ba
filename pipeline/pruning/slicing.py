"""Cut a Llama / Qwen2 teacher down to a `PrunePlan`: sliced weights and a rewritten HF config.

Shape glossary: H query heads, G KV heads, D head dim (never pruned), I MLP channels, E hidden channels,
V vocab; `_s` the kept counts. Linear weights are (out, in).

    embed_tokens / lm_head (V, E) -> (V, E_s)           every *norm.weight (E,) -> (E_s,)
    q_proj (H*D, E) -> (H_s*D, E_s)   + bias rows        o_proj (E, H*D) -> (E_s, H_s*D)
    k_proj, v_proj (G*D, E) -> (G_s*D, E_s) + bias rows  gate/up (I, E) -> (I_s, E_s); down (E, I) -> (E_s, I_s)

A parameter the rules do not know is an error (a silent copy of an unknown tensor could be wrong).
The model is built from the new config and loaded with `strict=True`, so every tensor is accounted for.
"""

from __future__ import annotations

import copy
import re

import torch
from transformers import AutoModelForCausalLM

from pipeline.models.geometry import model_geometry
from pipeline.pruning.select import PrunePlan, TeacherShape

SUPPORTED = ("llama", "qwen2")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def teacher_shape(model) -> TeacherShape:
    """Geometry of a supported teacher; one-line ValueError for other architectures."""
    c = model.config
    if c.model_type not in SUPPORTED:
        raise ValueError(f"teacher model_type={c.model_type!r}: pruning supports {list(SUPPORTED)}")
    g = model_geometry(c)
    return TeacherShape(
        g["layers"], g["heads"], g["kv_heads"], g["head_dim"], g["hidden"], c.intermediate_size
    )


def _rows(heads: list[int], D: int) -> torch.Tensor:
    """Flat (H_s*D,) row indices of whole heads (head h owns rows h*D .. h*D+D-1)."""
    return (torch.tensor(heads)[:, None] * D + torch.arange(D)[None, :]).flatten()


def _slice_layer_param(name: str, w: torch.Tensor, i: int, plan: PrunePlan, D: int, hid) -> torch.Tensor:
    """One parameter of student layer i (teacher layer plan.layers[i]) cut to the plan."""
    q, kv, mlp = _rows(plan.q_heads[i], D), _rows(plan.kv_heads[i], D), torch.tensor(plan.mlp[i])
    rows_cols = {
        "self_attn.q_proj": (q, hid),
        "self_attn.k_proj": (kv, hid),
        "self_attn.v_proj": (kv, hid),
        "self_attn.o_proj": (hid, q),
        "mlp.gate_proj": (mlp, hid),
        "mlp.up_proj": (mlp, hid),
        "mlp.down_proj": (hid, mlp),
    }
    module, kind = name.rsplit(".", 1)
    if module.endswith("norm") and kind == "weight":
        return w[hid]
    if module not in rows_cols or kind not in ("weight", "bias"):
        raise ValueError(f"parameter 'model.layers.{plan.layers[i]}.{name}': no pruning rule for it")
    rows, cols = rows_cols[module]
    return w[rows] if kind == "bias" else w[rows][:, cols]


def sliced_state_dict(teacher_sd: dict, student_keys, plan: PrunePlan, D: int) -> dict:
    """Student state dict (keys of the new model) sliced out of the teacher's state dict."""
    hid = torch.tensor(plan.hidden)
    out = {}
    for key in student_keys:
        m = _LAYER.match(key)
        if m:
            i, name = int(m.group(1)), m.group(2)
            w = teacher_sd[f"model.layers.{plan.layers[i]}.{name}"]
            out[key] = _slice_layer_param(name, w, i, plan, D, hid)
        elif key in ("model.embed_tokens.weight", "lm_head.weight"):
            out[key] = teacher_sd[key][:, hid]
        elif key == "model.norm.weight":
            out[key] = teacher_sd[key][hid]
        else:
            raise ValueError(f"parameter {key!r}: no pruning rule for it")
    return {k: v.clone().contiguous() for k, v in out.items()}


def pruned_config(teacher_config, plan: PrunePlan, head_dim: int):
    """The teacher's HF config with the kept sizes; rotary settings, vocab, tying and ids carry over."""
    cfg = copy.deepcopy(teacher_config)
    cfg.num_hidden_layers = len(plan.layers)
    cfg.num_attention_heads = len(plan.q_heads[0])
    cfg.num_key_value_heads = len(plan.kv_heads[0])
    cfg.intermediate_size = len(plan.mlp[0])
    cfg.hidden_size = len(plan.hidden)
    cfg.head_dim = head_dim  # never pruned; explicit because hidden / heads no longer gives it
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[t] for t in plan.layers]
    return cfg


def build_pruned_model(teacher, plan: PrunePlan):
    """A new HF model of `pruned_config` holding the teacher's sliced weights (same dtype, on CPU).

    Example:
        >>> student = build_pruned_model(teacher, plan); student.save_pretrained(folder)
    """
    D = teacher_shape(teacher).head_dim
    cfg = pruned_config(teacher.config, plan, D)
    dtype = next(teacher.parameters()).dtype
    student = AutoModelForCausalLM.from_config(
        cfg, dtype=dtype, attn_implementation=teacher.config._attn_implementation
    )
    teacher_sd = {k: v.detach().cpu() for k, v in teacher.state_dict().items()}
    sd = sliced_state_dict(teacher_sd, student.state_dict().keys(), plan, D)
    student.load_state_dict(sd, strict=True)
    student.generation_config = copy.deepcopy(teacher.generation_config)
    return student.eval()
