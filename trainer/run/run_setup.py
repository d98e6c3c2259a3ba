"""Everything a stage-2 run needs before its first step, as one `Run` (trainer/train.py owns the loop).

Shapes: none (wiring). Order, so that every bad input stops the run before any step and before the run
folder is touched: the accelerator, the run folder (writable? resumable? already finished?), the store,
the student, tokenizer agreement, the aligner and KD term, the dataset; then the optimizer and schedule,
the checkpoint to resume from, the run metadata and the resumable sample stream.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.utils import ProjectConfiguration, set_seed

from alignment import create_structural_loss
from pipeline.config.configlib import write_run_metadata
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.trained_tokens import check_trained_tokens, segment_token_counts
from pipeline.models.load import load_model, pad_token_id
from trainer.data.cross_tokens import collate_cross
from trainer.data.loader import ResumableSampler, StoreDataset, collate_right_pad, make_loader
from trainer.data.preload import preload_bytes
from trainer.objective.schedules import lr_schedule
from trainer.objective.step import DistillModel
from trainer.run.checkpoint import MetricsLog, read_trainer_state
from trainer.run.cross_setup import build_cross_kd, check_cross, cross_dataset, is_cross_tokenizer
from trainer.run.loop_utils import flat_config, notice, trackers
from trainer.run.run_dir import prepare_run_dir, remove_if_empty
from trainer.run.setup import (
    build_aligner,
    build_kd,
    kd_segment_ids,
    needed_components,
    param_groups,
    segment_ids,
    store_path_of,
)
from trainer.run.sharding import check_fsdp, is_sharded, load_sharded_state, shard_model
from trainer.run.store_checks import check_heads, check_layers, check_tokenizer, open_store
from trainer.run.student_wrap import is_lora, trainable_parameters, wrap_student


@dataclass
class Run:
    """The live pieces of one training run (built by `setup_run`, advanced by trainer/train.py)."""

    cfg: KVMapConfig
    accelerator: Any
    store: Any  # pipeline.store.reader.KVStore
    tokenizer: Any
    model: Any  # DistillModel wrapped by accelerate
    base: DistillModel  # the unwrapped model (student + aligner)
    optimizer: Any
    scheduler: Any
    batches: Any  # iterator over the resumable sample stream
    log: MetricsLog
    ce_ids: list[int]
    struct_ids: list[int]
    loss_fn: Any = None  # StructuralKVLoss, or None when lambda_kv == 0
    kd: Any = None  # trainer.objective.step.KDTerm, or None without logit KD
    kd_ids: list[int] | None = None  # KD's segments when they differ from CE's (train.kd_segments)
    eval_split: str | None = None
    pad_id: int = 0
    start_step: int = 0
    recent: list[dict] = field(default_factory=list)  # the last `log_every` steps' logs (final train/*)
    cross_tokenizer: bool = (
        False  # the student's tokenizer differs from the store's (trainer/run/cross_setup.py)
    )

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def tracker_init_kwargs(cfg: KVMapConfig, names: list[str]) -> dict:
    """Per-tracker init options: W&B writes its run files (offline runs too) under the run folder. MLflow
    logs where MLFLOW_TRACKING_URI points (its own default otherwise); TensorBoard writes run_dir/tb."""
    return {"wandb": {"dir": str(Path(cfg.run_dir).resolve())}} if "wandb" in names else {}


def make_accelerator(cfg: KVMapConfig) -> Accelerator:
    """The run's Accelerator: device, mixed precision, DDP, trackers, the run folder as project folder."""
    run_dir = Path(cfg.run_dir)
    return Accelerator(
        # Without a GPU, cpu=True is what makes a multi-process launch use gloo (DistributedType.MULTI_CPU);
        # otherwise accelerate sees LOCAL_RANK without CUDA and silently runs every rank as world size 1.
        cpu=not torch.cuda.is_available(),
        mixed_precision=cfg.train.mixed_precision,
        step_scheduler_with_optimizer=False,  # the LR schedule counts optimizer steps, not per-rank batches
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        log_with=trackers(cfg.train.report_to) or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "tb")),
    )


def preflight(cfg: KVMapConfig, accelerator) -> dict:
    """Store, student, tokenizer, aligner, KD term, loss, dataset: every check before any step."""
    store = open_store(store_path_of(cfg))
    fmt = store.attrs.get("dataset", {}).get("train", {}).get("format")
    segments = segment_token_counts(store.token_array("segment_ids")[:])  # (N,) int8: one small read
    check_trained_tokens(cfg, segments, fmt, f"train.store='{store.path}'")
    set_seed(cfg.seed)  # the student's random init and the aligner's init come from this seed
    student, tokenizer = load_model(cfg.student, for_training=True)
    vocab = int(student.get_input_embeddings().weight.shape[0])
    cross = is_cross_tokenizer(store, tokenizer)
    check_cross(cfg, store, tokenizer, cross)
    if not cross:
        check_tokenizer(store, tokenizer, vocab)
    student = wrap_student(student, cfg)  # checkpointing / LoRA before the aligner, optimizer and prepare
    if is_lora(student):
        notice(
            accelerator, "student.lora: {:,} of {:,} parameters train".format(*trainable_parameters(student))
        )
    aligner = build_aligner(cfg, store, student)
    kd = build_cross_kd(cfg, store, tokenizer) if cross else build_kd(cfg, store, vocab)
    if aligner is not None and aligner.head_selection is not None:
        notice(accelerator, aligner.head_selection.describe())
    layers, comps, loss_fn, heads = [], (), None, None
    if aligner is not None:
        layers, comps, heads = list(aligner.teacher_layers), needed_components(cfg), aligner.teacher_heads
        # a selected-head arm reads only the layers holding its heads, and only those heads
        read = layers if heads is None else [t for t, hs in zip(layers, heads["q"]) if max(hs) >= 0]
        check_heads(store, layers, comps, heads)  # first: a missing head is named, not just its layer
        check_layers(store, read, comps)
        loss_fn = create_structural_loss(**dataclasses.asdict(cfg.loss_config))
    if kd is not None:
        comps = (*comps, "logits")
    train_ds = open_train_split(cfg, store, layers, comps, accelerator, tokenizer if cross else None, heads)
    pad_id = pad_token_id(tokenizer)
    return dict(
        store=store,
        student=student,
        tokenizer=tokenizer,
        aligner=aligner,
        kd=kd,
        loss_fn=loss_fn,
        train_ds=train_ds,
        pad_id=pad_id,
        cross_tokenizer=cross,
    )


# Reading a URL store in the global order costs a request per sample and array; the shard order does not.
URL_ORDER_NOTE = (
    "note: train.store is a URL read in the global order (~2 requests per sample and array); "
    "train.shuffle=shards reads whole shards instead (README 'Stores at scale')"
)


def open_train_split(
    cfg: KVMapConfig, store, layers: list[int], comps, accelerator, cross_tokenizer=None, heads=None
) -> StoreDataset:
    """`train_dataset`, telling the user what its read order or preload costs; with `cross_tokenizer` (the
    student's tokenizer, when it differs from the store's) the split re-tokenised for the student;
    `heads`: a selected-head arm's heads (`aligner.teacher_heads`)."""
    t_load = time.perf_counter()
    train_ds = train_dataset(cfg, store, layers, comps, cfg.train.preload, cross_tokenizer, heads)
    if train_ds.shard_cache:
        notice(accelerator, shard_order_line(cfg, store, layers, comps))
    elif store.location.remote and not cfg.train.preload:
        notice(accelerator, URL_ORDER_NOTE)
    if cfg.train.preload:
        held = [t for t in layers if t in store.layers] or store.layers  # a selected-head arm: its layers
        gb = preload_bytes(store, "train", held, comps) / 2**30
        notice(
            accelerator, f"preloaded the train split: {gb:.2f} GiB in {time.perf_counter() - t_load:.1f} s"
        )
    return train_ds


def train_dataset(
    cfg: KVMapConfig, store, layers: list[int], comps, preload: bool, cross_tokenizer=None, heads=None
) -> StoreDataset:
    """The train split as the trainer reads it; `train.shuffle: shards` reads whole shards through a cache of
    shuffle_window + 1 shards per array (preload reads the split whole anyway). `cross_tokenizer`: the
    student's tokenizer, for a `CrossTokenDataset` (trainer/data/cross_tokens.py); `heads`: a selected-head
    arm's heads (`aligner.teacher_heads`)."""
    shards = cfg.train.shuffle == "shards" and not preload
    cache = cfg.train.shuffle_window + 1 if shards else 0
    kw = dict(layers=layers, components=comps, preload=preload, shard_cache=cache, heads=heads)
    if cross_tokenizer is not None:
        return cross_dataset(cfg, store, "train", cross_tokenizer, **kw)
    return StoreDataset(store.path, "train", **kw)


def train_sampler(
    cfg: KVMapConfig,
    ds: StoreDataset,
    total: int,
    start: int = 0,
    processes: int = 1,
    batch: int | None = None,
) -> ResumableSampler:
    """The run's sample stream: global permutations, or shard windows dealt to the run's readers (`processes`
    ranks x `train.num_workers` loader workers reading micro-batches of `batch`, default train.batch_size;
    `train.shuffle: shards`, trainer/data/sample_order.py)."""
    groups = ds.shards() if cfg.train.shuffle == "shards" else None
    readers = processes * max(cfg.train.num_workers, 1)
    return ResumableSampler(
        len(ds),
        cfg.seed,
        total,
        start,
        groups=groups,
        window=cfg.train.shuffle_window,
        readers=readers,
        batch=batch or cfg.train.batch_size,
    )


def shard_order_line(cfg: KVMapConfig, store, layers: list[int], comps) -> str:
    """What `train.shuffle: shards` costs: shards per window and each loader process's cache in RAM."""
    n_shards = -(-store.num_tokens("train") // store.chunk_tokens)
    per_shard = preload_bytes(store, "train", layers or store.layers, comps) / max(n_shards, 1)
    gib = per_shard * (cfg.train.shuffle_window + 1) / 2**30
    return (
        f"train.shuffle=shards: {n_shards} shards of {store.chunk_tokens} tokens, {cfg.train.shuffle_window} "
        f"per window; each loader process caches up to {gib:.2f} GiB of decompressed shards"
    )


def optimizer_and_schedule(cfg: KVMapConfig, student, aligner):
    """AdamW (betas 0.9/0.95; decay on the student's matrices only) and warmup + cosine LR."""
    optimizer = torch.optim.AdamW(param_groups(student, aligner, cfg), betas=(0.9, 0.95))
    t = cfg.train
    return optimizer, lr_schedule(optimizer, t.warmup_steps, t.steps, t.min_lr_ratio)


def restore(run: Run, ckpt: Path | None, resume: bool) -> None:
    """Load the checkpoint (model, optimizer, schedule, RNG) and the step counters; or start clean."""
    acc = run.accelerator
    if ckpt is not None:
        acc.load_state(str(ckpt))
        if is_sharded(run.model):
            load_sharded_state(run.model, run.optimizer, ckpt)
        saved = read_trainer_state(ckpt)
        run.start_step = int(saved["step"])
        run.recent = saved.get("recent", [])  # the final train/* window continues exactly
        run.log.truncate_after(run.start_step)
        notice(acc, f"resuming from {ckpt} at step {run.start_step}")
    elif resume:
        notice(acc, f"--resume: no checkpoint in {run.run_dir}/checkpoints; starting fresh")
    if acc.is_main_process:
        if ckpt is None:
            run.log.path.unlink(missing_ok=True)
        extra = {
            "store": str(run.store.path),
            "store_fingerprint": run.store.fingerprint,
            "resumed_from_step": run.start_step,
            "num_processes": acc.num_processes,
        }
        write_run_metadata(run.run_dir, run.cfg, run.cfg.seed, extra)


def sample_stream(run: Run, train_ds: StoreDataset):
    """The run's whole seeded sample stream, restarted at the first sample not yet consumed."""
    cfg, acc = run.cfg, run.accelerator
    global_batch = cfg.train.batch_size * cfg.train.grad_accum * acc.num_processes
    total, start = cfg.train.steps * global_batch, run.start_step * global_batch
    sampler = train_sampler(cfg, train_ds, total, start, processes=acc.num_processes)
    # Pinned host batches on CUDA: the teacher states are most of a batch's bytes, and a pageable copy of
    # them cost 214-254 ms vs 38 ms pinned per 4 x 1024-token batch of 7B states on an H100
    # (benchmarks/bench_gpu.py, section 2) -- more than the CE-only step itself.
    loader = make_loader(
        train_ds,
        cfg.train.batch_size,
        run.pad_id,
        sampler,
        cfg.train.num_workers,
        cfg.train.prefetch_factor,
        pin_memory=acc.device.type == "cuda",
        collate=collate_cross if run.cross_tokenizer else collate_right_pad,
    )
    return iter(acc.prepare_data_loader(loader, device_placement=True))


def prepare_model(cfg: KVMapConfig, accelerator, parts: dict):
    """The DistillModel, AdamW and the LR schedule, through accelerate (DDP); with `train.fsdp` the model is
    sharded first (trainer/run/sharding.py) and only the schedule goes through accelerate: its DDP wrapper
    and main-process optimizer checkpoint would be wrong for sharded parameters."""
    model = DistillModel(parts["student"], parts["aligner"])
    if not cfg.train.fsdp:
        optimizer, scheduler = optimizer_and_schedule(cfg, parts["student"], parts["aligner"])
        return accelerator.prepare(model, optimizer, scheduler)
    model = shard_model(model, accelerator, accelerator.mixed_precision)  # what autocast uses too
    optimizer, scheduler = optimizer_and_schedule(cfg, model.student, model.aligner)
    return model, optimizer, accelerator.prepare(scheduler)


def setup_run(cfg: KVMapConfig, resume: bool, overwrite: bool) -> Run:
    """Build the run of `cfg`: checks, model, optimizer, resume state, metadata and the sample stream."""
    ce_ids, struct_ids = segment_ids(cfg)
    accelerator = make_accelerator(cfg)
    check_fsdp(cfg, accelerator.num_processes)
    new_folder = not Path(cfg.run_dir).exists()
    ckpt = prepare_run_dir(cfg, resume, overwrite, accelerator)
    try:
        parts = preflight(cfg, accelerator)
    except BaseException:
        if new_folder and accelerator.is_main_process:
            remove_if_empty(Path(cfg.run_dir))  # a failed start leaves no empty run folder behind
        raise
    model, optimizer, scheduler = prepare_model(cfg, accelerator, parts)
    store = parts["store"]
    run = Run(
        cfg=cfg,
        accelerator=accelerator,
        store=store,
        tokenizer=parts["tokenizer"],
        model=model,
        base=accelerator.unwrap_model(model),
        optimizer=optimizer,
        scheduler=scheduler,
        batches=None,
        log=MetricsLog(Path(cfg.run_dir) / "metrics.jsonl", enabled=accelerator.is_main_process),
        ce_ids=ce_ids,
        struct_ids=struct_ids,
        loss_fn=parts["loss_fn"],
        kd=parts["kd"],
        kd_ids=kd_segment_ids(cfg),
        eval_split="eval" if "eval" in store.splits else None,
        pad_id=parts["pad_id"],
        cross_tokenizer=parts["cross_tokenizer"],
    )
    restore(run, ckpt, resume)
    if accelerator.log_with:  # train.report_to, through accelerate's trackers, with the resolved config
        project = cfg.train.tracker_project or Path(cfg.run_dir).name
        accelerator.init_trackers(
            project,
            config=flat_config(cfg),
            init_kwargs=tracker_init_kwargs(cfg, trackers(cfg.train.report_to)),
        )
    run.batches = sample_stream(run, parts["train_ds"])
    return run
