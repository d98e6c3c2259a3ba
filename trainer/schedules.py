"""Step -> multiplier schedules: the learning rate (warmup + cosine) and lambda_kv (issue 5 weighting).

Shapes: none (scalars). `step` counts optimizer steps from 0; the value at step s is the one used by the
update that produces step s+1, so a run of `total` steps sees s = 0 .. total-1.
"""

from __future__ import annotations

import math

LAMBDA_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR factor for `torch.optim.lr_scheduler.LambdaLR`: linear warm-up, then cosine to `min_ratio`.

    Args:
        step: optimizer step (0-based).
        warmup_steps: steps of linear warm-up; step 0 gets 1/(warmup_steps+1) rather than 0 so that no
            step is wasted with a zero learning rate.
        total_steps: the step at which the cosine reaches `min_ratio`.
        min_ratio: final LR as a fraction of the peak, in [0, 1].
    Example:
        >>> lr_multiplier(0, 0, 100, 0.1), round(lr_multiplier(100, 0, 100, 0.1), 6)
        (1.0, 0.1)
    """
    if warmup_steps < 0:
        raise ValueError(f"train.warmup_steps={warmup_steps!r}: expected an int >= 0")
    if total_steps < 1:
        raise ValueError(f"train.steps={total_steps!r}: expected an int >= 1")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"train.min_lr_ratio={min_ratio!r}: expected a value in [0, 1]")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lambda_kv_at(step: int, base: float, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """The structural-loss weight lambda_kv used at optimizer step `step`.

    Args:
        step: optimizer step (0-based).
        base: the configured `lambda_kv` (peak value); 0 disables the structural loss entirely.
        schedule: "constant" | "linear" (linear decay to 0 at `total_steps`) | "cosine" (cosine decay to 0).
        warmup_steps: linear ramp from 0 to `base` over these steps before the schedule applies; the decay
            then spans the remaining `total_steps - warmup_steps` steps.
        total_steps: the run's number of optimizer steps.
    Example:
        >>> [round(lambda_kv_at(s, 1.0, "linear", 0, 4), 2) for s in range(4)]
        [1.0, 0.75, 0.5, 0.25]
    """
    if schedule not in LAMBDA_SCHEDULES:
        raise ValueError(f"train.lambda_schedule={schedule!r}: expected one of {list(LAMBDA_SCHEDULES)}")
    if base < 0 or not math.isfinite(base):
        raise ValueError(f"lambda_kv={base!r}: expected a finite value >= 0")
    if warmup_steps < 0:
        raise ValueError(f"train.lambda_warmup_steps={warmup_steps!r}: expected an int >= 0")
    if step < warmup_steps:
        return base * (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return base
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))
