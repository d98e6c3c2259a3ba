"""kvmap alignment: map teacher attention states (Q/K/V) into student space and score the student on them.

Typical stage-2 use (see each module's docstring for shapes):

    aligner = create_aligner(cfg.kv_projection_mode, teacher_hf_cfg, student_hf_cfg, cfg.align)
    loss_fn = create_structural_loss(**dataclasses.asdict(cfg.loss_config))
    out = aligner.align(k_t, v_t, q_t, segment_ids)        # teacher layers = aligner.teacher_layers
    s_k, s_v, s_q = (aligner.warp_student(x, out.plan) for x in (k_s, v_s, q_s))
    loss, metrics = loss_fn(s_k, s_v, s_q, out.k, out.v, out.q, **out.loss_kwargs())

Public API:
- layer map: `build_layer_map`, `teacher_layers_needed`
- time warp: `SegmentTimeWarper`, `create_reasoning_focused_warper`, `WarpPlan`
- across tokenizers: `token_alignment` / `alignment_plan` (W from character overlap, as a WarpPlan),
  `warped_attention_kl` (W A_t W^T), `CrossVocabKD` / `cross_vocab_kd` (exact-match + ULD on the top-k)
- projectors: `HeadwiseMapProjector` (structured), `KVDimensionProjector` (flat), `RopePairDimMap`
- aligner: `MapProjectionAligner`, `AlignedKV`, `create_structured_aligner`, `create_flat_aligner`, `create_aligner`;
  what it is built from: `AlignerSpec` (+ `ProjectionOptions`), read by `aligner_spec` from HF configs
- loss: `StructuralKVLoss`, `create_structural_loss`, `attention_kl`, `naive_attention_kl`
- attention geometry: `attention_dims` / `AttentionDims` (the one reader of an HF config or a store's teacher
  attributes), `LogitSpec` + `attention_probs` (the one Q/K -> attention builder: scaling, softcap, window)
- diagnostics: `effective_rank`, `rms`
"""

from alignment.geometry.attention_probs import LogitSpec, attention_probs
from alignment.geometry.model_dims import AttentionDims, attention_dims, rope_inv_freq
from alignment.losses.attention_kl import attention_kl, naive_attention_kl
from alignment.losses.cross_attention import warped_attention_kl
from alignment.losses.cross_vocab import CrossVocabKD, cross_vocab_kd
from alignment.losses.diagnostics import effective_rank, rms
from alignment.losses.structural import StructuralKVLoss, create_structural_loss
from alignment.mapping.char_alignment import alignment_plan, token_alignment
from alignment.mapping.head_maps import gqa_query_mixer, pair_selection, uniform_mixer
from alignment.mapping.layer_map import build_layer_map, teacher_layers_needed
from alignment.mapping.time_warping import SegmentTimeWarper, WarpPlan, create_reasoning_focused_warper
from alignment.projection.aligner import (
    AlignedKV,
    MapProjectionAligner,
    create_aligner,
    create_flat_aligner,
    create_structured_aligner,
)
from alignment.projection.aligner_spec import AlignerSpec, ProjectionOptions, aligner_spec
from alignment.projection.projectors import HeadwiseMapProjector, KVDimensionProjector
from alignment.projection.rope import RopePairDimMap

__all__ = [
    "AlignedKV",
    "CrossVocabKD",
    "alignment_plan",
    "cross_vocab_kd",
    "token_alignment",
    "warped_attention_kl",
    "AlignerSpec",
    "AttentionDims",
    "HeadwiseMapProjector",
    "KVDimensionProjector",
    "LogitSpec",
    "MapProjectionAligner",
    "ProjectionOptions",
    "RopePairDimMap",
    "SegmentTimeWarper",
    "StructuralKVLoss",
    "WarpPlan",
    "aligner_spec",
    "attention_dims",
    "attention_kl",
    "attention_probs",
    "build_layer_map",
    "create_aligner",
    "create_flat_aligner",
    "create_reasoning_focused_warper",
    "create_structural_loss",
    "create_structured_aligner",
    "effective_rank",
    "gqa_query_mixer",
    "naive_attention_kl",
    "pair_selection",
    "rms",
    "rope_inv_freq",
    "teacher_layers_needed",
    "uniform_mixer",
]
