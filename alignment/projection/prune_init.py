"""Start a structured aligner at the exact correspondence of a student pruned from its teacher.

Shapes: L_s student layers, H query heads, G KV heads, D head dim (`_t` teacher, `_s` student).

A pruned student's head s of layer i *is* teacher head kept[i][s] of teacher layer kept_layers[i]
(pipeline/prune.py). So the layer map is the kept layers (passed to the aligner as an explicit list), each
head mixer row is the one-hot selection of the head it was cut from, and the dim maps are the identity
(head_dim is never pruned: the orthogonal dim map and the RoPE pair map both start there when D_t == D_s
and the rotary frequencies are equal).

Exactness of the one-hot rows:
- "unconstrained": the weight is the 0/1 selection itself (exact).
- "constrained" / "frozen": rows are softmax(logits); the kept head gets logit 0 and the others
  -SELECTION_GAP, i.e. weight exp(-30) ~ 9.4e-14 each: below float32 resolution next to the kept head's
  weight 1 (a projected head equals the teacher head to ~1e-13 relative, plus float rounding). Adam's
  update is scale-free, so the large gap does not freeze the mixer: its logits still move ~lr per step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SELECTION_GAP = 30.0


def selection_rows(kept: Sequence[Sequence[int]], n_in: int) -> torch.Tensor:
    """(L_s, n_out, n_in) 0/1 selection: row s of layer i is one-hot at kept[i][s]."""
    n_out = len(kept[0])
    if any(len(k) != n_out for k in kept):
        raise ValueError(f"kept heads {list(map(list, kept))}: expected the same count in every layer")
    sel = torch.zeros(len(kept), n_out, n_in)
    for i, heads in enumerate(kept):
        for s, h in enumerate(heads):
            if not 0 <= h < n_in:
                raise ValueError(f"kept head {h} of student layer {i}: expected an index in [0, {n_in})")
            sel[i, s, h] = 1.0
    return sel


def _set_mixer(mixer, sel: torch.Tensor) -> None:
    """Write a (L_s, n_out, n_in) selection into a HeadMixer (per-layer or shared)."""
    if not mixer.per_layer:
        if not torch.equal(sel, sel[:1].expand_as(sel)):
            raise ValueError(
                "align.per_layer=false, but the pruned student keeps different heads in different layers: "
                "expected align.per_layer: true (one head mixer per layer)"
            )
        sel = sel[0]  # (n_out, n_in)
    with torch.no_grad():
        if hasattr(mixer, "parametrizations"):  # simplex (constrained / frozen): logits 0 / -gap
            mixer.parametrizations.weight.original.copy_((sel - 1.0) * SELECTION_GAP)
        else:
            mixer.weight.copy_(sel)


def init_from_prune(
    aligner, kept_query_heads: Sequence[Sequence[int]], kept_kv_heads: Sequence[Sequence[int]]
):
    """Set a structured aligner's head mixers to the pruned student's head selection (in place).

    Args:
        aligner: a `MapProjectionAligner` built with `layer_map=kept_layers` (mode "structured").
        kept_query_heads: per student layer, the teacher query head of each student query head (L_s, H_s).
        kept_kv_heads: per student layer, the teacher KV head of each student KV head (L_s, G_s).
    Example:
        >>> aligner = create_aligner("structured", t_cfg, s_cfg, replace(align_cfg, layer_map=meta["kept_layers"]))
        >>> init_from_prune(aligner, meta["kept_query_heads"], meta["kept_kv_heads"])
    """
    if aligner.mode != "structured":
        raise ValueError(
            f"align.init='from_prune' with kv_projection_mode={aligner.mode!r}: expected 'structured' (head mixers)"
        )
    if aligner.D_t != aligner.D_s:
        raise ValueError(f"align.init='from_prune': head_dim {aligner.D_t} -> {aligner.D_s}: expected equal")
    L_s = len(aligner.layer_map)
    for name, kept, n_out in (
        ("kept_query_heads", kept_query_heads, aligner.H_s),
        ("kept_kv_heads", kept_kv_heads, aligner.G_s),
    ):
        if len(kept) != L_s or any(len(k) != n_out for k in kept):
            raise ValueError(
                f"align.init='from_prune': {name} has the wrong shape: expected ({L_s}, {n_out})"
            )
    q = selection_rows(kept_query_heads, aligner.H_t)  # (L_s, H_s, H_t)
    kv = selection_rows(kept_kv_heads, aligner.G_t)  # (L_s, G_s, G_t)
    for proj, rows in ((aligner.q_proj, q), (aligner.k_proj, kv), (aligner.v_proj, kv)):
        if proj is not None:  # a component no loss term projects has no mixer to set
            _set_mixer(proj.mixer, rows)
    return aligner
