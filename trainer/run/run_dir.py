"""The run folder: writable before any expensive work (store checks, model load, steps), and what it already
holds decides whether a run starts, resumes (same config, same samples per step) or is refused.

Without the write check a read-only `run_dir` surfaces as a traceback from whichever write comes first
(config.yaml, a tracker's log folder, the first checkpoint minutes later).

Example:
    check_run_dir_writable(cfg.run_dir)  # creates it; raises one line naming the folder if it cannot write
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from pipeline.config.configlib import ConfigError, load_config, to_dict
from pipeline.config.kvmap import KVMapConfig
from trainer.run.checkpoint import latest_checkpoint, read_trainer_state
from trainer.run.setup import check_resume_config


def check_run_dir_writable(run_dir: str | Path) -> Path:
    """Create `run_dir` (and its parents) and write + delete a probe file in it (every rank may call this:
    the probe names are unique).

    Returns the folder; raises PermissionError with ONE line naming the folder, the reason and the fix.
    """
    p = Path(run_dir).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".kvmap_write_probe_"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise PermissionError(
            f"run_dir='{p}' is not a writable folder ({reason}): choose another run_dir or fix its permissions"
        ) from None
    return p


def finished_metrics(cfg: KVMapConfig, resume: bool, overwrite: bool) -> dict | None:
    """metrics.json of an already finished run of this config when `--resume` is asked (nothing to do).

    A finished run keeps no checkpoint unless `train.save_final_state`; without `--resume` or `--overwrite`
    its folder is refused like one holding checkpoints.
    """
    run_dir = Path(cfg.run_dir)
    done = run_dir / "metrics.json"
    if overwrite or not done.is_file() or latest_checkpoint(run_dir) is not None:
        return None
    if not resume:
        raise ConfigError(
            f"run_dir='{run_dir}' holds a finished run (metrics.json): pass --resume to read it, --overwrite to "
            "retrain, or choose another run_dir"
        )
    saved = load_config(KVMapConfig, run_dir / "config.yaml")
    check_resume_config(to_dict(saved), to_dict(cfg))
    return json.loads(done.read_text())


def check_resume_batch(cfg: KVMapConfig, saved_cfg: dict, world: int, now_world: int, ckpt_name: str) -> None:
    """Elastic resume: another process count is fine when every step still consumes the same number of
    samples (batch_size x grad_accum x processes), because the global sample stream is a function of the
    stream position alone; the resumed run then reads exactly the samples the first one had not."""
    saved_train = saved_cfg.get("train", {})
    before = saved_train.get("batch_size", 0) * saved_train.get("grad_accum", 0) * world
    now = cfg.train.batch_size * cfg.train.grad_accum * now_world
    if before != now:
        raise ConfigError(
            f"--resume: checkpoint {ckpt_name} consumed {before} samples per step (train.batch_size x "
            f"train.grad_accum x {world} process(es)), this launch {now} ({now_world} process(es)): keep the product "
            "equal so the sample stream continues where it stopped"
        )
    if world != now_world and cfg.train.shuffle == "shards":
        raise ConfigError(
            f"--resume: checkpoint {ckpt_name} was written by {world} processes, this launch has {now_world}: "
            "train.shuffle=shards deals shards to the run's readers, so resume it with the same process count"
        )


def prepare_run_dir(cfg: KVMapConfig, resume: bool, overwrite: bool, accelerator) -> Path | None:
    """The checkpoint to resume from (or None); refuses to silently restart over an existing run, or to
    resume one with a different training config."""
    run_dir = Path(cfg.run_dir)
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        saved = read_trainer_state(ckpt)
        saved_cfg = saved.get("config", to_dict(cfg))
        check_resume_config(saved_cfg, to_dict(cfg))
        world = saved.get("num_processes", accelerator.num_processes)
        check_resume_batch(cfg, saved_cfg, world, accelerator.num_processes, ckpt.name)
    ckpt_root = run_dir / "checkpoints"
    existing = (ckpt_root.is_dir() and any(ckpt_root.iterdir())) or (run_dir / "metrics.json").is_file()
    if not resume and existing:
        if not overwrite:
            raise ConfigError(
                f"run_dir='{run_dir}' already holds checkpoints: pass --resume to continue it or --overwrite to restart"
            )
        accelerator.wait_for_everyone()  # every rank has looked before the main one deletes
        if accelerator.is_main_process:
            shutil.rmtree(run_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        check_run_dir_writable(run_dir)
    return ckpt


def remove_if_empty(folder: Path) -> None:
    """Delete `folder` when no file lives anywhere under it (only empty folders)."""
    if folder.is_dir() and not any(p.is_file() for p in folder.rglob("*")):
        shutil.rmtree(folder, ignore_errors=True)
