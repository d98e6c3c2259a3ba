"""MapProjectionAligner: layer map + segment time warp + projection of teacher K, V and Q.

Shapes: B batch, L_sel stored/selected teacher layers (in `aligner.teacher_layers` order), L_s student
layers, H query heads, G KV heads, T teacher tokens, T' warped tokens, D head dim (`_t` teacher,
`_s` student).

    k_t, v_t (B, L_sel, G_t, T, D_t), q_t (B, L_sel, H_t, T, D_t), segment_ids (B, T)
      --layer map-->  (B, L_s, ., T, D_t)
      --time warp-->  (B, L_s, ., T', D_t)          (same plan for K, V, Q; identity by default)
      --projection--> k_s, v_s (B, L_s, G_s, T', D_s), q_s (B, L_s, H_s, T', D_s)

Modes: "structured" (HeadwiseMapProjector per K/V/Q; Q's head mixer initialised GQA-consistently with K's;
optionally RoPE-consistent Q/K dim maps) and "flat" (KVDimensionProjector per K/V/Q). What an aligner is
built from (geometry, layer map, warp, projection options) is one `AlignerSpec`
(alignment/projection/aligner_spec.py); the factories read it from HF configs or an `AlignConfig`.

Only the components in `spec.projections` get a projector (`alignment.config.used_projections`: a loss term
of weight 0 builds no parameters); the others come back as None. A selected-head arm with no projector reads
only its heads (`use_head_view`): the teacher Q and K then arrive as P slots per layer (P = the most heads
chosen in one teacher layer, K repeated per query head), not as all H_t / G_t heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alignment.config import AlignConfig
from alignment.mapping.head_maps import gqa_query_mixer, random_mixer, uniform_mixer
from alignment.mapping.layer_map import build_layer_map, layer_slots, teacher_layers_needed
from alignment.mapping.time_warping import SegmentTimeWarper, WarpPlan, validate_segment_ids
from alignment.projection.aligner_spec import AlignerSpec, aligner_spec, spec_from_align_config
from alignment.projection.projectors import HeadwiseMapProjector, KVDimensionProjector, check_5d
from alignment.projection.rope import RopePairDimMap


@dataclass
class AlignedKV:
    """What `MapProjectionAligner.align` returns.

    k, v: (B, L_s, G_s, T', D_s) or None (not projected); q: (B, L_s, H_s, T', D_s) or None; mask: (B, T')
    bool (True = real token); segment_ids: (B, T'); plan: the WarpPlan (apply it to student states in use (a) with
    `aligner.warp_student(x_s, out.plan)`); q_t_raw (B, L_s, H_t, T', D_t) and k_t_raw (B, L_s, G_t, T', D_t):
    the teacher's own Q/K, layer-mapped and time-warped but not projected (for `attn_target="teacher"`);
    head_mix: (H_s, H_t) or (L_s, H_s, H_t) convex Q head-mixing weights (`aligner.q_head_mix()`);
    teacher_scale / student_scale: the models' attention scalings (a float, or (L_s,) per student layer);
    teacher_softcap / student_softcap: their attention-logit softcaps (None: none); teacher_window /
    student_window: (L_s,) per-layer sliding windows or None (`alignment.geometry.attention_probs`); v_t_raw (B, L_s, G_t, T', D_t) the teacher's
    raw values (relation distillation); head_mask (L_s, H_s) bool or None: the student heads `align.head_select`
    distils (head_mix is then the one-hot selection). `loss_kwargs()` bundles what the loss needs.
    Cross-tokenizer batches only (`align(token_map=W)`): token_map (the W plan; T' = T_s), q_t_axis /
    k_t_axis ((projected (B, L_s, H_s|G_s, T_t, D_s), raw (B, L_s, H_t|G_t, T_t, D_t)) on the teacher's
    axis), t_mask (B, T_t) real teacher tokens.
    """

    k: torch.Tensor | None
    v: torch.Tensor | None
    q: torch.Tensor | None
    mask: torch.Tensor
    segment_ids: torch.Tensor
    plan: WarpPlan
    q_t_raw: torch.Tensor | None = None
    k_t_raw: torch.Tensor | None = None
    head_mix: torch.Tensor | None = None
    teacher_scale: float | None = None
    student_scale: float | None = None
    v_t_raw: torch.Tensor | None = None
    head_mask: torch.Tensor | None = None
    teacher_softcap: float | None = None
    student_softcap: float | None = None
    teacher_window: torch.Tensor | None = None
    student_window: torch.Tensor | None = None
    token_map: WarpPlan | None = None
    q_t_axis: tuple[torch.Tensor | None, torch.Tensor | None] | None = None
    k_t_axis: tuple[torch.Tensor, torch.Tensor] | None = None
    t_mask: torch.Tensor | None = None

    def loss_kwargs(self) -> dict:
        """Keyword arguments for `StructuralKVLoss` that come from the aligner, for either attn_target:
        `loss_fn(s_k, s_v, s_q, out.k, out.v, out.q, **out.loss_kwargs())`."""
        return dict(
            attention_mask=self.mask,
            t_q_raw=self.q_t_raw,
            t_k_raw=self.k_t_raw,
            head_mix=self.head_mix,
            teacher_scale=self.teacher_scale,
            student_scale=self.student_scale,
            t_v_raw=self.v_t_raw,
            head_mask=self.head_mask,
            teacher_softcap=self.teacher_softcap,
            student_softcap=self.student_softcap,
            teacher_window=self.teacher_window,
            student_window=self.student_window,
            **self._cross_kwargs(),
        )

    def _cross_kwargs(self) -> dict:
        """Only on a cross-tokenizer batch: W and the teacher's Q/K on its own axis for the warped attention KL."""
        if self.token_map is None:
            return {}
        return dict(
            token_map=self.token_map, t_q_axis=self.q_t_axis, t_k_axis=self.k_t_axis, t_mask=self.t_mask
        )


class MapProjectionAligner(nn.Module):
    """Layer map + time warp + K/V/Q projection (see module docstring), built from an `AlignerSpec`.

    Attributes read by callers: H_t, G_t, D_t, H_s, G_s, D_s (heads, KV heads, head dims); layer_map (L_s
    teacher layers); teacher_layers (the stored layers `align` expects, in order); teacher_scaling,
    student_scaling (plain scalings); teacher_logits, student_logits (`LogitSpec`s the loss uses: per
    student layer, from the geometry unless the spec gives a plain scaling); warper; spec.
    Example:
        >>> aligner = create_structured_aligner(teacher_cfg, student_cfg)
        >>> k_s, v_s, q_s = aligner(k_t, v_t, q_t, segment_ids)
        >>> out = aligner.align(k_t, v_t, q_t, segment_ids)   # + out.mask, out.plan, raw teacher Q/K
    """

    def __init__(self, spec: AlignerSpec):
        super().__init__()
        t, s, options = spec.teacher, spec.student, spec.projection
        self.spec, self.mode = spec, spec.mode
        self.constraint, self.rope_consistent = options.constraint, options.rope_consistent
        self.H_t, self.G_t, self.D_t = t.num_heads, t.num_kv_heads, t.head_dim
        self.H_s, self.G_s, self.D_s = s.num_heads, s.num_kv_heads, s.head_dim
        self.layer_map = build_layer_map(spec.layer_map, t.num_layers, s.num_layers)
        self.teacher_layers = teacher_layers_needed(self.layer_map)
        self._slots = layer_slots(self.layer_map, self.teacher_layers)
        self.warper = spec.warper if spec.warper is not None else SegmentTimeWarper()
        self.head_selection = None  # alignment.mapping.head_select.HeadSelection (set_head_selection)
        self.teacher_heads = None  # use_head_view: {q, k: per teacher layer, the teacher heads read}
        self.projections = tuple(spec.projections)
        self.teacher_scaling = spec.teacher_scaling if spec.teacher_scaling is not None else t.scaling
        self.student_scaling = spec.student_scaling if spec.student_scaling is not None else s.scaling
        self.teacher_logits = spec.teacher_logits(self.layer_map)  # (L_s,) student-layer order
        self.student_logits = spec.student_logits()
        if spec.mode == "flat":
            projectors = _flat_projectors(spec)
            # Flat has no head mixer; attn_target="teacher" still needs one: the fixed GQA-consistent mix.
            mix = gqa_query_mixer(uniform_mixer(self.G_t, self.G_s), self.H_t, self.G_t, self.H_s, self.G_s)
            self.register_buffer("_flat_q_mix", mix, persistent=False)
        else:
            projectors = _structured_projectors(spec)
        # a component without a projector builds none (and is not projected)
        self.k_proj, self.v_proj, self.q_proj = (
            p if c in self.projections else None for c, p in zip(("k", "v", "q"), projectors)
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, constraint={self.constraint!r}, rope_consistent={self.rope_consistent}, "
            f"layer_map={self.layer_map}, warper={self.warper!r}"
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def q_head_mix(self) -> torch.Tensor:
        """(L_s?, H_s, H_t) convex Q head-mixing weights: the Q mixer (structured) or the fixed
        GQA-consistent uniform mix (flat, which has no head structure of its own)."""
        if self.mode == "flat":
            return self._flat_q_mix
        if self.q_proj is None:
            raise ValueError("q_head_mix: this aligner has no Q projector (projections without q)")
        return self.q_proj.head_mix()

    def set_head_selection(self, selection) -> None:
        """Distil only the selected teacher heads one-to-one (`alignment.mapping.head_select`): `align` then returns the
        selection's one-hot (L_s, H_s, H_t) head mix and (L_s, H_s) head mask instead of the Q mixer."""
        L_s = len(self.layer_map)
        if selection.head_mix.shape != (L_s, self.H_s, self.H_t) or selection.head_mask.shape != (
            L_s,
            self.H_s,
        ):
            raise ValueError(
                f"head selection mix {tuple(selection.head_mix.shape)} / mask {tuple(selection.head_mask.shape)}: "
                f"expected {(L_s, self.H_s, self.H_t)} / {(L_s, self.H_s)}"
            )
        self.head_selection = selection
        self.register_buffer("_sel_mix", selection.head_mix.clone(), persistent=False)
        self.register_buffer("_sel_mask", selection.head_mask.clone(), persistent=False)

    def use_head_view(self, teacher_heads: dict, head_mix: torch.Tensor) -> None:
        """Read only the selected heads: `teacher_heads` {q, k: per teacher layer (`teacher_layers` order)
        the teacher heads delivered, P slots each} and the selection's one-hot mix over those slots
        (L_s, H_s, P) (`alignment.mapping.head_select.head_view`). Call after `set_head_selection`; only
        without projectors (a projector maps every teacher head)."""
        if self.k_proj is not None or self.v_proj is not None or self.q_proj is not None:
            raise ValueError(f"use_head_view: expected an aligner without projectors, got {self.projections}")
        P = head_mix.shape[-1]
        if head_mix.shape != self._sel_mix.shape[:2] + (P,) or len(teacher_heads["q"]) != len(
            self.teacher_layers
        ):
            raise ValueError(
                f"head view mix {tuple(head_mix.shape)} over {len(teacher_heads['q'])} layers: expected "
                f"{tuple(self._sel_mix.shape[:2])} + (P,) over {len(self.teacher_layers)} teacher layers"
            )
        self.teacher_heads = teacher_heads
        self.register_buffer("_sel_mix", head_mix.clone(), persistent=False)

    def _select(self, x: torch.Tensor | None, name: str, heads: int) -> torch.Tensor | None:
        if x is None:
            return None
        if self.teacher_heads is not None:  # the head view: P slots per layer for both q and k
            heads = self._sel_mix.shape[-1]
        check_5d(x, name, heads, self.D_t)
        if x.shape[1] != len(self.teacher_layers):
            raise ValueError(
                f"{name}: got {x.shape[1]} layers, expected L_sel={len(self.teacher_layers)} "
                f"(aligner.teacher_layers={self.teacher_layers})"
            )
        if self._slots == list(range(x.shape[1])):
            return x
        return x[:, self._slots]  # (B, L_s, heads, T, D_t)

    def warp_student(self, x: torch.Tensor, plan: WarpPlan) -> torch.Tensor:
        """Apply the teacher's warp plan to student states (use (a)): (B, ..., T, D) -> (B, ..., T', D)."""
        return self.warper.apply(x, plan)

    def align(
        self,
        k_t: torch.Tensor,
        v_t: torch.Tensor,
        q_t: torch.Tensor | None,
        segment_ids: torch.Tensor,
        T_s: int | None = None,
        student_segment_ids: torch.Tensor | None = None,
        token_map: WarpPlan | None = None,
    ) -> AlignedKV:
        """Layer-map, warp and project the teacher states; returns an `AlignedKV` (see its docstring).

        A teacher component the loss does not read may be None (and comes back None).

        token_map: a cross-tokenizer W (alignment/mapping/char_alignment.py, (B, T_s, K) -> T_t) used instead of
        the warper's plan: every output is on the student's tokens, and the teacher's Q/K stay on its own axis
        too (`q_t_axis` / `k_t_axis`: projected for attn_target "projected", raw for "teacher") for the
        warped attention KL W A_t W^T."""
        k = self._select(k_t, "k_t", self.G_t)
        v = self._select(v_t, "v_t", self.G_t)
        q = self._select(q_t, "q_t", self.H_t)
        ref = next(x for x in (k, q, v) if x is not None)
        validate_segment_ids(segment_ids)
        if segment_ids.shape != (ref.shape[0], ref.shape[3]):
            raise ValueError(
                f"segment_ids shape {tuple(segment_ids.shape)}: expected (B, T)={(ref.shape[0], ref.shape[3])}"
            )
        if token_map is not None:
            return self._align_across(k, v, q, segment_ids, token_map)
        plan = self.warper.plan(segment_ids, T_s, student_segment_ids)
        k, v, q = (self.warper.apply(x, plan) if x is not None else None for x in (k, v, q))  # (., T', D_t)
        return AlignedKV(
            k=_project(self.k_proj, k),  # (B, L_s, G_s, T', D_s)
            v=_project(self.v_proj, v),
            q=_project(self.q_proj, q),  # (B, L_s, H_s, T', D_s)
            mask=plan.mask,
            segment_ids=plan.segment_ids,
            plan=plan,
            q_t_raw=q,
            k_t_raw=k,
            head_mix=self._head_mix(),
            teacher_scale=self.teacher_logits.scale,
            student_scale=self.student_logits.scale,
            v_t_raw=v,
            head_mask=None if self.head_selection is None else self._sel_mask,
            teacher_softcap=self.teacher_logits.softcap,
            student_softcap=self.student_logits.softcap,
            teacher_window=self.teacher_logits.window,
            student_window=self.student_logits.window,
        )

    def _align_across(self, k, v, q, segment_ids, plan: WarpPlan) -> AlignedKV:
        """`align` with a cross-tokenizer W: K/V targets warped by W (projection is per position, so projecting
        first is the same), Q/K kept on the teacher's axis for the attention target."""

        def warp(x):
            return self.warper.apply(x, plan) if x is not None else None

        k_p, q_p = _project(self.k_proj, k), _project(self.q_proj, q)  # teacher axis
        return AlignedKV(
            k=warp(k_p),  # (B, L_s, G_s, T_s, D_s)
            v=warp(_project(self.v_proj, v)),
            q=warp(q_p),  # (B, L_s, H_s, T_s, D_s)
            mask=plan.mask,
            segment_ids=plan.segment_ids,
            plan=plan,
            q_t_raw=warp(q),
            k_t_raw=warp(k),
            head_mix=self._head_mix(),
            teacher_scale=self.teacher_logits.scale,
            student_scale=self.student_logits.scale,
            v_t_raw=warp(v),
            head_mask=None if self.head_selection is None else self._sel_mask,
            teacher_softcap=self.teacher_logits.softcap,
            student_softcap=self.student_logits.softcap,
            teacher_window=self.teacher_logits.window,
            student_window=self.student_logits.window,
            token_map=plan,
            q_t_axis=(q_p, q),  # (projected, raw) on the teacher axis; the loss picks by attn_target
            k_t_axis=(k_p, k),
            t_mask=segment_ids >= 0,
        )

    def _head_mix(self) -> torch.Tensor | None:
        """The target's head mix: the selection's (one-hot), the Q mixer's, or None without either."""
        if self.head_selection is not None:
            return self._sel_mix
        return self.q_head_mix() if self.mode == "flat" or self.q_proj is not None else None

    def forward(
        self,
        k_t: torch.Tensor,
        v_t: torch.Tensor,
        q_t: torch.Tensor | None,
        segment_ids: torch.Tensor,
        T_s: int | None = None,
        student_segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`k_s, v_s, q_s = aligner(k_t, v_t, q_t, segment_ids)`; use `align` for the mask and the plan."""
        out = self.align(k_t, v_t, q_t, segment_ids, T_s, student_segment_ids)
        return out.k, out.v, out.q


def _project(proj: nn.Module | None, x: torch.Tensor | None) -> torch.Tensor | None:
    """x projected into student head space, or None without a projector or an input."""
    return proj(x) if proj is not None and x is not None else None


def _flat_projectors(spec: AlignerSpec) -> tuple[nn.Module, nn.Module, nn.Module]:
    """K, V, Q `KVDimensionProjector`s: one free map of all heads' dims per side."""
    t, s, kw = spec.teacher, spec.student, _layer_options(spec)
    return (
        KVDimensionProjector(t.num_kv_heads, s.num_kv_heads, t.head_dim, s.head_dim, **kw),
        KVDimensionProjector(t.num_kv_heads, s.num_kv_heads, t.head_dim, s.head_dim, **kw),
        KVDimensionProjector(t.num_heads, s.num_heads, t.head_dim, s.head_dim, **kw),
    )


def _structured_projectors(spec: AlignerSpec) -> tuple[nn.Module, nn.Module, nn.Module]:
    """K, V, Q `HeadwiseMapProjector`s. K and V share the head-mixer init; Q's starts GQA-consistent with
    it (uniform init) or random; with rope_consistent, Q/K dim maps are `RopePairDimMap`s."""
    t, s, o = spec.teacher, spec.student, spec.projection
    H_t, G_t, D_t = t.num_heads, t.num_kv_heads, t.head_dim
    H_s, G_s, D_s = s.num_heads, s.num_kv_heads, s.head_dim
    kv_init = uniform_mixer(G_t, G_s) if o.init_uniform else random_mixer(G_t, G_s)
    q_init = gqa_query_mixer(kv_init, H_t, G_t, H_s, G_s) if o.init_uniform else random_mixer(H_t, H_s)
    k_dim, q_dim = (_rope_dim_map(spec, G_s), _rope_dim_map(spec, H_s)) if o.rope_consistent else (None, None)
    kw = dict(share_dim_proj=o.share_dim_proj, **_layer_options(spec))
    return (
        HeadwiseMapProjector(G_t, G_s, D_t, D_s, mixer_init=kv_init, dim_map=k_dim, **kw),
        HeadwiseMapProjector(G_t, G_s, D_t, D_s, mixer_init=kv_init, **kw),
        HeadwiseMapProjector(H_t, H_s, D_t, D_s, mixer_init=q_init, dim_map=q_dim, **kw),
    )


def _layer_options(spec: AlignerSpec) -> dict[str, Any]:
    """Projector keywords both modes share: parameters per student layer or not, and the constraint."""
    o = spec.projection
    return dict(per_layer=o.per_layer, num_layers=spec.student.num_layers, constraint=o.constraint)


def _rope_dim_map(spec: AlignerSpec, heads: int) -> RopePairDimMap:
    """A RoPE-consistent dim map for `heads` student heads (one gain set for all when share_dim_proj)."""
    o = spec.projection
    return RopePairDimMap(
        spec.teacher_inv_freq,
        spec.student_inv_freq,
        None if o.share_dim_proj else heads,
        o.per_layer,
        spec.student.num_layers,
        o.constraint,
    )


def create_structured_aligner(teacher_cfg: Any, student_cfg: Any, **kw: Any) -> MapProjectionAligner:
    """Structured aligner from HF configs. kw: layer_map, share_dim_proj, init_uniform, per_layer, constraint,
    warper | ratio_map + alpha_map, rope_consistent (reads rope_theta / rope_parameters from the configs)."""
    return MapProjectionAligner(aligner_spec("structured", teacher_cfg, student_cfg, **kw))


def create_flat_aligner(teacher_cfg: Any, student_cfg: Any, **kw: Any) -> MapProjectionAligner:
    """Flat-baseline aligner from HF configs. kw: layer_map, per_layer, constraint, warper | ratio_map + alpha_map."""
    return MapProjectionAligner(aligner_spec("flat", teacher_cfg, student_cfg, **kw))


def create_aligner(
    mode: str,
    teacher_cfg: Any,
    student_cfg: Any,
    align_cfg: AlignConfig | None = None,
    projections: tuple[str, ...] = ("k", "v", "q"),
) -> MapProjectionAligner:
    """Aligner for `kv_projection_mode` = mode ("structured" | "flat") from an `AlignConfig` (None = defaults);
    `projections`: the teacher components that get a projector (`alignment.config.used_projections`)."""
    return MapProjectionAligner(
        spec_from_align_config(mode, teacher_cfg, student_cfg, align_cfg, projections)
    )
