"""Tiny kvmap stores for tests (store round trips here; the trainer's tests may reuse `write_random_store`).

Sizes match the tiny teacher of tests/conftest.py: 4 layers, H=6 query heads, G=2 KV heads, D=16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.store import PackedSplit, encode_states

H, G, D = 6, 2, 16


def random_split(num_samples: int, seed: int = 0, vocab: int = 101, min_len: int = 5, max_len: int = 40):
    """A PackedSplit of random samples with P/R/A segments (each segment at least one token)."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_samples):
        t = int(rng.integers(min_len, max_len + 1))
        cut1, cut2 = sorted(rng.choice(np.arange(1, t), size=2, replace=False))
        seg = np.zeros(t, dtype=np.int64)
        seg[cut1:cut2], seg[cut2:] = 1, 2
        samples.append(
            {
                "input_ids": torch.from_numpy(rng.integers(3, vocab, size=t)),
                "segment_ids": torch.from_numpy(seg),
                "answer_mask": torch.from_numpy((rng.random(t) < 0.2) & (seg > 0)),
            }
        )
    return PackedSplit.from_samples(samples, rows=np.arange(num_samples) * 2)


def write_random_store(
    path: str | Path,
    num_samples: int = 7,
    layers=(0, 2, 3),
    dtype: str = "bfloat16",
    codec: str = "zstd-shuffle",
    chunk_tokens: int = 64,
    inner_chunk_tokens: int = 16,
    with_eval: bool = True,
    seed: int = 0,
):
    """Write a complete store of random states; returns (path, packed train split, {(layer, comp): (N, X, D)}).

    The returned states are the float32 values *after* rounding to `dtype`, i.e. exactly what
    `KVStore.read_sample` must give back.
    """
    from pipeline.writer import StoreWriter

    train = random_split(num_samples, seed)
    ev = random_split(3, seed + 1) if with_eval else None
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (H, D), "k": (G, D), "v": (G, D)}
    truth = {}
    for layer in layers:
        for comp, (x, d) in shapes.items():
            vals = torch.randn(train.num_tokens, x, d, generator=gen) * 3.0
            truth[(layer, comp)] = vals.to(getattr(torch, dtype)).float()
    attrs = {
        "teacher": {"path": "tiny", "num_layers": 4, "num_heads": H, "num_kv_heads": G, "head_dim": D},
        "layers": list(layers),
        "components": ["q", "k", "v"],
        "dtype": dtype,
        "codec": codec,
        "compression_level": 1,
    }
    w = StoreWriter.create(
        path,
        attrs=attrs,
        train=train,
        eval=ev,
        state_shapes=shapes,
        chunk_tokens=chunk_tokens,
        inner_chunk_tokens=inner_chunk_tokens,
    )
    for c in w.todo_chunks():
        s, e = w.chunk_range(c)
        w.write_chunk(c, {key: encode_states(v[s:e], dtype) for key, v in truth.items()}, stats={})
    w.mark_complete({"tokens": train.num_tokens})
    return Path(path), train, truth
