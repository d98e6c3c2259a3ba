"""Students that do not fit one device: step time with vs without gradient checkpointing, LoRA vs full.

    python benchmarks/bench_student_memory.py [--config configs/default.yaml] [--scale_hidden 2]
        [--scale_layers 5] [--batch_size 4] [--seq 256] [--steps 5] [--warmup 2] [--threads 2]

Shape glossary: B batch, T tokens, L_s student layers, G KV heads, D head dim.

The student is the config's `student.config` grown to about 4x its parameters (hidden, intermediate and
heads x `--scale_hidden`, layers x `--scale_layers`; random init, one seed for every variant). Variants,
each wrapped by the trainer's own `trainer.run.student_wrap.wrap_student` and timed interleaved in one
process (a load swing on a shared machine hits all alike), medians of `--steps` after `--warmup`:
  full, full+gc, lora, lora+gc   full fine-tuning / LoRA (r 8, all linear layers), without / with
                                 `train.gradient_checkpointing`.
The step is the trainer's student side: forward with the student's Q/K/V captured with gradients
(pipeline.models.capture), CE + (1 - cos) of the captured K/V against fixed random targets (stand-ins for
the aligned teacher states: the aligner's cost does not depend on how the student trains), backward,
AdamW. `saved MiB` is what autograd keeps for backward (the bytes of every tensor a forward op saves,
counted with saved-tensor hooks; under checkpointing the layers' own saves are recomputed instead, and
their inputs, which the checkpoint keeps, are not counted).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.config.configlib import load_config
from pipeline.config.kvmap import KVMapConfig, LoRAConfig
from pipeline.models.capture import capture_qkv
from trainer.run.student_wrap import trainable_parameters, wrap_student

REPO = Path(__file__).resolve().parent.parent
VARIANTS = {"full": (False, False), "full+gc": (False, True), "lora": (True, False), "lora+gc": (True, True)}


def _args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/bench_student_memory.py")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--scale_hidden", type=int, default=2)
    ap.add_argument("--scale_layers", type=int, default=5)
    ap.add_argument("--batch_size", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    return ap.parse_args(argv)


def scaled(student: dict, hidden: int, layers: int) -> dict:
    """The student config with widths and head counts x `hidden` and layers x `layers` (head_dim kept)."""
    out = dict(student)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        out[key] = student[key] * hidden
    out["num_hidden_layers"] = student["num_hidden_layers"] * layers
    return out


def make_student(hf: dict, seed: int = 0):
    """A random-init HF causal LM of config dict `hf` (sdpa attention, train mode)."""
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(**hf)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").train()


def step(model, opt, ids, targets) -> float:
    """One student step: capture, CE + K/V cosine loss, backward, AdamW; returns the loss."""
    with capture_qkv(model, detach=False, components=("k", "v")) as cap:
        logits = model(input_ids=ids, use_cache=False).logits  # (B, T, V)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    for c in ("k", "v"):
        s = cap.stack(c)  # (B, L_s, G, T, D)
        loss = loss + (1 - F.cosine_similarity(s, targets[c], dim=-1)).mean()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def saved_bytes(model, ids, targets) -> int:
    """Bytes autograd saves for backward during one forward + loss (saved-tensor hooks)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with capture_qkv(model, detach=False, components=("k", "v")) as cap:
            logits = model(input_ids=ids, use_cache=False).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        for c in ("k", "v"):
            loss = loss + (1 - F.cosine_similarity(cap.stack(c), targets[c], dim=-1)).mean()
    del loss
    return total


def build(base: KVMapConfig, hf: dict, lora: bool, gc: bool):
    """(wrapped student, AdamW over its trainable parameters) for one variant."""
    student = dataclasses.replace(base.student, lora=LoRAConfig() if lora else None)
    train = dataclasses.replace(base.train, gradient_checkpointing=gc)
    model = wrap_student(make_student(hf), dataclasses.replace(base, student=student, train=train))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def main(argv=None) -> int:
    """Time the variants interleaved and print one table with ratios to full fine-tuning."""
    a = _args(argv)
    torch.set_num_threads(a.threads)
    base = load_config(KVMapConfig, a.config)
    default = base.student.config
    hf = scaled(default, a.scale_hidden, a.scale_layers)
    n_default = sum(p.numel() for p in make_student(default).parameters())
    models = {name: build(base, hf, *flags) for name, flags in VARIANTS.items()}
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, hf["vocab_size"], (a.batch_size, a.seq), generator=g)
    shape = (a.batch_size, hf["num_hidden_layers"], hf["num_key_value_heads"], a.seq, hf["head_dim"])
    targets = {c: torch.randn(shape, generator=g) for c in ("k", "v")}
    times = {name: [] for name in models}
    for i in range(a.warmup + a.steps):
        for name, (model, opt) in models.items():
            t0 = time.perf_counter()
            step(model, opt, ids, targets)
            if i >= a.warmup:
                times[name].append(time.perf_counter() - t0)
    n_total = trainable_parameters(models["full"][0])[1]
    print(
        f"student {n_total / 1e6:.1f}M params ({n_total / n_default:.2f}x the default {n_default / 1e6:.1f}M): "
        f"hidden {hf['hidden_size']}, {hf['num_hidden_layers']} layers; B={a.batch_size} T={a.seq}, "
        f"{a.threads} threads, medians of {a.steps} steps"
    )
    print(f"{'variant':<9} {'trainable':>12} {'step s':>8} {'x full':>7} {'saved MiB':>10} {'x full':>7}")
    med = {name: statistics.median(ts) for name, ts in times.items()}
    mem = {name: saved_bytes(m, ids, targets) / 2**20 for name, (m, _) in models.items()}
    for name, (model, _) in models.items():
        trainable = trainable_parameters(model)[0]
        print(
            f"{name:<9} {trainable:>12,} {med[name]:>8.3f} {med[name] / med['full']:>7.2f} "
            f"{mem[name]:>10.1f} {mem[name] / mem['full']:>7.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
