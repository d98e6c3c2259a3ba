"""Reading a kvmap store's zarr arrays with errors a user can act on.

zarr reports a damaged shard as `Stored and computed checksum do not match` (the shard index's crc32c) or
`Zstd decompression error` (the data), naming neither the array nor the chunk. Every store read goes
through `read_all`, which turns such a failure into ONE line naming the store, the array, the chunk (its
token range and file) and the fix; `chunk_error` is the same message for callers that read chunk by chunk
(`kvmap-inspect --check`).

Shapes: none (selections are token ranges on an array's first axis).

Example:
    flat = read_all(store, [(arr, slice(0, 10)), (arr2, slice(0, 10))])  # numpy arrays, in order
"""

from __future__ import annotations

import asyncio

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.store.schema import PROGRESS_DIR, SAMPLE_ARRAYS


def chunk_len(arr: zarr.Array) -> int:
    """Tokens per stored chunk file on the first axis: the shard when sharded, else the chunk."""
    return int((arr.shards or arr.chunks)[0])


def _write_chunk(store, arr: zarr.Array, i: int) -> int | None:
    """The extraction's write-chunk number of chunk i of a sharded array (train chunks first, then eval)."""
    if arr.shards is None:
        return None  # token / per-sample arrays are written whole at creation, not chunk by chunk
    if arr.path.startswith("eval/"):
        return -(-store.num_tokens("train") // chunk_len(arr)) + i
    return i


def chunk_error(store, arr: zarr.Array, i: int, problem: str | BaseException) -> ValueError:
    """One-line error: chunk i of `arr` in `store` (a KVStore) `problem` (an exception: "is damaged or
    unreadable (its first line)"), with the fix."""

    if isinstance(problem, BaseException):
        first = (str(problem).strip().splitlines() or [""])[0]
        problem = f"is damaged or unreadable ({type(problem).__name__}: {first})"
    n = chunk_len(arr)
    unit = "samples" if arr.path.rsplit("/", 1)[-1] in SAMPLE_ARRAYS else "tokens"
    key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
    fix = "re-extract the store (kvmap-extract ... --overwrite)"
    c = _write_chunk(store, arr, i)
    if c is not None:
        fix += (
            f", or while the extraction is incomplete delete {PROGRESS_DIR}/chunk_{c:07d}.json and resume to "
            "recompute that chunk"
        )
    return ValueError(
        f"store '{store.path}': array {arr.path} chunk {i} ({unit} {i * n}-{min((i + 1) * n, arr.shape[0])}, "
        f"file {arr.path}/{key}) {problem}: {fix}"
    )


def _first_bad_chunk(arr: zarr.Array, sel: slice) -> int:
    """Re-read `sel` chunk by chunk (only after a failure) to find the chunk that fails."""
    n = chunk_len(arr)
    start, stop = sel.start or 0, sel.stop if sel.stop is not None else arr.shape[0]
    for i in range(start // n, -(-stop // n)):
        try:
            arr[max(start, i * n) : min(stop, (i + 1) * n)]
        except Exception:  # any codec / IO failure marks the chunk
            return i
    return start // n  # the failure did not repeat: name the first chunk of the selection


def read_all(store, jobs: list[tuple[zarr.Array, slice]]) -> list[np.ndarray]:
    """Read every (array, token slice) of `jobs` concurrently; a failing read raises `chunk_error`
    (a ValueError) for the first failing job, after every read has finished (no dangling tasks)."""
    if not jobs:
        return []

    async def fetch():
        return await asyncio.gather(*[a.async_array.getitem(s) for a, s in jobs], return_exceptions=True)

    got = sync(fetch())
    for (arr, sel), res in zip(jobs, got):
        if isinstance(res, Exception):
            raise chunk_error(store, arr, _first_bad_chunk(arr, sel), res) from res
        if isinstance(res, BaseException):  # KeyboardInterrupt, SystemExit: not a store problem
            raise res
    return got
