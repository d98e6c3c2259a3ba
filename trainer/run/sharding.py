"""`train.fsdp`: the student sharded across the run's processes with FSDP2 (`torch.distributed.fsdp.fully_shard`).

Shapes: none (wiring). What is sharded and what is not:
- each student decoder layer (the classes in the student's `_no_split_modules`) is one FSDP unit, all-gathered
  for its forward and backward and resharded after; the rest of the student (embeddings, final norm, LM head)
  is the root unit, the `DistillModel`, gathered once per forward. Parameters, gradients and AdamW state of
  the student are 1 / world per process.
- the aligner stays replicated (`ignored_params`): it is small, and the trainer calls it outside the model's
  forward (`alignment_diagnostics`, the saved aligner), where a sharded module would hold only its shard.
  Its gradients are averaged across processes here (`sync_replicated_grads`), which DDP did before.

Why `fully_shard` directly and not accelerate's FSDP plugin: accelerate 1.16 enables its plugin only for
GPU-like distributed types (`AcceleratorState` drops `fsdp_plugin` for `MULTI_CPU`), so on a CPU launch
(gloo) the plugin is silently ignored and the student would train unsharded under DDP. The trainer therefore
shards the model itself, the same way on CPU and on GPU (one code path, the one the tests run), and keeps
accelerate for the rest (device, process group, mixed precision, the LR schedule, RNG state, the loader).
Its FSDP2 helpers are torch's: a full state dict for the saved student (`get_model_state_dict`, what
`accelerator.get_state_dict` calls under FSDP2) and distributed checkpoints (`torch.distributed.checkpoint`)
for model + optimizer, which also reshard on resume.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from accelerate.utils import parse_flag_from_env
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from pipeline.config.configlib import ConfigError

FSDP_STATE = "fsdp"  # checkpoints/step_N/fsdp/: the distributed checkpoint of model + optimizer


def is_sharded(model) -> bool:
    """Whether `model` was sharded by `shard_model`."""
    return isinstance(model, FSDPModule)


def with_launch_fsdp(cfg):
    """`cfg` with `train.fsdp` on when `accelerate launch` was given an FSDP config (configs/accelerate/fsdp.yaml
    sets ACCELERATE_USE_FSDP): the run folder's config then records it, and resume checks it, as for the key."""
    if cfg.train.fsdp or not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fsdp=True))


def check_fsdp(cfg, num_processes: int) -> None:
    """`train.fsdp` needs several processes and a fully fine-tuned student; one line otherwise."""
    if not cfg.train.fsdp:
        return
    if cfg.train.mixed_precision == "fp16":
        raise ConfigError(
            "config key 'train.mixed_precision': got 'fp16' with train.fsdp, expected 'no' or 'bf16' (fp16 "
            "needs a gradient scaler over the sharded gradients, which the trainer does not run)"
        )
    if cfg.student.lora is not None:
        raise ConfigError(
            "config key 'student.lora': got adapters with train.fsdp, expected null (not supported together: "
            "the merged LoRA student is built from the whole base on one process)"
        )
    if num_processes < 2:
        raise ConfigError(
            f"config key 'train.fsdp': got true with {num_processes} process, expected a launch of >= 2 "
            "processes (accelerate launch --num_processes N ...): one process has nothing to shard across"
        )


def layer_classes(student) -> tuple[type, ...]:
    """The student's decoder-layer classes (HF `_no_split_modules`) that occur in it."""
    names = set(getattr(student, "_no_split_modules", None) or [])
    found = {type(m) for m in student.modules() if type(m).__name__ in names}
    if not found:
        raise ConfigError(
            f"config key 'train.fsdp': got true for a {type(student).__name__} whose _no_split_modules "
            f"({sorted(names)}) names no class it holds, expected an HF causal LM with decoder layers to shard"
        )
    return tuple(found)


def mixed_precision_policy(mixed_precision: str) -> MixedPrecisionPolicy:
    """Parameters gathered and computed in bf16/fp16, gradients reduced and kept in float32."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)


def shard_model(model, accelerator, mixed_precision: str = "no"):
    """Shard `model` (a `DistillModel`) in place over all processes; returns it (an `FSDPModule`).

    Must run before the optimizer is built: `fully_shard` replaces the student's parameters by sharded
    DTensor parameters, which are the ones the optimizer must hold.
    """
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    kwargs = {"mesh": mesh, "mp_policy": mixed_precision_policy(mixed_precision)}
    classes = layer_classes(model.student)
    for module in list(model.student.modules()):
        if isinstance(module, classes):
            fully_shard(module, **kwargs)
    replicated = set()
    if model.aligner is not None:  # not FSDP's: it moves only what it shards to the mesh's device
        replicated = set(model.aligner.to(accelerator.device).parameters())
    fully_shard(model, ignored_params=replicated, **kwargs)
    return model


def replicated_params(model) -> list[torch.nn.Parameter]:
    """Parameters that train but are not sharded (the aligner's)."""
    aligner = model.aligner
    return [p for p in aligner.parameters() if p.requires_grad] if aligner is not None else []


def sync_replicated_grads(model, world: int) -> None:
    """Average the aligner's gradients across processes (FSDP reduces only what it shards), as one
    flat all-reduce."""
    grads = [p.grad for p in replicated_params(model) if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads]), strict=True):
        g.copy_(part.view_as(g))


def clip_grad_norm(model, max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm over student (sharded) and aligner (replicated) parameters; returns the
    pre-clip norm. torch's `clip_grad_norm_` cannot stack DTensor and plain norms, so the two groups' norms
    are taken apart (the sharded one as a full tensor) and combined."""
    sharded = [p.grad for p in model.parameters() if p.grad is not None and hasattr(p.grad, "full_tensor")]
    plain = [p.grad for p in replicated_params(model) if p.grad is not None]
    norm2 = torch.zeros((), dtype=torch.float32)
    if sharded:
        norm2 += torch.nn.utils.get_total_norm(sharded).full_tensor().float().cpu() ** 2
    if plain:
        norm2 += torch.nn.utils.get_total_norm(plain).float().cpu() ** 2
    total = norm2.sqrt()
    coef = min(1.0, max_norm / (float(total) + 1e-6))  # torch's clip_grads_with_norm_ rule
    for grads in (sharded, plain):  # one foreach per kind: DTensor ops refuse plain tensors
        if coef < 1.0 and grads:
            torch._foreach_mul_(grads, coef)
    return total


@contextlib.contextmanager
def gathered(model):
    """The root unit's parameters (embeddings, norm, LM head) gathered while the student is called outside
    the model's forward (evaluation, greedy decoding); the decoder layers gather themselves."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def full_student_state(model) -> dict[str, torch.Tensor]:
    """The student's full (gathered) state dict on the main process (CPU tensors; empty on the others).
    Every process must call it (it all-gathers)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full = get_model_state_dict(model, options=options)
    # one name per tensor, as the student's own state dict has for tied weights (embeddings / LM head);
    # the gathered dict names every alias, and save_pretrained would then store the tied head twice
    student = model.student
    names = {n for n, _ in student.named_parameters()} | {n for n, _ in student.named_buffers()}
    prefix = "student."
    return {
        k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix) and k[len(prefix) :] in names
    }


def save_sharded_state(model, optimizer, ckpt_dir: str | Path) -> None:
    """Model + optimizer as a distributed checkpoint in `ckpt_dir/fsdp` (each process writes its shards)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(ckpt_dir) / FSDP_STATE))


def load_sharded_state(model, optimizer, ckpt_dir: str | Path) -> None:
    """Load `save_sharded_state`'s checkpoint into the sharded model and its optimizer (any process count)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(Path(ckpt_dir) / FSDP_STATE))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
