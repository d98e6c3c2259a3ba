"""Depth pruning by measured removal cost: drop contiguous blocks of layers, keep the last (Minitron).

Shape glossary: B batch, T tokens (calibration batches are right-padded), V vocabulary, L teacher layers.

Per-layer importance (`importance.py`, 1 - cos(in, out)) scores each block alone, as if the others stayed;
Minitron (Muralidharan et al. 2024; Sreenivas et al. 2024) instead removes *contiguous* blocks and ranks
each candidate by the language-model loss of the model without it, which accounts for what the remaining
blocks do with the changed residual stream. The last block is always kept (Minitron found removing it
costs the most; it writes the stream the LM head reads; this search never tries removing it).

The search is greedy over blocks of `block` layers: each round removes the window (among the layers still
present, never the last) whose removal gives the lowest calibration loss, until `keep` layers remain. With
`block` = L - keep it is one exhaustive pass over every single window. The teacher is never copied: the
candidate is evaluated by swapping `model.model.layers` for the kept sub-list (a view of the same modules).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def only_layers(model: nn.Module, kept: list[int]) -> Iterator[None]:
    """Run `model` (a Llama/Qwen2-style HF causal LM) with only the teacher layers `kept`, then restore it."""
    full, n = model.model.layers, model.config.num_hidden_layers
    model.model.layers = nn.ModuleList([full[i] for i in kept])
    model.config.num_hidden_layers = len(kept)
    try:
        yield
    finally:
        model.model.layers, model.config.num_hidden_layers = full, n


@torch.inference_mode()
def lm_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Mean next-token cross-entropy over the real tokens of right-padded (input_ids, attention_mask) batches.

    Token-weighted (not a mean of batch means), so it does not depend on how the rows are batched.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, mask in batches:
        ids, mask = ids.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1)
        ce = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum"
        )
        total, count = total + float(ce), count + int((target != -100).sum())
    return total / max(count, 1)


def candidate_windows(present: list[int], block: int) -> list[list[int]]:
    """Every run of `block` consecutive entries of `present` (ascending teacher layers) except the last one."""
    removable = present[:-1]
    return [removable[s : s + block] for s in range(len(removable) - block + 1)]


def drop_contiguous_blocks(
    model: nn.Module, batches: list, keep: int, block: int = 0, progress=None
) -> tuple[list[int], list[dict]]:
    """Teacher layers to keep after greedily removing the cheapest contiguous windows of `block` layers.

    Args:
        model: the teacher (eval mode), a Llama/Qwen2-style HF causal LM with L layers.
        batches: calibration (input_ids (B, T), attention_mask (B, T)) pairs, right-padded.
        keep: layers to keep, 1 <= keep <= L.
        block: layers removed per round; 0 = L - keep (one window, every position tried).
        progress: optional tqdm bar advanced once per candidate evaluated.
    Returns:
        (kept teacher layers ascending, the last of them L - 1; one record per round:
        {"removed": [...], "loss": lm loss without them, "candidates": {"a-b": loss, ...}}).
    """
    L = model.config.num_hidden_layers
    if not 1 <= keep <= L:
        raise ValueError(f"keep={keep}: expected 1 <= keep <= {L} (the teacher's layers)")
    present, rounds = list(range(L)), []
    while len(present) > keep:
        size = min(block or (L - keep), len(present) - keep)
        costs = {}
        for window in candidate_windows(present, size):
            with only_layers(model, [i for i in present if i not in window]):
                costs[(window[0], window[-1])] = lm_loss(model, batches)
            if progress is not None:
                progress.update(1)
        (a, b), loss = min(costs.items(), key=lambda kv: (kv[1], kv[0]))  # ties: the earlier window
        removed = [i for i in present if a <= i <= b]
        present = [i for i in present if not a <= i <= b]
        rounds.append(
            {"removed": removed, "loss": loss, "candidates": {f"{x}-{y}": c for (x, y), c in costs.items()}}
        )
    return present, rounds


def search_evaluations(num_layers: int, keep: int, block: int = 0) -> int:
    """How many candidate evaluations `drop_contiguous_blocks` runs (for its progress bar)."""
    present, n = num_layers, 0
    while present > keep:
        size = min(block or (num_layers - keep), present - keep)
        n += present - 1 - size + 1
        present -= size
    return n
