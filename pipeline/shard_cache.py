"""Whole-shard reads with a small LRU cache: the read path for stores on object storage.

Shape glossary: N tokens on an array's first axis; a shard holds `chunk_len(arr)` of them (the store's
write chunk, `extract.chunk_tokens`).

Why: zarr reads a token range inside a shard as one request for the shard index plus one request per inner
chunk, one after the other (zarr.codecs.sharding `_decode_partial_single`). On a local disk that is cheap;
against object storage every request is a round trip, and a batch of 16 random samples x 29 arrays issues
~1,000 of them (measured: 11.6 samples/s from a local S3 server vs 127 from a folder). Reading a *whole*
shard is one request (zarr's full-shard path), so with a sample order that visits a few shards at a time
(`train.shuffle: shards`, trainer/data.py) each shard of each array is fetched once per loader worker and
every sample of the window is cut from memory: 431 samples/s from the same server (README "Stores at scale").

Example:
    store.shard_cache = ShardCache(max_shards=5)  # KVStore.read_samples now reads whole shards
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import zarr

from pipeline.store_read import chunk_len, read_all


class ShardCache:
    """Decoded whole shards, least recently used evicted first.

    Args:
        max_shards: shards kept per array (>= 1); the cache holds at most `max_shards` x (arrays read)
            shards. A read that needs more shards than that still returns correct data: a call assembles
            its answer from the shards it fetched before anything is evicted.
    """

    def __init__(self, max_shards: int):
        if max_shards < 1:
            raise ValueError(f"ShardCache max_shards={max_shards}: expected >= 1")
        self.max_shards = max_shards
        self._lru: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._paths: set[str] = set()
        self.fetched = 0  # whole-shard reads issued so far (tests and benchmarks count requests with it)

    def read(self, store, jobs: list[tuple[zarr.Array, slice]]) -> list[np.ndarray]:
        """Each (array, token slice) of `jobs` as a numpy array (a copy), like `read_all`.

        Missing shards are read whole, all at once (`read_all`: concurrent, damaged chunks named).
        """
        have: dict[tuple[str, int], np.ndarray] = {}
        need: dict[tuple[str, int], tuple[zarr.Array, slice]] = {}
        for arr, sel in jobs:
            n = chunk_len(arr)
            for i in range(sel.start // n, -(-sel.stop // n)):
                key = (arr.path, i)
                if key in have or key in need:
                    continue
                if key in self._lru:
                    self._lru.move_to_end(key)
                    have[key] = self._lru[key]
                else:
                    need[key] = (arr, slice(i * n, min((i + 1) * n, arr.shape[0])))
        for key, got in zip(need, read_all(store, list(need.values()))):
            have[key] = np.asarray(got)
            self._lru[key] = have[key]
        self.fetched += len(need)
        self._paths.update(arr.path for arr, _ in jobs)
        while len(self._lru) > self.max_shards * len(self._paths):
            self._lru.popitem(last=False)
        return [self._cut(arr, sel, have) for arr, sel in jobs]

    @staticmethod
    def _cut(arr: zarr.Array, sel: slice, have: dict) -> np.ndarray:
        """Tokens `sel` of `arr` from its shards in `have` (a copy: callers may write into what they get)."""
        n = chunk_len(arr)
        if sel.stop <= sel.start:
            return np.asarray(arr[sel])  # an empty range: no shard to cut from
        parts = [
            have[(arr.path, i)][max(sel.start - i * n, 0) : min(sel.stop - i * n, n)]
            for i in range(sel.start // n, -(-sel.stop // n))
        ]
        return np.concatenate(parts) if len(parts) > 1 else parts[0].copy()
