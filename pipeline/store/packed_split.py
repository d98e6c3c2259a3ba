"""One split's samples packed end to end (the store's token-major layout, pipeline/store/reader.py).

Shape glossary: N tokens of the split (all samples end to end, no padding), S samples.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


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
        """Pack tokenised samples (dicts with 1-D `input_ids`, `segment_ids`, `answer_mask`)."""
        lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int32)
        if len(samples) and lengths.min() < 1:
            raise ValueError(f"sample {int(lengths.argmin())} has 0 tokens: expected at least 1")
        offsets = np.zeros(len(samples), dtype=np.int64)
        offsets[1:] = np.cumsum(lengths[:-1], dtype=np.int64)

        def cat(key, dt):
            parts = [np.asarray(torch.as_tensor(s[key]).cpu(), dtype=dt).reshape(-1) for s in samples]
            return np.concatenate(parts) if parts else np.zeros(0, dtype=dt)

        with_text = bool(samples) and all("text" in s and "char_spans" in s for s in samples)
        spans = (
            [np.asarray(torch.as_tensor(s["char_spans"]), dtype=np.int32) for s in samples]
            if with_text
            else []
        )
        return cls(
            texts=[s["text"] for s in samples] if with_text else None,
            char_spans=np.concatenate(spans).reshape(-1, 2) if with_text else None,
            input_ids=cat("input_ids", np.int32),
            segment_ids=cat("segment_ids", np.int8),
            answer_mask=cat("answer_mask", np.uint8),
            offsets=offsets,
            lengths=lengths,
            rows=np.asarray(rows, dtype=np.int64).reshape(-1),
        )

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
