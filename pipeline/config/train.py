"""Config sections owned by stage 2 (the whole schema: pipeline/config/kvmap.py, its one home both stages read).

Every key is documented here next to its default; `trainer/train.py` validates the combinations that a
dataclass cannot (e.g. segment names) before any step runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from pipeline.config.configlib import ConfigError
from pipeline.store.location import check_storage_options

SEGMENTS = {"P": 0, "R": 1, "A": 2}  # segment ids; -1 is padding (never stored)


def _at_least(section: str, obj, bounds: dict[str, int]) -> None:
    for key, lo in bounds.items():
        v = getattr(obj, key)
        if v < lo:
            raise ConfigError(f"config key '{section}.{key}': got {v!r}, expected an int >= {lo}")


def segment_ids_of(names: list[str], key: str) -> list[int]:
    """Segment names -> sorted unique ids, with a one-line error naming the config key on a bad name."""
    bad = [n for n in names if n not in SEGMENTS]
    if bad or not names:
        raise ConfigError(
            f"config key '{key}': got {names!r}, expected a non-empty list of segment names from {sorted(SEGMENTS)}"
        )
    return sorted({SEGMENTS[n] for n in names})


# The smallest value of each integer key of `train` (the first key below its bound is the one reported).
# The trackers accelerate integrates (accelerate.tracking.LOGGER_TYPE_TO_CLASS), by `log_with` name.
TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
TRAIN_INT_MINIMUMS = dict(
    steps=1,
    batch_size=1,
    grad_accum=1,
    warmup_steps=0,
    lambda_warmup_steps=0,
    ckpt_every=0,
    keep_checkpoints=1,
    log_every=1,
    num_workers=0,
    prefetch_factor=1,
    grad_probe_every=0,
    shuffle_window=1,
)


@dataclass
class TrainConfig:
    """The stage-2 student loop (AdamW, warmup + cosine LR, lambda_kv schedule, checkpoints)."""

    store: str | None = None  # the teacher-state store to train from (folder or URL); None = `extract.store`
    # fsspec options for a URL `store` (None = extract.storage_options when `store` is None); no
    # credentials here: they come from the environment (pipeline/store/location.py)
    storage_options: dict[str, Any] | None = None
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # samples per process per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # the student's peak learning rate (AdamW)
    aligner_lr: float | None = None  # None = same as lr
    weight_decay: float = 0.01  # on the student's matrices only (not norms/biases, not the aligner)
    warmup_steps: int = 20  # linear LR warm-up from 0, then cosine down to lr * min_lr_ratio at `steps`
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    clip_grad: float = 1.0  # max global grad norm over student + aligner (0 = no clipping)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"  # passed to accelerate (fp16 needs a GPU)
    # Recompute each student decoder layer's activations in backward instead of keeping them (HF gradient
    # checkpointing, non-reentrant): less activation memory for a slower step; same losses and gradients.
    gradient_checkpointing: bool = False
    # Shard the student's parameters, gradients and AdamW state across the launch's processes (FSDP2,
    # trainer/run/sharding.py) instead of a full copy per process (DDP); the aligner stays replicated.
    fsdp: bool = False
    # How lambda_kv (the top-level weight of loss_struct) changes over the run:
    # "constant"; "linear" = linear decay to 0 at `steps`; "cosine" = cosine decay to 0 at `steps`.
    # `lambda_warmup_steps` > 0 first ramps lambda linearly from 0 up to lambda_kv (decay starts after it).
    # "step" = lambda_kv for the first `lambda_until` steps, then exactly 0 (the structural forward is skipped).
    lambda_schedule: Literal["constant", "linear", "cosine", "step"] = "constant"
    lambda_warmup_steps: int = 0  # steps of the linear ramp of lambda_kv from 0
    lambda_until: int | None = None  # lambda_schedule "step": first step without the structural term
    # lambda_kv "auto": lambda = L_ref / L_struct each step (detached; L_ref = KD loss if on, else CE), clipped.
    lambda_auto_range: list[float] = field(default_factory=lambda: [0.01, 100.0])
    ckpt_every: int = 100  # accelerate.save_state every N steps (and always at the end; 0 = end only)
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (>= 1)
    log_every: int = 10  # steps between metrics.jsonl rows (the first and last steps are always logged)
    # DataLoader worker processes per rank (0 = read in the main process). Two, because decoding the
    # store's compressed inner chunks costs ~40 ms per sample and layer set on one core (benchmarks/bench_train.py).
    num_workers: int = 2
    prefetch_factor: int = 4  # batches each worker reads ahead
    # Read the train split's teacher states (selected layers/components only) into RAM once at start
    # (trainer/data/preload.py): bulk decode in seconds instead of ~40 ms of zarr reads per sample per epoch.
    # Needs the split's raw size in RAM per process (default store: ~1.1 GB; each accelerate rank holds its
    # own copy); the run logs it. Off for stores that do not fit.
    preload: bool = False
    # Sample order. "global": a fresh permutation of the whole split per epoch. "shards": shuffle the store's
    # shards (write chunks of extract.chunk_tokens tokens), then the samples inside each window of
    # `shuffle_window` consecutive shards, each epoch's shards dealt to the readers (ranks x loader workers;
    # trainer/data/sample_order.py), and read whole shards through a small cache (pipeline/store/shard_cache.py): one
    # request per shard and array instead of ~2 per sample, for stores on object storage
    # (docs/guides/scale-out.md). Each loader worker keeps shuffle_window + 1 shards of the read arrays in RAM.
    shuffle: Literal["global", "shards"] = "global"
    shuffle_window: int = 4  # shuffle: shards, the shards whose samples are mixed together
    ce_segments: list[str] = field(default_factory=lambda: ["P", "R", "A"])  # target-token segments for CE
    # Target-token segments for logit KD; null = ce_segments. E.g. CE on [A] with KD on [R, A]: the teacher's
    # distribution on the reasoning, gold tokens only on the answer (removes the CE/KD conflict on greedy
    # teacher text while keeping the answer's likelihood).
    kd_segments: list[str] | None = None
    struct_segments: list[str] = field(default_factory=lambda: ["P", "R", "A"])  # tokens in loss_struct
    progress: bool = True  # tqdm progress bar on the main process
    # Keep a final checkpoint (optimizer state + RNG: ~3x the student's size) in run_dir/checkpoints, so the
    # run can be continued with more steps. Off: a finished run keeps the student and metrics only, and the
    # periodic checkpoints are deleted once student/ and metrics.json are written.
    save_final_state: bool = False
    # Every N steps, log each weighted term's gradient norm on the student and the cosines between terms
    # (trainer/objective/grad_probe.py: is a structural term too weak, or pulling elsewhere?). 0 = off.
    grad_probe_every: int = 0
    # Experiment trackers, through accelerate's `log_with` (tensorboard, wandb, mlflow, trackio, comet_ml,
    # aim, clearml, dvclive, swanlab), given the resolved config; the console and metrics.jsonl always stay.
    # "auto": tensorboard when it is installed; []: none. Trackers that write files write under run_dir.
    report_to: list[str] | Literal["auto"] = "auto"
    tracker_project: str | None = (
        None  # the tracker's project / experiment name (null: the run folder's name)
    )

    def __post_init__(self):
        _at_least("train", self, TRAIN_INT_MINIMUMS)
        if self.report_to != "auto":
            bad = [x for x in self.report_to if x not in TRACKERS]
            if bad:
                raise ConfigError(
                    f"config key 'train.report_to': got {bad!r}, expected names from {list(TRACKERS)} or 'auto'"
                )
        for key in ("lr", "aligner_lr"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"config key 'train.{key}': got {v!r}, expected a finite value > 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(
                f"config key 'train.min_lr_ratio': got {self.min_lr_ratio!r}, expected a value in [0, 1]"
            )
        if self.clip_grad < 0:
            raise ConfigError(
                f"config key 'train.clip_grad': got {self.clip_grad!r}, expected >= 0 (0 = off)"
            )
        r = self.lambda_auto_range
        if len(r) != 2 or not (0 <= r[0] <= r[1] and math.isfinite(r[1])):
            raise ConfigError(
                f"config key 'train.lambda_auto_range': got {r!r}, expected [lo, hi] with 0 <= lo <= hi"
            )
        if self.lambda_schedule == "step" and (self.lambda_until is None or self.lambda_until < 0):
            raise ConfigError(
                f"config key 'train.lambda_until': got {self.lambda_until!r}, expected an int >= 0 with "
                "lambda_schedule 'step'"
            )
        if self.fsdp and self.grad_probe_every:
            raise ConfigError(
                f"config key 'train.grad_probe_every': got {self.grad_probe_every!r} with train.fsdp, expected 0 "
                "(the probe takes per-term gradients of whole parameters, which FSDP shards)"
            )
        segment_ids_of(self.ce_segments, "train.ce_segments")
        segment_ids_of(self.struct_segments, "train.struct_segments")
        if self.kd_segments is not None:
            segment_ids_of(self.kd_segments, "train.kd_segments")
        check_storage_options(self.storage_options, "train.storage_options")


@dataclass
class EvalConfig:
    """Held-out evaluation on the store's eval split (CE per segment, answer-token accuracy, greedy EM)."""

    every: int = 100  # steps between evaluations (0 = only at the end); the end always evaluates
    batch_size: int = 16  # held-out samples per forward
    max_samples: int | None = None  # cap on eval samples for CE / accuracy (None = the whole split)
    greedy_samples: int = 64  # held-out samples decoded greedily for answer exact-match (0 = skip)
    max_new_tokens: int = 32  # greedy decoding budget for exact match

    def __post_init__(self):
        _at_least("eval", self, dict(every=0, batch_size=1, greedy_samples=0, max_new_tokens=1))
        if self.max_samples is not None and self.max_samples < 1:
            raise ConfigError(
                f"config key 'eval.max_samples': got {self.max_samples!r}, expected null or >= 1"
            )
