"""Held-out evaluation of the student (CE per segment, answer-token accuracy, greedy exact match) and the
aligner's collapse diagnostics (effective rank of the projected teacher).

Shape glossary: B batch, T tokens, V vocab, L_s student layers, X heads, D head dim.

Every quantity is aggregated from sums and counts, so the result does not depend on the batch size or
on how the samples are split across ranks: rank r evaluates samples r, r + W, r + 2W, ... (W = world
size) and the sums are all-reduced.
"""

from __future__ import annotations

import torch

from alignment.losses.diagnostics import effective_rank
from alignment.losses.logit_kd import teacher_fidelity_sums
from pipeline.config.kvmap import SEGMENTS
from pipeline.data.metrics import answer_token_accuracy
from pipeline.store.reader import KVStore
from trainer.data.loader import StoreDataset, collate_right_pad
from trainer.eval.greedy import greedy_exact_match
from trainer.objective.losses import ce_sums_by_segment, ce_targets

SEG_NAMES = {v: k for k, v in SEGMENTS.items()}


def answer_token_counts(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor, segment_ids
):
    """Teacher-forced hits and counts on answer-bearing target tokens of R and A, summable across batches.

    Wraps `pipeline.data.metrics.answer_token_accuracy` (the definition shared with stage 1's summary).
    Shapes: logits (B, T, V), input_ids / answer_mask / segment_ids (B, T) -> (2, 2) float64: row 0 hits,
    row 1 counts; column 0 R, column 1 A.
    """
    m = answer_token_accuracy(logits, input_ids, answer_mask, segment_ids)
    return torch.tensor(
        [[m["correct_R"], m["correct_A"]], [m["n_R"], m["n_A"]]], dtype=torch.float64, device=logits.device
    )


def _shard(n: int, rank: int, world: int) -> list[int]:
    return list(range(rank, n, world))


def _ratio(a, b) -> float:
    return float(a / b) if b > 0 else float("nan")


def teacher_forced_sums(
    accelerator,
    student,
    ds: StoreDataset,
    indices: list[int],
    batch_size: int,
    pad_id: int,
    ce_ids,
    fidelity: bool,
) -> torch.Tensor:
    """CE, answer-accuracy and teacher-fidelity sums and counts over `indices`, one flat float64 vector.

    Layout: CE sums then counts per segment (2 * S), answer hits then counts for R, A (4), and with
    `fidelity` the teacher's top-1 agreements, KL sum and rows (3; zeros without).
    """
    dev = accelerator.device
    ce = torch.zeros(2, len(SEGMENTS), dtype=torch.float64, device=dev)
    acc = torch.zeros(2, 2, dtype=torch.float64, device=dev)
    fid = torch.zeros(3, dtype=torch.float64, device=dev)  # agreements, KL sum, rows
    for b0 in range(0, len(indices), batch_size):
        batch = collate_right_pad(ds.__getitems__(indices[b0 : b0 + batch_size]), pad_id)
        batch = {k: v.to(dev) for k, v in batch.items()}
        with accelerator.autocast():
            logits = student(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
            ).logits  # (B, T, V)
        ce += ce_sums_by_segment(logits, batch["input_ids"], batch["segment_ids"])
        acc += answer_token_counts(logits, batch["input_ids"], batch["answer_mask"], batch["segment_ids"])
        if fidelity:
            keep, _ = ce_targets(batch["input_ids"], batch["segment_ids"], ce_ids if ce_ids else [0, 1, 2])
            z = logits[keep].float()  # (N, V)
            fid += teacher_fidelity_sums(z, batch["topk_logprobs"][keep], batch["topk_indices"][keep])
    return torch.cat([ce.flatten(), acc.flatten(), fid])


def exact_match_sums(
    accelerator, student, tokenizer, ds: StoreDataset, n: int, eval_cfg, sharded: bool = False
) -> torch.Tensor:
    """(hits, count) of greedy exact match on this rank's share of the first `eval.greedy_samples` (all of
    them when the student is sharded; see `evaluate`)."""
    rank, world = (0, 1) if sharded else (accelerator.process_index, accelerator.num_processes)
    g = _shard(min(n, eval_cfg.greedy_samples), rank, world)
    hits, count = greedy_exact_match(
        student,
        tokenizer,
        ds,
        g,
        eval_cfg.max_new_tokens,
        eval_cfg.batch_size,
        accelerator.device,
        synced=sharded,
    )
    return torch.tensor([hits, count], dtype=torch.float64, device=accelerator.device)


def eval_metrics(sums: torch.Tensor, em: torch.Tensor | None, n: int, ce_ids, fidelity: bool) -> dict:
    """The `eval/*` dict from the all-reduced sums (`teacher_forced_sums` layout) and exact-match sums."""
    S = len(SEGMENTS)
    ce, acc, fid = sums[: 2 * S].view(2, S), sums[2 * S : 2 * S + 4].view(2, 2), sums[-3:]
    out = {"eval/ce": _ratio(ce[0].sum(), ce[1].sum())}
    cols = list(range(S)) if ce_ids is None else list(ce_ids)
    out["eval/ce_trained"] = _ratio(ce[0, cols].sum(), ce[1, cols].sum())
    for j, name in SEG_NAMES.items():
        out[f"eval/ce_{name}"] = _ratio(ce[0, j], ce[1, j])
    for j, name in enumerate(("R", "A")):
        out[f"eval/acc_{name}"] = _ratio(acc[0, j], acc[1, j])
    out["eval/acc"] = _ratio(acc[0].sum(), acc[1].sum())
    if em is not None:  # a disabled evaluation reports no value
        out["eval/exact_match"] = _ratio(em[0], em[1])
    out["eval/samples"] = n
    if fidelity:
        out["eval/agree_top1"] = _ratio(fid[0], fid[2])
        out["eval/kl_teacher"] = _ratio(fid[1], fid[2])
    return out


@torch.no_grad()
def evaluate(
    accelerator,
    student,
    tokenizer,
    store_path,
    split: str,
    eval_cfg,
    pad_id: int,
    ce_ids=None,
    dataset=None,
    sharded: bool = False,
) -> dict:
    """CE overall and per segment, teacher-forced answer-token accuracy in R and A, greedy exact match.

    Args:
        accelerator: the run's Accelerator (device, rank, all-reduce).
        student: the unwrapped student model.
        tokenizer: the student's tokenizer (None skips exact match: nothing to decode with).
        store_path, split: the store and its held-out split (tokens, segments, answer mask; no states).
        eval_cfg: pipeline.config.train.EvalConfig.
        ce_ids: the segment ids training's token losses count (train.ce_segments, plus train.kd_segments
            when KD reads others: `trainer.run.setup.token_loss_ids`); None = all segments.
        dataset: the split as the student reads it (default: the store's tokens); a cross-tokenizer arm passes
            its `CrossTokenDataset` (student tokens; no teacher fidelity: the vocabularies differ).
        sharded: the student is sharded across the processes (train.fsdp): each forward needs every
            process, so every process evaluates every sample (same forwards, same sums; nothing to reduce),
            and greedy decoding runs in lockstep (`synced_gpus`).
    Returns:
        {"eval/ce", "eval/ce_trained", "eval/ce_P", "eval/ce_R", "eval/ce_A", "eval/acc_R", "eval/acc_A",
         "eval/acc", "eval/exact_match", "eval/samples"}; a value is NaN where its count is 0, and
        `eval/exact_match` is absent when greedy decoding is off (`eval.greedy_samples: 0` or no tokenizer).
        `eval/ce_trained` is CE over the segments training counts: with `ce_segments: [R, A]` the prompt is
        never a target, so `eval/ce` (all segments) is dominated by P and says little about the student.
    """
    was_training = student.training
    student.eval()
    fidelity = dataset is None and KVStore(store_path).has_logits(split)  # the teacher's held-out top-k
    ds = (
        dataset
        if dataset is not None
        else StoreDataset(store_path, split, components=("logits",) if fidelity else ())
    )
    n = len(ds) if eval_cfg.max_samples is None else min(len(ds), eval_cfg.max_samples)
    rank, world = (0, 1) if sharded else (accelerator.process_index, accelerator.num_processes)
    mine = _shard(n, rank, world)
    sums = teacher_forced_sums(accelerator, student, ds, mine, eval_cfg.batch_size, pad_id, ce_ids, fidelity)
    greedy = tokenizer is not None and eval_cfg.greedy_samples > 0
    em = (
        exact_match_sums(accelerator, student, tokenizer, ds, n, eval_cfg, sharded)
        if greedy
        else sums.new_zeros(2)
    )
    stacked = torch.cat([sums, em])
    if world > 1:
        stacked = accelerator.reduce(stacked, reduction="sum")
    stacked = stacked.cpu()
    out = eval_metrics(stacked[:-2], stacked[-2:] if greedy else None, n, ce_ids, fidelity)
    if was_training:
        student.train()
    return out


@torch.no_grad()
def alignment_diagnostics(accelerator, aligner, store_path, cfg, pad_id: int, num_samples: int = 16) -> dict:
    """Effective rank of the projected teacher Q/K/V (mean over student layers) on the first train samples.

    A projector collapsing the teacher toward rank 1 shows here even when the cosine terms look fine.
    Returns {"align/eff_rank_q", "align/eff_rank_k", "align/eff_rank_v"} for the projected components only
    (none without a projector).
    """
    comps = [c for c in ("q", "k", "v") if c in aligner.projections]  # what the aligner projects
    if not comps:
        return {}
    ds = StoreDataset(store_path, "train", layers=aligner.teacher_layers, components=comps)
    idx = list(range(min(num_samples, len(ds))))
    batch = collate_right_pad(ds.__getitems__(idx), pad_id)
    dev = next(iter(aligner.parameters()), torch.empty(0, device=accelerator.device)).device
    batch = {k: v.to(dev) for k, v in batch.items()}
    out = aligner.align(batch.get("k_t"), batch.get("v_t"), batch.get("q_t"), batch["segment_ids"])
    mask = out.mask  # (B, T')
    res = {}
    for c in comps:
        x = getattr(out, c)  # (B, L_s, X, T', D_s)
        ranks = []
        for layer in range(x.shape[1]):
            rows = x[:, layer].permute(0, 2, 1, 3)[mask]  # (N_real, X, D_s)
            ranks.append(effective_rank(rows.reshape(-1, rows.shape[-1])))
        res[f"align/eff_rank_{c}"] = sum(ranks) / len(ranks)
    return res
