"""Whole-shard reads with a small LRU cache: the read path for stores on object storage.

Shape glossary: N tokens on an array's first axis; a shard holds `chunk_len(arr)` of them (the store's
write chunk, `extract.chunk_tokens`).

Why: zarr reads a token range inside a shard as one request for the shard index plus one request per inner
chunk, one after the other (zarr.codecs.sharding `_decode_partial_single`). On a local disk that is cheap;
against object storage every request is a round trip, and a batch of 16 random samples x 29 arrays issues
~1,000 of them (measured: 10-11 samples/s from a local S3 server, 0.4x what the trainer consumes). Reading a
*whole* shard is one request (zarr's full-shard path), so with a sample order that visits a few shards at a
time and deals them to the loader workers (`train.shuffle: shards`, trainer/data/sample_order.py) each shard of
each array is fetched by one worker per epoch and every sample of its window is cut from memory: 5.9x the
trainer's consumption from the same server (docs/guides/scale-out.md).

Example:
    store.shard_cache = ShardCache(max_shards=5)  # KVStore.read_samples now reads whole shards
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import zarr

from pipeline.store.chunk_read import chunk_len, read_all


class ShardCache:
    """Whole shards (decompressed storage words), least recently used evicted first.

    Args:
        max_shards: shards kept per array (>= 1; each array has its own LRU, so small one-chunk arrays such as
            the token ids stay while the state arrays cycle through shards). A read that needs more shards
            than that still returns correct data: a call assembles its answer before anything is evicted.
    """

    def __init__(self, max_shards: int):
        if max_shards < 1:
            raise ValueError(f"ShardCache max_shards={max_shards}: expected >= 1")
        self.max_shards = max_shards
        self._lru: dict[str, OrderedDict[int, np.ndarray]] = {}  # array path -> shard index -> its words
        self.fetched = 0  # whole-shard reads issued so far (tests and benchmarks count requests with it)

    def read(self, store, jobs: list[tuple[zarr.Array, slice]]) -> list[np.ndarray]:
        """Each (array, token slice) of `jobs` as a numpy array (a copy), like `read_all`.

        The shard a range starts in is read whole and cached; the part of a range that runs on into a shard
        not cached is read as that part only (a sample straddling a boundary should not pull a whole shard
        another reader owns, trainer/data/sample_order.py). Every read is issued at once (`read_all`: concurrent,
        damaged chunks named).
        """
        have: dict[tuple[str, int], np.ndarray] = {}
        need: dict[tuple[str, int], tuple[zarr.Array, slice]] = {}
        tails: dict[tuple[int, int], tuple[zarr.Array, slice]] = {}  # (job, shard) -> the job's part in it
        for j, (arr, sel) in enumerate(jobs):
            n = chunk_len(arr)
            lru = self._lru.setdefault(arr.path, OrderedDict())
            for i in range(sel.start // n, -(-sel.stop // n)):
                key = (arr.path, i)
                if key in have or key in need:
                    continue
                if i in lru:
                    lru.move_to_end(i)
                    have[key] = lru[i]
                elif i == sel.start // n:
                    need[key] = (arr, slice(i * n, min((i + 1) * n, arr.shape[0])))
                else:
                    tails[(j, i)] = (arr, slice(i * n, min(sel.stop, (i + 1) * n)))
        got = read_all(store, [*need.values(), *tails.values()])
        for (path, i), a in zip(need, got):
            have[(path, i)] = self._lru[path][i] = np.asarray(a)
            while len(self._lru[path]) > self.max_shards:
                self._lru[path].popitem(last=False)
        part = dict(zip(tails, got[len(need) :]))
        self.fetched += len(need)
        return [self._cut(arr, sel, have, part, j) for j, (arr, sel) in enumerate(jobs)]

    @staticmethod
    def _cut(arr: zarr.Array, sel: slice, have: dict, part: dict, j: int) -> np.ndarray:
        """Tokens `sel` of `arr` (job j) from whole shards in `have` or its own parts in `part` (parts start at
        their shard's first token, so both index alike); a copy: callers may write into what they get."""
        n = chunk_len(arr)
        if sel.stop <= sel.start:
            return np.asarray(arr[sel])  # an empty range: no shard to cut from
        parts = []
        for i in range(sel.start // n, -(-sel.stop // n)):
            src = have.get((arr.path, i))
            src = np.asarray(part[(j, i)]) if src is None else src
            parts.append(src[max(sel.start - i * n, 0) : min(sel.stop - i * n, n)])
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
