"""Stage 2: train a student on a kvmap store with loss = loss_ce + lambda_kv(step) * loss_struct.

    accelerate launch trainer/train.py --config configs/default.yaml [key=value ...] [--resume] [--overwrite]
    python trainer/train.py --config configs/default.yaml train.steps=50      # single process

Shape glossary: B batch (per process), T tokens, L_sel teacher layers read from the store, L_s student
layers; see trainer/step.py for the loss shapes.

What happens, in order (every check runs before the first step):
1. config checks (segments, schedules, precision), the store (complete, readable, train split), the
   student (`pipeline.models.load_model`, random init seeded by `seed`), tokenizer/vocab agreement with the
   store, the aligner from the store's teacher geometry (the teacher is never loaded), the teacher layers
   and components the loss needs.
2. the run folder: config.yaml + meta.json (git SHA, seed, store fingerprint); `--resume` loads the newest
   checkpoint (accelerate.save_state: student + aligner, optimizer, LR schedule, RNG) and restarts the
   seeded sample stream at the first sample not yet consumed, so the loss curve equals an uninterrupted
   run's; without `--resume` an existing run folder with checkpoints is refused (`--overwrite` clears it).
3. the loop: AdamW (student matrices decayed; aligner at `train.aligner_lr`), warmup + cosine LR, gradient
   accumulation, clipping, NaN/inf stop naming the step and the term, metrics.jsonl rows, evaluation every
   `eval.every` steps, checkpoints every `train.ckpt_every` steps and at the end.
4. the end: student/ (HF folder + aligner.safetensors), metrics.json.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # `accelerate launch trainer/train.py` runs this file as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from pipeline.config import KVMapConfig
from pipeline.configlib import ConfigError, parse_cli, to_dict, write_run_metadata
from trainer.checkpoint import (
    MetricsLog,
    _jsonable,
    latest_checkpoint,
    read_trainer_state,
    save_checkpoint,
    save_student,
)
from trainer.data import ResumableSampler, StoreDataset, make_loader
from trainer.evaluate import alignment_diagnostics, evaluate
from trainer.losses import segment_ids_of
from trainer.schedules import lambda_kv_at, lr_multiplier
from trainer.step import DistillModel, forward_step
from trainer.store_checks import check_layers, check_tokenizer, open_store, teacher_config_from_attrs

# Test hook (tests/test_train_resume.py): SIGKILL this process right after optimizer step N completes
# (after its checkpoint, if one falls on N), to prove that --resume reproduces an uninterrupted run.
KILL_ENV = "KVMAP_TEST_KILL_AFTER_STEP"
FINAL_TRAIN_KEYS = ("loss", "loss_ce", "loss_struct", "cos_k", "cos_v", "cos_q", "attn_kl")


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
    try:
        aligner = create_aligner(cfg.kv_projection_mode, teacher_cfg, student.config, cfg.align)
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


def _prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool, accelerator) -> Path | None:
    """The checkpoint to resume from (or None); refuses to silently restart over an existing run."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    ckpt_root = run_dir / "checkpoints"
    if not resume and ckpt_root.is_dir() and any(ckpt_root.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"run_dir='{run_dir}' already holds checkpoints: pass --resume to continue it or --overwrite to restart"
            )
        accelerator.wait_for_everyone()  # every rank has looked before the main one deletes
        if accelerator.is_main_process:
            shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    return ckpt


def _reduce_logs(accelerator, logs: list[dict]) -> dict:
    """Mean over micro-batches and processes of every numeric log (per-layer lists elementwise)."""
    keys = sorted(logs[0])
    flat, spans = [], []
    for k in keys:
        vals = [r[k] for r in logs]
        if isinstance(vals[0], list):
            arr = torch.tensor(vals, dtype=torch.float64).mean(0)
        else:
            arr = torch.tensor([sum(vals) / len(vals)], dtype=torch.float64)
        spans.append((k, len(arr), isinstance(vals[0], list)))
        flat.append(arr)
    vec = torch.cat(flat).to(accelerator.device)
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="mean")
    vec, out, i = vec.cpu().tolist(), {}, 0
    for k, n, is_list in spans:
        out[k] = vec[i : i + n] if is_list else vec[i]
        i += n
    return out


def _check_finite(accelerator, res, step: int) -> None:
    """Stop every rank together on a NaN/inf term, naming the step and the term."""
    names = list(res.terms)
    bad = torch.tensor(
        [0.0 if math.isfinite(float(res.terms[n].detach())) else 1.0 for n in names],
        device=accelerator.device,
    )
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    for n, b in zip(names, bad.tolist()):
        if b > 0:
            raise FloatingPointError(
                f"step {step}: {n} is not finite ({float(res.terms[n].detach())}); stopping (lower train.lr, check the store "
                "with `python -m pipeline.inspect`, or run trainer/profile_alignment.py)"
            )


def _trackers(run_dir: Path) -> list[str]:
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        return ["tensorboard"]
    return []


def run_training(cfg: KVMapConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the student of `cfg` on its store; returns the final metrics (also written to metrics.json).

    Args:
        cfg: the resolved config (pipeline.config.KVMapConfig).
        resume: continue from the newest checkpoint in `cfg.run_dir` (a fresh start if there is none).
        overwrite: delete an existing run folder that holds checkpoints instead of refusing it.
    Returns:
        dict with the metric names of the BRIEF (eval/ce, eval/ce_P|R|A, eval/acc_R|A, eval/exact_match,
        train/loss_ce, train/cos_k, train/cos_v, train/attn_kl, train/cos_k_layer, train/cos_v_layer,
        align/eff_rank_q|k|v, align/params, wall_s, steps).
    Example:
        >>> cfg = load_config(KVMapConfig, "configs/default.yaml", ["train.steps=20"])
        >>> run_training(cfg)["eval/ce"]
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    from pipeline.models import load_model

    t0 = time.time()
    ce_ids, struct_ids = validate_config(cfg)
    run_dir = Path(cfg.run_dir)
    accelerator = Accelerator(
        # Without a GPU, cpu=True is what makes a multi-process launch use gloo (DistributedType.MULTI_CPU);
        # otherwise accelerate sees LOCAL_RANK without CUDA and silently runs every rank as world size 1.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        step_scheduler_with_optimizer=False,  # the LR schedule counts optimizer steps, not per-rank batches
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=_trackers(run_dir) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )
    is_main = accelerator.is_main_process
    ckpt = _prepare_run_dir(run_dir, resume, overwrite, accelerator)
    # --- preflight: store, student, tokenizer, aligner, layers (all before any step) ---
    store = open_store(store_path_of(cfg))
    set_seed(cfg.seed)  # the student's random init and the aligner's init come from this seed
    student, tokenizer = load_model(cfg.student, for_training=True)
    vocab = int(student.get_input_embeddings().weight.shape[0])
    check_tokenizer(store, tokenizer, vocab)
    aligner = build_aligner(cfg, store, student)
    layers, comps = [], ()
    if aligner is not None:
        layers, comps = list(aligner.teacher_layers), needed_components(cfg)
        check_layers(store, layers, comps)
    loss_fn = None
    if aligner is not None:
        from alignment import create_structural_loss

        loss_fn = create_structural_loss(**dataclasses.asdict(cfg.loss_config))
    train_ds = StoreDataset(store.path, "train", layers=layers, components=comps)
    eval_split = "eval" if "eval" in store.splits else None
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0

    # --- model, optimizer, schedule ---
    model = DistillModel(student, aligner)
    optimizer = torch.optim.AdamW(param_groups(student, aligner, cfg), betas=(0.9, 0.95))
    lr_fn = partial(
        lr_multiplier,
        warmup_steps=cfg.train.warmup_steps,
        total_steps=cfg.train.steps,
        min_ratio=cfg.train.min_lr_ratio,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_fn)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    base = accelerator.unwrap_model(model)
    scales = (aligner.student_scaling, aligner.teacher_scaling) if aligner is not None else (None, None)

    start_step = 0
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        start_step = int(read_trainer_state(ckpt)["step"])
        log.truncate_after(start_step)
        accelerator.print(f"resuming from {ckpt} at step {start_step}")
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {run_dir}/checkpoints; starting fresh")
    if is_main:
        if ckpt is None:
            log.path.unlink(missing_ok=True)
        write_run_metadata(
            run_dir,
            cfg,
            cfg.seed,
            {"store": str(store.path), "store_fingerprint": store.fingerprint, "resumed_from_step": start_step,
             "num_processes": accelerator.num_processes},
        )  # fmt: skip
        accelerator.init_trackers("kvmap", config=_flat_config(cfg)) if accelerator.log_with else None

    # --- data: the run's whole sample stream, restarted at the first unconsumed sample ---
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    sampler = ResumableSampler(
        len(train_ds), cfg.seed, cfg.train.steps * global_batch, start_step * global_batch
    )
    loader = make_loader(
        train_ds, cfg.train.batch_size, pad_id, sampler, cfg.train.num_workers, cfg.train.prefetch_factor
    )
    loader = accelerator.prepare_data_loader(loader, device_placement=True)
    batches = iter(loader)

    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    recent: list[dict] = []
    final_eval: dict = {}
    bar = tqdm(
        total=cfg.train.steps, initial=start_step, disable=not (is_main and cfg.train.progress), desc="train"
    )
    model.train()
    step = start_step
    for step in range(start_step, cfg.train.steps):
        lam = lambda_kv_at(
            step, cfg.lambda_kv, cfg.train.lambda_schedule, cfg.train.lambda_warmup_steps, cfg.train.steps
        )
        micro_logs = []
        t_step = time.time()
        tokens = 0
        for micro in range(cfg.train.grad_accum):
            batch = next(batches)
            tokens += int(batch["attention_mask"].sum())
            sync = micro == cfg.train.grad_accum - 1
            ctx = accelerator.no_sync(model) if not sync else contextlib.nullcontext()
            with ctx:
                res = forward_step(
                    model,
                    batch,
                    ce_ids=ce_ids,
                    struct_ids=struct_ids,
                    lambda_kv=lam,
                    loss_fn=loss_fn,
                    scales=scales,
                )
                _check_finite(accelerator, res, step)
                accelerator.backward(res.loss / cfg.train.grad_accum)
            micro_logs.append(res.logs)
        grad_norm = None
        if cfg.train.clip_grad > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs = _reduce_logs(accelerator, micro_logs)
        lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)}
        logs.update(
            lr=lrs.get("student", next(iter(lrs.values()))), lambda_kv=lam, step_s=time.time() - t_step
        )
        if "aligner" in lrs:
            logs["lr_aligner"] = lrs["aligner"]
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        logs["tokens"] = tokens * accelerator.num_processes
        done = step + 1
        recent = (recent + [logs])[-cfg.train.log_every :]
        if done % cfg.train.log_every == 0 or done == 1 or done == cfg.train.steps:
            row = {"step": done, **logs}
            log.write(row)
            if accelerator.log_with:
                accelerator.log({k: v for k, v in row.items() if isinstance(v, float)}, step=done)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", ce=f"{logs['loss_ce']:.4f}")
        if cfg.eval.every and done % cfg.eval.every == 0 and done != cfg.train.steps and eval_split:
            ev = evaluate(accelerator, base.student, tokenizer, store.path, eval_split, cfg.eval, pad_id)
            log.write({"step": done, **ev})
            model.train()
        if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or done == cfg.train.steps:
            save_checkpoint(accelerator, run_dir, done, {"seed": cfg.seed}, cfg.train.keep_checkpoints)
        if done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    # --- end: evaluation, diagnostics, saved student, metrics.json ---
    if eval_split:
        final_eval = evaluate(accelerator, base.student, tokenizer, store.path, eval_split, cfg.eval, pad_id)
        log.write({"step": cfg.train.steps, **final_eval})
    diag = {}
    if aligner is not None:
        diag = alignment_diagnostics(accelerator, base.aligner, store.path, cfg, pad_id)
    metrics = {
        **final_eval,
        **_final_train(recent),
        **diag,
        "wall_s": time.time() - t0,
        "steps": cfg.train.steps,
    }
    metrics["align/params"] = base.aligner.num_parameters(trainable_only=True) if aligner is not None else 0
    if is_main:
        meta = {
            "mode": cfg.kv_projection_mode,
            "align": to_dict(cfg.align),
            "teacher": teacher_config_from_attrs(store.attrs),
            "teacher_layers": list(base.aligner.teacher_layers) if aligner is not None else [],
            "layer_map": list(base.aligner.layer_map) if aligner is not None else [],
        }
        save_student(base.student, tokenizer, base.aligner, meta, run_dir / "student")
        (run_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.end_training()
    return metrics


def _final_train(recent: list[dict]) -> dict:
    """train/* = mean over the last `log_every` steps (a less noisy end value than the last step)."""
    out = {}
    if not recent:
        return out
    for k in FINAL_TRAIN_KEYS:
        vals = [r[k] for r in recent if k in r]
        if vals:
            out[f"train/{k}"] = sum(vals) / len(vals)
    for k in ("cos_k_layer", "cos_v_layer", "cos_q_layer"):
        rows = [r[k] for r in recent if k in r]
        if rows:
            out[f"train/{k}"] = [sum(c) / len(c) for c in zip(*rows)]
    return out


def _flat_config(cfg: KVMapConfig) -> dict:
    """Scalar config values for trackers (TensorBoard hparams accept scalars only)."""
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (int, float, str, bool)):
                out[prefix + k] = v

    walk("", to_dict(cfg))
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI: `--config PATH [key=value ...] [--resume] [--overwrite]`; prints the final metrics."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, flags = parse_cli(KVMapConfig, argv, flags=("resume", "overwrite"))
        metrics = run_training(cfg, resume=flags["resume"], overwrite=flags["overwrite"])
    except (ConfigError, ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    keys = [k for k in metrics if not isinstance(metrics[k], list)]
    print(
        "  ".join(
            f"{k}={metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k}={metrics[k]}" for k in keys
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
