"""Section 2 of benchmarks/bench_gpu.py: the stage-2 step cost (forward_step + backward + clip + AdamW) of
each loss variant next to CE-only and KD-only, at the student geometry of gpu_sections.GEOMETRY.

Shape glossary: B batch, T tokens, V vocab, L_t/L_s teacher/student layers, H query heads, G KV heads, D head
dim; `_t` teacher, `_s` student. Helpers (timing, memory, tables, models) come from gpu_sections.
"""

from __future__ import annotations

import dataclasses
import traceback
from types import SimpleNamespace

import torch
from gpu_sections import (
    GIB,
    KD_TOP_K,
    build_lm,
    fmt,
    free,
    log,
    md_table,
    peak_gib,
    reset_peak,
    segments,
    timed,
    to_dev,
)

# ----------------------------------------------------------------------------------------------- section 2
# Selected-head arm (`kd_heads_top` in configs/ablations): KD + attention KL on 4 teacher heads one-to-one
# (teacher layer, head), in 4 different mapped layers; the rest of the student gets no structural term.
HEADS_TOP = dict(
    align=dict(head_select=dict(method="list", heads=[[0, 3], [9, 7], [18, 20], [27, 12]])),
    loss=dict(alpha_k=0.0, alpha_v=0.0, alpha_attn=1.0, attn_target="teacher", sink="drop", alpha_logit=1.0),
)
STEP_VARIANTS = {  # name -> (kv_projection_mode or None for no aligner, LossConfig overrides, AlignConfig overrides)
    "ce_only": (None, {}, {}),
    "kd_only": (None, dict(alpha_logit=1.0), {}),
    "structured": ("structured", {}, {}),
    "flat": ("flat", {}, {}),
    "attn_only_teacher": ("structured", dict(alpha_k=0.0, alpha_v=0.0, attn_target="teacher"), {}),
    "kd_heads_top": ("structured", HEADS_TOP["loss"], HEADS_TOP["align"]),
    "kd_heads_top_torch_kl": (
        "structured",
        {**HEADS_TOP["loss"], "attn_kl_impl": "torch"},
        HEADS_TOP["align"],
    ),
}


def _kd_term(ctx: SimpleNamespace, b: dict, B: int, loss_kw: dict):
    """The logit-KD term and its batch entries (random sorted top-k log-probs) when the variant has KD."""
    from alignment.losses.logit_kd import LogitKDLoss
    from trainer.objective.step import KDTerm

    if not loss_kw.get("alpha_logit"):
        return None
    g = torch.Generator(device=ctx.dev).manual_seed(2)
    z = torch.randn(B, ctx.T, KD_TOP_K + 1, generator=g, device=ctx.dev)
    b["topk_logprobs"] = torch.log_softmax(z, -1)[..., :KD_TOP_K].sort(-1, descending=True).values
    b["topk_indices"] = torch.randint(0, ctx.vocab, (B, ctx.T, KD_TOP_K), generator=g, device=ctx.dev)
    return KDTerm(LogitKDLoss("forward_kl", "bucket"), float(loss_kw["alpha_logit"]))


def _heads(aligner, ctx: SimpleNamespace, align_kw: dict) -> None:
    from alignment.mapping.head_select import select_heads

    hs = align_kw.get("head_select")
    if hs:
        mapped = sorted(set(aligner.layer_map))
        heads = [[mapped[min(t, len(mapped) - 1)], h % ctx.H_t] for t, h in hs["heads"]]  # smoke geometry too
        aligner.set_head_selection(select_heads("list", aligner.layer_map, ctx.H_t, aligner.H_s, heads=heads))


def _step_variant(
    ctx: SimpleNamespace, mode: str | None, loss_kw: dict, align_kw: dict, B: int, repeats: int
) -> dict:
    """One variant at batch B: build aligner + loss + optimizer, time `repeats` optimizer steps."""
    from alignment import create_aligner, create_structural_loss
    from alignment.config import AlignConfig, LossConfig
    from trainer.objective.step import DistillModel, forward_step
    from trainer.run.setup import param_groups

    acc, dev, student, T = ctx.acc, ctx.dev, ctx.student, ctx.T
    g = torch.Generator().manual_seed(0)
    b = {
        "input_ids": torch.randint(0, ctx.vocab, (B, T), generator=g).to(dev),  # (B, T)
        "attention_mask": torch.ones(B, T, dtype=torch.long, device=dev),
        "segment_ids": segments(B, T).to(dev),
    }
    row: dict = {"B": B}
    aligner = loss_fn = None
    if mode is not None:
        aligner = create_aligner(mode, ctx.teacher_cfg, student.config, AlignConfig())
        _heads(aligner, ctx, align_kw)
        loss_fn = create_structural_loss(**dataclasses.asdict(LossConfig(**loss_kw)))
        row["L_sel"] = L_sel = len(aligner.teacher_layers)
        gd = torch.Generator(device=dev).manual_seed(1)
        for c, X in (("q", ctx.H_t), ("k", ctx.G_t), ("v", ctx.G_t)):  # float32, as the store reader returns
            b[f"{c}_t"] = torch.randn(
                B, L_sel, X, T, ctx.D_t, generator=gd, device=dev
            )  # (B, L_sel, X, T, D)
        row["teacher_states_gib"] = sum(b[f"{c}_t"].numel() * 4 for c in "qkv") / GIB
        if dev.type == "cuda":  # the whole batch host -> device, pageable (as the loader) and pinned
            host = {k: v.cpu() for k, v in b.items()}
            row["h2d_ms"] = 1e3 * timed(lambda: to_dev(host, dev, False), dev, repeats)[0]
            host = {k: v.pin_memory() for k, v in host.items()}
            row["h2d_pinned_ms"] = 1e3 * timed(lambda: to_dev(host, dev, True), dev, repeats)[0]
            host = None
    kd = _kd_term(ctx, b, B, loss_kw)
    model = DistillModel(student, aligner)
    opt = torch.optim.AdamW(param_groups(student, aligner, ctx.train_cfg), betas=(0.9, 0.95))
    model, opt = acc.prepare(model, opt)
    model.train()
    losses = []

    def step():
        r = forward_step(
            model, b, ce_ids=[0, 1, 2], struct_ids=[0, 1, 2], lambda_kv=1.0, loss_fn=loss_fn, kd=kd
        )
        acc.backward(r.loss)
        acc.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(r.logs["loss"])

    base = reset_peak(dev)
    med, times = timed(step, dev, repeats, warmup=2)  # the first step allocates the AdamW state
    row.update(median_s=med, times_s=times, tokens_per_s=B * T / med, peak_gib=peak_gib(dev),
               peak_above_start_gib=peak_gib(dev, base), losses=losses)  # fmt: skip
    return row


def section_step(geo: dict, dev: torch.device, repeats: int) -> dict:
    from accelerate import Accelerator
    from transformers import Qwen2Config

    from pipeline.config.train import TrainConfig

    tg, sg = geo["teacher"], geo["student"]
    B, T = geo["step_bt"]
    acc = Accelerator(cpu=dev.type == "cpu", mixed_precision="bf16")
    if acc.device.type != dev.type:
        raise RuntimeError(f"accelerate picked device {acc.device}, expected {dev}")
    student = build_lm(sg, torch.float32, dev).train()  # fp32 master weights; autocast comes from accelerate
    H_t = tg["num_attention_heads"]
    ctx = SimpleNamespace(
        acc=acc, dev=dev, student=student, T=T, vocab=sg["vocab_size"], teacher_cfg=Qwen2Config(**tg),
        H_t=H_t, G_t=tg["num_key_value_heads"], D_t=tg["hidden_size"] // H_t,
        train_cfg=SimpleNamespace(train=TrainConfig(lr=1e-4)),  # param_groups reads only cfg.train
    )  # fmt: skip
    res: dict = {"B": B, "T": T, "student_params": sum(p.numel() for p in student.parameters()),
                 "mixed_precision": "bf16", "variants": {}}  # fmt: skip
    log(f"step: student {res['student_params'] / 1e9:.2f}B params fp32 on {dev}, B={B} T={T}")
    for name, (mode, loss_kw, align_kw) in STEP_VARIANTS.items():
        row: dict = {}
        for bs in (B, B // 2):  # one retry at half the batch if B runs out of memory
            try:
                row.update(_step_variant(ctx, mode, loss_kw, align_kw, bs, repeats))
                log(f"step/{name} B={bs}: {row['median_s'] * 1e3:.1f} ms, peak {fmt(row['peak_gib'])} GiB, "
                    f"loss {row['losses'][-1]:.3f}")  # fmt: skip
                row.pop("error", None)
                break
            except Exception as e:
                traceback.print_exc()
                row["error"] = f"B={bs}: {type(e).__name__}: {e}".splitlines()[0]
                oom = isinstance(e, torch.OutOfMemoryError)
                if oom:
                    row["oom_at_B"] = bs
            finally:
                acc.free_memory()  # drops accelerate's references to the prepared model and optimizer
                student.zero_grad(set_to_none=True)
                free(dev)
            if not oom or bs // 2 < 1:
                break
        res["variants"][name] = row
    ce = res["variants"]["ce_only"].get("tokens_per_s")
    kd = res["variants"]["kd_only"].get("tokens_per_s")
    for r in res["variants"].values():
        if ce and "median_s" in r:  # time per token relative to CE-only (= the ms ratio at equal B)
            r["ratio_vs_ce_only"] = ce / r["tokens_per_s"]
        if kd and "median_s" in r:
            r["ratio_vs_kd_only"] = kd / r["tokens_per_s"]
    student = None
    free(dev)
    return res


def table_step(res: dict) -> str:
    rows = []
    for name, r in res["variants"].items():
        if "median_s" not in r:
            rows.append([name, r.get("B", "-"), "error: " + r.get("error", "?")[:80]] + ["-"] * 6)
            continue
        rows.append([name, r["B"], r["median_s"] * 1e3, r.get("ratio_vs_ce_only"), r.get("ratio_vs_kd_only"),
                     r["peak_gib"],
                     r.get("teacher_states_gib"), r.get("h2d_ms"), r.get("h2d_pinned_ms")])  # fmt: skip
    head = (f"Stage-2 step (forward_step + backward + clip + AdamW), B={res['B']} T={res['T']}, student "
            f"{res['student_params'] / 1e9:.2f}B params fp32 + bf16 autocast (accelerate); x CE-only is time "
            "per token (= the ms ratio at equal B)")  # fmt: skip
    cols = [
        "variant",
        "B",
        "ms/step",
        "x CE-only",
        "x KD-only",
        "peak GiB",
        "teacher states GiB",
        "H2D ms",
        "H2D pinned ms",
    ]
    return head + "\n\n" + md_table(cols, rows)
