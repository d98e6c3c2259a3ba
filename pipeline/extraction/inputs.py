"""What a stage-1 run reads: one split of the dataset tokenised into the packed store layout, with the
counts of the rows it kept, skipped and truncated (shared across processes through the staging folder).

Imports data, config, store and the extraction summary's wording of skip reasons.
"""

from __future__ import annotations

from pipeline.config.kvmap import KVMapConfig
from pipeline.data.split_shards import tokenize_packed
from pipeline.extraction.summary import skip_reasons
from pipeline.store.packed_split import PackedSplit


def load_split(cfg: KVMapConfig, split: str, tokenizer, state=None) -> tuple[PackedSplit, dict] | None:
    """Tokenise one split (pipeline.data.samples) into the packed layout; with several processes (`state`,
    every one must call it) each tokenises its share of the rows (pipeline/data/split_shards.py).

    Returns (packed, counts) with counts {"rows", "kept", "skipped", "bad_rows", "dropped_too_long",
    "truncated", "format", "segment_tokens"}, or None when the split has no data (eval_path null). Bad rows
    follow `data.on_bad_row`; a split that keeps no sample is an error.
    """
    if split == "eval" and cfg.data.eval_path is None:
        return None
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    packed, c = tokenize_packed(
        cfg.data,
        split,
        tokenizer,
        cfg.extract.store,
        rank,
        world,
        texts=cfg.extract.texts,
        storage_options=cfg.extract.storage_options,
    )
    counts = {
        "rows": c["rows"],
        "kept": c["samples"],
        "skipped": c["rows"] - c["samples"],
        "bad_rows": c["bad_rows"],
        "dropped_too_long": c["dropped_too_long"],
        "truncated": c["truncated"],
        "format": c["format"],
        "segment_tokens": c["segment_tokens"],
    }
    if not packed.num_tokens:
        key = "train_path" if split == "train" else "eval_path"
        raise ValueError(
            f"data.{key}={getattr(cfg.data, key)!r}: no usable sample ({counts['skipped']} rows "
            f"skipped{skip_reasons(counts)})"
        )
    return packed, counts
