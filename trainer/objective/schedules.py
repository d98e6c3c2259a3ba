"""Step -> multiplier schedules: the learning rate (warmup + cosine) and the structural-loss weight lambda_kv.

Shapes: none (scalars). `step` counts optimizer steps from 0; the value at step s is the one used by the
update that produces step s+1, so a run of `total` steps sees s = 0 .. total-1.

The LR schedule the trainer steps is transformers' warmup + cosine (`lr_schedule`); `lr_multiplier` is its
closed form, the definition tests check it against at every step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_cosine_with_min_lr_schedule_with_warmup

LAMBDA_SCHEDULES = ("constant", "linear", "cosine", "step")


def lr_schedule(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float) -> LambdaLR:
    """The run's LR schedule: transformers' warmup + cosine to `min_ratio`, equal to `lr_multiplier` at every step.

    transformers' warm-up gives its step 0 a zero LR; ours gives the first update 1/(warmup_steps+1) so no
    update is wasted. The same curve shifted by one: a warm-up of warmup_steps+1 over total_steps+1 steps,
    started at its step 1 (`last_epoch=0`: torch's start-mid-schedule contract, which reads each group's
    `initial_lr`). The scheduler's state (accelerate.save_state) therefore counts optimizer steps + 1.

    Args:
        optimizer: the run's optimizer; each group's `lr` is its peak.
        warmup_steps, total_steps, min_ratio: as in `lr_multiplier`.
    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> lr_schedule(opt, 4, 20, 0.1).get_last_lr()
        [0.2]
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer,
        num_warmup_steps=warmup_steps + 1,
        num_training_steps=total_steps + 1,
        min_lr_rate=min_ratio,
        last_epoch=0,
    )


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The closed form of `lr_schedule`: linear warm-up, then cosine to `min_ratio` (LR = peak x this).

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


def lambda_kv_at(
    step: int, base: float, schedule: str, warmup_steps: int, total_steps: int, until: int | None = None
) -> float:
    """The structural-loss weight lambda_kv used at optimizer step `step`.

    Args:
        step: optimizer step (0-based).
        base: the configured `lambda_kv` (peak value); 0 disables the structural loss entirely.
        schedule: "constant" | "linear" (linear decay to 0 at `total_steps`) | "cosine" (cosine decay to 0) |
            "step" (`base` for steps < `until`, then exactly 0: the structural term as a stage, MOHAWK-style).
        warmup_steps: linear ramp from 0 to `base` over these steps before the schedule applies; the decay
            then spans the remaining `total_steps - warmup_steps` steps.
        total_steps: the run's number of optimizer steps.
        until: "step" only: the first step at which the term is off (`train.lambda_until`).
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
    if schedule == "step":
        if isinstance(until, bool) or not isinstance(until, int) or until < 0:
            raise ValueError(
                f"train.lambda_until={until!r}: expected an int >= 0 with lambda_schedule 'step'"
            )
        if step >= until:
            return 0.0
    if step < warmup_steps:
        return base * (step + 1) / (warmup_steps + 1)
    if schedule in ("constant", "step"):
        return base
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return base * (1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def auto_lambda(loss_ref: float, loss_struct: float, lo: float, hi: float) -> float:
    """`lambda_kv: auto` (Minitron's dynamic weight): loss_ref / loss_struct of this step, clipped to [lo, hi].

    loss_ref is the logit-KD loss when that term is on, else the CE loss; both are detached values, so the
    weight carries no gradient. With loss_struct <= 0 (nothing left to match) the ratio is +inf -> hi.
    Example:
        >>> auto_lambda(2.0, 0.5, 0.01, 100.0), auto_lambda(2.0, 0.0, 0.01, 3.0)
        (4.0, 3.0)
    """
    if not (0 <= lo <= hi and math.isfinite(hi)):
        raise ValueError(f"train.lambda_auto_range={[lo, hi]!r}: expected [lo, hi] with 0 <= lo <= hi < inf")
    if not math.isfinite(loss_ref) or not math.isfinite(loss_struct):
        return hi if math.isfinite(loss_ref) else lo  # the NaN check of the step reports the bad loss itself
    ratio = loss_ref / loss_struct if loss_struct > 0 else math.inf
    return min(hi, max(lo, ratio))
