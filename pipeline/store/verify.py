"""`kvmap-inspect --check`: read every chunk of every array of a kvmap store and stop at the first bad one.

Shape glossary: N tokens of a split, X heads of a component, D head dim, K stored top-k log-probs.

What "bad" means, in the order checked per chunk:
- its file is missing (states / logits: a missing shard would silently read as zeros);
- zarr cannot decode it (the shard index's crc32c checksum, the zstd frame: a damaged file);
- it holds non-finite values: teacher states (N, X, D) and top-k log-probs (N, K) must be finite.
Each problem is ONE line naming the store, the array, the chunk (token range, file) and the fix
(`pipeline.store.chunk_read.chunk_error`).

Example:
    verify_store(KVStore("stores/default.zarr"))  # None, or raises ValueError at the first bad chunk
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from pipeline.store.chunk_read import chunk_error, chunk_len
from pipeline.store.encoding import decode_logprobs, decode_states
from pipeline.store.reader import KVStore
from pipeline.store.schema import LOGIT_ARRAYS, SAMPLE_ARRAYS, TOKEN_ARRAYS


def store_arrays(store: KVStore) -> Iterator[tuple[zarr.Array, str]]:
    """Every array of the store with its kind: "tokens" | "states" | "logprobs" | "indices"."""
    for split in store.splits:
        for name in (*TOKEN_ARRAYS, *SAMPLE_ARRAYS):
            yield store.token_array(name, split), "tokens"
        if split == "train":
            for layer in store.layers:
                for comp in store.components:
                    yield store.array(layer, comp, split), "states"
        if store.has_logits(split):
            for name in LOGIT_ARRAYS:
                yield store.logit_array(name, split), "logprobs" if name == "values" else "indices"


def _values(store: KVStore, kind: str, raw: np.ndarray) -> torch.Tensor | None:
    """The float values of a chunk to check for finiteness (None for integer arrays)."""
    if kind == "states":
        return decode_states(raw, store.dtype)  # (n, X, D) float32
    if kind == "logprobs":
        return decode_logprobs(raw)  # (n, K) float32
    return None


def check_chunk(store: KVStore, arr: zarr.Array, kind: str, i: int) -> None:
    """Raise a one-line ValueError if chunk i of `arr` is missing, unreadable or non-finite."""
    n = chunk_len(arr)
    key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
    # sharded arrays (states, logits) are written whole, chunk by chunk: every shard file must exist
    if arr.shards is not None and not store.location.exists(f"{arr.path}/{key}"):
        raise chunk_error(store, arr, i, "is missing (zarr would read it as zeros)")
    try:
        raw = arr[i * n : min((i + 1) * n, arr.shape[0])]
    except Exception as e:  # any codec / IO failure: the file is damaged
        raise chunk_error(store, arr, i, e) from e
    x = _values(store, kind, raw)
    if x is not None:
        bad = ~torch.isfinite(x)
        if bad.any():
            first = int(bad.reshape(bad.shape[0], -1).any(dim=1).nonzero()[0, 0]) + i * n
            raise chunk_error(
                store, arr, i, f"holds {int(bad.sum())} non-finite values (first at token {first})"
            )


def verify_store(store: KVStore, progress: bool = True) -> int:
    """Check every chunk of every array (`check_chunk`); returns the number of chunks checked.

    Raises ValueError (one line) at the first bad chunk.
    """
    todo = [(arr, kind) for arr, kind in store_arrays(store) if arr.shape[0] > 0]
    counts = [-(-arr.shape[0] // chunk_len(arr)) for arr, _ in todo]
    with tqdm(total=sum(counts), unit="chunk", desc="check", disable=not progress) as bar:
        for (arr, kind), num in zip(todo, counts):
            for i in range(num):
                check_chunk(store, arr, kind, i)
                bar.update(1)
    return sum(counts)
