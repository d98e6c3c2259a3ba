"""Loop helpers of trainer/train.py: cross-rank log reduction, the NaN/inf stop, final train metrics, trackers,
and the run's messages to the user (stderr: stdout carries a command's result).

Shapes: logs are dicts of floats and per-layer lists (L_s,); reductions run on flat float64 vectors.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import torch
from accelerate.tracking import get_available_trackers

from pipeline.config.configlib import to_dict

# step_s: seconds per optimiser step (forward + backward + update, no evaluation): the report's step cost
FINAL_TRAIN_KEYS = (
    "loss",
    "loss_ce",
    "loss_kd",
    "loss_struct",
    "cos_k",
    "cos_v",
    "cos_q",
    "attn_kl",
    "step_s",
)


def reduce_logs(accelerator, logs: list[dict]) -> dict:
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


def check_finite(accelerator, res, step: int) -> None:
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
                "with `python -m pipeline.analysis.inspect_store`, or run trainer/profile_alignment.py)"
            )


def notice(accelerator, text: str) -> None:
    """A message to the user, once per run (main process), on stderr: stdout is for a command's result."""
    if accelerator.is_main_process:
        print(text, file=sys.stderr, flush=True)


def trackers(report_to: list[str] | str = "auto") -> list[str]:
    """The accelerate trackers of `train.report_to`: "auto" = ["tensorboard"] when a TensorBoard writer is
    installed, else none; a named tracker that is not installed is a one-line error (accelerate would drop it
    silently)."""
    if report_to == "auto":
        has_tb = importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX")
        return ["tensorboard"] if has_tb else []
    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in report_to if name not in available]
    if missing:
        raise ValueError(
            f"train.report_to={list(report_to)!r}: {missing} not installed (pip install {' '.join(missing)}); "
            f"installed trackers: {sorted(available) or 'none'}"
        )
    return list(dict.fromkeys(report_to))


def final_train_metrics(recent: list[dict]) -> dict:
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


def flat_config(cfg) -> dict:
    """Scalar values of a config dataclass, dotted keys (TensorBoard hparams accept scalars only)."""
    out = {}

    def walk(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(f"{prefix}{k}.", v)
            elif isinstance(v, (int, float, str, bool)):
                out[prefix + k] = v

    walk("", to_dict(cfg))
    return out
