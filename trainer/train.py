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

import torch

from pipeline.cli import command_parser, config_from_args, parse_args, run_command
from pipeline.config import KVMapConfig
from pipeline.configlib import ConfigError, to_dict, write_run_metadata
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
from trainer.loop_utils import check_finite, final_train_metrics, flat_config, reduce_logs, trackers
from trainer.schedules import lambda_kv_at, lr_multiplier
from trainer.setup import (
    build_aligner,
    build_kd,
    check_resume_config,
    needed_components,
    param_groups,
    store_path_of,
    validate_config,
)
from trainer.step import DistillModel, forward_step
from trainer.store_checks import check_layers, check_tokenizer, open_store, teacher_config_from_attrs

# Test hook (tests/test_train.py): SIGKILL this process right after optimizer step N completes
# (after its checkpoint, if one falls on N), to prove that --resume reproduces an uninterrupted run.
KILL_ENV = "KVMAP_TEST_KILL_AFTER_STEP"


def _prepare_run_dir(cfg: KVMapConfig, resume: bool, overwrite: bool, accelerator) -> Path | None:
    """The checkpoint to resume from (or None); refuses to silently restart over an existing run, or to
    resume one with a different training config."""
    run_dir = Path(cfg.run_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        saved = read_trainer_state(ckpt)
        check_resume_config(saved.get("config", to_dict(cfg)), to_dict(cfg))
        world = saved.get("num_processes", accelerator.num_processes)
        if world != accelerator.num_processes:
            raise ConfigError(
                f"--resume: checkpoint {ckpt.name} was written by {world} processes, this launch has "
                f"{accelerator.num_processes}: expected the same number (the sample stream is sharded by it)"
            )
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
        log_with=trackers() or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )
    is_main = accelerator.is_main_process
    ckpt = _prepare_run_dir(cfg, resume, overwrite, accelerator)
    # --- preflight: store, student, tokenizer, aligner, layers (all before any step) ---
    store = open_store(store_path_of(cfg))
    set_seed(cfg.seed)  # the student's random init and the aligner's init come from this seed
    student, tokenizer = load_model(cfg.student, for_training=True)
    vocab = int(student.get_input_embeddings().weight.shape[0])
    check_tokenizer(store, tokenizer, vocab)
    aligner = build_aligner(cfg, store, student)
    kd = build_kd(cfg, store, vocab)
    if aligner is not None and aligner.head_selection is not None:
        accelerator.print(aligner.head_selection.describe())
    layers, comps = [], ()
    if aligner is not None:
        layers, comps = list(aligner.teacher_layers), needed_components(cfg)
        check_layers(store, layers, comps)
    if kd is not None:
        comps = (*comps, "logits")
    loss_fn = None
    if aligner is not None:
        from alignment import create_structural_loss

        loss_fn = create_structural_loss(**dataclasses.asdict(cfg.loss_config))
    t_load = time.perf_counter()
    train_ds = StoreDataset(store.path, "train", layers=layers, components=comps, preload=cfg.train.preload)
    if cfg.train.preload:
        from trainer.preload import preload_bytes

        gb = preload_bytes(store, "train", layers or store.layers, comps) / 2**30
        accelerator.print(f"preloaded the train split: {gb:.2f} GiB in {time.perf_counter() - t_load:.1f} s")
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

    start_step = 0
    recent: list[dict] = []  # per-step logs of the last `log_every` steps (final train/* metrics)
    log = MetricsLog(run_dir / "metrics.jsonl", enabled=is_main)
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        saved = read_trainer_state(ckpt)
        start_step = int(saved["step"])
        recent = saved.get("recent", [])  # the final train/* window continues exactly
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

    if accelerator.log_with:  # TensorBoard (when installed), through accelerate's trackers
        accelerator.init_trackers("kvmap", config=flat_config(cfg))

    # --- data: the run's whole sample stream, restarted at the first unconsumed sample ---
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    sampler = ResumableSampler(
        len(train_ds), cfg.seed, cfg.train.steps * global_batch, start_step * global_batch
    )
    # Pinned host batches on CUDA: the teacher states are most of a batch's bytes, and a pageable copy of
    # them cost 214-254 ms vs 38 ms pinned per 4 x 1024-token batch of 7B states on an H100
    # (benchmarks/bench_gpu.py, section 2) -- more than the CE-only step itself.
    loader = make_loader(
        train_ds,
        cfg.train.batch_size,
        pad_id,
        sampler,
        cfg.train.num_workers,
        cfg.train.prefetch_factor,
        pin_memory=accelerator.device.type == "cuda",
    )
    loader = accelerator.prepare_data_loader(loader, device_placement=True)
    batches = iter(loader)

    def emit(row: dict) -> None:
        """A metrics.jsonl row, and its scalars to the trackers (TensorBoard) when any is installed."""
        log.write(row)
        if accelerator.log_with:
            accelerator.log(
                {k: v for k, v in row.items() if isinstance(v, float) and math.isfinite(v)}, step=row["step"]
            )

    kill_after = int(os.environ.get(KILL_ENV, "-1"))
    final_eval: dict = {}
    bar = tqdm(
        total=cfg.train.steps, initial=start_step, disable=not (is_main and cfg.train.progress), desc="train"
    )
    model.train()
    for step in range(start_step, cfg.train.steps):
        lam = lambda_kv_at(
            step, 1.0 if cfg.lambda_kv == "auto" else cfg.lambda_kv, cfg.train.lambda_schedule,
            cfg.train.lambda_warmup_steps, cfg.train.steps, cfg.train.lambda_until,
        )  # fmt: skip
        lam = "auto" if cfg.lambda_kv == "auto" and lam > 0 else lam  # auto: computed per batch in the step
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
                    kd=kd,
                    ce_weight=cfg.loss_config.ce_weight,
                    lambda_auto_range=cfg.train.lambda_auto_range,
                )
                check_finite(accelerator, res, step + 1)  # 1-based like metrics.jsonl
                accelerator.backward(res.loss / cfg.train.grad_accum)
            micro_logs.append(res.logs)
        grad_norm = None
        if cfg.train.clip_grad > 0:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        lrs = {
            g.get("name", str(i)): g["lr"] for i, g in enumerate(optimizer.param_groups)
        }  # used by this step
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs = reduce_logs(accelerator, micro_logs)
        logs.update(lr=lrs.get("student", next(iter(lrs.values()))), step_s=time.time() - t_step)
        logs.setdefault("lambda_kv", 0.0 if lam == "auto" else float(lam))  # the step logs auto's value
        if "aligner" in lrs:
            logs["lr_aligner"] = lrs["aligner"]
        if grad_norm is not None:
            logs["grad_norm"] = float(grad_norm)
        logs["tokens"] = tokens * accelerator.num_processes
        done = step + 1
        recent = (recent + [logs])[-cfg.train.log_every :]
        if done % cfg.train.log_every == 0 or done == 1 or done == cfg.train.steps:
            row = {"step": done, **logs}
            emit(row)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", ce=f"{logs['loss_ce']:.4f}")
        if cfg.eval.every and done % cfg.eval.every == 0 and done != cfg.train.steps and eval_split:
            ev = evaluate(
                accelerator, base.student, tokenizer, store.path, eval_split, cfg.eval, pad_id, ce_ids
            )
            emit({"step": done, **ev})
            model.train()
        if (cfg.train.ckpt_every and done % cfg.train.ckpt_every == 0) or done == cfg.train.steps:
            save_checkpoint(
                accelerator,
                run_dir,
                done,
                {
                    "seed": cfg.seed,
                    "recent": recent,
                    "config": to_dict(cfg),
                    "num_processes": accelerator.num_processes,
                },
                cfg.train.keep_checkpoints,
            )
        if done == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    bar.close()

    # --- end: evaluation, diagnostics, saved student, metrics.json ---
    if eval_split:
        final_eval = evaluate(
            accelerator, base.student, tokenizer, store.path, eval_split, cfg.eval, pad_id, ce_ids
        )
        emit({"step": cfg.train.steps, **final_eval})
    diag = {}
    if aligner is not None:
        diag = alignment_diagnostics(accelerator, base.aligner, store.path, cfg, pad_id)
    metrics = {
        **final_eval,
        **final_train_metrics(recent),
        **diag,
        "wall_s": time.time() - t0,
        "steps": cfg.train.steps,
    }
    metrics["align/params"] = base.aligner.num_parameters(trainable_only=True) if aligner is not None else 0
    if is_main:
        meta = {
            "mode": cfg.kv_projection_mode,
            "align": to_dict(cfg.align),
            "teacher": teacher_config_from_attrs(store.attrs, store.path),
            "teacher_layers": list(base.aligner.teacher_layers) if aligner is not None else [],
            "layer_map": list(base.aligner.layer_map) if aligner is not None else [],
        }
        save_student(base.student, tokenizer, base.aligner, meta, run_dir / "student")
        (run_dir / "metrics.json").write_text(json.dumps(_jsonable(metrics), indent=2))
    accelerator.wait_for_everyone()
    if accelerator.log_with:
        accelerator.end_training()
    return metrics


def main(argv: list[str] | None = None) -> int:
    """`kvmap-train` / `accelerate launch trainer/train.py`: train, then print the final metrics."""
    p = command_parser(
        "kvmap-train",
        __doc__,
        sections=["student", "align", "loss_config", "lambda_kv", "train", "eval", "seed"],
        examples=[
            "kvmap-train --config configs/default.yaml train.steps=50 run_dir=runs/try",
            "accelerate launch trainer/train.py --config configs/default.yaml --resume",
        ],
    )
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="clear an existing run folder first")
    args = parse_args(p, argv)
    metrics: dict = {}

    def body() -> None:
        cfg = config_from_args(KVMapConfig, args)
        metrics.update(run_training(cfg, resume=args.resume, overwrite=args.overwrite))

    rc = run_command("train", body)
    if rc:
        return rc
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
