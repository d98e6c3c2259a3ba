"""Stage 1's tokenisation split over the launch's processes: each tokenises its share of the rows, the packed
shares are exchanged, and every process ends with the one packed split a single process would make.

Shapes: N tokens of the split, S samples (pipeline/store/packed_split.py).

Why each process still holds the whole packed split: a write chunk's owner forwards every sample
overlapping it, and the chunks are cut from the packed token axis, so every process needs the offsets of all
samples and the tokens of its chunks. What no longer happens is every process tokenising every row (W times
the CPU) and keeping a dict of int64 tensors per sample: a process keeps 6 bytes per token and 16 per
sample of its share while it tokenises (`PackedSplit.from_stream`; + 8 per token of character spans and the
rendered texts where the store keeps them), then the exchanged shares.

Shares: rows i with i % W == rank. A bad row under `data.on_bad_row: error` stops the process that reads it;
the others learn of it at the exchange, and every process raises the error of the lowest failing row, the
one a single process would have met first.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from pipeline.config.kvmap import DataConfig
from pipeline.data.samples import iter_split, new_counts
from pipeline.store.packed_split import PackedSplit


def _without_texts(items):
    """(row, sample) pairs with each sample's rendered text and char spans dropped as it arrives."""
    for row, sample in items:
        yield row, {k: v for k, v in sample.items() if k not in ("text", "char_spans")}


def _my_share(
    data_cfg: DataConfig, split: str, tokenizer, rank: int, world: int, texts: bool = True
) -> tuple:
    """(packed share, counts, None) or (None, failing row, the exception)."""
    counts = new_counts()
    try:
        items = iter_split(data_cfg, split, tokenizer, counts, rank, world)
        packed = PackedSplit.from_stream(items if texts else _without_texts(items))
    except Exception as e:  # re-raised on every process after the exchange
        # tokenize_sample counts a row before it can fail, so this share's failing row is its last counted
        return None, rank + (counts["rows"] - 1) * world, e
    return packed, counts, None


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


def tokenize_packed(
    data_cfg: DataConfig, split: str, tokenizer, rank: int = 0, world: int = 1, texts: bool = True
):
    """Tokenise and pack a split with `world` processes (this one is `rank`); every process must call it.
    `texts`: keep each sample's rendered text and char spans (`extract.texts`).

    Returns:
        (packed, counts): the whole split packed in source-row order (pipeline/store/packed_split.py) and the
        counts of `pipeline.data.samples.new_counts()` with "format", as `tokenize_split` + `from_samples`
        give with one process.
    """
    mine = _my_share(data_cfg, split, tokenizer, rank, world, texts)
    shares = [mine]
    if world > 1:
        shares = [None] * world
        dist.all_gather_object(shares, mine)
    failed = [(row, e) for _, row, e in shares if e is not None]
    if failed:
        raise min(failed, key=lambda f: f[0])[1]
    packed = PackedSplit.merge([p for p, _, _ in shares])
    return packed, add_counts([c for _, c, _ in shares])
