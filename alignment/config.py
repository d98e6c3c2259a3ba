"""Config sections owned by the aligner and the structural loss (see pipeline/config/kvmap.py for the whole schema)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class HeadSelectConfig:
    """Which teacher query heads the attention KL distils (alignment/mapping/head_select.py; scores: pipeline/analysis/head_scores.py).

    method "all" = every student head against the head-mixed teacher (the design). Otherwise the chosen
    teacher heads, each one-to-one into its own student head; every other student head gets no KL term.
    "top_retrieval" / "top_answer_mass": the `top` best heads by that train-split score among the teacher
    layers the layer map uses; "list": `heads` = [[teacher layer, teacher head], ...].
    """

    # how teacher heads are chosen (see the class doc)
    method: Literal["all", "top_retrieval", "top_answer_mass", "list"] = "all"
    top: int | None = None  # top_*: how many heads
    heads: list[list[int]] | None = None  # list: [[teacher layer, head], ...]
    samples: int | None = 64  # top_*: train samples scored (None = the whole split)


@dataclass
class AlignConfig:
    """Layer map + segment time warp + head-wise projection (the mode itself is top-level `kv_projection_mode`)."""

    # "uniform" | "last" | "heads" (the layers of the store's best heads by head_select.method, one per student
    # layer, for any student depth) | an explicit teacher layer per student layer
    layer_map: str | list[int] = "uniform"
    share_dim_proj: bool = True  # one head-dim map shared by every head (else one per head)
    init_uniform: bool = True  # head mixers start as uniform averages (else random)
    per_layer: bool = False  # a projector per mapped layer (else one shared by all)
    # How the projector is kept from cheating (shrinking / collapsing the projected teacher):
    # "constrained" = simplex head mixers + (semi-)orthogonal dim maps; "unconstrained" = free linear maps;
    # "frozen" = the init, not trained.
    constraint: Literal["constrained", "unconstrained", "frozen"] = "constrained"
    # time warp: fraction of each segment kept
    ratio_map: dict[str, float] = field(default_factory=lambda: {"P": 1.0, "R": 1.0, "A": 1.0})
    # time warp: 0 = nearest position, 1 = window mean
    alpha_map: dict[str, float] = field(default_factory=lambda: {"P": 0.0, "R": 0.0, "A": 0.0})
    # Structured mode: Q/K dim maps select the teacher rotary pair of the nearest frequency for each student
    # pair with a unit-modulus per-pair gain, so projection commutes with RoPE (alignment/projection/rope.py).
    rope_consistent: bool = False
    head_select: HeadSelectConfig = field(default_factory=HeadSelectConfig)
    # "from_prune": the student was cut from the teacher (pipeline/prune.py); read its prune_meta.json and
    # start the layer map, head mixers and dim maps at the exact correspondence (alignment/projection/prune_init.py).
    init: Literal["default", "from_prune"] = "default"


@dataclass
class RelationConfig:
    """MiniLMv2 relation KL (alignment/losses/relation.py): + weight * sum over components of KL(teacher || student)
    of softmax(X X^T / sqrt(d_r)) over `heads` relation heads re-split from each side's concatenated heads, or
    over the selected heads themselves (`heads: selected`)."""

    # the relation heads built from these
    components: list[Literal["q", "k", "v"]] = field(default_factory=lambda: ["q", "k", "v"])
    # R: must divide H*D of every chosen component on both sides; "selected": one relation map per head that
    # `align.head_select` chose, into the student head it maps to (relation KD on the retrieval heads)
    heads: int | Literal["selected"] = 8
    weight: float = 0.0  # 0 = off


@dataclass
class LossConfig:
    """StructuralKVLoss weights: loss_struct = alpha_k*(1-cos K) + alpha_v*(1-cos V) + alpha_attn*KL(attn)."""

    alpha_k: float = 1.0  # weight of 1 - cos(K)
    alpha_v: float = 1.0  # weight of 1 - cos(V)
    alpha_attn: float = 0.5  # weight of KL(teacher attention || student attention)
    temperature: float = 1.0  # softens both attention distributions in the KL
    chunk_size: int = 128  # query rows per chunk of the streaming attention KL
    # "projected": KL(attention of the projected teacher Q/K || student attention) (the design's loss);
    # "teacher": KL(convex Q-head-mix of the teacher's own attention (stored Q/K, teacher scaling) || student
    # attention): no learned projection in the target's path, so it cannot be gamed.
    attn_target: Literal["projected", "teacher"] = "projected"
    # "drop": remove key positions `sink_keys` (the first token: an attention sink) from both attention
    # distributions and renormalise before the KL; "keep": the plain KL.
    sink: Literal["keep", "drop"] = "keep"
    sink_keys: list[int] = field(default_factory=lambda: [0])  # with sink: drop, the key positions removed
    relation: RelationConfig = field(default_factory=RelationConfig)
    # Logit distillation from the store's top-k log-probs (alignment/losses/logit_kd.py). The total objective is
    # ce_weight * CE + alpha_logit * KD + lambda_kv * loss_struct; KD counts the rows CE counts.
    alpha_logit: float = 0.0  # 0 = off; > 0 needs a store extracted with `logits` in extract.components
    kd_loss: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # the logit divergence
    # jsd only: m = beta p_teacher + (1 - beta) q_student (TRL); 0 = forward, 1 = reverse KL.
    kd_beta: float = 0.5
    kd_temperature: float = 1.0  # both sides softened by tau; the term is scaled by tau^2
    # renormalize: softmax over the top-k only on both sides; bucket: exact divergence over {top-k tokens,
    # the rest}. renormalize is the default because it measured better on the default task (docs/results, logit KD on the template data: R
    # answer accuracy 0.30 vs 0.13, every seed learnt the copy; bucket pulls 5% of the student's mass onto
    # the teacher's 49k-token tail).
    kd_tail: Literal["bucket", "renormalize"] = "renormalize"
    ce_weight: float = 1.0  # 0 = logit-only (Minitron's recipe)
    # how the attention KL runs: "auto" = the fused Triton kernels on CUDA where they apply (one-to-one heads,
    # no softcap / sliding window), else the PyTorch stream; "torch" = always the stream; "triton" = insist.
    attn_kl_impl: Literal["auto", "torch", "triton"] = "auto"
    # Logit KD of a student whose tokenizer differs from the store's (alignment/losses/cross_vocab.py):
    # "exact_uld" = tokens with identical decoded strings share the teacher's mass, ULD on the rest; "uld" =
    # ULD on everything. null on same-tokenizer arms (docs/guides/cross-tokenizer.md).
    kd_cross: Literal["exact_uld", "uld"] | None = None

    def __post_init__(self):
        for key in ("alpha_logit", "ce_weight"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"loss_config.{key}={v!r}: expected a finite value >= 0")
        if not (math.isfinite(self.kd_temperature) and self.kd_temperature > 0):
            raise ValueError(
                f"loss_config.kd_temperature={self.kd_temperature!r}: expected a finite value > 0"
            )
        if not 0 <= self.kd_beta <= 1:
            raise ValueError(f"loss_config.kd_beta={self.kd_beta!r}: expected a value in [0, 1]")


def used_projections(loss: LossConfig, head_select: str = "all", mode: str = "structured") -> tuple[str, ...]:
    """The teacher components the aligner must project (a projector each) for these loss weights; a term
    whose weight is 0 builds no projector (and its cosine is never computed).

    k: the K cosine, or the attention KL against the projected teacher; v: the V cosine; q: the attention KL
    against the projected teacher, or against the teacher's own attention mixed by the structured Q head
    mixer (`align.head_select: all`; a head selection's one-hot mix and flat mode's fixed mix need none).
    The relation term reads raw teacher states and needs no projector.
    Example:
        >>> used_projections(LossConfig(alpha_k=0, alpha_v=0, attn_target="teacher"), "top_retrieval")
        ()
    """
    attn = loss.alpha_attn > 0
    projected = attn and loss.attn_target == "projected"
    mixed = attn and loss.attn_target == "teacher" and head_select == "all" and mode == "structured"
    used = {"k": loss.alpha_k > 0 or projected, "v": loss.alpha_v > 0, "q": projected or mixed}
    return tuple(c for c in ("k", "v", "q") if used[c])


def only_selected_heads(relation: RelationConfig) -> bool:
    """Whether the relation term reads no teacher head beyond `align.head_select`'s (off, or `heads: selected`),
    so a head selection can read (and a store can hold) those heads alone."""
    return relation.weight == 0 or relation.heads == "selected"
