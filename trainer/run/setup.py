"""Stage-2 setup pieces: config checks a dataclass cannot express, the aligner from the store's teacher
geometry, the store components the loss reads, and the optimizer's parameter groups.

Shapes: none (configuration). Errors are one-line `ConfigError`s naming the key, the value and what was
expected; `trainer/train.py` calls all of this before its first step.
"""

from __future__ import annotations

import dataclasses

import torch

from alignment import create_aligner
from alignment.config import only_selected_heads, used_projections
from alignment.losses.logit_kd import create_logit_kd_loss
from alignment.losses.relation import check_relation_heads
from alignment.mapping.head_select import head_view, layers_of_ranked_heads, select_heads
from alignment.projection.prune_init import init_from_prune
from pipeline.analysis.head_scores import load_or_compute, ranked_heads
from pipeline.config.configlib import ConfigError
from pipeline.config.kvmap import KVMapConfig
from pipeline.config.train import segment_ids_of
from pipeline.models.geometry import teacher_config_from_attrs
from pipeline.pruning.meta import read_prune_meta
from pipeline.store.location import StoreLocation
from trainer.objective.step import KDTerm


def segment_ids(cfg: KVMapConfig) -> tuple[list[int], list[int]]:
    """(CE target segment ids, structural-loss segment ids); also refuses fp16 without a GPU.

    Every config key is checked where it is defined (the config classes' `__post_init__`); this only adds
    what depends on the machine.
    """
    if cfg.train.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'train.mixed_precision': got 'fp16', expected 'no' or 'bf16' without a GPU"
        )
    t = cfg.train
    return segment_ids_of(t.ce_segments, "train.ce_segments"), segment_ids_of(
        t.struct_segments, "train.struct_segments"
    )


def kd_segment_ids(cfg: KVMapConfig) -> list[int] | None:
    """The target-token segment ids logit KD counts when they differ from CE's (`train.kd_segments`), else
    None: CE and KD read the same rows, the default."""
    t = cfg.train
    if t.kd_segments is None:
        return None
    kd = segment_ids_of(t.kd_segments, "train.kd_segments")
    return None if kd == segment_ids_of(t.ce_segments, "train.ce_segments") else kd


def token_loss_ids(ce_ids: list[int], kd_ids: list[int] | None) -> list[int]:
    """The segment ids whose target tokens any token loss (CE or KD) trains: what held-out CE, agreement and
    KL count as 'trained', so arms that move CE or KD off some rows stay comparable."""
    return sorted(set(ce_ids) | set(kd_ids or ()))


def _check_relation_widths(cfg: KVMapConfig, aligner) -> None:
    rel = cfg.loss_config.relation
    if rel.weight == 0:
        return
    if rel.heads == "selected":  # no re-split: each selected teacher head goes to its student head
        return
    a = aligner
    widths = {"q": (a.H_s * a.D_s, a.H_t * a.D_t), "k": (a.G_s * a.D_s, a.G_t * a.D_t)}
    widths["v"] = widths["k"]
    for c in rel.components:
        for side, w in zip(("student", "teacher"), widths[c]):
            try:
                check_relation_heads(w, rel.heads, f"{side} {c}")
            except ValueError as e:
                raise ConfigError(str(e)) from None


def _apply_head_selection(cfg: KVMapConfig, store, aligner) -> None:
    """align.head_select: scores from the train split (sidecar or computed), the one-to-one assignment."""
    hs = cfg.align.head_select
    scores = None
    if hs.method in ("top_retrieval", "top_answer_mass"):
        scores = load_or_compute(store.path, "train", hs.samples)
    cut_from = None
    if cfg.align.init == "from_prune":  # each chosen teacher head goes to the student head cut from it
        cut_from = read_prune_meta(cfg.student)["kept_query_heads"]
    try:
        sel = select_heads(
            hs.method,
            aligner.layer_map,
            aligner.H_t,
            aligner.H_s,
            top=hs.top,
            heads=hs.heads,
            scores=scores,
            cut_from=cut_from,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if sel is not None:
        aligner.set_head_selection(sel)
        # attention KL (and a relation on the selected heads) alone: the teacher's chosen heads are all it reads
        if not aligner.projections and only_selected_heads(cfg.loss_config.relation):
            aligner.use_head_view(*head_view(sel, aligner.teacher_layers, aligner.H_t, aligner.G_t))


def store_path_of(cfg: KVMapConfig):
    """The store stage 2 reads: `train.store` (+ train.storage_options) or `extract.store` (+ its options),
    as a StoreLocation (str() = the folder or URL)."""
    if cfg.train.store:
        return StoreLocation(cfg.train.store, cfg.train.storage_options)
    return StoreLocation(cfg.extract.store, cfg.train.storage_options or cfg.extract.storage_options)


def layer_map_from_head_scores(cfg: KVMapConfig, store, student) -> list[int]:
    """`align.layer_map: heads`: the teacher layers of the store's best heads by `align.head_select.method`
    (scores of the train split, as head selection reads them), one per student layer."""
    method = cfg.align.head_select.method
    if method not in ("top_retrieval", "top_answer_mass"):
        raise ConfigError(
            f"config key 'align.layer_map': 'heads' with align.head_select.method={method!r}: expected "
            "top_retrieval or top_answer_mass (the layers come from the ranked heads)"
        )
    scores = load_or_compute(store.path, "train", cfg.align.head_select.samples)
    ranked = ranked_heads(scores, by=method.removeprefix("top_"))
    return layers_of_ranked_heads(ranked, int(student.config.num_hidden_layers))


def build_aligner(cfg: KVMapConfig, store, student):
    """The aligner from the store's teacher geometry and the student's config; None when lambda_kv == 0.
    Only the components a nonzero loss term projects get a projector (`used_projections`); a selected-head
    arm without any reads only its heads (`aligner.teacher_heads`, `MapProjectionAligner.use_head_view`)."""
    if cfg.lambda_kv == 0:
        return None
    teacher_cfg = teacher_config_from_attrs(store.attrs, store.path)
    align_cfg, meta = cfg.align, None
    if cfg.align.init == "from_prune":  # the layer map is the kept teacher layers (prune_meta.json)
        meta = read_prune_meta(cfg.student)
        align_cfg = dataclasses.replace(cfg.align, layer_map=meta["kept_layers"])
    elif cfg.align.layer_map == "heads":  # the layers of the best heads, for this student's depth
        align_cfg = dataclasses.replace(cfg.align, layer_map=layer_map_from_head_scores(cfg, store, student))
    try:
        used = used_projections(cfg.loss_config, cfg.align.head_select.method, cfg.kv_projection_mode)
        aligner = create_aligner(cfg.kv_projection_mode, teacher_cfg, student.config, align_cfg, used)
        if meta is not None:
            init_from_prune(aligner, meta["kept_query_heads"], meta["kept_kv_heads"])
    except ValueError as e:
        raise ConfigError(f"aligner ({cfg.kv_projection_mode}): {e}".splitlines()[0]) from None
    lc = cfg.loss_config
    needs_mixer = (
        lc.alpha_attn > 0
        and lc.attn_target == "teacher"
        and cfg.align.head_select.method == "all"
        and aligner.q_head_mix() is None
    )
    if needs_mixer and aligner.H_t != aligner.H_s:
        raise ConfigError(
            f"config key 'loss_config.attn_target': 'teacher' with kv_projection_mode='{cfg.kv_projection_mode}' "
            f"needs a Q head mixer (teacher {aligner.H_t} vs student {aligner.H_s} heads): expected 'structured'"
        )
    _check_relation_widths(cfg, aligner)
    _apply_head_selection(cfg, store, aligner)
    return aligner


def require_store_logits(alpha_logit: float, store) -> None:
    """A logit-KD arm needs the store's teacher top-k log-probs: one-line ConfigError otherwise."""
    if not store.has_logits("train"):
        raise ConfigError(
            f"loss_config.alpha_logit={alpha_logit}: store '{store.path}' holds no teacher logits: re-extract "
            "it with 'logits' in extract.components (e.g. extract.components=[q,k,v,logits])"
        )


def build_kd(cfg: KVMapConfig, store, student_vocab: int):
    """The logit-KD term (`trainer.objective.step.KDTerm`) when `loss_config.alpha_logit > 0`, else None.

    Checks, before any step: the store holds the teacher's top-k log-probs for the train split, and every
    stored token id indexes a row of the student's head. Rule for vocabularies of different sizes (e.g.
    Qwen2.5-7B's 152,064 head rows vs 1.5B's 151,936, both padding the same 151,665-token tokenizer): the
    student's distribution is over all of its head rows (rows past the tokenizer's size fall in the
    "rest" bucket with `kd_tail: bucket`, and are ignored with `renormalize`); when the teacher's head
    is larger than the student's, the stored ids are read once and any id >= the student's rows (a padding
    row in the teacher's top-k) is an error.
    """
    lc = cfg.loss_config
    if lc.alpha_logit == 0:
        return None
    require_store_logits(lc.alpha_logit, store)
    teacher_rows = int(store.attrs.get("teacher", {}).get("vocab_size") or 0)
    if teacher_rows > student_vocab:
        top = max(int(store.logit_array("indices", s)[:].max()) for s in store.logits["splits"])
        if top >= student_vocab:
            raise ConfigError(
                f"store '{store.path}' has teacher top-k token id {top} >= the student's {student_vocab} head rows: "
                "expected every stored id to be a student token (resize the student's embeddings)"
            )
    try:
        loss_fn = create_logit_kd_loss(**dataclasses.asdict(lc))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return KDTerm(loss_fn, float(lc.alpha_logit))


def needed_components(cfg: KVMapConfig) -> tuple[str, ...]:
    """Store components the loss reads (a term of weight 0 reads nothing): Q for the attention term or a Q
    relation; K for the K cosine, the attention term or a K relation; V for the V cosine or a V relation."""
    lc, rel = cfg.loss_config, cfg.loss_config.relation
    related = set(rel.components) if rel.weight > 0 else set()
    attn = lc.alpha_attn > 0
    used = {"q": attn or "q" in related, "k": lc.alpha_k > 0 or attn or "k" in related}
    used["v"] = lc.alpha_v > 0 or "v" in related
    return tuple(c for c in ("q", "k", "v") if used[c])


def param_groups(student, aligner, cfg: KVMapConfig) -> list[dict]:
    """AdamW groups: student matrices (decayed), student norms/biases/1-D (not decayed), aligner (own lr, no decay).

    The aligner is not decayed: its constrained parametrisations (simplex logits, orthogonal bases) have
    no meaningful 'small weights' prior, and decay would pull an unconstrained projector toward zero, the
    collapse the constraints exist to prevent.
    """
    decay, no_decay = [], []
    for _, p in student.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.train.weight_decay, "lr": cfg.train.lr, "name": "student"},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.train.lr, "name": "student_no_decay"},
    ]
    if aligner is not None:
        ap = [p for p in aligner.parameters() if p.requires_grad]
        if ap:
            lr = cfg.train.aligner_lr if cfg.train.aligner_lr is not None else cfg.train.lr
            groups.append({"params": ap, "weight_decay": 0.0, "lr": lr, "name": "aligner"})
    return [g for g in groups if g["params"]]


# Keys that may change between a run and its resume: they do not touch the training math or data order.
RESUME_FREE_KEYS = (
    "run_dir",
    "train.ckpt_every",
    "train.keep_checkpoints",
    "train.log_every",
    "train.progress",
    "train.save_final_state",
    "train.num_workers",
    "train.prefetch_factor",
    # per-process batch shape: free as long as the samples per step stay equal (run_dir.check_resume_batch)
    "train.batch_size",
    "train.grad_accum",
    "eval.",
    "prune.",  # pipeline/prune.py only
)


def check_resume_config(saved: dict, current: dict) -> None:
    """Refuse to resume a run whose training-relevant config changed (the curve would silently differ).

    Args:
        saved, current: nested config dicts (`to_dict(cfg)`) of the checkpoint and of this invocation.
    """

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict) and not (prefix + k).startswith(
                ("student.config", "align.ratio_map", "align.alpha_map")
            ):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[prefix + k] = v
        return out

    a, b = flat(saved), flat(current)
    for key in sorted(set(a) | set(b)):
        if key.startswith(RESUME_FREE_KEYS) or a.get(key) == b.get(key):
            continue
        raise ConfigError(
            f"--resume: config key '{key}' was {a.get(key)!r} in the checkpoint, now {b.get(key)!r}: expected the "
            "same training config (start a new run_dir, or --overwrite to restart this one)"
        )
