"""AlignerSpec: everything a `MapProjectionAligner` is built from, checked once, read from HF configs.

A spec holds the two models' attention geometry (`AttentionDims`: layers, heads, head dim, per-layer
logits), the layer map, the time warp, the projection mode and its options (`ProjectionOptions`), and, for
RoPE-consistent Q/K maps, both sides' rotary inverse frequencies. `aligner_spec` reads one from HF configs
(objects or dicts) and the factories' keyword arguments; `spec_from_align_config` from an `AlignConfig`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from alignment.config import AlignConfig
from alignment.geometry.attention_probs import LogitSpec
from alignment.geometry.model_dims import AttentionDims, attention_dims, rope_inv_freq
from alignment.mapping.time_warping import SegmentTimeWarper
from alignment.projection.projectors import CONSTRAINTS, Constraint

MODES = ("structured", "flat")


@dataclass(frozen=True)
class ProjectionOptions:
    """How the projectors are shaped and initialised.

    share_dim_proj: one dim map for all student heads (structured). init_uniform: head mixers start uniform
    (Q GQA-consistent with K) instead of random (structured). per_layer: parameters per student layer.
    constraint: "constrained" | "unconstrained" | "frozen" (`alignment.projection.projectors`).
    rope_consistent: Q/K dim maps are `RopePairDimMap`s (structured only).
    """

    share_dim_proj: bool = True
    init_uniform: bool = True
    per_layer: bool = False
    constraint: Constraint = "constrained"
    rope_consistent: bool = False

    def __post_init__(self):
        if self.constraint not in CONSTRAINTS:
            raise ValueError(f"constraint={self.constraint!r}: expected one of {CONSTRAINTS}")


@dataclass(frozen=True)
class AlignerSpec:
    """What a `MapProjectionAligner` is built from (module docstring); invalid combinations raise here.

    mode: "structured" | "flat". teacher, student: the models' `AttentionDims`. layer_map: "uniform" |
    "last" | L_s teacher layer indices (`build_layer_map`). warper: None = identity. teacher_inv_freq,
    student_inv_freq: (P_t,), (P_s,) rotary inverse frequencies (rope_consistent only).
    teacher_scaling, student_scaling: a plain attention scaling that replaces that side's geometry in the
    loss (no per-layer scale, softcap or window); None = the geometry's own. projections: the teacher
    components that get a projector (`alignment.config.used_projections`; the others are not projected).
    """

    mode: str
    teacher: AttentionDims
    student: AttentionDims
    layer_map: str | Sequence[int] = "uniform"
    projection: ProjectionOptions = field(default_factory=ProjectionOptions)
    warper: SegmentTimeWarper | None = None
    teacher_inv_freq: torch.Tensor | None = None
    student_inv_freq: torch.Tensor | None = None
    teacher_scaling: float | None = None
    student_scaling: float | None = None
    projections: tuple[str, ...] = ("k", "v", "q")

    def __post_init__(self):
        if any(c not in ("k", "v", "q") for c in self.projections):
            raise ValueError(f"projections={self.projections!r}: expected a subset of k, v, q")
        if self.mode not in MODES:
            raise ValueError(f"kv_projection_mode={self.mode!r}: expected one of {MODES}")
        for name, dims in (("teacher", self.teacher), ("student", self.student)):
            h, g = dims.num_heads, dims.num_kv_heads
            if g < 1 or h % g:
                raise ValueError(
                    f"{name} heads={h}, kv_heads={g}: expected query heads a multiple of KV heads"
                )
        if self.projection.rope_consistent:
            self._check_rope()

    def _check_rope(self) -> None:
        if self.mode == "flat":
            raise ValueError(
                "rope_consistent=True: expected kv_projection_mode='structured' (flat has no pairs)"
            )
        t_freq, s_freq = self.teacher_inv_freq, self.student_inv_freq
        if t_freq is None or s_freq is None:
            raise ValueError("rope_consistent=True: expected teacher_inv_freq and student_inv_freq")
        D_t, D_s = self.teacher.head_dim, self.student.head_dim
        if 2 * len(t_freq) != D_t or 2 * len(s_freq) != D_s:
            raise ValueError(
                f"rope_consistent=True: rotary pairs {len(t_freq)}/{len(s_freq)} do not "
                f"cover head dims {D_t}/{D_s}: expected full rotary (partial rotary is not supported)"
            )

    def teacher_logits(self, layer_map: Sequence[int]) -> LogitSpec:
        """(L_s,) in student-layer order: the attention of the teacher layer each student layer maps to."""
        if self.teacher_scaling is not None:
            return LogitSpec(self.teacher_scaling)
        return self.teacher.logit_spec(layer_map)

    def student_logits(self) -> LogitSpec:
        """The student's attention per layer (or the plain `student_scaling`)."""
        if self.student_scaling is not None:
            return LogitSpec(self.student_scaling)
        return self.student.logit_spec()


_PROJECTION_OPTIONS = tuple(f.name for f in fields(ProjectionOptions))


def aligner_spec(mode: str, teacher_cfg: Any, student_cfg: Any, **kw: Any) -> AlignerSpec:
    """AlignerSpec from HF configs (objects or dicts). kw: the `ProjectionOptions` fields, layer_map,
    warper | ratio_map + alpha_map, teacher_/student_inv_freq (default: read from the configs when
    rope_consistent), teacher_/student_scaling."""
    teacher, student = attention_dims(teacher_cfg, "teacher_cfg"), attention_dims(student_cfg, "student_cfg")
    options = {name: kw.pop(name) for name in _PROJECTION_OPTIONS if name in kw}
    ratio_map, alpha_map = kw.pop("ratio_map", None), kw.pop("alpha_map", None)
    if "warper" not in kw and (ratio_map or alpha_map):
        kw["warper"] = SegmentTimeWarper(ratio_map, alpha_map)
    if options.get("rope_consistent"):
        kw.setdefault("teacher_inv_freq", rope_inv_freq(teacher_cfg, "teacher_cfg"))
        kw.setdefault("student_inv_freq", rope_inv_freq(student_cfg, "student_cfg"))
    return AlignerSpec(mode, teacher, student, projection=ProjectionOptions(**options), **kw)


def spec_from_align_config(
    mode: str,
    teacher_cfg: Any,
    student_cfg: Any,
    align_cfg: AlignConfig | None = None,
    projections: tuple[str, ...] = ("k", "v", "q"),
) -> AlignerSpec:
    """AlignerSpec for `kv_projection_mode` = mode from an `AlignConfig` (None = defaults); flat mode reads
    only the options it has (layer map, per_layer, constraint, warp). `projections`: the components that get
    a projector (`alignment.config.used_projections`)."""
    a = align_cfg if align_cfg is not None else AlignConfig()
    if mode not in MODES:
        raise ValueError(f"kv_projection_mode={mode!r}: expected one of {MODES}")
    kw: dict[str, Any] = dict(
        layer_map=a.layer_map,
        per_layer=a.per_layer,
        constraint=a.constraint,
        ratio_map=dict(a.ratio_map) if isinstance(a.ratio_map, Mapping) else a.ratio_map,
        alpha_map=dict(a.alpha_map) if isinstance(a.alpha_map, Mapping) else a.alpha_map,
        projections=tuple(projections),
    )
    if mode == "structured":
        kw.update(
            share_dim_proj=a.share_dim_proj, init_uniform=a.init_uniform, rope_consistent=a.rope_consistent
        )
    elif a.rope_consistent:
        raise ValueError("align.rope_consistent=True: expected kv_projection_mode='structured'")
    return aligner_spec(mode, teacher_cfg, student_cfg, **kw)
