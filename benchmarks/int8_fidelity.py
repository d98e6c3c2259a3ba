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

from pipeline.store.codecs import BLOSC_BLOCKSIZE
from pipeline.store.int8 import SCHEMES, quantize


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


LEVELS = (127, 90, 63, 45, 31)


def _sample(src: dict, layers: list[int], a: int, b: int) -> dict[str, torch.Tensor]:
    """Tokens [a, b) of {(layer, comp): (N, X, D)} as one sample: {comp: (L, X, T, D)}."""
    return {c: torch.stack([src[(layer, c)][a:b] for layer in layers]).permute(0, 2, 1, 3) for c in "qkv"}


def levels_table(store, num_samples: int, level: int = 1) -> list[dict]:
    """Fewer quantisation levels (symmetric, per (head, channel), qmax < 127) on the store's first write chunk:
    compressed bytes vs bf16 and fidelity, every stored layer.

    Why: int8 words that use the whole range compress ~1.05x with any lossless codec (their entropy is ~7.1-7.7
    bits per word), so below ~0.65x the bf16 bytes only using fewer levels shrinks a store; this table says
    what each level count costs in cosine and attention KL. Args: store, a bf16 KVStore; num_samples, samples
    that lie inside the first chunk for the cosine / KL columns.
    """
    ct, layers = min(store.chunk_tokens, store.num_tokens()), store.layers
    x = {(layer, c): store.read_states(layer, c, 0, ct) for layer in layers for c in "qkv"}  # (ct, X, D)
    ref_bytes = sum(
        _compressed_bytes(v.to(torch.bfloat16).view(torch.int16).numpy(), level) for v in x.values()
    )
    off, ln = store.offsets(), store.lengths()
    inside = [i for i in range(store.num_samples()) if off[i] + ln[i] <= ct][:num_samples]
    head_dim = int(store.attrs["teacher"]["head_dim"])
    rows = []
    for qmax in LEVELS:
        deq, nbytes = {}, 0
        for key, v in x.items():
            q, s = quantize(v, "channel", qmax)
            nbytes += _compressed_bytes(q.numpy(), level)
            deq[key] = q.float() * s
        m = [sample_metrics(_sample(x, layers, off[i], off[i] + ln[i]), _sample(deq, layers, off[i], off[i] + ln[i]),
                            head_dim) for i in inside]  # fmt: skip
        cos = min(float(np.mean([r[f"cos_{c}"] for r in m])) for c in "qkv")
        rows.append({"qmax": qmax, "bytes_over_bf16": nbytes / ref_bytes, "min_cos": cos,
                     "kl": float(np.mean([r["kl"] for r in m])), "samples": len(m)})  # fmt: skip
    return rows
