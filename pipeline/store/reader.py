"""Reading a kvmap store: `KVStore` opens a store (folder or URL) and serves samples as tensors.

Owns: opening and validating a store, per-split arrays, concurrent sample reads. May import the store's
schema, encoding, codecs, int8, location and chunk_read modules; never the writer. The layout is defined in
pipeline/store/schema.py; samples are decoded by pipeline/store/sample.py (the one decoder every reader uses).

Shape glossary: N tokens in a split, S samples, L stored teacher layers, H query heads, G KV heads,
D head dim, T tokens of one sample, K stored top-k log-probs.

Example:
    store = KVStore("stores/default.zarr", require_complete=True)
    s = store.read_sample(0)  # s["k"]: (L, G, T, D) float32
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from pipeline.store.chunk_read import read_all
from pipeline.store.codecs import quiet_codecs
from pipeline.store.encoding import decode_states
from pipeline.store.heads import head_positions, take_heads
from pipeline.store.int8 import expand_scales, scale_rows
from pipeline.store.location import StoreLocation
from pipeline.store.sample import decode_sample
from pipeline.store.schema import (
    COMPONENTS,
    LOGIT_ARRAYS,
    READABLE_SCHEMA_VERSIONS,
    SAMPLE_ARRAYS,
    SPLITS,
    STORAGE_DTYPES,
    TEXT_ARRAYS,
    TOKEN_ARRAYS,
    fingerprint_of,
    scale_key,
    state_key,
)

SCALE_CACHE_BYTES = 64 << 20  # per-chunk int8 scale arrays up to this size are read once and kept


class KVStore:
    """Reader for a kvmap store (see the module docstring for the schema).

    Args:
        path: the store folder (`*.zarr`), a URL (`s3://bucket/prefix/name.zarr`) or a StoreLocation.
        require_complete: raise if the store is not marked complete (an interrupted extraction).
        storage_options: fsspec options for a URL (pipeline/store/location.py; credentials from the env).
    Example:
        store = KVStore("stores/default.zarr")
        s = store.read_sample(3, layers=store.layers[:2], components=("k", "v"))  # s["k"]: (2, G, T, D)
    """

    def __init__(
        self,
        path: str | Path | StoreLocation,
        require_complete: bool = False,
        storage_options: dict | None = None,
    ):
        # `path` is the StoreLocation (str() = the folder or URL; os.fspath works for local folders)
        self.path = self.location = StoreLocation(path, storage_options)
        if not self.location.exists():
            raise FileNotFoundError(
                f"store '{self.path}' does not exist (no zarr.json): run pipeline/extract.py"
            )
        self.group = self.location.open_group("r")
        self.attrs: dict[str, Any] = dict(self.group.attrs)
        version = self.attrs.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ValueError(
                f"store '{self.path}': schema_version={version!r}, expected one of {READABLE_SCHEMA_VERSIONS}"
            )
        if require_complete and not self.complete:
            raise ValueError(f"store '{self.path}' is not complete (interrupted extraction?): re-run extract")
        self.dtype: str = self.attrs["dtype"]
        self.layers: list[int] = list(self.attrs["layers"])
        self.components: list[str] = list(self.attrs["components"])
        # int8 stores: the scale scheme of each component (pipeline/store/int8.py)
        self.quantization: dict[str, str] = dict(self.attrs.get("quantization") or {})
        self.chunk_tokens = int(self.attrs.get("chunk_tokens", 1))
        self._sample_cache: dict[tuple[str, str], np.ndarray] = {}
        self._scale_cache: dict[tuple[str, int, str], np.ndarray | None] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self.shard_cache = (
            None  # a ShardCache: read_samples reads whole shards (pipeline/store/shard_cache.py)
        )

    @property
    def logits(self) -> dict | None:
        """{top_k, dtype, index_dtype, splits} when the store holds the teacher's top-k log-probs, else None."""
        rec = self.attrs.get("logits")
        return dict(rec) if rec else None

    def has_logits(self, split: str = "train") -> bool:
        """Whether the store holds top-k log-probs for `split`."""
        return self.logits is not None and split in self.logits.get("splits", [])

    @property
    def complete(self) -> bool:
        """Whether extraction finished (every chunk's marker written, the summary recorded)."""
        return bool(self.attrs.get("complete", False))

    @property
    def fingerprint(self) -> str:
        """Short hash of the store's stable attributes (`schema.fingerprint_of`)."""
        return fingerprint_of(self.attrs)

    @property
    def splits(self) -> list[str]:
        """The splits the store holds ("train", and "eval" when extracted)."""
        return [s for s in SPLITS if s in self.group]

    def _split(self, split: str):
        if split not in self.splits:
            raise KeyError(f"split={split!r}: store '{self.path}' has splits {self.splits}")
        return self.group[split]

    def _array(self, split: str, name: str) -> zarr.Array:
        key = (split, name)
        if key not in self._arrays:
            g = self._split(split)
            with quiet_codecs():
                self._arrays[key] = g[name]
        return self._arrays[key]

    def _per_sample(self, split: str, name: str) -> np.ndarray:
        key = (split, name)
        if key not in self._sample_cache:
            arr = self._array(split, name)
            self._sample_cache[key] = np.asarray(read_all(self, [(arr, slice(0, arr.shape[0]))])[0])
        return self._sample_cache[key]

    def token_array(self, name: str, split: str = "train") -> zarr.Array:
        """The raw zarr array of one token or per-sample array of a split (schema `TOKEN_ARRAYS`,
        `SAMPLE_ARRAYS`)."""
        if name not in TOKEN_ARRAYS and name not in SAMPLE_ARRAYS:
            raise KeyError(f"name={name!r}: expected one of {[*TOKEN_ARRAYS, *SAMPLE_ARRAYS]}")
        return self._array(split, name)

    def has_text(self, split: str = "train") -> bool:
        """Whether `split` holds the rendered texts and per-token char spans (stores written before they were
        recorded do not; cross-tokenizer arms need them)."""
        return all(name in self._split(split) for name in TEXT_ARRAYS)

    def read_texts(self, indices: Sequence[int], split: str = "train") -> list[tuple[str, np.ndarray]]:
        """(text, char_spans (T, 2) int32) of each sample: its rendered text and each token's [start, end)
        in it, (-1, -1) for a template token. Raises a one-line KeyError for a store without texts."""
        if not self.has_text(split):
            raise KeyError(
                f"store '{self.path}' split {split!r} holds no texts / char_spans (written before stage 1 kept "
                "them): re-extract it for a cross-tokenizer arm"
            )
        texts, spans = self._array(split, "texts"), self._array(split, "char_spans")
        offsets, lengths = self.offsets(split), self.lengths(split)
        out = []
        for i in indices:
            o, n = int(offsets[i]), int(lengths[i])
            out.append((str(texts[int(i)]), np.asarray(spans[o : o + n], dtype=np.int32)))
        return out

    def has_states(self, split: str = "train") -> bool:
        """Whether `split` holds teacher states (the eval split never does)."""
        return "layers" in self._split(split)

    def num_samples(self, split: str = "train") -> int:
        """Samples of `split`."""
        return int(self._array(split, "lengths").shape[0])

    def num_tokens(self, split: str = "train") -> int:
        """Packed tokens of `split`."""
        return int(self._array(split, "input_ids").shape[0])

    def lengths(self, split: str = "train") -> np.ndarray:
        """(S,) int32 sample lengths in tokens."""
        return self._per_sample(split, "lengths")

    def offsets(self, split: str = "train") -> np.ndarray:
        """(S,) int64 start of each sample on the packed token axis."""
        return self._per_sample(split, "offsets")

    def rows(self, split: str = "train") -> np.ndarray:
        """(S,) int64 row index of each sample in the source dataset (skipped rows are absent)."""
        return self._per_sample(split, "rows")

    def array(self, layer: int, component: str, split: str = "train") -> zarr.Array:
        """The raw zarr array (N, H|G, D) of one teacher layer / component (storage dtype)."""
        if layer not in self.layers:
            raise KeyError(f"layer={layer}: store '{self.path}' holds teacher layers {self.layers}")
        if component not in self.components:
            raise KeyError(f"component={component!r}: store '{self.path}' holds {self.components}")
        return self._array(split, state_key(layer, component))

    def scale_array(self, layer: int, component: str, split: str = "train") -> zarr.Array:
        """int8 stores: the scales of one layer / component ((C, X, D) or (N, X) float32, pipeline/store/int8.py)."""
        self.array(layer, component, split)  # same checks
        return self._array(split, state_key(layer, scale_key(component)))

    def _cached_scales(self, layer: int, component: str, split: str) -> np.ndarray | None:
        """The whole per-chunk scale array, read once and kept: (C, X, D) with C = N / chunk_tokens is small
        (85 KB per array on the default store) and saves one zarr read per layer and component per sample.
        None for per-token scales or arrays over SCALE_CACHE_BYTES (read per sample instead)."""
        key = (split, layer, component)
        if key not in self._scale_cache:
            a = self.scale_array(layer, component, split)
            small = int(np.prod(a.shape)) * 4 <= SCALE_CACHE_BYTES
            keep = self.quantization[component] == "channel" and small
            self._scale_cache[key] = np.asarray(a[:]) if keep else None
        return self._scale_cache[key]

    async def _scale_rows(self, layer: int, component: str, split: str, sel: slice) -> np.ndarray:
        """The scale rows tokens `sel` need (see pipeline/store/int8.py `scale_rows`), cached when small."""
        rows = scale_rows(self.quantization[component], sel.start, sel.stop, self.chunk_tokens)
        cached = self._scale_cache[(split, layer, component)]  # filled by `_cached_scales` (sync) first
        if cached is not None:
            return cached[rows]
        return await self.scale_array(layer, component, split).async_array.getitem(rows)

    def read_states(
        self, layer: int, component: str, start: int, end: int, split: str = "train"
    ) -> torch.Tensor:
        """Tokens [start, end) of one layer / component, decoded to float32: (end - start, X, D)."""
        words = np.asarray(self.array(layer, component, split)[start:end])
        scale = None
        if self.dtype == "int8":
            scheme = self.quantization[component]
            self._cached_scales(layer, component, split)
            rows = sync(self._scale_rows(layer, component, split, slice(start, end)))
            scale = expand_scales(np.asarray(rows), scheme, start, end, self.chunk_tokens)
        return decode_states(words, self.dtype, scale)

    def read_samples(
        self,
        indices: Sequence[int],
        split: str = "train",
        layers: Sequence[int] | None = None,
        components: Sequence[str] = COMPONENTS,
        heads: dict[str, Sequence[Sequence[int]]] | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Read several samples with all zarr reads issued concurrently (the trainer's batch loader).

        `components` may include "logits" (the teacher's top-k log-probs; the store must hold them for
        `split`). `heads` {component: per layer of `layers`, the teacher heads to return (NO_HEAD = a slot of
        zeros)}, equally many per layer: those heads, read at their positions in the stored arrays
        (pipeline/store/heads.py; a layer asking for no head is not read and need not be stored); a head the
        store lacks is a one-line KeyError. Without it every stored head comes back in stored order.
        Returns one dict per index, as `read_sample` (decoded by pipeline/store/sample.py).
        """
        offsets, lengths = self.offsets(split), self.lengths(split)
        n = len(lengths)
        for i in indices:
            if not -n <= int(i) < n:
                raise IndexError(f"sample index {i}: split {split!r} has {n} samples")
        layers = self.layers if layers is None else [int(x) for x in layers]
        comps = [c for c in components if c in COMPONENTS] if self.has_states(split) else []
        pos = {c: self.positions_of(layers, c, (heads or {}).get(c)) for c in comps}
        reads = [(c, li, lay) for c in comps for li, lay in enumerate(layers) if _wanted(pos[c][li])]
        with_logits = "logits" in components
        arrays = [self._array(split, name) for name in TOKEN_ARRAYS]
        arrays += [self.array(layer, c, split) for c, _, layer in reads]
        arrays += [self.logit_array(name, split) for name in LOGIT_ARRAYS] if with_logits else []
        sels = [slice(int(offsets[i]), int(offsets[i]) + int(lengths[i])) for i in indices]

        # concurrent reads; a damaged chunk raises one line naming the array and chunk (pipeline/store/chunk_read.py)
        jobs = [(a, s) for s in sels for a in arrays]
        flat = self.shard_cache.read(self, jobs) if self.shard_cache else read_all(self, jobs)
        scales = self._sample_scales(split, reads, sels)
        out, per = [], len(arrays)
        for j, sel in enumerate(sels):
            got = iter(flat[j * per : (j + 1) * per])  # in `arrays` order: tokens, states, logits
            tokens = {name: next(got) for name in TOKEN_ARRAYS}
            words = {(c, li): next(got) for c, li, _ in reads}  # (T, X, D) each
            states = {c: self._stack(words, c, pos[c], sel.stop - sel.start) for c in comps}  # (L, T, X, D)
            scale = None
            if scales:
                scale = {
                    c: self._stack(scales[j], c, pos[c], sel.stop - sel.start, scale=True) for c in comps
                }
            logits = {name: next(got) for name in LOGIT_ARRAYS} if with_logits else None
            out.append(decode_sample(tokens, self.dtype, states, scale, logits))
        return out

    def positions_of(self, layers: list[int], comp: str, wanted) -> list[np.ndarray | None]:
        """Per layer of `layers` the stored positions of the `wanted` teacher heads of `comp` (one list per
        layer; None: every stored head, as stored). A head the store lacks: one-line KeyError."""
        if wanted is None:
            return [None] * len(layers)
        if len(wanted) != len(layers) or len({len(w) for w in wanted}) > 1:
            raise ValueError(
                f"heads[{comp!r}]: got {[len(w) for w in wanted]} heads for layers {layers}: expected one "
                "equally long list per layer"
            )
        return [
            head_positions(self.attrs, lay, comp, w, f"store '{self.path}'") for lay, w in zip(layers, wanted)
        ]

    def _stack(self, parts: dict, comp: str, pos: list, T: int, scale: bool = False) -> np.ndarray:
        """(L, T, X, D) words (or int8 scales) of one component: each layer's read array gathered at its
        head positions, zeros for a layer asking for no head."""
        layers = []
        for li, p in enumerate(pos):
            if (comp, li) in parts:
                layers.append(take_heads(parts[(comp, li)], p))
            else:  # no head of this layer was asked for: nothing was read
                last = 1 if scale and self.quantization.get(comp) == "token" else self._head_dim()
                dtype = np.float32 if scale else np.dtype(STORAGE_DTYPES[self.dtype])
                layers.append(np.zeros((T, len(p), last), dtype=dtype))
        if len({x.shape for x in layers}) > 1:  # a head-subset store read without `heads`
            raise ValueError(
                f"store '{self.path}' holds {[x.shape[1] for x in layers]} {comp} heads in the layers read (a "
                "head subset, attribute `heads`): pass heads= to read chosen teacher heads"
            )
        return np.stack(layers)

    def _head_dim(self) -> int:
        return int((self.attrs.get("teacher") or {}).get("head_dim") or 0)

    def _sample_scales(self, split: str, reads: list, sels: list[slice]) -> list[dict] | None:
        """int8 stores: per sample, {(component, layer slot): scales broadcastable to its (T, X, D) words}."""
        if self.dtype != "int8" or not reads:
            return None
        pairs = [(c, layer) for c, _, layer in reads]
        for c, layer in pairs:  # outside the event loop: whole small scale arrays are read here once
            self._cached_scales(layer, c, split)
        rows = iter(sync(self._gather_scale_rows(pairs, split, sels)))  # sample-major, then `pairs` order
        ct = self.chunk_tokens
        return [
            {
                (c, li): expand_scales(next(rows), self.quantization[c], s.start, s.stop, ct)
                for c, li, _ in reads
            }
            for s in sels
        ]

    async def _gather_scale_rows(self, scales: list, split: str, sels: list[slice]) -> list:
        return await asyncio.gather(
            *[self._scale_rows(layer, c, split, s) for s in sels for c, layer in scales]
        )

    def logit_array(self, name: str, split: str = "train") -> zarr.Array:
        """The raw zarr array logits/{values|indices} (N, K) of a split (storage dtype)."""
        if not self.has_logits(split):
            raise KeyError(
                f"store '{self.path}' holds no teacher logits for split {split!r}: re-extract with "
                "'logits' in extract.components"
            )
        return self._array(split, f"logits/{name}")

    def read_sample(
        self,
        i: int,
        split: str = "train",
        layers: Sequence[int] | None = None,
        components: Sequence[str] = COMPONENTS,
        heads: dict[str, Sequence[Sequence[int]]] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One sample: input_ids/segment_ids (T,) int64, answer_mask (T,) bool, q (L, H, T, D),
        k/v (L, G, T, D) float32 for `layers` (default: all stored, ascending). The eval split has no states.
        With "logits" in `components`: topk_logprobs (T, K) float32 and topk_indices (T, K) int64.
        """
        return self.read_samples([i], split, layers, components, heads)[0]

    def stored_bytes(self) -> int:
        """Bytes stored under the store root (metadata included)."""
        return self.location.size(skip_metadata=False)

    def __repr__(self) -> str:
        return (
            f"KVStore('{self.path}', samples={self.num_samples()}, tokens={self.num_tokens()}, "
            f"layers={self.layers}, dtype={self.dtype}, complete={self.complete})"
        )


def _wanted(positions: np.ndarray | None) -> bool:
    """Whether a layer's array must be read: every stored head (None), or at least one head asked for."""
    return positions is None or bool((positions >= 0).any())
