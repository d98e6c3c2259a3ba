"""Config sections owned by the aligner and the structural loss (see pipeline/config.py for the whole schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AlignConfig:
    """Layer map + segment time warp + head-wise projection (the mode itself is top-level `kv_projection_mode`)."""

    layer_map: str | list[int] = "uniform"  # "uniform" | "last" | explicit teacher layer per student layer
    share_dim_proj: bool = True
    init_uniform: bool = True
    per_layer: bool = False
    # How the projector is kept from cheating (shrinking / collapsing the projected teacher):
    # "constrained" = simplex head mixers + (semi-)orthogonal dim maps; "unconstrained" = free linear maps;
    # "frozen" = the init, not trained.
    constraint: Literal["constrained", "unconstrained", "frozen"] = "constrained"
    ratio_map: dict[str, float] = field(default_factory=lambda: {"P": 1.0, "R": 1.0, "A": 1.0})
    alpha_map: dict[str, float] = field(default_factory=lambda: {"P": 0.0, "R": 0.0, "A": 0.0})
    # Structured mode: Q/K dim maps select the teacher rotary pair of the nearest frequency for each student
    # pair with a unit-modulus per-pair gain, so projection commutes with RoPE (alignment/rope.py).
    rope_consistent: bool = False
    # "from_prune": the student was cut from the teacher (pipeline/prune.py); read its prune_meta.json and
    # start the layer map, head mixers and dim maps at the exact correspondence (alignment/prune_init.py).
    init: Literal["default", "from_prune"] = "default"


@dataclass
class LossConfig:
    """StructuralKVLoss weights: loss_struct = alpha_k*(1-cos K) + alpha_v*(1-cos V) + alpha_attn*KL(attn)."""

    alpha_k: float = 1.0
    alpha_v: float = 1.0
    alpha_attn: float = 0.5
    temperature: float = 1.0
    chunk_size: int = 128  # query rows per chunk of the streaming attention KL
    # "projected": KL(attention of the projected teacher Q/K || student attention) (the design's loss);
    # "teacher": KL(convex Q-head-mix of the teacher's own attention (stored Q/K, teacher scaling) || student
    # attention): no learned projection in the target's path, so it cannot be gamed.
    attn_target: Literal["projected", "teacher"] = "projected"
