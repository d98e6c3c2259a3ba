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

from pipeline.quantize import expand_scales
from pipeline.store import TOKEN_ARRAYS, decode_states
from pipeline.store_logits import LOGIT_ARRAYS, decode_logprobs


def preload_bytes(store, split: str, layers: Sequence[int], components: Sequence[str]) -> int:
    """Bytes `PreloadedSplit` would hold (token arrays + states in the storage dtype)."""
    n = store.num_tokens(split)
    total = n * sum(np.dtype(dt).itemsize for dt in TOKEN_ARRAYS.values())
    if "layers" in store._split(split):
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

    def __init__(self, store, split: str, layers: Sequence[int], components: Sequence[str]):
        self.dtype = store.dtype
        self.layers = [int(x) for x in layers]
        self.offsets = np.asarray(store.offsets(split), dtype=np.int64)  # (S,)
        self.lengths = np.asarray(store.lengths(split), dtype=np.int64)  # (S,)
        self.tokens = {name: np.asarray(store._array(split, name)[:]) for name in TOKEN_ARRAYS}  # (N,)
        self.components = [c for c in components if c != "logits"] if "layers" in store._split(split) else []
        # (L_sel, N, X, D_t) per component: one bulk read per layer, stacked so a sample is one slice.
        self.states = {
            c: np.stack([np.asarray(store.array(layer, c, split)[:]) for layer in self.layers])
            for c in self.components
        }
        # int8: (L_sel, C, X, D_t) per-chunk or (L_sel, N, X) per-token scales (pipeline/quantize.py)
        self.quantization, self.chunk_tokens = store.quantization, store.chunk_tokens
        self.scales = {
            c: np.stack([np.asarray(store.scale_array(layer, c, split)[:]) for layer in self.layers])
            for c in (self.components if self.dtype == "int8" else [])
        }
        # (N, K) top-k log-probs (float16 words) and token ids, when asked for
        self.logits = (
            {name: np.asarray(store.logit_array(name, split)[:]) for name in LOGIT_ARRAYS}
            if "logits" in components
            else None
        )

    def read_samples(self, indices: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """Same keys, dtypes and shapes as `KVStore.read_samples` (q (L_sel, H_t, T, D_t), float32)."""
        n = len(self.lengths)
        out = []
        for i in indices:
            if not -n <= int(i) < n:
                raise IndexError(f"sample index {i}: split has {n} samples")
            a, b = int(self.offsets[i]), int(self.offsets[i] + self.lengths[i])
            s = {
                "input_ids": torch.from_numpy(self.tokens["input_ids"][a:b].astype(np.int64)),  # (T,)
                "segment_ids": torch.from_numpy(self.tokens["segment_ids"][a:b].astype(np.int64)),  # (T,)
                "answer_mask": torch.from_numpy(self.tokens["answer_mask"][a:b].astype(bool)),  # (T,)
            }
            for c in self.components:
                x = decode_states(
                    self.states[c][:, a:b], self.dtype, self._scales(c, a, b)
                )  # (L_sel, T, X, D_t)
                s[c] = x.permute(0, 2, 1, 3).contiguous()  # (L_sel, X, T, D_t)
            if self.logits is not None:
                s["topk_logprobs"] = decode_logprobs(self.logits["values"][a:b])  # (T, K)
                s["topk_indices"] = torch.from_numpy(self.logits["indices"][a:b].astype(np.int64))  # (T, K)
            out.append(s)
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
