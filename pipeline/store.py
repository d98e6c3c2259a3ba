"""The kvmap teacher-state store: a Zarr v3 group with a packed, token-major layout (schema v2).

Shape glossary: N tokens in a split (all samples packed end to end, no padding), S samples, L stored
teacher layers, H query heads, G KV heads, D head dim, T tokens of one sample, K stored top-k log-probs.

Schema (schema_version 2; version 1 = the same without `logits/`, read as "no logits")::

    STORE.zarr/                       Zarr v3 group; attributes below
      train/
        input_ids     (N,) int32      token ids of all kept samples, packed in sample order
        segment_ids   (N,) int8       P=0 prompt, R=1 reasoning, A=2 answer (padding is never stored)
        answer_mask   (N,) uint8      1 on answer-bearing tokens (the answer string inside R and A)
        offsets       (S,) int64      first token of sample i on the packed axis
        lengths       (S,) int32      tokens of sample i (sample i = [offsets[i], offsets[i] + lengths[i]))
        rows          (S,) int64      row index of sample i in the source dataset (skipped rows are absent)
        layers/{l}/q  (N, H, D)       teacher layer l (0-based), post-RoPE queries
        layers/{l}/k  (N, G, D)       post-RoPE keys, KV heads before any GQA repeat
        layers/{l}/v  (N, G, D)       values, KV heads before any GQA repeat
        layers/{l}/{q,k,v}_scale      only with dtype "int8": float32 scales (pipeline/quantize.py), per the
                                      `quantization` attribute: "channel" (C, X, D), one row per write
                                      chunk (C = ceil(N / chunk_tokens)); "token" (N, X)
        logits/values (N, K) uint16   only with `logits` in extract.components: the teacher's log-softmax
                                      (fp32, temperature 1) at position t (its prediction of token t + 1),
                                      reduced to its top K, sorted descending, as float16 words (see below)
        logits/indices (N, K)         the token ids of those K log-probs (uint16 when the vocabulary fits,
                                      else uint32)
      eval/                           the held-out split: input_ids, segment_ids, answer_mask, offsets,
                                      lengths, rows, and logits/ when stored (never layers: no states);
                                      absent when the config has no eval data
      _kvmap_progress/                only while incomplete: one JSON done-marker per finished write chunk

    STORE may be a folder or a URL (s3://bucket/prefix/name.zarr, memory://...; pipeline/store_location.py):
    the same objects under the same keys, through zarr's LocalStore or FsspecStore.
    dtype "bfloat16": states are stored as the raw 16-bit words (zarr dtype uint16; numpy and zarr have no
    bfloat16) and viewed back on read; dtype "float16": stored as float16 (overflow is an extraction error);
    dtype "int8": symmetric int8 words x float32 scales (`quantization` {q, k, v: "channel"}: per (write
    chunk, head, channel); "token" = per (token, head) also reads; a chunk's scales come from its own tokens,
    so it is self-contained), dequantised to float32 by every reader (`read_samples`, `read_states`,
    trainer/preload.py, `decode_states` with the scales).
    State arrays are sharded: one shard = `chunk_tokens` tokens (the unit of writing, resuming and rank
    ownership), holding inner chunks of `inner_chunk_tokens` tokens (the unit of random-access reads).
    Codec "blosc-zstd" (default since issue 16; Zarr v3 spec BloscCodec: zstd + byte shuffle, 1 MiB blocks)
    and "zstd-shuffle" (the default before: numcodecs' Shuffle + Zstd, outside the v3 spec) both give 1.36x
    on the default teacher's bf16 states (8 of SmolLM2's 30 layers); a store's arrays carry their own codec
    metadata, so stores written with either read alike. Zarr pads the array's last inner chunk to
    full size with zeros (at most inner_chunk_tokens - 1 tokens per array; compressed to almost nothing);
    nothing else beyond the real tokens is stored. Token arrays use plain chunks of 65536 entries.
    Reading sample i touches only the inner chunks overlapping [offsets[i], offsets[i] + lengths[i]).
    Top-k log-probs: float16 (not bf16: 8x finer steps where it matters, log-probs are bounded) viewed as
    uint16 words, a lossless Delta filter on the words (sorted descending negative halves have increasing
    bit patterns, so neighbours differ by small integers; numcodecs, outside the v3 spec: without it the
    ratio falls to 1.8-2.0x) + blosc-zstd (byte shuffle; before: Shuffle + Zstd): 79 B/token at K = 128 on
    the default teacher (3.2x); the indices are close to random (zstd: 1.14x). Sharded like the states.

Group attributes: schema_version, complete (true only once every chunk is written), teacher {path,
model_type, config_hash, num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size, rope,
dtype}, layers (stored teacher layers, ascending), components, tokenizer {name, vocab_size, hash}, dtype,
quantization (int8 only: the scale scheme per component), storage_dtype, codec, compression_level, chunk_tokens, inner_chunk_tokens, segments {P, R, A}, logits
({top_k, dtype, index_dtype, splits}: only when stored), dataset
{train|eval: {source, rows, kept, skipped, bad_rows, dropped_too_long, truncated}}, config_fingerprint (of
teacher, tokens, layers and extraction settings; a re-run with another config is refused), and, once
complete, summary (samples, tokens, forward_tokens, stored/raw bytes, compression ratio, bytes per token,
wall/loop seconds, teacher_acc_R/A/all). `KVStore.fingerprint` hashes every attribute but `complete` and
`summary`: equal fingerprints = the same extraction (teacher, data, layers, settings).

Example:
    store = KVStore("stores/default.zarr", require_complete=True)
    s = store.read_sample(0)  # s["k"]: (L, G, T, D) float32
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.core.sync import sync

from pipeline.packed_split import PackedSplit  # noqa: F401 (re-exported: stage 1 and tests import it here)
from pipeline.quantize import expand_scales, scale_key, scale_rows
from pipeline.store_codecs import BLOSC_BLOCKSIZE, CODECS, make_compressors, quiet_codecs  # noqa: F401 (re-exported)
from pipeline.store_location import StoreLocation
from pipeline.store_logits import LOGIT_ARRAYS, decode_logprobs
from pipeline.store_read import read_all

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # v1 stores predate logits: they read as stores without logits
SPLITS = ("train", "eval")
COMPONENTS = ("q", "k", "v")
TOKEN_ARRAYS = {"input_ids": "int32", "segment_ids": "int8", "answer_mask": "uint8"}
SAMPLE_ARRAYS = {"offsets": "int64", "lengths": "int32", "rows": "int64"}
PROGRESS_DIR = "_kvmap_progress"
# Attributes that change between otherwise identical stores (timings) are left out of the fingerprint.
VOLATILE_ATTRS = ("complete", "summary")
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "int8": "int8"}
FP16_MAX = 65504.0
SCALE_CACHE_BYTES = 64 << 20  # per-chunk int8 scale arrays up to this size are read once and kept


def fingerprint_of(attrs: dict) -> str:
    """Stable short hash of store attributes (volatile keys such as `complete` and `summary` excluded)."""
    stable = {k: v for k, v in attrs.items() if k not in VOLATILE_ATTRS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_states(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Float tensor -> numpy array of the storage dtype (bf16 as uint16 words). Callers check range first."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.uint16).cpu().numpy()
    if dtype == "float16":
        return x.to(torch.float16).cpu().numpy()
    raise ValueError(f"dtype={dtype!r}: expected 'bfloat16' or 'float16'")


def decode_states(a: np.ndarray, dtype: str, scale: np.ndarray | None = None) -> torch.Tensor:
    """Numpy array of the storage dtype -> float32 torch tensor (exact for 16-bit words; int8 words are
    dequantised: `scale` broadcasts against `a`, see pipeline/quantize.py `expand_scales`)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if dtype == "bfloat16":
        return t.view(torch.bfloat16).float()
    if dtype == "int8":
        if scale is None:
            raise ValueError("decode_states: int8 states need their scales")
        return t.float() * torch.from_numpy(np.ascontiguousarray(scale))
    return t.float()


class KVStore:
    """Reader for a kvmap store (see the module docstring for the schema).

    Args:
        path: the store folder (`*.zarr`), a URL (`s3://bucket/prefix/name.zarr`) or a StoreLocation.
        require_complete: raise if the store is not marked complete (an interrupted extraction).
        storage_options: fsspec options for a URL (pipeline/store_location.py; credentials from the env).
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
        # int8 stores: the scale scheme of each component (pipeline/quantize.py)
        self.quantization: dict[str, str] = dict(self.attrs.get("quantization") or {})
        self.chunk_tokens = int(self.attrs.get("chunk_tokens", 1))
        self._sample_cache: dict[tuple[str, str], np.ndarray] = {}
        self._scale_cache: dict[tuple[str, int, str], np.ndarray | None] = {}
        self._arrays: dict[tuple[str, str], zarr.Array] = {}
        self.shard_cache = None  # a ShardCache: read_samples reads whole shards (pipeline/shard_cache.py)

    @property
    def logits(self) -> dict | None:
        """{top_k, dtype, index_dtype, splits} when the store holds the teacher's top-k log-probs, else None."""
        rec = self.attrs.get("logits")
        return dict(rec) if rec else None

    def has_logits(self, split: str = "train") -> bool:
        return self.logits is not None and split in self.logits.get("splits", [])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete", False))

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.attrs)

    @property
    def splits(self) -> list[str]:
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

    def num_samples(self, split: str = "train") -> int:
        return int(self._array(split, "lengths").shape[0])

    def num_tokens(self, split: str = "train") -> int:
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
        return self._array(split, f"layers/{layer}/{component}")

    def scale_array(self, layer: int, component: str, split: str = "train") -> zarr.Array:
        """int8 stores: the scales of one layer / component ((C, X, D) or (N, X) float32, pipeline/quantize.py)."""
        self.array(layer, component, split)  # same checks
        return self._array(split, f"layers/{layer}/{scale_key(component)}")

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
        """The scale rows tokens `sel` need (see pipeline/quantize.py `scale_rows`), cached when small."""
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
    ) -> list[dict[str, torch.Tensor]]:
        """Read several samples with all zarr reads issued concurrently (the trainer's batch loader).

        `components` may include "logits" (the teacher's top-k log-probs; the store must hold them for
        `split`). Returns one dict per index, as `read_sample`.
        """
        offsets, lengths = self.offsets(split), self.lengths(split)
        n = len(lengths)
        for i in indices:
            if not -n <= int(i) < n:
                raise IndexError(f"sample index {i}: split {split!r} has {n} samples")
        layers = self.layers if layers is None else [int(x) for x in layers]
        comps = [c for c in components if c in COMPONENTS] if "layers" in self._split(split) else []
        token_arrays = [self._array(split, name) for name in TOKEN_ARRAYS]
        state_arrays = [self.array(layer, c, split) for c in comps for layer in layers]
        if "logits" in components:
            state_arrays += [self.logit_array(name, split) for name in LOGIT_ARRAYS]
        int8 = self.dtype == "int8"
        scales = [(c, layer) for c in comps for layer in layers] if int8 else []
        for c, layer in scales:  # outside the event loop: whole small scale arrays are read here once
            self._cached_scales(layer, c, split)
        sels = [slice(int(offsets[i]), int(offsets[i]) + int(lengths[i])) for i in indices]
        ct = self.chunk_tokens

        # concurrent reads; a damaged chunk raises one line naming the array and chunk (pipeline/store_read.py)
        jobs = [(a, s) for s in sels for a in token_arrays + state_arrays]
        flat = self.shard_cache.read(self, jobs) if self.shard_cache else read_all(self, jobs)
        per = len(token_arrays) + len(state_arrays)
        k = len(scales)  # int8: each sample's scale rows (small, mostly cached), in `scales` order
        scale_rows = sync(self._gather_scale_rows(scales, split, sels)) if k else []
        out = []
        for j, sel in enumerate(sels):
            got = flat[j * per : (j + 1) * per]
            s = {
                "input_ids": torch.from_numpy(got[0].astype(np.int64)),  # (T,)
                "segment_ids": torch.from_numpy(got[1].astype(np.int64)),  # (T,)
                "answer_mask": torch.from_numpy(got[2].astype(bool)),  # (T,)
            }
            first_scale = len(token_arrays) + len(state_arrays)
            for ci, c in enumerate(comps):
                parts = got[3 + ci * len(layers) : 3 + (ci + 1) * len(layers)]
                scale = None
                if int8:
                    rows = scale_rows[j * k + ci * len(layers) : j * k + (ci + 1) * len(layers)]
                    scheme = self.quantization[c]
                    scale = np.stack([expand_scales(r, scheme, sel.start, sel.stop, ct) for r in rows])
                x = decode_states(np.stack(parts), self.dtype, scale)  # (L, T, H|G, D)
                s[c] = x.permute(0, 2, 1, 3).contiguous()  # (L, H|G, T, D)
            if "logits" in components:
                s["topk_logprobs"] = decode_logprobs(got[first_scale - 2])  # (T, K) float32
                s["topk_indices"] = torch.from_numpy(got[first_scale - 1].astype(np.int64))  # (T, K)
            out.append(s)
        return out

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
    ) -> dict[str, torch.Tensor]:
        """One sample: input_ids/segment_ids (T,) int64, answer_mask (T,) bool, q (L, H, T, D),
        k/v (L, G, T, D) float32 for `layers` (default: all stored, ascending). The eval split has no states.
        With "logits" in `components`: topk_logprobs (T, K) float32 and topk_indices (T, K) int64.
        """
        return self.read_samples([i], split, layers, components)[0]

    def stored_bytes(self) -> int:
        """Bytes stored under the store root (metadata included)."""
        return self.location.size(skip_metadata=False)

    def __repr__(self) -> str:
        return (
            f"KVStore('{self.path}', samples={self.num_samples()}, tokens={self.num_tokens()}, "
            f"layers={self.layers}, dtype={self.dtype}, complete={self.complete})"
        )


def __getattr__(name: str):
    # StoreWriter lives in pipeline/writer.py (stage 1 only); imported lazily to avoid an import cycle.
    if name == "StoreWriter":
        from pipeline.writer import StoreWriter

        return StoreWriter
    raise AttributeError(f"module 'pipeline.store' has no attribute {name!r}")
