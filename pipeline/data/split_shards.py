"""Stage 1's tokenisation split over the launch's processes, kept out of RAM: each process tokenises one
contiguous block of the rows and appends its packed share to a staging Zarr group beside the store; the
processes exchange only the samples' lengths and source rows, and every process reads the split's tokens
back per range (`StagedArray`). No process holds the split's tokens.

Shapes: N tokens of the split, S samples (pipeline/store/packed_split.py).

Why blocks of rows, not every W-th row: a block's kept samples are one run of the packed token axis, so the
split's token arrays are the shares' arrays end to end, and any token range is read from one or two shares.
The packed layout (offsets of all samples, source-row order) is the one a single process makes: the store,
its dataset counts and its fingerprint are the same for any process count.

Memory per process: the per-sample arrays (offsets, lengths, rows: 20 bytes per sample) and one block of
samples while it tokenises. The tokens (6 bytes per token; + 8 of character spans and the texts with
`extract.texts`) live in `{extract.store}.staging/{split}/{rank}` (uncompressed), which `remove_staging`
deletes when the extraction ends (a killed run's staging is rewritten by the next). Every process reads the
rows before its block without tokenising them only where the dataset streams (no random access).

A bad row under `data.on_bad_row: error` stops the process that reads it; the others learn of it at the
exchange, and every process raises the error of the lowest failing row, the one a single process would
have met first.
"""

from __future__ import annotations

from array import array
from typing import Any

import numpy as np
import torch.distributed as dist

from pipeline.config.kvmap import DataConfig
from pipeline.data.samples import count_rows, iter_rows, new_counts
from pipeline.store.location import StoreLocation
from pipeline.store.packed_split import TOKEN_DTYPES, PackedSplit, StagedArray, StagedTexts

BLOCK_SAMPLES = 1024  # samples packed together before they are appended to the staging arrays
STAGE_CHUNK = 1 << 14  # tokens (or samples, for texts) per chunk of the staging arrays: one batch's read


def staging_location(
    store: str | StoreLocation, split: str, rank: int, storage_options=None
) -> StoreLocation:
    """Where process `rank` stages its share of `split` for the store `store`."""
    base = StoreLocation(store, storage_options)
    return StoreLocation(f"{base.url}.staging/{split}/{rank}", base.storage_options or None)


def remove_staging(store: str | StoreLocation, storage_options=None) -> None:
    """Delete the staging folder of `store` (every split and process), if any."""
    base = StoreLocation(store, storage_options)
    staging = StoreLocation(f"{base.url}.staging", base.storage_options or None)
    if staging.remote or staging.local_path().exists():
        staging.delete()


class _ShareWriter:
    """One process's packed samples, appended block by block to its staging group."""

    def __init__(self, loc: StoreLocation):
        if loc.remote or loc.local_path().exists():  # a killed run's share: rewritten whole
            loc.delete()
        self.group = loc.open_group("w-", zarr_format=3)
        self.arrays: dict[str, Any] = {}

    def _array(self, name: str, like: np.ndarray):
        if name not in self.arrays:
            self.arrays[name] = self.group.create_array(
                name,
                shape=(0, *like.shape[1:]),
                dtype=like.dtype,
                chunks=(STAGE_CHUNK, *like.shape[1:]),
                compressors=None,
            )
        return self.arrays[name]

    def append(self, block: PackedSplit) -> None:
        for name in TOKEN_DTYPES:
            data = getattr(block, name)
            self._array(name, data).append(data)
        if block.texts is not None:  # texts as UTF-8 bytes + byte lengths (StagedTexts says why)
            self._array("char_spans", block.char_spans).append(block.char_spans)
            encoded = [t.encode() for t in block.texts]
            data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
            self._array("text_bytes", data).append(data)
            lengths = np.array([len(e) for e in encoded], dtype=np.int64)
            self._array("text_lengths", lengths).append(lengths)


def _blocks(items, size: int):
    """Lists of up to `size` items."""
    block = []
    for item in items:
        block.append(item)
        if len(block) == size:
            yield block
            block = []
    if block:
        yield block


def _stage(items, loc: StoreLocation, texts: bool) -> dict:
    """Pack (row, sample) pairs block by block into the staging group; the share's per-sample record."""
    writer = _ShareWriter(loc)
    lengths, rows = array("q"), array("q")
    with_texts = texts
    for block in _blocks(items, BLOCK_SAMPLES):
        if not texts:
            block = [(r, {k: v for k, v in s.items() if k not in ("text", "char_spans")}) for r, s in block]
        packed = PackedSplit.from_stream(block)
        with_texts = with_texts and packed.texts is not None
        writer.append(packed)
        lengths.extend(packed.lengths.tolist())
        rows.extend(packed.rows.tolist())
    return {
        "lengths": np.asarray(lengths, dtype=np.int32),
        "rows": np.asarray(rows, dtype=np.int64),
        "texts": with_texts,
    }


def _my_share(
    data_cfg: DataConfig,
    split: str,
    tokenizer,
    rank: int,
    world: int,
    loc: StoreLocation,
    texts: bool = True,
    n_rows: int | None = None,
) -> tuple:
    """(share record, counts, None) or (None, failing row, the exception); the share's tokens go to `loc`."""
    n_rows = count_rows(data_cfg, split) if n_rows is None else n_rows
    lo, hi = n_rows * rank // world, n_rows * (rank + 1) // world
    counts = new_counts()
    try:
        share = _stage(iter_rows(data_cfg, split, tokenizer, counts, lo, hi), loc, texts)
    except Exception as e:  # re-raised on every process after the exchange
        # tokenize_sample counts a row before it can fail, so this share's failing row is its last counted
        return None, lo + counts["rows"] - 1, e
    return share, counts, None


def add_counts(parts: list[dict]) -> dict[str, Any]:
    """The counts of the shares added up (ints summed, per-key counters merged key by key, zero counts kept:
    the trained-tokens check names a segment with 0 tokens; the format is row 0's)."""
    out: dict[str, Any] = {}
    for counts in parts:
        for key, v in counts.items():
            if isinstance(v, dict):
                merged = out.setdefault(key, {})
                for name, n in v.items():
                    merged[name] = merged.get(name, 0) + n
            elif key == "format":
                out[key] = out.get(key) or v
            else:
                out[key] = out.get(key, 0) + v
    return out


def staged_split(shares: list[dict], locs: list[StoreLocation]) -> PackedSplit:
    """The split whose token arrays are the staged shares end to end (read per range; rank order = row
    order) and whose per-sample arrays are in RAM."""
    groups = [loc.open_group("r") for loc in locs]
    present = [g for g, s in zip(groups, shares, strict=True) if len(s["lengths"])]

    def joined(name: str, dtype) -> StagedArray:
        return StagedArray([g[name] for g in present], dtype=dtype)

    tokens = {k: joined(k, dt) for k, dt in TOKEN_DTYPES.items()}
    with_texts = bool(present) and all(s["texts"] for s in shares if len(s["lengths"]))
    texts = None
    if with_texts:
        lengths = np.concatenate([g["text_lengths"][:] for g in present])
        texts = StagedTexts(joined("text_bytes", np.uint8), lengths)
    return PackedSplit.from_arrays(
        tokens,
        np.concatenate([s["lengths"] for s in shares]),
        np.concatenate([s["rows"] for s in shares]),
        texts=texts,
        char_spans=joined("char_spans", np.int32) if with_texts else None,
    )


def tokenize_packed(
    data_cfg: DataConfig,
    split: str,
    tokenizer,
    store: str | StoreLocation,
    rank: int = 0,
    world: int = 1,
    texts: bool = True,
    storage_options: dict | None = None,
):
    """Tokenise and pack a split with `world` processes (this one is `rank`); every process must call it.
    Each stages its block of rows beside `store` (`staging_location`); `texts`: keep each sample's rendered
    text and char spans (`extract.texts`).

    Returns:
        (packed, counts): the whole split packed in source-row order (pipeline/store/packed_split.py), its
        token arrays read from the staging groups, and the counts of `pipeline.data.samples.new_counts()`
        with "format", as `tokenize_split` + `from_samples` give with one process.
    """
    locs = [staging_location(store, split, r, storage_options) for r in range(world)]
    mine = _my_share(data_cfg, split, tokenizer, rank, world, locs[rank], texts)
    shares = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    failed = [(row, e) for _, row, e in shares if e is not None]
    if failed:
        raise min(failed, key=lambda f: f[0])[1]
    packed = staged_split([s for s, _, _ in shares], locs)
    return packed, add_counts([c for _, c, _ in shares])
