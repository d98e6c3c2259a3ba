"""Config sections owned by stage 2 (see pipeline/config.py for the whole schema)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class TrainConfig:
    steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    aligner_lr: float | None = None  # None = same as lr
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    clip_grad: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    ckpt_every: int = 100
    log_every: int = 10
    num_workers: int = 1
    prefetch_factor: int = 4
    ce_segments: list[str] = field(default_factory=lambda: ["P", "R", "A"])
    struct_segments: list[str] = field(default_factory=lambda: ["P", "R", "A"])


@dataclass
class EvalConfig:
    every: int = 100
    batch_size: int = 16
    max_samples: int | None = None
    greedy_samples: int = 64  # held-out samples decoded greedily for answer exact-match (0 = skip)
    max_new_tokens: int = 32
