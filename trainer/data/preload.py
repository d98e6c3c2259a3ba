"""A store split's tokens and teacher states read into RAM once, served like `KVStore.read_samples`.

Shape glossary: N packed tokens of the split, S samples, L_sel selected teacher layers, X heads (H_t for q,
G_t for k/v), T one sample's tokens, D_t teacher head dim.

Why: per-sample zarr reads cost ~40 ms per sample on the default store (12 small reads of sharded inner
chunks, mostly Python overhead), more than the default student's whole step; a sweep reads each sample
several times per run and again in every run. Reading each array whole is one bulk decode (seconds), after
which a sample is a slice. Memory: the split's raw size for the selected layers/components (storage dtype:
2 bytes per value, 1 for int8 + its scales; `KVStore.num_tokens * sum over components of X * D_t * 2 * L_sel`).
int8 stores stay int8 in RAM (half the bytes) and are dequantised per sample, as `KVStore.read_samples` does. DataLoader workers
forked after the load share these pages copy-on-write (nothing writes to them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from pipeline.store.heads import take_heads
from pipeline.store.int8 import expand_scales
from pipeline.store.sample import decode_sample
from pipeline.store.schema import LOGIT_ARRAYS, STORAGE_DTYPES, TOKEN_ARRAYS


def preload_bytes(store, split: str, layers: Sequence[int], components: Sequence[str]) -> int:
    """Bytes `PreloadedSplit` would hold (token arrays + states in the storage dtype)."""
    n = store.num_tokens(split)
    total = n * sum(np.dtype(dt).itemsize for dt in TOKEN_ARRAYS.values())
    if store.has_states(split):
        for c in components:
            if c == "logits":
                continue
            for layer in layers:
                arrays = [store.array(layer, c, split)]
                if store.dtype == "int8":
                    arrays.append(store.scale_array(layer, c, split))
                total += sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in arrays)
    if "logits" in components:
        for name in LOGIT_ARRAYS:
            a = store.logit_array(name, split)
            total += int(np.prod(a.shape)) * a.dtype.itemsize
    return total


class PreloadedSplit:
    """Every array of one split (selected layers/components only) as numpy, in the storage dtype.

    Args:
        store: an open `KVStore`.
        split: "train" or "eval".
        layers: teacher layers to hold (ascending, as `aligner.teacher_layers`).
        components: subset of ("q", "k", "v"); () holds tokens only.
    Example:
        pre = PreloadedSplit(KVStore("stores/default.zarr"), "train", [7, 14], ("q", "k", "v"))
        pre.read_samples([0, 5])  # same dicts as store.read_samples([0, 5], "train", [7, 14], ...)
    """

    def __init__(self, store, split: str, layers: Sequence[int], components: Sequence[str], heads=None):
        self.dtype = store.dtype
        self.layers = [int(x) for x in layers]
        self.offsets = np.asarray(store.offsets(split), dtype=np.int64)  # (S,)
        self.lengths = np.asarray(store.lengths(split), dtype=np.int64)  # (S,)
        self.tokens = {name: np.asarray(store.token_array(name, split)[:]) for name in TOKEN_ARRAYS}  # (N,)
        self.components = [c for c in components if c != "logits"] if store.has_states(split) else []
        # `heads` as KVStore.read_samples: per component and layer, the teacher heads to hold (positions)
        pos = {c: store.positions_of(self.layers, c, (heads or {}).get(c)) for c in self.components}
        # (L_sel, N, X, D_t) per component: one bulk read per layer, stacked so a sample is one slice.
        self.states = {c: _stacked(store, split, self.layers, c, pos[c], False) for c in self.components}
        # int8: (L_sel, C, X, D_t) per-chunk or (L_sel, N, X) per-token scales (pipeline/store/int8.py)
        self.quantization, self.chunk_tokens = store.quantization, store.chunk_tokens
        self.scales = {
            c: _stacked(store, split, self.layers, c, pos[c], True)
            for c in (self.components if self.dtype == "int8" else [])
        }
        # (N, K) top-k log-probs (float16 words) and token ids, when asked for
        self.logits = (
            {name: np.asarray(store.logit_array(name, split)[:]) for name in LOGIT_ARRAYS}
            if "logits" in components
            else None
        )

    def read_samples(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Same keys, dtypes and shapes as `KVStore.read_samples` (the same decoder: pipeline/store/sample.py)."""
        n = len(self.lengths)
        out = []
        for i in indices:
            if not -n <= int(i) < n:
                raise IndexError(f"sample index {i}: split has {n} samples")
            a, b = int(self.offsets[i]), int(self.offsets[i] + self.lengths[i])
            tokens = {name: arr[a:b] for name, arr in self.tokens.items()}  # (T,) each
            states = {c: self.states[c][:, a:b] for c in self.components}  # (L_sel, T, X, D_t) words
            scales = {c: self._scales(c, a, b) for c in self.scales} or None
            logits = (
                {name: arr[a:b] for name, arr in self.logits.items()} if self.logits is not None else None
            )
            out.append(decode_sample(tokens, self.dtype, states, scales, logits))
        return out

    def _scales(self, c: str, a: int, b: int) -> np.ndarray | None:
        """int8: the scales of tokens [a, b) broadcastable to (L_sel, b - a, X, D_t); None otherwise."""
        if c not in self.scales:
            return None
        scheme = self.quantization[c]
        s = self.scales[c]  # (L_sel, C, X, D_t) | (L_sel, N, X)
        if scheme == "token":
            return s[:, a:b, :, None]  # (L_sel, T, X, 1)
        return np.stack(
            [expand_scales(x, scheme, a, b, self.chunk_tokens) for x in s[:, a // self.chunk_tokens :]]
        )


def _stacked(store, split: str, layers: list[int], c: str, pos: list, scale: bool) -> np.ndarray:
    """One component's whole arrays (or int8 scales), one per layer, gathered at each layer's head positions
    (pipeline/store/heads.py) and stacked; a layer asking for no head is zeros and is not read."""
    read = store.scale_array if scale else store.array
    parts = [
        None if p is not None and not (p >= 0).any() else take_heads(np.asarray(read(lay, c, split)[:]), p)
        for lay, p in zip(layers, pos)
    ]
    if any(x is None for x in parts):
        n, P, D = store.num_tokens(split), len(pos[0]), int(store.attrs["teacher"]["head_dim"])
        if scale and store.quantization.get(c) == "channel":
            n = -(-n // store.chunk_tokens)
        shape = (n, P) if scale and store.quantization.get(c) == "token" else (n, P, D)
        dtype = np.float32 if scale else np.dtype(STORAGE_DTYPES[store.dtype])
        parts = [x if x is not None else np.zeros(shape, dtype=dtype) for x in parts]
    return np.stack(parts)
