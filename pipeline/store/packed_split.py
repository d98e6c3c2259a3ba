"""One split's samples packed end to end (the store's token-major layout, pipeline/store/reader.py).

Shape glossary: N tokens of the split (all samples end to end, no padding), S samples.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# the token arrays and their dtypes in the store (pipeline/store/schema.py)
TOKEN_DTYPES = {"input_ids": np.int32, "segment_ids": np.int8, "answer_mask": np.uint8}


@dataclass
class PackedSplit:
    """One split's samples packed end to end: token arrays (N,) plus per-sample offsets/lengths/rows (S,). The
    token arrays (and texts / char spans) are numpy arrays or, in stage 1, `StagedArray`s read per range from
    disk; read them by slices."""

    input_ids: np.ndarray | StagedArray
    segment_ids: np.ndarray | StagedArray
    answer_mask: np.ndarray | StagedArray
    offsets: np.ndarray
    lengths: np.ndarray
    rows: np.ndarray
    texts: list[str] | None = None  # (S,) rendered texts, when the samples carry them
    char_spans: np.ndarray | None = None  # (N, 2) int32 spans in the texts ((-1, -1) = template token)

    @classmethod
    def from_samples(cls, samples: Sequence[dict], rows: Sequence[int]) -> PackedSplit:
        """Pack tokenised samples (dicts with 1-D `input_ids`, `segment_ids`, `answer_mask`, and optionally
        `text` + `char_spans` (T, 2))."""
        return cls.from_stream(zip(rows, samples, strict=True))

    @classmethod
    def from_stream(cls, items: Iterable[tuple[int, dict]], block: int = 4096) -> PackedSplit:
        """Pack (source row, tokenised sample) pairs as they arrive, keeping only the packed arrays: each
        sample's tensors are converted at once and every `block` samples are joined into one array, so a
        split costs its packed bytes (6 per token, 16 per sample while packing, 20 after; + 8 per token and
        the texts when the samples carry them) and not a dict of tensors per sample."""
        done = {k: [] for k in TOKEN_DTYPES}  # joined blocks
        pending = {k: [] for k in TOKEN_DTYPES}
        rows, lengths = array("q"), array("q")
        texts: list[str] | None = []
        for row, sample in items:
            for key, dt in TOKEN_DTYPES.items():
                pending[key].append(np.asarray(torch.as_tensor(sample[key]).cpu(), dtype=dt).reshape(-1))
            if texts is not None and "text" in sample and "char_spans" in sample:
                texts.append(sample["text"])
                spans = np.asarray(torch.as_tensor(sample["char_spans"]), dtype=np.int32).reshape(-1, 2)
                pending.setdefault("char_spans", []).append(spans)
                done.setdefault("char_spans", [])
            else:  # texts only when every sample carries one
                texts = None
            rows.append(int(row))
            lengths.append(len(pending["input_ids"][-1]))
            if len(pending["input_ids"]) == block:
                _join_block(done, pending)
        _join_block(done, pending)
        spans = done.pop("char_spans", None)
        tokens = {k: np.concatenate(v) if v else np.zeros(0, dtype=TOKEN_DTYPES[k]) for k, v in done.items()}
        with_text = texts is not None and len(texts) > 0
        return cls.from_arrays(
            tokens,
            np.asarray(lengths, dtype=np.int32),
            np.asarray(rows, dtype=np.int64),
            texts=texts if with_text else None,
            char_spans=np.concatenate(spans).reshape(-1, 2) if with_text else None,
        )

    @classmethod
    def from_arrays(
        cls, tokens: dict[str, np.ndarray], lengths: np.ndarray, rows: np.ndarray, texts=None, char_spans=None
    ) -> PackedSplit:
        """A packed split from its token arrays (N,) and the samples' lengths and source rows (S,) (texts (S,)
        and char_spans (N, 2) optional)."""
        if len(lengths) and lengths.min() < 1:
            raise ValueError(f"sample {int(lengths.argmin())} has 0 tokens: expected at least 1")
        offsets = np.zeros(len(lengths), dtype=np.int64)
        offsets[1:] = np.cumsum(lengths[:-1], dtype=np.int64)
        return cls(
            **tokens,
            offsets=offsets,
            lengths=lengths,
            rows=rows.reshape(-1),
            texts=texts,
            char_spans=char_spans,
        )

    @property
    def num_tokens(self) -> int:
        """Tokens of the packed split (all samples end to end)."""
        return int(self.input_ids.shape[0])

    def fingerprint(self, block: int = 1 << 20) -> str:
        """A hash of the tokens, segments, answer mask, lengths and source rows (part of the store fingerprint);
        read `block` entries at a time (the same hash as hashing each array whole)."""
        h = hashlib.sha256()
        for a in (self.input_ids, self.segment_ids, self.answer_mask, self.lengths, self.rows):
            for i in range(0, len(a), block):
                h.update(np.ascontiguousarray(a[i : i + block]).tobytes())
        return h.hexdigest()[:16]

    def samples_in(self, start: int, end: int) -> np.ndarray:
        """Indices of the samples overlapping packed token range [start, end)."""
        ends = self.offsets + self.lengths
        lo = int(np.searchsorted(ends, start, side="right"))
        hi = int(np.searchsorted(self.offsets, end, side="left"))
        return np.arange(lo, hi)


def _unit_slice(key, n: int, what: str) -> tuple[int, int]:
    """(lo, hi) of a step-1 slice over n entries (hi >= lo); TypeError naming `what` for anything else."""
    if not isinstance(key, slice) or key.step not in (None, 1):
        raise TypeError(f"{what} index {key!r}: expected a slice with step 1")
    lo, hi, _ = key.indices(n)
    return lo, max(hi, lo)


class StagedArray:
    """Arrays end to end along axis 0, read per range: a PackedSplit's token arrays when they stay on disk
    (pipeline/data/split_shards.py). Only slices with step 1 are read; each returns a numpy array.

    Example:
        >>> StagedArray([np.arange(3), np.arange(2)], dtype=np.int64)[2:4].tolist()
        [2, 0]
    """

    def __init__(self, parts: Sequence, dtype):
        self.parts = list(parts)
        self.dtype = np.dtype(dtype)
        self.starts = np.concatenate([[0], np.cumsum([p.shape[0] for p in self.parts])]).astype(np.int64)
        tail = tuple(self.parts[0].shape[1:]) if self.parts else ()
        self.shape = (int(self.starts[-1]), *tail)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi = _unit_slice(key, len(self), "StagedArray")
        out = [np.zeros((0, *self.shape[1:]), dtype=self.dtype)]
        first = max(int(np.searchsorted(self.starts, lo, side="right")) - 1, 0)
        for p in range(first, len(self.parts)):
            s0, s1 = int(self.starts[p]), int(self.starts[p + 1])
            if s0 >= hi:
                break
            a, b = max(lo, s0) - s0, min(hi, s1) - s0
            if a < b:
                out.append(np.asarray(self.parts[p][a:b], dtype=self.dtype))
        return np.concatenate(out) if len(out) > 2 else out[-1]

    @property
    def nbytes(self) -> int:
        return len(self) * int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize


class StagedTexts:
    """Strings stored as their UTF-8 bytes end to end (a `StagedArray` of uint8) plus each one's byte length:
    a PackedSplit's texts when they stay on disk. Fixed-width arrays, not variable-length strings, because
    writing those from zarr's I/O threads grew the heap of a stage-1 process with the rows (glibc arenas:
    118 vs 38 MiB at 80,000 rows). Slices with step 1 return numpy object arrays of str."""

    def __init__(self, data: StagedArray, lengths: np.ndarray):
        self.data = data
        self.ends = np.cumsum(lengths, dtype=np.int64)
        self.shape = (len(lengths),)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice) -> np.ndarray:
        lo, hi = _unit_slice(key, len(self), "StagedTexts")
        b0 = int(self.ends[lo - 1]) if lo else 0
        raw = self.data[b0 : int(self.ends[hi - 1]) if hi else 0].tobytes()
        cuts = (self.ends[lo:hi] - b0).tolist()
        return np.array([raw[a:b].decode() for a, b in zip([0, *cuts[:-1]], cuts)], dtype=object)


def _join_block(done: dict, pending: dict) -> None:
    """Move the pending per-sample arrays into one joined block per token array."""
    for key, arrays in pending.items():
        if arrays:
            done[key].append(np.concatenate(arrays))
            arrays.clear()
