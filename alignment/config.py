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


@dataclass
class LossConfig:
    """StructuralKVLoss weights: loss_struct = alpha_k*(1-cos K) + alpha_v*(1-cos V) + alpha_attn*KL(attn)."""

    alpha_k: float = 1.0
    alpha_v: float = 1.0
    alpha_attn: float = 0.5
    temperature: float = 1.0
    chunk_size: int = 128  # query rows per chunk of the streaming attention KL
