"""Sample orders of `train.shuffle: shards`: shard windows, with the shards dealt to the run's readers.

Shape glossary: n samples of the split, S shards that samples start in, R readers (ranks x loader workers),
B micro-batch size.

Why readers: accelerate gives global batch b to rank b % N and torch's DataLoader gives a rank's j-th batch to
worker j % W, so batch b is read by reader b % R (R = N * W: rank b % N, worker (b // N) % W). If every reader
drew from the same shard windows, every reader would fetch every shard: R times the store per epoch (16x with
8 GPUs x 2 workers), more than the global order's overfetch. So each epoch deals the shards out to the readers
(balanced by samples), orders each reader's samples in shard windows, and fills batch b from reader b % R's
own samples: each shard is fetched by one reader per epoch. Near an epoch's end a reader that has run out fills
its batches from the reader with the most samples left (a few shards fetched twice).

Both orders are pure functions of their arguments and the generator, so a resumed run rebuilds them.
"""

from __future__ import annotations

import torch


def shard_window_permutation(groups: torch.Tensor, window: int, g: torch.Generator) -> torch.Tensor:
    """A permutation of range(n) that visits shards in random order, `window` shards at a time, with the
    samples of each window in random order.

    Shapes: groups (n,) int64 shard of each sample -> (n,) int64.
    Example:
        shard_window_permutation(torch.tensor([0, 0, 1, 1, 2]), 2, torch.Generator().manual_seed(0))
    """
    n = len(groups)
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    # shard ids -> 0..S-1 (a shard in which no sample starts has no id); rank = each shard's place in the order
    _, dense = torch.unique(groups, return_inverse=True)
    n_shards = int(dense.max()) + 1
    rank = torch.empty(n_shards, dtype=torch.long)
    rank[torch.randperm(n_shards, generator=g)] = torch.arange(n_shards)
    key = (rank[dense] // window) * n + torch.randperm(n, generator=g)  # window first, random inside it
    return torch.argsort(key)


def deal_shards(groups: torch.Tensor, readers: int, g: torch.Generator) -> torch.Tensor:
    """(n,) reader of each sample: shards in random order, each to the reader with the fewest samples so far."""
    shards, dense, counts = torch.unique(groups, return_inverse=True, return_counts=True)
    owner = torch.empty(len(shards), dtype=torch.long)
    load = [0] * readers
    for s in torch.randperm(len(shards), generator=g).tolist():
        r = min(range(readers), key=load.__getitem__)
        owner[s] = r
        load[r] += int(counts[s])
    return owner[dense]


def reader_order(
    groups: torch.Tensor, window: int, readers: int, batch: int, first_slot: int, first_room: int, g
) -> torch.Tensor:
    """One epoch's permutation of range(n): shard windows per reader, batches filled reader by reader.

    Args:
        groups: (n,) shard of each sample. window: shards per window. readers: R. batch: B.
        first_slot / first_room: the global batch index of the epoch's first position and how many positions
            of that batch are still free (B unless the previous epoch ended mid-batch).
    Example:
        reader_order(torch.tensor([0, 0, 1, 1, 2, 2]), 1, 2, 2, 0, 2, torch.Generator().manual_seed(0))
    """
    if readers == 1:
        return shard_window_permutation(groups, window, g)
    owner = deal_shards(groups, readers, g)
    streams = []
    for r in range(readers):
        idx = torch.nonzero(owner == r).flatten()
        streams.append(idx[shard_window_permutation(groups[idx], window, g)].tolist())
    return torch.tensor(_fill_batches(streams, batch, first_slot, first_room), dtype=torch.long)


def _fill_batches(streams: list[list[int]], batch: int, slot: int, room: int) -> list[int]:
    """Concatenate the readers' streams batch by batch: batch `slot` (with `room` free positions, then
    `batch`) takes from stream slot % R, or from the stream with the most left once that one is empty."""
    readers, pos, out = len(streams), [0] * len(streams), []
    left = sum(len(s) for s in streams)
    while left:
        own = slot % readers
        while room and left:
            src = (
                own
                if pos[own] < len(streams[own])
                else max(range(readers), key=lambda i: len(streams[i]) - pos[i])
            )
            k = min(room, len(streams[src]) - pos[src])
            out.extend(streams[src][pos[src] : pos[src] + k])
            pos[src], room, left = pos[src] + k, room - k, left - k
        slot, room = slot + 1, batch
    return out
