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
    """One split's samples packed end to end: token arrays (N,) plus per-sample offsets/lengths/rows (S,)."""

    input_ids: np.ndarray
    segment_ids: np.ndarray
    answer_mask: np.ndarray
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

    @classmethod
    def merge(cls, parts: Sequence[PackedSplit]) -> PackedSplit:
        """One split from parts holding disjoint source rows (e.g. each process's share), in source-row order."""
        if len(parts) == 1:
            return parts[0]
        rows = np.concatenate([p.rows for p in parts])
        lengths = np.concatenate([p.lengths for p in parts])
        bases = np.cumsum([0] + [p.num_tokens for p in parts[:-1]])
        starts = np.concatenate([p.offsets + b for p, b in zip(parts, bases, strict=True)])
        order = np.argsort(rows, kind="stable")
        lengths, starts = lengths[order], starts[order]
        out_starts = np.zeros(len(order), dtype=np.int64)
        out_starts[1:] = np.cumsum(lengths[:-1], dtype=np.int64)
        src = np.arange(int(lengths.sum()), dtype=np.int64) + np.repeat(starts - out_starts, lengths)  # (N,)
        tokens = {k: np.concatenate([getattr(p, k) for p in parts])[src] for k in TOKEN_DTYPES}
        texts = spans = None
        if all(p.texts is not None for p in parts):
            every = [t for p in parts for t in p.texts]
            texts = [every[i] for i in order]
            spans = np.concatenate([p.char_spans for p in parts])[src]
        return cls.from_arrays(tokens, lengths, rows[order], texts=texts, char_spans=spans)

    @property
    def num_tokens(self) -> int:
        """Tokens of the packed split (all samples end to end)."""
        return int(self.input_ids.shape[0])

    def fingerprint(self) -> str:
        """A hash of the tokens, segments, answer mask, lengths and source rows (part of the store fingerprint)."""
        h = hashlib.sha256()
        for a in (self.input_ids, self.segment_ids, self.answer_mask, self.lengths, self.rows):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def samples_in(self, start: int, end: int) -> np.ndarray:
        """Indices of the samples overlapping packed token range [start, end)."""
        ends = self.offsets + self.lengths
        lo = int(np.searchsorted(ends, start, side="right"))
        hi = int(np.searchsorted(self.offsets, end, side="left"))
        return np.arange(lo, hi)


def _join_block(done: dict, pending: dict) -> None:
    """Move the pending per-sample arrays into one joined block per token array."""
    for key, arrays in pending.items():
        if arrays:
            done[key].append(np.concatenate(arrays))
            arrays.clear()
