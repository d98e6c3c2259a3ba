"""int8 teacher states (`extract.dtype: int8`): symmetric quantisation with float32 scales stored beside them.

Shape glossary: N tokens (of a write chunk when quantising, of a read range when dequantising), X heads of a
component (H for q, G for k/v), D head dim, C write chunks of the train split.

Schemes (the scale's granularity; the store records one per component in its `quantization` attribute):
  channel  one scale per (head, channel) per write chunk: scale[c] = absmax over the chunk's tokens / 127,
           stored as `layers/{l}/{comp}_scale` (C, X, D) float32, one zarr chunk per write chunk.
  token    one scale per (token, head): absmax over the head's D channels / 127, stored as
           `layers/{l}/{comp}_scale` (N, X) float32, sharded like the states.
Why scales come from the write chunk only: a chunk is the unit of writing, resuming and rank ownership, so
its int8 words and scales are a function of its own tokens and the stored bits do not depend on the number
of processes or on where a run was killed. q = round(x / scale) (half to even) clipped to [-127, 127];
x' = q * scale; an all-zero (head, channel) or token gets scale 0 and decodes to 0.
Measured on the default teacher (docs/guides/scale-out.md "int8 states", benchmarks/bench_extract.py --int8): per (head,
channel) is clearly better for Q and K (half the error of per (token, head); attention KL 1.4e-4 vs 5.4e-4:
RoPE and outlier channels make channel ranges differ by orders of magnitude). For V the two are close (relative
RMS error 0.0079 vs 0.0077 on layers 6 and 18; 0.0088 vs 0.0066 on all 8 stored layers) while per channel
stores 8% fewer bytes and needs no per-token scale reads (the loader's per-read cost): V is per channel too.
"token" stays readable (a store records its schemes).
"""

from __future__ import annotations

import numpy as np
import torch

SCHEMES = ("channel", "token")
# The scheme of each component in stores written by this version (docs/guides/scale-out.md "int8 states" for the measurement).
INT8_SCHEMES = {"q": "channel", "k": "channel", "v": "channel"}
QMAX = 127.0


def quantize(x: torch.Tensor, scheme: str, qmax: float = QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of one chunk's states, on the device they live on.

    `qmax` < 127 uses fewer levels (benchmarks/int8_fidelity.py `levels_table` measures the bytes / fidelity
    trade; stores always use 127).
    Shapes: x (N, X, D) float -> q (N, X, D) int8, scale (1, X, D) for "channel" | (N, X) for "token" float32.
    Example:
        q, s = quantize(torch.randn(4096, 3, 64), "channel")  # s: (1, 3, 64)
    """
    if x.dim() != 3:
        raise ValueError(f"quantize: x has shape {tuple(x.shape)}, expected (N, X, D)")
    x = x.float()
    if scheme == "channel":
        scale = x.abs().amax(dim=0, keepdim=True) / qmax  # (1, X, D)
        full = scale
    elif scheme == "token":
        scale = x.abs().amax(dim=2) / qmax  # (N, X)
        full = scale.unsqueeze(-1)  # (N, X, 1)
    else:
        raise ValueError(f"int8 scheme={scheme!r}: expected one of {SCHEMES}")
    safe = torch.where(full > 0, full, torch.ones_like(full))
    q = torch.round(x / safe).clamp_(-qmax, qmax).to(torch.int8)  # zero-scale entries are exactly 0
    return q, scale


def expand_scales(scale: np.ndarray, scheme: str, start: int, end: int, chunk_tokens: int) -> np.ndarray:
    """Stored scales of a token range -> an array that broadcasts against its (end - start, X, D) int8 words.

    Args:
        scale: "channel": the scale rows of write chunks start // chunk_tokens .. (end - 1) // chunk_tokens
            ((C_sel, X, D)); "token": the range's own rows ((end - start, X)).
    Returns: (end - start, X, D) for "channel", (end - start, X, 1) for "token".
    """
    if scheme == "token":
        return scale[..., None]
    rows = np.arange(start, end) // chunk_tokens - start // chunk_tokens  # (T,) chunk of each token
    return scale[rows]


def scale_rows(scheme: str, start: int, end: int, chunk_tokens: int) -> slice:
    """Which rows of a scale array a token range [start, end) needs (see `expand_scales`)."""
    if scheme == "token":
        return slice(start, end)
    return slice(start // chunk_tokens, (end - 1) // chunk_tokens + 1)


def dequantize(q: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """int8 words * broadcastable float32 scales -> float32 tensor (the shape of q)."""
    return torch.from_numpy(np.ascontiguousarray(q)).float() * torch.from_numpy(np.ascontiguousarray(scale))
