"""Students that do not fit one device: gradient checkpointing and LoRA adapters (docs/guides/scale-out.md).

Shapes: none (wiring). `wrap_student` runs on the loaded student before the aligner, the optimizer and
`accelerator.prepare`; `save_merged` at the very end of a LoRA run.

Why checkpointing keeps the structural loss exact: the student's Q/K/V are captured inside the forward
(pipeline/models/capture.py) as tensors of the autograd graph. Non-reentrant checkpointing builds that graph
as usual and only drops the tensors it would save, recomputing them in backward (by then the capture context
has ended, so the recomputation runs the plain attention and records nothing). The reentrant variant runs
the forward under `no_grad`, which would hand the loss captured tensors without gradients: it is not used.

Why a peft-wrapped student needs no change elsewhere: `PeftModel` forwards `config`,
`set_attn_implementation`, `get_decoder` and `get_output_embeddings` to the wrapped model, whose linear
layers were replaced in place by LoRA layers, so capture, the selected-rows LM head and evaluation see the
adapted model.
"""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from pipeline.config.kvmap import KVMapConfig
from trainer.run.checkpoint import save_student


def enable_checkpointing(model) -> None:
    """HF gradient checkpointing, non-reentrant (see the module docstring for why not reentrant)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x: the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def wrap_student(student, cfg: KVMapConfig):
    """The student as it trains: HF gradient checkpointing (`train.gradient_checkpointing`) and LoRA adapters
    (`student.lora`, base weights frozen) when asked; otherwise `student` unchanged."""
    if cfg.train.gradient_checkpointing:
        enable_checkpointing(student)
    lora = cfg.student.lora
    if lora is None:
        return student
    spec = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(student, spec)
    except ValueError as e:  # e.g. a target module name the model does not have
        raise ValueError(
            f"config key 'student.lora.target_modules': got {lora.target_modules!r}, expected module names "
            f"of the student ({str(e).splitlines()[0]})"
        ) from None


def is_lora(student) -> bool:
    """Whether `student` trains LoRA adapters (a peft model)."""
    return isinstance(student, PeftModel)


def trainable_parameters(student) -> tuple[int, int]:
    """(trainable, total) parameter counts of the student."""
    params = list(student.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def save_merged(student, tokenizer, out_dir: str | Path) -> Path:
    """Merge the adapters into the base weights and save the result as a normal HF folder
    (`AutoModelForCausalLM.from_pretrained` loads it, no peft needed).

    Merges in place (`merge_and_unload`), so it is the last use of `student`: a copy would double the
    memory of a student that was made a LoRA student because it barely fits.
    """
    merged = student.merge_and_unload()
    return save_student(merged, tokenizer, None, {}, out_dir)
