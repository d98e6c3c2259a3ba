"""StructuralKVLoss: (1 - cosine) on K and V per vector + KL between causal attention distributions.

Shapes: B batch, L student layers, G_s/H_s student KV/query heads, T tokens (after the time warp), D_s head
dim; for attn_target="teacher" also H_t/G_t teacher heads and D_t.

    loss_struct = alpha_k * mean(1 - cos(s_k, t_k)) + alpha_v * mean(1 - cos(s_v, t_v)) + alpha_attn * KL

Means run over real tokens (attention_mask, optionally narrowed by query_mask), heads and layers.
KL(target || student) per counted query row
(`alignment.losses.attention_kl`, streamed in query-row chunks). A term whose alpha is 0 is not computed at all.

attn_target:
  "projected": the target is the attention of the projected teacher (t_q, t_k: student head space) scaled by
      `teacher_scale` if given, else like the student (D_s**-0.5 or `student_scale`). The constrained
      projectors keep teacher vector norms, so pass `teacher_scale=aligner.teacher_scaling` to keep the
      projected logits on the teacher's scale.
  "teacher": the target is the teacher's own attention from `t_q_raw` (B, L, H_t, T, D_t) and `t_k_raw`
      (B, L, G_t, T, D_t) with `teacher_scale` (default D_t**-0.5; a float or (L,) per layer), the teacher's
      `teacher_softcap` and per-layer sliding `teacher_window` (L,) (the store's geometry, via the aligner's
      `out.loss_kwargs()`; `alignment/geometry/attention_probs.py`), mixed over teacher query heads by
      `head_mix` (H_s, H_t) or (L, H_s, H_t) (the aligner's Q head mixer; detached here so the target is fixed:
      nothing learned can reshape it). The student side uses its own s_q/s_k and `student_scale`.

Structural signals (all off by default; off = the plain loss above, bit for bit):
  sink="drop": key positions `sink_keys` (default [0], the first token) are removed from both attention
      distributions and both renormalised before the KL (`attention_kl(drop_keys=...)`).
  head_mask (L, H_s) bool (call argument, from the aligner's `align.head_select`): only these student heads
      count in the attention KL; with `head_mix` a one-hot selection each is distilled one-to-one.
  relation={"components": [q, k, v], "heads": R, "weight": w}: + w * sum over components of the MiniLMv2
      relation KL (alignment/losses/relation.py) between the student's own states and the teacher's layer-mapped raw
      states (`t_q_raw`, `t_k_raw`, `t_v_raw`); metrics "rel_q" / "rel_k" / "rel_v". "heads": "selected" =
      one relation map per selected head, into the student head `head_mix` maps it to (needs head_mix).

Cross-tokenizer batches (`token_map` = W, from `aligner.align(token_map=W)`): the cosines compare the student
with the W-warped teacher K/V on the student's tokens (masks on that axis: rows W has); the attention KL's
target is W A_t W^T built from the teacher's Q/K on its own axis (`t_q_axis` / `t_k_axis`, `t_mask`;
alignment/losses/cross_attention.py). With identical tokenisations W = I and every term equals the plain one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from alignment.losses.attention_kl import attention_kl
from alignment.losses.attention_kl_fused import IMPLS as KL_IMPLS
from alignment.losses.cross_attention import warped_attention_kl
from alignment.losses.relation import COMPONENTS as RELATION_COMPONENTS
from alignment.losses.relation import SELECTED, relation_kl, selected_relation_kl

ATTN_TARGETS = ("projected", "teacher")
SINK_MODES = ("keep", "drop")


def check_relation(relation: dict | None) -> dict | None:
    """Normalise `loss_config.relation` ({components, heads, weight}); None when off (weight 0 / no components)."""
    if relation is None:
        return None
    comps, heads, weight = relation.get("components", []), relation.get("heads"), relation.get("weight", 0.0)
    if not isinstance(comps, (list, tuple)) or any(c not in RELATION_COMPONENTS for c in comps):
        raise ValueError(
            f"loss_config.relation.components={comps!r}: expected a subset of {list(RELATION_COMPONENTS)}"
        )
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
        raise ValueError(f"loss_config.relation.weight={weight!r}: expected a number >= 0")
    if weight == 0 or not comps:
        return None
    if heads != SELECTED and (isinstance(heads, bool) or not isinstance(heads, int) or heads < 1):
        raise ValueError(f"loss_config.relation.heads={heads!r}: expected a positive int or {SELECTED!r}")
    return {"components": list(dict.fromkeys(comps)), "heads": heads, "weight": float(weight)}


def _check_pair(s: torch.Tensor, t: torch.Tensor, name: str) -> None:
    for side, x in (("s_", s), ("t_", t)):
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{side}{name}: got shape {shape}, expected a 5-D (B, L, H, T, D) tensor")
    if s.shape != t.shape:
        raise ValueError(
            f"s_{name} shape {tuple(s.shape)} != t_{name} shape {tuple(t.shape)}: expected equal shapes"
        )


class StructuralKVLoss(nn.Module):
    """Structural loss between student and (aligned) teacher K/V/Q.

    Args:
        alpha_k, alpha_v, alpha_attn: term weights (>= 0; 0 skips the term).
        temperature: attention logits are divided by it on both sides.
        chunk_size: query rows per streamed chunk of the attention KL.
        attn_target: "projected" | "teacher" (module docstring).
        per_layer_metrics: also return "cos_k_layer" / "cos_v_layer" (lists of floats, one per layer).
        sink: "keep" | "drop"; sink_keys: key positions dropped by "drop" (module docstring).
        relation: None or {"components", "heads", "weight"} (MiniLMv2 relation term; module docstring).
    Call:
        loss, metrics = loss_fn(s_k, s_v, s_q, t_k, t_v, t_q, attention_mask=None, query_mask=None,
                                t_q_raw=None, t_k_raw=None, head_mix=None,
                                student_scale=None, teacher_scale=None, head_mask=None, t_v_raw=None)
        s_k/t_k (B, L, G_s, T, D_s), s_v/t_v (B, L, G_s, T, D_s), s_q/t_q (B, L, H_s, T, D_s);
        attention_mask (B, T) bool (True = real token; the keys attention may use). query_mask (B, T) bool:
        optional subset of positions the losses count (cosine positions, KL query rows), e.g. one segment,
        while attention still spans every real key. metrics: floats "loss_struct" and, per computed term,
        "loss_k", "cos_k", "loss_v", "cos_v", "attn_kl". teacher_softcap / teacher_window (attn_target="teacher"
        only) and student_softcap / student_window (always): attention geometry, None = plain causal softmax.
        Inputs only a zero-alpha term would read may be None
        (attention-only with attn_target="teacher" needs s_k, s_q, t_q_raw, t_k_raw, head_mix).
    Example:
        >>> loss_fn = create_structural_loss(alpha_attn=0.5)
        >>> out = aligner.align(k_t, v_t, q_t, seg)
        >>> loss, m = loss_fn(k_s, v_s, q_s, out.k, out.v, out.q, attention_mask=out.mask)
    """

    def __init__(
        self,
        alpha_k: float = 1.0,
        alpha_v: float = 1.0,
        alpha_attn: float = 0.5,
        temperature: float = 1.0,
        chunk_size: int = 128,
        attn_target: str = "projected",
        per_layer_metrics: bool = False,
        sink: str = "keep",
        sink_keys: list[int] | tuple[int, ...] = (0,),
        relation: dict | None = None,
        attn_kl_impl: str = "auto",
    ):
        super().__init__()
        for name, v in (("alpha_k", alpha_k), ("alpha_v", alpha_v), ("alpha_attn", alpha_attn)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}={v!r}: expected a number >= 0")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected a number > 0")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int")
        if attn_target not in ATTN_TARGETS:
            raise ValueError(f"attn_target={attn_target!r}: expected one of {ATTN_TARGETS}")
        self.alpha_k, self.alpha_v, self.alpha_attn = float(alpha_k), float(alpha_v), float(alpha_attn)
        self.temperature, self.chunk_size, self.attn_target = float(temperature), chunk_size, attn_target
        self.per_layer_metrics = per_layer_metrics
        if sink not in SINK_MODES:
            raise ValueError(f"loss_config.sink={sink!r}: expected one of {SINK_MODES}")
        if sink == "drop" and (
            not sink_keys or any(isinstance(j, bool) or not isinstance(j, int) or j < 0 for j in sink_keys)
        ):
            raise ValueError(
                f"loss_config.sink_keys={sink_keys!r}: expected a non-empty list of key positions >= 0"
            )
        self.sink, self.sink_keys = sink, list(sink_keys)
        self.relation = check_relation(relation)
        if attn_kl_impl not in KL_IMPLS:
            raise ValueError(f"loss_config.attn_kl_impl={attn_kl_impl!r}: expected one of {list(KL_IMPLS)}")
        self.attn_kl_impl = attn_kl_impl

    def extra_repr(self) -> str:
        return (
            f"alpha_k={self.alpha_k}, alpha_v={self.alpha_v}, alpha_attn={self.alpha_attn}, "
            f"temperature={self.temperature}, attn_target={self.attn_target!r}, chunk_size={self.chunk_size}, "
            f"sink={self.sink!r}, relation={self.relation}"
        )

    @staticmethod
    def _cosine_term(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked mean of (1 - cos) over (B, L, H, T) and the per-layer mean cosine (L,)."""
        cos = F.cosine_similarity(
            s.float() if s.dtype != torch.float64 else s, t.to(s.dtype), dim=-1, eps=1e-8
        )
        wt = w[:, None, None, :].to(cos.dtype)  # (B, 1, 1, T)
        denom = wt.sum() * s.shape[1] * s.shape[2]
        loss = ((1.0 - cos) * wt).sum() / denom.clamp_min(1)
        per_layer = (cos * wt).sum(dim=(0, 2, 3)) / (wt.sum() * s.shape[2]).clamp_min(1)  # (L,)
        return loss, per_layer

    def forward(
        self,
        s_k: torch.Tensor,
        s_v: torch.Tensor,
        s_q: torch.Tensor | None,
        t_k: torch.Tensor,
        t_v: torch.Tensor,
        t_q: torch.Tensor | None,
        attention_mask: torch.Tensor | None = None,
        *,
        query_mask: torch.Tensor | None = None,
        t_q_raw: torch.Tensor | None = None,
        t_k_raw: torch.Tensor | None = None,
        head_mix: torch.Tensor | None = None,
        student_scale: float | None = None,
        teacher_scale: float | None = None,
        head_mask: torch.Tensor | None = None,
        t_v_raw: torch.Tensor | None = None,
        teacher_softcap: float | None = None,
        teacher_window: torch.Tensor | None = None,
        student_softcap: float | None = None,
        student_window: torch.Tensor | None = None,
        token_map=None,
        t_q_axis=None,
        t_k_axis=None,
        t_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """`loss, metrics = loss_fn(...)` (class docstring). The weighted terms add up in the order K, V,
        attention, relation."""
        ref = self._check_states(s_k, s_v, t_k, t_v)
        attention_mask, positions = _loss_masks(ref, attention_mask, query_mask)
        metrics: dict = {}
        total = ref.new_zeros((), dtype=torch.float32 if ref.dtype != torch.float64 else torch.float64)
        for name, alpha, s, t in (("k", self.alpha_k, s_k, t_k), ("v", self.alpha_v, s_v, t_v)):
            if alpha != 0:
                total = total + alpha * self._cosine_loss(name, s, t, positions, metrics)
        if self.alpha_attn != 0:
            if s_q is None:
                raise ValueError(
                    "s_q is None: expected student queries (B, L, H_s, T, D_s) when alpha_attn > 0"
                )
            kw = self._kl_options(query_mask, head_mask, student_softcap, student_window)
            if token_map is not None:  # cross-tokenizer: W A_t W^T from the teacher's own axis
                kw.update(softcap_t=teacher_softcap, window_t=teacher_window)
                scales = (student_scale, teacher_scale)
                kl = _warped_kl(
                    self.attn_target, s_q, s_k, t_q_axis, t_k_axis, token_map, t_mask, head_mix, scales, kw
                )
            elif self.attn_target == "projected":
                kl = _projected_kl(s_q, s_k, t_q, t_k, attention_mask, student_scale, teacher_scale, kw)
            else:  # the teacher's own attention: its softcap and sliding windows
                kw.update(softcap_t=teacher_softcap, window_t=teacher_window)
                kl = _teacher_kl(
                    s_q, s_k, t_q_raw, t_k_raw, attention_mask, head_mix, student_scale, teacher_scale, kw
                )
            total = total + self.alpha_attn * kl
            metrics["attn_kl"] = float(kl.detach())
        if self.relation is not None:
            students, teachers = {"q": s_q, "k": s_k, "v": s_v}, {"q": t_q_raw, "k": t_k_raw, "v": t_v_raw}
            heads = (head_mix, head_mask)
            total = self._add_relation(total, students, teachers, attention_mask, query_mask, heads, metrics)
        metrics["loss_struct"] = float(total.detach())
        return total, metrics

    def _check_states(self, s_k, s_v, t_k, t_v) -> torch.Tensor:
        """Check the K/V pairs the enabled terms read (a zero-alpha term's may be None, e.g. t_v / s_v for an
        attention-only loss); returns the 5-D reference (s_k, else s_v) that gives B and T."""
        if self.alpha_k != 0 or (self.alpha_attn != 0 and self.attn_target == "projected"):
            _check_pair(s_k, t_k, "k")
        if self.alpha_v != 0:
            _check_pair(s_v, t_v, "v")
        ref = s_k if s_k is not None else s_v
        if not isinstance(ref, torch.Tensor) or ref.dim() != 5:
            raise ValueError(
                f"s_k: got {type(ref).__name__ if ref is None else tuple(ref.shape)}, expected a 5-D tensor"
            )
        return ref

    def _cosine_loss(
        self, name: str, s: torch.Tensor, t: torch.Tensor, positions, metrics: dict
    ) -> torch.Tensor:
        """The (1 - cos) term of K or V over `positions`; records its metrics."""
        term, per_layer = self._cosine_term(s, t, positions)
        metrics[f"loss_{name}"] = float(term.detach())
        metrics[f"cos_{name}"] = float(per_layer.detach().mean())
        if self.per_layer_metrics:
            metrics[f"cos_{name}_layer"] = [float(c) for c in per_layer.detach()]
        return term

    def _kl_options(self, query_mask, head_mask, softcap_s, window_s) -> dict:
        """Keyword arguments of `attention_kl` that do not depend on the target: options, student geometry."""
        kw = dict(temperature=self.temperature, chunk_size=self.chunk_size, query_mask=query_mask)
        kw["impl"] = self.attn_kl_impl
        kw.update(softcap_s=softcap_s, window_s=window_s)
        if self.sink == "drop":
            kw["drop_keys"] = self.sink_keys
        if head_mask is not None:
            kw["head_mask"] = head_mask
        return kw

    def _add_relation(
        self, total, students: dict, teachers: dict, mask, query_mask, selection, metrics: dict
    ):
        """total + weight * relation KL of each component (student's own states vs the teacher's raw ones);
        selection = (head_mix, head_mask), read only with `heads: "selected"`."""
        heads, weight = self.relation["heads"], self.relation["weight"]
        kw = dict(query_mask=query_mask, chunk_size=self.chunk_size)
        for c in self.relation["components"]:
            s, t = students[c], teachers[c]
            if s is None or t is None:
                raise ValueError(f"relation component {c!r}: expected s_{c} and t_{c}_raw, got None")
            if heads == SELECTED:
                rel = selected_relation_kl(s, t, *selection, mask, name=c, **kw)
            else:
                rel = relation_kl(s, t, heads, mask, name=c, **kw)
            total = total + weight * rel
            metrics[f"rel_{c}"] = float(rel.detach())
        return total


def _loss_masks(ref: torch.Tensor, attention_mask, query_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask (B, T): the keys attention may use, default all; positions (B, T): where the losses
    count, attention_mask narrowed by query_mask), checked against ref (B, L, H, T, D)."""
    B, T = ref.shape[0], ref.shape[3]
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool, device=ref.device)
    if attention_mask.shape != (B, T) or attention_mask.dtype != torch.bool:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} dtype {attention_mask.dtype}: "
            f"expected a (B, T)={(B, T)} bool tensor"
        )
    if query_mask is None:
        return attention_mask, attention_mask
    if query_mask.shape != (B, T) or query_mask.dtype != torch.bool:
        raise ValueError(
            f"query_mask shape {tuple(query_mask.shape)} dtype {query_mask.dtype}: expected a (B, T)={(B, T)} bool"
        )
    return attention_mask, attention_mask & query_mask


def _projected_kl(s_q, s_k, t_q, t_k, mask, student_scale, teacher_scale, kw: dict) -> torch.Tensor:
    """attn_target="projected": KL against the projected teacher's attention (student scaling unless
    teacher_scale is given)."""
    if t_q is None:
        raise ValueError("t_q is None: expected projected teacher queries when alpha_attn > 0")
    _check_pair(s_q, t_q, "q")
    scale_t = teacher_scale if teacher_scale is not None else student_scale
    return attention_kl(s_q, s_k, t_q, t_k, mask, scale_s=student_scale, scale_t=scale_t, **kw)


def _teacher_kl(
    s_q, s_k, t_q_raw, t_k_raw, mask, head_mix, student_scale, teacher_scale, kw: dict
) -> torch.Tensor:
    """attn_target="teacher": KL against the teacher's own attention, mixed over its heads by the detached
    head_mix (nothing learned can reshape the target)."""
    if t_q_raw is None or t_k_raw is None:
        raise ValueError(
            "attn_target='teacher': expected t_q_raw and t_k_raw (the aligner's out.q_t_raw/k_t_raw)"
        )
    if head_mix is None and t_q_raw.shape[2] != s_q.shape[2]:
        raise ValueError(
            f"attn_target='teacher': teacher heads {t_q_raw.shape[2]} != student heads {s_q.shape[2]}: "
            "expected head_mix (the aligner's out.head_mix)"
        )
    hm = head_mix.detach() if head_mix is not None else None
    return attention_kl(
        s_q, s_k, t_q_raw, t_k_raw, mask, scale_s=student_scale, scale_t=teacher_scale, head_mix=hm, **kw
    )


def _warped_kl(attn_target, s_q, s_k, t_q_axis, t_k_axis, plan, t_mask, head_mix, scales, kw: dict):
    """Cross-tokenizer attention KL (alignment/losses/cross_attention.py): the target from the projected teacher
    Q/K (attn_target "projected", scaled like `_projected_kl`) or its raw Q/K mixed by the detached head_mix
    ("teacher"), both on the teacher's axis, warped onto the student's tokens by W."""
    student_scale, teacher_scale = scales
    s_mask = plan.segment_ids >= 0  # every real student token is a key
    kw = {k: v for k, v in kw.items() if k != "impl"}  # the warped target has no fused kernel
    if attn_target == "projected":
        axis, scale_t = 0, teacher_scale if teacher_scale is not None else student_scale
        kw = {k: v for k, v in kw.items() if k not in ("softcap_t", "window_t")}
    else:
        axis, scale_t = 1, teacher_scale
        kw["head_mix"] = head_mix.detach() if head_mix is not None else None
    return warped_attention_kl(
        s_q,
        s_k,
        t_q_axis[axis],
        t_k_axis[axis],
        plan,
        s_mask,
        t_mask,
        scale_s=student_scale,
        scale_t=scale_t,
        **kw,
    )


def create_structural_loss(
    alpha_k: float = 1.0,
    alpha_v: float = 1.0,
    alpha_attn: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 128,
    attn_target: str = "projected",
    per_layer_metrics: bool = False,
    sink: str = "keep",
    sink_keys: list[int] | tuple[int, ...] = (0,),
    relation: dict | None = None,
    attn_kl_impl: str = "auto",
    **_other_terms,
) -> StructuralKVLoss:
    """`StructuralKVLoss` factory; `create_structural_loss(**dataclasses.asdict(cfg.loss_config))` works
    (`loss_config` keys of the other terms, logit KD's `alpha_logit`, `kd_*`, `ce_weight`, are ignored)."""
    return StructuralKVLoss(
        alpha_k,
        alpha_v,
        alpha_attn,
        temperature,
        chunk_size,
        attn_target,
        per_layer_metrics,
        sink,
        sink_keys,
        relation,
        attn_kl_impl,
    )
