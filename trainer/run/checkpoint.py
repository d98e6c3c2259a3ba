"""Run-folder bookkeeping: atomic checkpoints, resume lookup, metrics JSONL, the saved student folder.

Shapes: none (files).

Layout of `cfg.run_dir`:
    config.yaml, meta.json         resolved config, git SHA, seed, store fingerprint (write_run_metadata)
    metrics.jsonl                  one JSON object per logged train step / evaluation
    metrics.json                   final metrics
    checkpoints/step_000100/       accelerate.save_state + trainer_state.json (written last)
    student/                       HF model folder + aligner.safetensors + aligner.json (student.lora:
                                   the peft adapter, and merged/ the merged HF model folder)

Why atomic: a checkpoint is written into `step_N.tmp` and renamed only after `trainer_state.json` is in
it, so a run killed while saving never leaves a checkpoint that resume would take for complete.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

CKPT_RE = re.compile(r"^step_(\d+)$")
STATE_FILE = "trainer_state.json"
ALIGNER_WEIGHTS = "aligner.safetensors"
ALIGNER_META = "aligner.json"
MERGED = "merged"  # student/merged/: a LoRA run's merged model, a plain HF folder


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    """The folder of the checkpoint at `step` (whether or not it exists)."""
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints (folders step_N holding trainer_state.json), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(
    accelerator, run_dir: str | Path, step: int, state: dict[str, Any], keep: int, save_more=None
) -> Path:
    """`accelerator.save_state` into a temp folder, add trainer_state.json, rename; keep the newest `keep`.

    All ranks must call this (save_state synchronises); only the main process renames and prunes.
    `save_more(folder)`, when given, writes what accelerate does not hold (train.fsdp: the sharded model and
    optimizer) into the temp folder on every rank, before trainer_state.json marks it complete.

    Why the rotation is not accelerate's `ProjectConfiguration(total_limit=...)`: accelerate applies
    `total_limit` only with `automatic_checkpoint_naming`, which names folders `checkpoint_<save count>`
    (not the step: the run-folder layout and resume read `step_NNNNNN`), deletes the oldest folders
    *before* writing the new one, and writes it in place. A kill during that save would leave one complete
    checkpoint fewer than `keep` plus a half-written folder that resume must not take; here the new
    checkpoint is complete (renamed from `.tmp`) before any old one is deleted.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if save_more is not None:
        save_more(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        ckpts = complete_checkpoints(run_dir)
        for old in ckpts[: max(0, len(ckpts) - max(1, keep))]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """trainer_state.json of a checkpoint: the step, seed, config, final-metrics window, process count."""
    return json.loads((ckpt / STATE_FILE).read_text())


class MetricsLog:
    """Append-only metrics.jsonl writer (main process only); floats that are NaN/inf are written as null.

    On resume, `truncate_after(step)` drops rows logged after the checkpoint the run resumes from, so the
    file reads as one uninterrupted run.
    """

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop the rows logged after `step` (and lines cut by a kill)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill mid-write
                continue
            if int(row.get("step", 0)) <= step:
                keep.append(line)
        self.path.write_text("".join(line + "\n" for line in keep))

    def write(self, row: dict[str, Any]) -> None:
        """Append one row, flushed (a reader or a resume sees it at once)."""
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(jsonable(row)) + "\n")
            f.flush()


def jsonable(x: Any) -> Any:
    """`x` with tensors as lists and NaN/inf floats as None (strict JSON has no NaN)."""
    if isinstance(x, dict):
        return {k: jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def save_student(
    model, tokenizer, aligner, aligner_meta: dict[str, Any], out_dir: str | Path, state_dict=None
) -> Path:
    """Save the student as a normal HF folder (`from_pretrained` loads it) plus the aligner's weights.

    The aligner goes to `aligner.safetensors` (its state_dict) and `aligner.json` (mode, align config,
    teacher geometry, teacher layers): enough to rebuild it with `alignment.create_aligner` and load.
    `state_dict`: the student's weights when `model` holds only shards of them (train.fsdp: gathered).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and getattr(model, "generation_config", None) is not None:
        # generation stops at the tokenizer's end of turn and pads with its pad token
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)  # with its chat template
    if aligner is not None:
        state = {k: v.detach().cpu().contiguous() for k, v in aligner.state_dict().items()}
        save_file(state, str(out / ALIGNER_WEIGHTS))
        (out / ALIGNER_META).write_text(json.dumps(jsonable(aligner_meta), indent=2, default=str))
    return out
