"""Stage-2 preflight: everything that can be wrong with a store / student / config, checked before any step.

Shapes: none (metadata). Each check raises a one-line ValueError naming the key or file, the value, and
what was expected, so that a bad run dies in seconds instead of after the first checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from pipeline.store.location import StoreLocation
from pipeline.store.reader import KVStore


def open_store(path: str | Path):
    """Open a store for training: it must exist, be complete and hold a train split."""
    p = StoreLocation(path)  # a folder or a URL (+ storage_options when `path` is a StoreLocation)
    if not p.remote and Path(p.url).is_file():
        raise ValueError(
            f"train.store='{p}' is a file: expected the store folder stage 1 wrote (extract.store, e.g. "
            "stores/name.zarr) or a URL"
        )
    if p.is_empty():
        raise FileNotFoundError(f"train.store='{p}' does not exist: run stage 1 (pipeline/extract.py) first")
    try:
        store = KVStore(p)
    except (FileNotFoundError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"train.store='{p}' is not a readable kvmap store: {e}".splitlines()[0]) from None
    if not store.complete:
        raise ValueError(
            f"train.store='{p}' is incomplete (interrupted extraction?): resume or re-run extract"
        )
    if "train" not in store.splits:
        raise ValueError(f"train.store='{p}' has no train split (splits: {store.splits})")
    return store


def check_layers(store, needed: Sequence[int], components: Sequence[str]) -> None:
    """Every teacher layer the layer map needs, and every component the loss reads, must be stored."""
    missing = [layer for layer in needed if layer not in store.layers]
    if missing:
        raise ValueError(
            f"align.layer_map needs teacher layers {list(needed)} but store '{store.path}' holds {store.layers} "
            f"(missing {missing}): re-extract with extract.layers covering them"
        )
    lacking = [c for c in components if c not in store.components]
    if lacking:
        raise ValueError(
            f"the structural loss reads components {list(components)} but store '{store.path}' holds "
            f"{store.components}: re-extract with extract.components including {lacking}"
        )


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 (16 hex) of the tokenizer's vocabulary, computed exactly as stage 1 records it in the store
    (`pipeline/extract.py`: sorted (token, id) pairs as JSON), so equal vocabularies give equal hashes."""
    vocab = tokenizer.get_vocab()
    return hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]


def check_tokenizer(store, tokenizer, student_vocab: int, hash_fn=None) -> None:
    """The student must read the store's token ids as the same tokens.

    Checks: the store's vocab fits the student's embedding (`student_vocab` rows); when both sides have a
    tokenizer record, their vocabulary hashes match (`hash_fn(tokenizer)`, default: the store writer's
    function when it has one, else `tokenizer_fingerprint`). A mismatch is an error: there is no token map.
    """
    rec = store.attrs.get("tokenizer") or {}
    store_vocab = rec.get("vocab_size")
    if store_vocab is not None and int(store_vocab) > int(student_vocab):
        raise ValueError(
            f"student vocab_size={student_vocab} < store tokenizer vocab_size={store_vocab} "
            f"({rec.get('name')!r}): expected the student to use the teacher's tokenizer (no token map is configured)"
        )
    for split in store.splits:
        ids = store.group[f"{split}/input_ids"][:]
        top = int(ids.max()) if ids.size else -1
        if top >= int(student_vocab):
            raise ValueError(
                f"store '{store.path}' {split} split has token id {top} >= student vocab_size={student_vocab}: "
                "expected the student to use the teacher's tokenizer"
            )
    if tokenizer is None or not rec.get("hash"):
        return
    ours = hash_fn(tokenizer) if hash_fn is not None else tokenizer_fingerprint(tokenizer)
    if ours != rec["hash"]:
        raise ValueError(
            f"student tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} (vocabulary of {len(tokenizer.get_vocab())} tokens, "
            f"hash {ours}) differs from the store's {rec.get('name')!r} ({rec.get('vocab_size')} tokens, hash "
            f"{rec['hash']}): expected the same tokenizer (no token map is configured)"
        )


def check_heads(store, layers: Sequence[int], components: Sequence[str], heads: dict | None) -> None:
    """Every teacher head the loss reads must be stored: `heads` {component: per layer the heads read}
    (a selected-head arm), else every head of every layer in `layers`. A head-subset store (extract.heads)
    lacking one is refused in one line naming the head (pipeline/store/heads.py); all-heads stores pass."""
    if not store.attrs.get("heads"):
        return
    for c in components:
        want = (heads or {}).get(c)
        if want is None:
            total = int(store.attrs["teacher"]["num_heads" if c == "q" else "num_kv_heads"])
            want = [list(range(total))] * len(layers)
        try:
            store.positions_of(list(layers), c, want)
        except KeyError as e:
            raise ValueError(f"the loss reads a head the store lacks: {e.args[0]}") from None
