"""Stage-2 data: a map-style Dataset over a kvmap store, right-padding collate, a resumable seeded sampler.

Shape glossary: B batch, L_sel selected teacher layers, H_t / G_t teacher query / KV heads, T tokens
(the batch's longest sample), D_t teacher head dim.

Why these pieces:
- `StoreDataset.__getitems__` lets torch's DataLoader fetch a whole batch with one call, so the store's
  concurrent `read_samples` issues every zarr read of the batch at once (per-sample reads would serialise
  one small read per layer/component). `__getitem__` still works for single samples.
- The store handle is opened lazily in each worker process (zarr groups are not meant to be pickled, and an
  object-storage client is not fork-safe: a forked worker reopens the store when its pid differs).
- `ResumableSampler` defines the whole run's sample order up front (a fresh seeded permutation per epoch)
  and can start at any global position, so a resumed run reads exactly the batches an uninterrupted run
  would have read, without touching the skipped ones. Accelerate then shards its batches across ranks.
  With `groups` (each sample's store shard) it shuffles shards, then samples within windows of a few shards,
  dealt to the run's readers (`train.shuffle: shards`, trainer/data/sample_order.py): with the dataset's
  `shard_cache`, each shard is read whole by one reader per epoch (pipeline/store/shard_cache.py), the order
  object-storage loaders use (WebDataset, MosaicML streaming).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.store.location import StoreLocation
from pipeline.store.reader import KVStore
from pipeline.store.shard_cache import ShardCache
from trainer.data.preload import PreloadedSplit
from trainer.data.sample_order import reader_order

PAD_SEGMENT = -1


class StoreDataset(Dataset):
    """Samples of one split of a kvmap store, with the teacher states of the selected layers.

    Args:
        store_path: the store folder, URL or StoreLocation (which carries the URL's storage_options).
        split: "train" or "eval".
        layers: teacher layers to read (ascending, as `aligner.teacher_layers`); ignored without components.
        components: subset of ("q", "k", "v", "logits") to read; () reads tokens only (CE-only runs).
            "logits" reads the teacher's top-k log-probs (train, or eval when the store holds them there).
        indices: optional subset of sample indices (dataset index i reads store sample indices[i]).
        preload: read the split's selected arrays into RAM at construction (`trainer.data.preload`) and serve
            samples from memory; the same items, without ~40 ms of zarr reads per sample.
        shard_cache: > 0: read whole shards and keep this many per array in each process
            (pipeline/store/shard_cache.py; for `train.shuffle: shards`); the same items.
        heads: {component: per layer, the teacher heads to read} (`KVStore.read_samples`): a selected-head
            arm reads only its heads, at their positions in the stored arrays (a head-subset store's or not).
    Shapes:
        item: input_ids / segment_ids (T,) int64, answer_mask (T,) bool, q (L_sel, H_t, T, D_t),
        k / v (L_sel, G_t, T, D_t) float32, index () int64 (the store sample index); with "logits":
        topk_logprobs (T, K) float32, topk_indices (T, K) int64.
    Example:
        ds = StoreDataset("stores/default.zarr", "train", layers=[7, 14], components=("q", "k", "v"))
    """

    def __init__(
        self,
        store_path,
        split: str = "train",
        layers: Sequence[int] = (),
        components: Sequence[str] = (),
        indices: Sequence[int] | None = None,
        preload: bool = False,
        shard_cache: int = 0,
        heads: dict[str, list[list[int]]] | None = None,
    ):
        self.store_path = StoreLocation(store_path)
        self.heads = heads
        self.split = split
        self.layers = [int(x) for x in layers]
        self.components = tuple(components)
        self._store, self._pid, self.shard_cache = None, None, shard_cache
        n = self.store.num_samples(split)
        self.indices = list(range(n)) if indices is None else [int(i) for i in indices]
        self._pre = None
        if preload:
            self._pre = PreloadedSplit(
                self.store, split, self.layers or self.store.layers, self.components, heads
            )

    @property
    def store(self) -> KVStore:
        """This process's store handle (reopened after a fork: see the module docstring)."""
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = KVStore(self.store_path), os.getpid()
            if self.shard_cache:
                self._store.shard_cache = ShardCache(self.shard_cache)
        return self._store

    def shards(self) -> np.ndarray:
        """(len(self),) int64: the store shard (write chunk) each item's first token lies in."""
        offsets = self.store.offsets(self.split)[self.indices]
        return np.asarray(offsets, dtype=np.int64) // self.store.chunk_tokens

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # reopened in the worker
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, idx: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        store_idx = [self.indices[i] for i in idx]
        if self._pre is not None:
            samples = self._pre.read_samples(store_idx)
        else:
            samples = self.store.read_samples(
                store_idx,
                split=self.split,
                layers=self.layers or None,
                components=self.components,
                heads=self.heads,
            )
        for s, i in zip(samples, store_idx):
            s["index"] = torch.tensor(i)
        return samples

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([i])[0]


def collate_right_pad(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Stack samples, right-padding every tensor to the batch's longest sample.

    Padding: input_ids <- pad_id, attention_mask <- 0, segment_ids <- -1, answer_mask <- False,
    teacher states <- 0 (never read: every loss masks padding).
    Shapes:
        out: input_ids / attention_mask / segment_ids / answer_mask (B, T); q_t (B, L_sel, H_t, T, D_t);
        k_t / v_t (B, L_sel, G_t, T, D_t); index (B,).
    """
    if not samples:
        raise ValueError("collate_right_pad: got an empty batch")
    T = max(int(s["input_ids"].shape[0]) for s in samples)
    B = len(samples)
    input_ids = torch.full((B, T), int(pad_id), dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    segment_ids = torch.full((B, T), PAD_SEGMENT, dtype=torch.long)
    answer_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, s in enumerate(samples):
        n = int(s["input_ids"].shape[0])
        input_ids[b, :n] = s["input_ids"]
        attention_mask[b, :n] = 1
        segment_ids[b, :n] = s["segment_ids"]
        answer_mask[b, :n] = s["answer_mask"].bool()
    out = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "segment_ids": segment_ids,
        "answer_mask": answer_mask,
        "index": torch.stack([s["index"] for s in samples]),
    }
    for c in ("q", "k", "v"):
        if c not in samples[0]:
            continue
        L, X, _, D = samples[0][c].shape  # (L_sel, H|G, T_i, D)
        x = torch.zeros(B, L, X, T, D, dtype=samples[0][c].dtype)  # (B, L_sel, H|G, T, D)
        for b, s in enumerate(samples):
            x[b, :, :, : s[c].shape[2]] = s[c]
        out[f"{c}_t"] = x
    for key in ("topk_logprobs", "topk_indices"):
        if key not in samples[0]:
            continue
        x = torch.zeros(B, T, samples[0][key].shape[1], dtype=samples[0][key].dtype)  # (B, T, K)
        for b, s in enumerate(samples):
            x[b, : s[key].shape[0]] = s[key]
        out[key] = x
    return out


class ResumableSampler(Sampler[int]):
    """Sample indices for a whole run: epoch e is `randperm(n)` seeded by (seed, e); starts at `start`.

    Position p of the run's stream is `perm_{p // n}[p % n]`, so the stream is a pure function of
    (n, seed) and a resumed run that starts at p = samples already consumed reads the same samples as an
    uninterrupted one. Epochs run back to back (no sample is dropped at an epoch boundary).

    Args:
        num_samples: dataset size n >= 1.
        seed: the run's seed.
        total: length of the whole stream (samples the run consumes, all ranks together).
        start: first stream position to yield (0 for a fresh run).
        groups: optional (n,) shard of each sample: epochs are shard-window orders instead
            (trainer/data/sample_order.py `reader_order`).
        window: shards per window with `groups` (>= 1).
        readers: with `groups`, the processes that read the stream's batches (ranks x loader workers;
            batch b is read by reader b % readers), each given its own shards.
        batch: with `groups`, the micro-batch size (the unit a reader reads).
    """

    def __init__(
        self,
        num_samples: int,
        seed: int,
        total: int,
        start: int = 0,
        groups: Sequence[int] | None = None,
        window: int = 1,
        readers: int = 1,
        batch: int = 1,
    ):
        if groups is not None and (len(groups) != num_samples or min(window, readers, batch) < 1):
            raise ValueError(
                f"ResumableSampler: got {len(groups)} shard ids for {num_samples} samples, window={window}, "
                f"readers={readers}, batch={batch}: expected one id per sample and window, readers, batch >= 1"
            )
        self.groups = None if groups is None else torch.as_tensor(np.asarray(groups), dtype=torch.long)
        self.window, self.readers, self.batch = window, readers, batch
        if num_samples < 1:
            raise ValueError(f"num_samples={num_samples}: expected a non-empty split")
        if not 0 <= start <= total:
            raise ValueError(f"start={start}: expected a position in [0, total={total}]")
        self.num_samples, self.seed, self.total, self.start = num_samples, seed, total, start
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            if self.groups is None:
                perm = torch.randperm(self.num_samples, generator=g)
            else:
                first = epoch * self.num_samples  # stream position of the epoch's first sample
                slot, room = first // self.batch, self.batch - first % self.batch
                perm = reader_order(self.groups, self.window, self.readers, self.batch, slot, room, g)
            self._perm, self._perm_epoch = perm, epoch
        return self._perm

    def __iter__(self):
        for p in range(self.start, self.total):
            yield int(self._permutation(p // self.num_samples)[p % self.num_samples])

    def __len__(self) -> int:
        return self.total - self.start


def make_loader(
    dataset: StoreDataset,
    batch_size: int,
    pad_id: int,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    prefetch_factor: int = 4,
    pin_memory: bool = False,
    collate=collate_right_pad,
) -> DataLoader:
    """A DataLoader with right-padding collate, worker prefetch and (optionally) a resumable sampler.

    Without a sampler the order is the dataset order (evaluation). `drop_last=False`: callers size the
    sampler's stream as a multiple of the global batch. `pin_memory`: page-locked batches, for CUDA runs.
    `collate(samples, pad_id)`: `collate_right_pad`, or trainer/data/cross_tokens.py's for a cross-tokenizer arm.
    """
    kw = {}
    if num_workers > 0:
        kw = dict(prefetch_factor=prefetch_factor, persistent_workers=True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=partial(collate, pad_id=pad_id),
        drop_last=False,
        pin_memory=pin_memory,
        **kw,
    )
