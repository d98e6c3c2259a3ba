"""Stage 2: train a student on a kvmap store with loss = loss_ce + lambda_kv(step) * loss_struct.

    accelerate launch trainer/train.py --config configs/default.yaml [key=value ...] [--resume] [--overwrite]
    python trainer/train.py --config configs/default.yaml train.steps=50      # single process

Shape glossary: B batch (per process), T tokens, L_sel teacher layers read from the store, L_s student
layers; see trainer/objective/step.py for the loss shapes.

What happens, in order (every check runs before the first step):
1. config checks (segments, schedules, precision), the store (complete, readable, train split), the
   student (`pipeline.models.load.load_model`, random init seeded by `seed`), tokenizer/vocab agreement with the
   store, the aligner from the store's teacher geometry (the teacher is never loaded), the teacher layers
   and components the loss needs.
2. the run folder: config.yaml + meta.json (git SHA, seed, store fingerprint); `--resume` loads the newest
   checkpoint (accelerate.save_state: student + aligner, optimizer, LR schedule, RNG) and restarts the
   seeded sample stream at the first sample not yet consumed, so the loss curve equals an uninterrupted
   run's; without `--resume` an existing run folder with checkpoints is refused (`--overwrite` clears it).
3. the loop: AdamW (student matrices decayed; aligner at `train.aligner_lr`), warmup + cosine LR, gradient
   accumulation, clipping, NaN/inf stop naming the step and the term, metrics.jsonl rows, evaluation every
   `eval.every` steps, checkpoints every `train.ckpt_every` steps and at the end.
4. the end: student/ (HF folder + aligner.safetensors; with student.lora the adapter, and the merged HF
   folder in student/merged/), metrics.json.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import sys
import time

from accelerate import PartialState
from tqdm.auto import tqdm

from pipeline.cli import CommandFailed, command_parser, config_from_args, parse_args, run_command
from pipeline.config.configlib import to_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.models.geometry import teacher_config_from_attrs
from trainer.eval.evaluate import alignment_diagnostics, evaluate
from trainer.objective.grad_probe import grad_probe, term_weights
from trainer.objective.schedules import lambda_kv_at
from trainer.objective.step import StepResult, forward_step
from trainer.run.checkpoint import MERGED, jsonable, save_checkpoint, save_student
from trainer.run.cross_setup import cross_dataset
from trainer.run.loop_utils import check_finite, final_train_metrics, reduce_logs
from trainer.run.model_card import model_card
from trainer.run.run_dir import finished_metrics
from trainer.run.run_setup import Run, setup_run
from trainer.run.setup import token_loss_ids
from trainer.run.sharding import (
    clip_grad_norm,
    full_student_state,
    gathered,
    is_sharded,
    save_sharded_state,
    sync_replicated_grads,
    with_launch_fsdp,
)
from trainer.run.student_wrap import is_lora, save_merged


def structural_weight(run: Run, step: int) -> float | str:
    """lambda_kv at `step` (`train.lambda_schedule`); "auto" while the auto weight is on (set per batch)."""
    cfg, t = run.cfg, run.cfg.train
    peak = 1.0 if cfg.lambda_kv == "auto" else cfg.lambda_kv
    lam = lambda_kv_at(step, peak, t.lambda_schedule, t.lambda_warmup_steps, t.steps, t.lambda_until)
    return "auto" if cfg.lambda_kv == "auto" and lam > 0 else lam


def micro_step(run: Run, batch: dict, lam: float | str) -> StepResult:
    """The objective on one micro-batch with the run's segments, loss terms and weights."""
    # accelerate's prepare wraps a DDP model's forward in autocast; a sharded model is not prepared
    amp = run.accelerator.autocast() if is_sharded(run.model) else contextlib.nullcontext()
    with amp:
        return objective(run, batch, lam)


def objective(run: Run, batch: dict, lam: float | str) -> StepResult:
    """`forward_step` with the run's segments, loss terms and weights."""
    return forward_step(
        run.model,
        batch,
        ce_ids=run.ce_ids,
        struct_ids=run.struct_ids,
        lambda_kv=lam,
        kd_ids=run.kd_ids,
        loss_fn=run.loss_fn,
        kd=run.kd,
        ce_weight=run.cfg.loss_config.ce_weight,
        lambda_auto_range=run.cfg.train.lambda_auto_range,
    )


def accumulate(run: Run, step: int, lam: float | str) -> tuple[list[dict], int]:
    """Forward + backward of the step's `train.grad_accum` micro-batches; (their logs, tokens read)."""
    cfg, acc = run.cfg, run.accelerator
    every = cfg.train.grad_probe_every
    probe = every > 0 and (step + 1) % every == 0  # 1-based like metrics.jsonl
    micro_logs, tokens = [], 0
    for micro in range(cfg.train.grad_accum):
        batch = next(run.batches)
        tokens += int(batch["attention_mask"].sum())
        last = micro == cfg.train.grad_accum - 1
        with contextlib.nullcontext() if last else acc.no_sync(run.model):
            res = micro_step(run, batch, lam)
            check_finite(acc, res, step + 1)  # 1-based like metrics.jsonl
            if probe:  # before backward: the probe's extra gradients leave this step's update unchanged
                res.logs.update(probe_step(run, res))
            acc.backward(res.loss / cfg.train.grad_accum)
        micro_logs.append(res.logs)
    return micro_logs, tokens


def update(run: Run) -> tuple[dict[str, float], float | None]:
    """Clip, AdamW step, LR schedule step; (the LR each param group used, the pre-clip gradient norm)."""
    cfg, acc = run.cfg, run.accelerator
    grad_norm = None
    if is_sharded(run.model):  # FSDP averaged the student's gradients; the replicated aligner's here
        sync_replicated_grads(run.model, acc.num_processes)
        if cfg.train.clip_grad > 0:
            grad_norm = clip_grad_norm(run.model, cfg.train.clip_grad)
    elif cfg.train.clip_grad > 0:
        grad_norm = acc.clip_grad_norm_(run.model.parameters(), cfg.train.clip_grad)
    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(run.optimizer.param_groups)}  # this step's
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return lrs, None if grad_norm is None else float(grad_norm)


def train_step(run: Run, step: int) -> dict:
    """One optimizer step (gradient accumulation, clipping, AdamW, LR schedule); returns its logs."""
    acc, t_step = run.accelerator, time.time()
    lam = structural_weight(run, step)
    micro_logs, tokens = accumulate(run, step, lam)
    lrs, grad_norm = update(run)
    logs = reduce_logs(acc, micro_logs)
    logs.update(lr=lrs.get("student", next(iter(lrs.values()))), step_s=time.time() - t_step)
    logs.setdefault("lambda_kv", 0.0 if lam == "auto" else float(lam))  # the step logs auto's value
    if "aligner" in lrs:
        logs["lr_aligner"] = lrs["aligner"]
    if grad_norm is not None:
        logs["grad_norm"] = grad_norm
    logs["tokens"] = tokens * acc.num_processes
    return logs


def probe_step(run: Run, res) -> dict:
    """`train.grad_probe_every`: per-term gradient norms / cosines on the student for this micro-batch."""
    lam = res.logs.get("lambda_kv", 0.0)  # the resolved weight (auto: this batch's value)
    weights = term_weights(run.cfg.loss_config.ce_weight, run.kd.alpha if run.kd else None, lam)
    params = [p for p in run.base.student.parameters() if p.requires_grad]
    return grad_probe(res.terms, weights, params)


def emit(run: Run, row: dict) -> None:
    """A metrics.jsonl row, and its scalars to the trackers (TensorBoard) when any is installed."""
    run.log.write(row)
    if run.accelerator.log_with:
        run.accelerator.log(
            {k: v for k, v in row.items() if isinstance(v, float) and math.isfinite(v)}, step=row["step"]
        )


def record(run: Run, done: int, logs: dict) -> None:
    """Keep the final-metrics window; log every `log_every` steps and the first and last."""
    run.recent = (run.recent + [logs])[-run.cfg.train.log_every :]
    every = run.cfg.train.grad_probe_every
    probed = every > 0 and done % every == 0  # probe rows are logged even off the log_every grid
    if done % run.cfg.train.log_every == 0 or done == 1 or done == run.cfg.train.steps or probed:
        emit(run, {"step": done, **logs})


def evaluate_now(run: Run) -> dict:
    """The held-out `eval/*` metrics of the student as it is now."""
    with gathered(run.model):
        return evaluate(
            run.accelerator,
            run.base.student,
            run.tokenizer,
            run.store.path,
            run.eval_split,
            run.cfg.eval,
            run.pad_id,
            token_loss_ids(run.ce_ids, run.kd_ids),
            cross_dataset(run.cfg, run.store, run.eval_split, run.tokenizer) if run.cross_tokenizer else None,
            sharded=is_sharded(run.model),
        )


def maybe_evaluate(run: Run, done: int) -> None:
    """Held-out evaluation every `eval.every` steps (the end always evaluates, in `finish`)."""
    if (
        run.cfg.eval.every
        and done % run.cfg.eval.every == 0
        and done != run.cfg.train.steps
        and run.eval_split
    ):
        emit(run, {"step": done, **evaluate_now(run)})
        run.model.train()


def maybe_checkpoint(run: Run, done: int) -> None:
    """Every `train.ckpt_every` steps; at the last step only with `train.save_final_state`."""
    t = run.cfg.train
    final = done == t.steps
    if (final and t.save_final_state) or (not final and t.ckpt_every and done % t.ckpt_every == 0):
        state = {
            "seed": run.cfg.seed,
            "recent": run.recent,
            "config": to_dict(run.cfg),
            "num_processes": run.accelerator.num_processes,
        }
        more = None
        if is_sharded(run.model):  # model + optimizer shards: a distributed checkpoint beside accelerate's
            more = functools.partial(save_sharded_state, run.model, run.optimizer)
        save_checkpoint(run.accelerator, run.run_dir, done, state, t.keep_checkpoints, more)


def finish(run: Run, t0: float) -> dict:
    """Final evaluation and diagnostics, the saved student, metrics.json; drop checkpoints unless asked."""
    cfg, acc, base = run.cfg, run.accelerator, run.base
    final_eval = evaluate_now(run) if run.eval_split else {}
    if final_eval:
        emit(run, {"step": cfg.train.steps, **final_eval})
    diag = alignment_diagnostics(acc, base.aligner, run.store.path, cfg, run.pad_id) if base.aligner else {}
    metrics = {**final_eval, **final_train_metrics(run.recent), **diag}
    metrics.update(wall_s=time.time() - t0, steps=cfg.train.steps)
    metrics["align/params"] = base.aligner.num_parameters(trainable_only=True) if base.aligner else 0
    weights = full_student_state(run.model) if is_sharded(run.model) else None  # every rank gathers
    if acc.is_main_process:
        meta = {
            "mode": cfg.kv_projection_mode,
            "align": to_dict(cfg.align),
            "teacher": teacher_config_from_attrs(run.store.attrs, run.store.path),
            "teacher_layers": list(base.aligner.teacher_layers) if base.aligner else [],
            "layer_map": list(base.aligner.layer_map) if base.aligner else [],
            "projections": list(base.aligner.projections) if base.aligner else [],  # the others: no weights
        }
        save_student(base.student, run.tokenizer, base.aligner, meta, run.run_dir / "student", weights)
        if is_lora(base.student):  # the adapter is in student/; the merged model next to it, last
            save_merged(base.student, run.tokenizer, run.run_dir / "student" / MERGED)
        (run.run_dir / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=2))
        (run.run_dir / "student" / "README.md").write_text(model_card(run.run_dir))  # how it was made
        if not cfg.train.save_final_state:  # the student is saved: the optimizer state is not needed
            shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)
    acc.wait_for_everyone()
    if acc.log_with:
        acc.end_training()
    return metrics


def run_training(cfg: KVMapConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the student of `cfg` on its store; returns the final metrics (also written to metrics.json).

    Args:
        cfg: the resolved config (pipeline.config.kvmap.KVMapConfig).
        resume: continue from the newest checkpoint in `cfg.run_dir` (a fresh start if there is none; a
            finished run returns its metrics.json).
        overwrite: delete an existing run folder that holds checkpoints or a finished run instead of refusing it.
    Returns:
        dict with the metric names of the BRIEF (eval/ce, eval/ce_P|R|A, eval/acc_R|A, eval/exact_match,
        train/loss_ce, train/cos_k, train/cos_v, train/attn_kl, train/cos_k_layer, train/cos_v_layer,
        align/eff_rank_q|k|v, align/params, wall_s, steps).
    Example:
        >>> cfg = load_config(KVMapConfig, "configs/default.yaml", ["train.steps=20"])
        >>> run_training(cfg)["eval/ce"]
    """
    t0 = time.time()
    cfg = with_launch_fsdp(cfg)
    done_before = finished_metrics(cfg, resume, overwrite)
    if done_before is not None:
        return done_before
    run = setup_run(cfg, resume, overwrite)
    show = run.accelerator.is_main_process and cfg.train.progress
    bar = tqdm(total=cfg.train.steps, initial=run.start_step, disable=not show, desc="train")
    run.model.train()
    for step in range(run.start_step, cfg.train.steps):
        logs = train_step(run, step)
        record(run, step + 1, logs)
        bar.update(1)
        bar.set_postfix(loss=f"{logs['loss']:.4f}", ce=f"{logs['loss_ce']:.4f}")
        maybe_evaluate(run, step + 1)
        maybe_checkpoint(run, step + 1)
    bar.close()
    return finish(run, t0)


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
        try:
            metrics.update(run_training(cfg, resume=args.resume, overwrite=args.overwrite))
        except FloatingPointError as e:  # the NaN/inf stop: the run diverged, a failure rather than bad input
            raise CommandFailed(str(e)) from e

    try:
        rc = run_command("train", body)
    except KeyboardInterrupt:
        print("train: interrupted; --resume continues from the newest checkpoint in run_dir", file=sys.stderr)
        return 130
    if rc:
        return rc
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
