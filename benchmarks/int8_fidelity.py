"""Fidelity of int8 states vs the bf16 store they came from: cosine, attention KL, attention-output cosine.

Shape glossary: L_sel stored layers, H query heads, G KV heads, T one sample's tokens, D head dim, N tokens.

Used by benchmarks/bench_extract.py (int8 store vs bf16 store of the same extraction) and to choose each
component's int8 scheme (`scheme_table`: both schemes on the bf16 states, quantised per write chunk as
stage 1 does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.quantize import SCHEMES, quantize
from pipeline.store import BLOSC_BLOCKSIZE


def _causal_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention probabilities. Shapes: q (H, T, D), k (G, T, D) -> (H, T, T)."""
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)  # (H, T, D)
    s = (q @ k.transpose(1, 2)) * scale  # (H, T, T)
    T = q.shape[1]
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s.double(), dim=-1)


def sample_metrics(ref: dict, got: dict, head_dim: int) -> dict:
    """Per-sample fidelity of `got` (dequantised) vs `ref` (bf16) states of one sample.

    Shapes: ref/got "q" (L, H, T, D), "k"/"v" (L, G, T, D).
    Returns cos_{q,k,v} (cosine of the flattened states), kl (mean over layers, heads and query rows of
    KL(softmax_ref || softmax_got)), out_cos (cosine of softmax(qk) v with everything dequantised).
    """
    out = {}
    for c in ("q", "k", "v"):
        a, b = ref[c].double().flatten(), got[c].double().flatten()
        out[f"cos_{c}"] = float(a @ b / (a.norm() * b.norm()))
    scale = 1.0 / math.sqrt(head_dim)
    kls, outs = [], []
    for layer in range(ref["q"].shape[0]):
        p = _causal_attention(ref["q"][layer], ref["k"][layer], scale)  # (H, T, T)
        r = _causal_attention(got["q"][layer], got["k"][layer], scale)
        kl = (p * (p.clamp_min(1e-300).log() - r.clamp_min(1e-300).log())).sum(-1)  # (H, T)
        kls.append(float(kl.mean()))
        rep = ref["q"].shape[1] // ref["v"].shape[1]
        o_ref = p @ ref["v"][layer].double().repeat_interleave(rep, dim=0)  # (H, T, D)
        o_got = r @ got["v"][layer].double().repeat_interleave(rep, dim=0)
        outs.append(float((o_ref.flatten() @ o_got.flatten()) / (o_ref.norm() * o_got.norm())))
    out["kl"] = float(np.mean(kls))
    out["out_cos"] = float(np.mean(outs))
    return out


def _compressed_bytes(a: np.ndarray, level: int) -> int:
    """Bytes of `a` after the default codec (blosc-zstd, byte shuffle), encoded in 256-row blocks."""
    from numcodecs import Blosc

    b = Blosc(cname="zstd", clevel=level, shuffle=Blosc.SHUFFLE, blocksize=BLOSC_BLOCKSIZE)
    return sum(len(b.encode(np.ascontiguousarray(a[i : i + 256]))) for i in range(0, max(len(a), 1), 256))


def scheme_table(states: dict[str, np.ndarray], chunk_tokens: int, level: int = 1) -> list[dict]:
    """Both int8 schemes on every component: relative RMS error, cosine, and compressed bytes vs bf16.

    Args:
        states: {comp: (N, X, D) float32} of one layer (or layers concatenated along N).
    """
    rows = []
    for comp, x in states.items():
        xt = torch.from_numpy(x)
        bf16 = xt.to(torch.bfloat16).view(torch.int16).numpy()
        ref_bytes = _compressed_bytes(bf16, level)
        for scheme in SCHEMES:
            deq, nbytes = [], 0
            for a in range(0, len(x), chunk_tokens):
                q, s = quantize(xt[a : a + chunk_tokens], scheme)
                deq.append(q.float() * (s if scheme == "channel" else s.unsqueeze(-1)))
                nbytes += _compressed_bytes(q.numpy(), level) + _compressed_bytes(s.numpy(), level)
            d = torch.cat(deq).double().flatten()
            r = xt.double().flatten()
            rows.append(
                {
                    "component": comp,
                    "scheme": scheme,
                    "rel_rms": float((d - r).norm() / r.norm()),
                    "cos": float(d @ r / (d.norm() * r.norm())),
                    "bytes_over_bf16": nbytes / ref_bytes,
                }
            )
    return rows
