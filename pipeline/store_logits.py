"""The teacher's top-k log-probs in a kvmap store: dtypes, codecs and the 16-bit encoding (schema v2).

Shape glossary: N tokens of a split, K stored log-probs per token.

Values are float16 (not bf16: 8x finer steps where it matters; log-probs are bounded) stored as uint16 words;
token ids use the narrowest unsigned type that holds the vocabulary. See pipeline/store.py for the layout and
README "Benchmarks" for the measured codecs.
"""

from __future__ import annotations

import numpy as np
import torch
import zarr

LOGIT_ARRAYS = ("values", "indices")
# Stored log-probs are clamped here: a token the teacher gives exactly zero probability (-inf) stays
# representable in float16 and contributes exp(-1e4) = 0 mass.
LOGPROB_FLOOR = -1.0e4


def index_dtype(vocab_size: int) -> str:
    """The narrowest unsigned integer dtype that holds every token id of a `vocab_size` vocabulary."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def logit_codecs(level: int = 1) -> dict[str, dict]:
    """Filters/compressors per logits array (measured on the default teacher, see the module docstring).

    values: numcodecs' Delta on the float16 words (outside the Zarr v3 spec: without it the ratio falls from
    3.2x to 1.8-2.0x, measured with blosc-zstd byte / bit shuffle) + blosc-zstd with byte shuffle (the same
    ratio as numcodecs' Shuffle + Zstd, 2.3x faster to write); indices: zstd (close to random; no shuffle
    helps).
    """
    from zarr.codecs.numcodecs import Delta

    from pipeline.store import make_compressors, quiet_codecs  # lazy: pipeline.store imports this module

    with quiet_codecs():
        return {
            "values": {"filters": [Delta(dtype="u2")], "compressors": make_compressors("blosc-zstd", level)},
            "indices": {"filters": [], "compressors": [zarr.codecs.ZstdCodec(level=level)]},
        }


def encode_logprobs(logprobs: torch.Tensor) -> np.ndarray:
    """(…, K) float log-probs -> float16 words as uint16 (clamped at LOGPROB_FLOOR)."""
    return logprobs.clamp_min(LOGPROB_FLOOR).to(torch.float16).view(torch.uint16).cpu().numpy()


def decode_logprobs(words: np.ndarray) -> torch.Tensor:
    """uint16 float16 words -> float32 log-probs (exact)."""
    return torch.from_numpy(np.ascontiguousarray(words)).view(torch.float16).float()
