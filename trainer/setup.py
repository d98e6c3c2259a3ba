"""Stage-2 setup pieces: config checks a dataclass cannot express, the aligner from the store's teacher
geometry, the store components the loss reads, and the optimizer's parameter groups.

Shapes: none (configuration). Errors are one-line `ConfigError`s naming the key, the value and what was
expected; `trainer/train.py` calls all of this before its first step.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from pipeline.config import KVMapConfig
from pipeline.configlib import ConfigError
from trainer.losses import segment_ids_of
from trainer.store_checks import teacher_config_from_attrs


def validate_config(cfg: KVMapConfig) -> tuple[list[int], list[int]]:
    """Checks a dataclass cannot express; returns (ce segment ids, struct segment ids)."""
    t = cfg.train
    for key, v, lo in (
        ("train.steps", t.steps, 1),
        ("train.batch_size", t.batch_size, 1),
        ("train.grad_accum", t.grad_accum, 1),
        ("train.warmup_steps", t.warmup_steps, 0),
        ("train.lambda_warmup_steps", t.lambda_warmup_steps, 0),
        ("train.ckpt_every", t.ckpt_every, 0),
        ("train.keep_checkpoints", t.keep_checkpoints, 1),
        ("train.log_every", t.log_every, 1),
        ("train.num_workers", t.num_workers, 0),
        ("train.prefetch_factor", t.prefetch_factor, 1),
        ("eval.every", cfg.eval.every, 0),
        ("eval.batch_size", cfg.eval.batch_size, 1),
        ("eval.greedy_samples", cfg.eval.greedy_samples, 0),
        ("eval.max_new_tokens", cfg.eval.max_new_tokens, 1),
    ):
        if v < lo:
            raise ConfigError(f"config key '{key}': got {v!r}, expected an int >= {lo}")
    for key, v in (("train.lr", t.lr), ("train.aligner_lr", t.aligner_lr)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ConfigError(f"config key '{key}': got {v!r}, expected a finite value > 0")
    if not (math.isfinite(cfg.lambda_kv) and cfg.lambda_kv >= 0):
        raise ConfigError(f"config key 'lambda_kv': got {cfg.lambda_kv!r}, expected a finite value >= 0")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError(
            f"config key 'train.min_lr_ratio': got {t.min_lr_ratio!r}, expected a value in [0, 1]"
        )
    if t.clip_grad < 0:
        raise ConfigError(
            f"config key 'train.clip_grad': got {t.clip_grad!r}, expected a value >= 0 (0 = off)"
        )
    if cfg.eval.max_samples is not None and cfg.eval.max_samples < 1:
        raise ConfigError(
            f"config key 'eval.max_samples': got {cfg.eval.max_samples!r}, expected null or >= 1"
        )
    if t.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "config key 'train.mixed_precision': got 'fp16', expected 'no' or 'bf16' without a GPU"
        )
    try:
        ce = segment_ids_of(t.ce_segments, "train.ce_segments")
        st = segment_ids_of(t.struct_segments, "train.struct_segments")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.kv_projection_mode not in ("structured", "flat"):
        raise ConfigError(
            f"config key 'kv_projection_mode': got {cfg.kv_projection_mode!r}, expected structured | flat"
        )
    return ce, st


def store_path_of(cfg: KVMapConfig) -> str:
    return cfg.train.store or cfg.extract.store


def build_aligner(cfg: KVMapConfig, store, student):
    """The aligner from the store's teacher geometry and the student's config; None when lambda_kv == 0."""
    if cfg.lambda_kv == 0:
        return None
    from alignment import create_aligner

    teacher_cfg = teacher_config_from_attrs(store.attrs)
    align_cfg, meta = cfg.align, None
    if cfg.align.init == "from_prune":  # the layer map is the kept teacher layers (prune_meta.json)
        from pipeline.prune_meta import read_prune_meta

        meta = read_prune_meta(cfg.student)
        align_cfg = dataclasses.replace(cfg.align, layer_map=meta["kept_layers"])
    try:
        aligner = create_aligner(cfg.kv_projection_mode, teacher_cfg, student.config, align_cfg)
        if meta is not None:
            from alignment.prune_init import init_from_prune

            init_from_prune(aligner, meta["kept_query_heads"], meta["kept_kv_heads"])
    except ValueError as e:
        raise ConfigError(f"aligner ({cfg.kv_projection_mode}): {e}".splitlines()[0]) from None
    lc = cfg.loss_config
    needs_mixer = lc.alpha_attn > 0 and lc.attn_target == "teacher" and aligner.q_head_mix() is None
    if needs_mixer and aligner.H_t != aligner.H_s:
        raise ConfigError(
            f"config key 'loss_config.attn_target': 'teacher' with kv_projection_mode='{cfg.kv_projection_mode}' "
            f"needs a Q head mixer (teacher {aligner.H_t} vs student {aligner.H_s} heads): expected 'structured'"
        )
    return aligner


def needed_components(cfg: KVMapConfig) -> tuple[str, ...]:
    """Store components the loss reads: K and V always (the aligner maps both), Q only for the attention term."""
    return ("q", "k", "v") if cfg.loss_config.alpha_attn > 0 else ("k", "v")


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
    "train.num_workers",
    "train.prefetch_factor",
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
