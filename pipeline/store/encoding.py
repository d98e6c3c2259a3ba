"""Stored words <-> float tensors: teacher states (bf16 / fp16 / int8 words) and top-k log-probs.

Owns: how a value is represented in a stored array. Imports nothing from kvmap. The layout is in
pipeline/store/schema.py.

Shape glossary: N tokens of a split, K stored log-probs per token; states are any shape.

States: numpy and zarr have no bfloat16, so bf16 states are stored as their raw 16-bit words (uint16) and
viewed back on read; int8 words are dequantised with their scales (pipeline/store/int8.py).
Log-prob values are float16 (not bf16: 8x finer steps where it matters; log-probs are bounded) stored as uint16 words;
token ids use the narrowest unsigned type that holds the vocabulary. See pipeline/store/schema.py for the layout and
docs/benchmarks.md for the measured codecs.
"""

from __future__ import annotations

import numpy as np
import torch

# Stored log-probs are clamped here: a token the teacher gives exactly zero probability (-inf) stays
# representable in float16 and contributes exp(-1e4) = 0 mass.
LOGPROB_FLOOR = -1.0e4


def index_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer dtype that holds every token id of a `vocab_size` vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def encode_logprobs(logprobs: torch.Tensor) -> np.ndarray:
    """(…, K) float log-probs -> float16 words as uint16 (clamped at LOGPROB_FLOOR)."""
    return logprobs.clamp_min(LOGPROB_FLOOR).to(torch.float16).view(torch.uint16).cpu().numpy()


def decode_logprobs(words: np.ndarray) -> torch.Tensor:
    """uint16 float16 words -> float32 log-probs (exact)."""
    return torch.from_numpy(np.ascontiguousarray(words)).view(torch.float16).float()


def encode_states(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Float tensor -> numpy array of the storage dtype (bf16 as uint16 words). Callers check range first."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    if dtype == "float16":
        return x.to(torch.float16).cpu().numpy()
    raise ValueError(f"dtype={dtype!r}: expected 'bfloat16' or 'float16'")


def decode_states(a: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    """Numpy array of the storage dtype -> float32 torch tensor (exact for 16-bit words; int8 words are
    dequantised: `scale` broadcasts against `a`, see pipeline/store/int8.py `expand_scales`)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        return t.view(torch.bfloat16).float()
    if dtype == "int8":
        if scale is None:
            raise ValueError("decode_states: int8 states need their scales")
        return t.float() * torch.from_numpy(np.ascontiguousarray(scale))
    return t.float()
