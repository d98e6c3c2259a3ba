"""Stage-1 store writing: create the schema (pipeline/store/reader.py), write whole chunks, mark them done.

Shape glossary: N tokens in the packed train split, C = ceil(N / chunk_tokens) write chunks, H query heads,
G KV heads, D head dim, K stored top-k log-probs.

Write chunks are numbered over the whole store: the train split's C chunks first (states, and top-k
logits when stored), then, when the store holds logits for the held-out split, that split's chunks
(logits only: the eval split never has states). A chunk's arrays are keyed (layer, component) for states
and ("logits", "values" | "indices") for logits.

Crash safety (why the pieces are ordered as they are):
- All arrays and the token/sample arrays are created and written before any teacher forward, so every
  rank knows the packed layout and the chunk it owns.
- A write chunk (= one zarr shard of every state array, and with int8 its scales) is written whole, then
  its done-marker object is written (pipeline/store/location.py: atomic on a folder and on object storage).
  A chunk without a marker is recomputed on resume, so a chunk half written when the process was killed is
  never taken as done.
- `complete` is set in the group attributes only after every marker exists; the progress prefix is then
  removed so the finished store is a plain zarr hierarchy.
Zarr's LocalStore itself writes every object atomically, so a killed write leaves the old object or none;
an object-store PUT is atomic too. The store may be a folder or a URL (s3://...; `storage_options`).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.store.codecs import logit_codecs, make_compressors, quiet_codecs
from pipeline.store.location import StoreLocation
from pipeline.store.packed_split import PackedSplit
from pipeline.store.schema import (
    LOGIT_ARRAYS,
    PROGRESS_DIR,
    SAMPLE_ARRAYS,
    SCHEMA_VERSION,
    STORAGE_DTYPES,
    TEXT_ARRAYS,
    TOKEN_ARRAYS,
    held_heads,
    scale_key,
)


class StoreWriter:
    """Writes a kvmap store chunk by chunk (one instance per process; ranks write disjoint chunks).

    Example:
        w = StoreWriter.create(path, attrs=attrs, train=packed, eval=None, state_shapes={"q": (9, 64), ...},
                               layers=[0, 9], chunk_tokens=4096, inner_chunk_tokens=256)
        for c in w.todo_chunks(): w.write_chunk(c, {(0, "q"): array_T_H_D, ...}, stats={})
        w.mark_complete(summary)
    """

    def __init__(self, path: str | Path | StoreLocation, storage_options: dict | None = None):
        self.path = self.location = StoreLocation(path, storage_options)
        self.group = self.location.open_group("r+")
        self.attrs = dict(self.group.attrs)
        self.quantization = dict(self.attrs.get("quantization") or {})  # int8: scale scheme per component
        self.chunk_tokens = int(self.attrs["chunk_tokens"])
        self.layers = list(self.attrs["layers"])
        self.components = list(self.attrs["components"])
        self.logit_splits = list((self.attrs.get("logits") or {}).get("splits", []))
        self.num_tokens = int(self.group["train/input_ids"].shape[0])
        # (split, start, end) of every write chunk, train first (see the module docstring)
        self.units = self._chunk_units("train")
        self.num_train_chunks = len(self.units)
        if "eval" in self.logit_splits:
            self.units += self._chunk_units("eval")
        self.num_chunks = len(self.units)
        self._arrays: dict[tuple[str, tuple], zarr.Array] = {}
        # Open every array now, in the calling thread: writer threads then only look them up
        # (warnings.catch_warnings in `quiet_codecs` is not thread-safe).
        for split in ("train", "eval"):
            for key in self.chunk_keys(split):
                self._array(key, split)

    def held_heads(self) -> dict[tuple, list[int]] | None:
        """{(layer, comp): the teacher heads its array holds} for a head-subset store; None when every head is
        stored (no `heads` record)."""
        if not self.attrs.get("heads"):
            return None
        return {(lay, c): held_heads(self.attrs, lay, c, 0) for lay in self.layers for c in self.components}

    def _chunk_units(self, split: str) -> list[tuple[str, int, int]]:
        n = int(self.group[f"{split}/input_ids"].shape[0])
        return [(split, a, min(a + self.chunk_tokens, n)) for a in range(0, n, self.chunk_tokens)]

    def chunk_keys(self, split: str) -> list[tuple]:
        """The array keys every chunk of `split` must write: (layer, comp) states, ("logits", name)."""
        keys = (
            [(layer, comp) for layer in self.layers for comp in self.components] if split == "train" else []
        )
        if split == "train" and self.quantization:  # int8: each state array's scales
            keys += [(layer, scale_key(comp)) for layer in self.layers for comp in self.components]
        if split in self.logit_splits:
            keys += [("logits", name) for name in LOGIT_ARRAYS]
        return keys

    def _array(self, key: tuple, split: str = "train") -> zarr.Array:
        if (split, key) not in self._arrays:
            name = f"logits/{key[1]}" if key[0] == "logits" else f"layers/{key[0]}/{key[1]}"
            with quiet_codecs():
                self._arrays[(split, key)] = self.group[f"{split}/{name}"]
        return self._arrays[(split, key)]

    @classmethod
    def create(
        cls,
        path: str | Path | StoreLocation,
        *,
        attrs: dict,
        train: PackedSplit,
        eval: PackedSplit | None,
        state_shapes: dict[str, tuple[int, int]],
        chunk_tokens: int,
        inner_chunk_tokens: int,
    ) -> StoreWriter:
        """Create the store: every array (states empty), token/sample arrays filled, attrs incomplete.

        Args:
            attrs: group attributes (must hold layers, components, dtype, codec, compression_level; and
                logits {top_k, dtype, index_dtype, splits} when top-k log-probs are stored).
            state_shapes: per component the (heads, head_dim) of one token, e.g. {"q": (H, D), "k": (G, D)};
                with a `heads` record in attrs each layer's array holds only its held heads (schema `held_heads`).
        """
        if chunk_tokens < 1 or inner_chunk_tokens < 1 or chunk_tokens % inner_chunk_tokens:
            raise ValueError(
                f"extract.chunk_tokens={chunk_tokens}, extract.inner_chunk_tokens={inner_chunk_tokens}: "
                "expected positive ints with chunk_tokens a multiple of inner_chunk_tokens"
            )
        if train.num_tokens == 0:
            raise ValueError("train split has 0 tokens: no sample was kept")
        loc = StoreLocation(path)
        group = loc.open_group("w-", zarr_format=3)
        # Mark the folder as a kvmap store at once (so a creation killed midway can be overwritten), but
        # without `config_fingerprint`: extract treats such a store as never started and recreates it.
        group.attrs.update({"schema_version": SCHEMA_VERSION, "complete": False})
        full = {
            **attrs,
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "chunk_tokens": chunk_tokens,
            "inner_chunk_tokens": inner_chunk_tokens,
            "storage_dtype": STORAGE_DTYPES[attrs["dtype"]],
        }
        logits = attrs.get("logits") or {}
        for split, packed in (("train", train), ("eval", eval)):
            if packed is None:
                continue
            g = group.create_group(split)
            cls._create_token_arrays(g, packed)
            if split in logits.get("splits", []):
                cls._create_logit_arrays(
                    g, packed.num_tokens, logits, attrs, chunk_tokens, inner_chunk_tokens
                )
            if split == "train":  # only the train split holds teacher states
                cls._create_state_arrays(g, packed.num_tokens, full, state_shapes)
        group.attrs.update(full)  # last: from here on the store can be resumed
        return cls(loc)

    @staticmethod
    def _create_token_arrays(g, packed: PackedSplit, block: int = 1 << 20) -> None:
        """The per-token (N,) and per-sample arrays of a split, filled from its packed layout `block` entries at
        a time (its token arrays may be staged on disk: pipeline/data/split_shards.py)."""
        for name, dt in {**TOKEN_ARRAYS, **SAMPLE_ARRAYS}.items():
            data = getattr(packed, name)
            n = max(len(data), 1)
            a = g.create_array(name, shape=(len(data),), dtype=dt, chunks=(min(n, 1 << 16),), fill_value=0)
            for i in range(0, len(data), block):
                a[i : i + block] = np.asarray(data[i : i + block]).astype(dt)
        if packed.texts is not None:  # what cross-tokenizer arms re-tokenise and align on
            texts, spans = packed.texts, packed.char_spans
            t = g.create_array(
                "texts", shape=(len(texts),), dtype=str, chunks=(max(min(len(texts), 1024), 1),)
            )
            for i in range(0, len(texts), block):
                t[i : i + block] = np.array(list(texts[i : i + block]), dtype=object)
            chunks = (min(max(len(spans), 1), 1 << 16), 2)
            c = g.create_array(
                "char_spans", shape=(len(spans), 2), dtype=TEXT_ARRAYS["char_spans"], chunks=chunks
            )
            for i in range(0, len(spans), block):
                c[i : i + block] = spans[i : i + block]

    @classmethod
    def _create_state_arrays(cls, g, n: int, attrs: dict, state_shapes: dict[str, tuple[int, int]]) -> None:
        """layers/{layer}/{comp} (N, X, D) in the storage dtype, one shard per write chunk, left empty; with
        int8 each one's scales too. `attrs` are the store's full attributes (chunking, storage dtype)."""
        chunk_tokens, inner = attrs["chunk_tokens"], attrs["inner_chunk_tokens"]
        storage = attrs["storage_dtype"]
        compressors = make_compressors(attrs["codec"], attrs["compression_level"], np.dtype(storage).itemsize)
        for layer in attrs["layers"]:
            for comp in attrs["components"]:
                total, dim = state_shapes[comp]
                heads = len(held_heads(attrs, layer, comp, total))
                with quiet_codecs():
                    g.create_array(
                        f"layers/{layer}/{comp}",
                        shape=(n, heads, dim),
                        dtype=storage,
                        chunks=(inner, heads, dim),
                        shards=(chunk_tokens, heads, dim),
                        compressors=compressors,
                        fill_value=0,
                    )
                scheme = (attrs.get("quantization") or {}).get(comp)
                if scheme is not None:
                    name = f"layers/{layer}/{scale_key(comp)}"
                    cls._create_scale_array(g, name, scheme, n, (heads, dim), attrs, chunk_tokens, inner)

    @staticmethod
    def _create_scale_array(g, name, scheme, n, shape, attrs, chunk_tokens: int, inner: int) -> None:
        """int8 scales (pipeline/store/int8.py): "channel" (C, X, D), one zarr chunk per write chunk;
        "token" (N, X), sharded like the states."""
        heads, dim = shape
        comp = make_compressors(attrs["codec"], attrs["compression_level"], 4)
        if scheme == "channel":
            c = -(-n // chunk_tokens)
            kw = dict(shape=(c, heads, dim), chunks=(1, heads, dim))
        else:
            kw = dict(shape=(n, heads), chunks=(inner, heads), shards=(chunk_tokens, heads))
        g.create_array(name, dtype="float32", compressors=comp, fill_value=0, **kw)

    @staticmethod
    def _create_logit_arrays(g, n: int, logits: dict, attrs: dict, chunk_tokens: int, inner: int) -> None:
        """logits/values (N, K) float16 words and logits/indices (N, K), sharded like the states."""
        k = int(logits["top_k"])
        codecs = logit_codecs(attrs["compression_level"]) if attrs["codec"] != "none" else {}
        for name, dt in (("values", "uint16"), ("indices", logits["index_dtype"])):
            kw = codecs.get(name, {"filters": [], "compressors": []})
            with quiet_codecs():
                g.create_array(
                    f"logits/{name}",
                    shape=(n, k),
                    dtype=dt,
                    chunks=(inner, k),
                    shards=(chunk_tokens, k),
                    fill_value=0,
                    **kw,
                )

    def chunk_range(self, c: int) -> tuple[int, int]:
        """Packed token range [start, end) of write chunk c, on the axis of its split (`chunk_split`)."""
        _, start, end = self.units[c]
        return start, end

    def chunk_split(self, c: int) -> str:
        """ "train" or "eval": the split write chunk c belongs to."""
        return self.units[c][0]

    def _marker(self, c: int) -> str:
        """The key of chunk c's done-marker (relative to the store root)."""
        return f"{PROGRESS_DIR}/chunk_{c:07d}.json"

    def done_chunks(self) -> dict[int, dict]:
        """Finished chunks -> the stats recorded with them (all chunks once the store is complete)."""
        if self.attrs.get("complete"):
            return {c: {} for c in range(self.num_chunks)}
        done = {}
        for key in self.location.list(PROGRESS_DIR):
            name = key.rsplit("/", 1)[-1]
            if name.startswith("chunk_") and name.endswith(".json"):  # not a LocalStore temporary file
                done[int(name[len("chunk_") : -len(".json")])] = self.location.read_json(key)
        return done

    def todo_chunks(self) -> list[int]:
        """Write chunks without a done-marker (to compute), in order."""
        done = self.done_chunks()
        return [c for c in range(self.num_chunks) if c not in done]

    def write_chunk(self, c: int, states: dict[tuple, np.ndarray], stats: dict) -> None:
        """Write chunk c of every array of its split (`chunk_keys`), then its done-marker (with `stats`).

        Shapes: states[(layer, comp)] is (end - start, H|G, D) in the storage dtype;
        states[("logits", "values" | "indices")] is (end - start, K).
        """
        start, end = self.chunk_range(c)
        split = self.chunk_split(c)
        expected = set(self.chunk_keys(split))
        if set(states) != expected:
            raise ValueError(f"chunk {c}: got arrays for {sorted(states)}, expected {sorted(expected)}")
        items = []
        for key, data in states.items():
            arr = self._array(key, split)
            region = self._region(key, c, start, end)
            if data.shape != (region.stop - region.start, *arr.shape[1:]) or data.dtype != arr.dtype:
                what = f"{split} logits/{key[1]}" if key[0] == "logits" else f"layer {key[0]} {key[1]}"
                raise ValueError(
                    f"chunk {c} {what}: got {data.shape} {data.dtype}, "
                    f"expected {(region.stop - region.start, *arr.shape[1:])} {arr.dtype}"
                )
            items.append((arr, data, region))
        self._set_all(items, start, end)
        self.location.write_json(self._marker(c), stats)

    def _region(self, key: tuple, c: int, start: int, end: int) -> slice:
        """Rows of array `key` that chunk c writes: its tokens, or its own row of per-chunk int8 scales."""
        comp = key[1][: -len("_scale")] if key[0] != "logits" and key[1].endswith("_scale") else None
        if comp is not None and self.quantization.get(comp) == "channel":
            return slice(c, c + 1)  # train chunks come first, so c is the train chunk index
        return slice(start, end)

    @staticmethod
    def _set_all(items, start: int, end: int) -> None:
        async def put():
            await asyncio.gather(*[arr.async_array.setitem(region, d) for arr, d, region in items])

        sync(put())

    def mark_complete(self, summary: dict) -> None:
        """Set `complete` (after checking every chunk's marker) and drop the progress folder."""
        missing = self.todo_chunks()
        if missing:
            raise RuntimeError(f"store '{self.path}': chunks {missing[:5]} not written; cannot mark complete")
        self.group.attrs.update({"summary": summary, "complete": True})
        self.attrs = dict(self.group.attrs)
        self.location.delete(PROGRESS_DIR)


class AsyncChunkWriter:
    """Overlaps compression + IO with the teacher forward: `submit` hands a chunk to writer threads.

    At most `max_pending` chunks are queued or being written (bounded memory); `submit` blocks beyond
    that. A writer error is re-raised by the next `submit` or by `close`.
    """

    def __init__(self, writer: StoreWriter, threads: int = 2, max_pending: int = 2):
        if threads < 1 or max_pending < 1:
            raise ValueError(f"writer_threads={threads}, max_pending={max_pending}: expected >= 1")
        self.writer = writer
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvmap-writer")
        self._slots = threading.Semaphore(max_pending)
        self._futures: list[Future] = []
        self.bytes_written = 0

    def _raise_errors(self) -> None:
        for f in [f for f in self._futures if f.done()]:
            self._futures.remove(f)
            f.result()

    def submit(self, c: int, states: dict[tuple[int, str], np.ndarray], stats: dict) -> None:
        """Queue chunk `c` for the writer threads; blocks while `max_pending` chunks are in flight."""
        self._raise_errors()
        self._slots.acquire()
        fut = self._pool.submit(self.writer.write_chunk, c, states, stats)
        fut.add_done_callback(lambda _: self._slots.release())
        self._futures.append(fut)
        self.bytes_written += sum(a.nbytes for a in states.values())

    def close(self, raise_errors: bool = True) -> None:
        """Wait for every pending chunk; re-raise the first writer error (if `raise_errors`)."""
        try:
            for f in self._futures:
                if raise_errors:
                    f.result()
                else:
                    f.exception()
        finally:
            self._futures.clear()
            self._pool.shutdown(wait=True)
