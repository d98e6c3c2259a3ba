"""Stage 1's tokenisation in shares (pipeline/data/split_shards.py): the staged shares of any process count read
back as the packed split of one process, counts included (empty shares too), and a bad row stops every share
at its first bad row.

The 2-process extraction that uses it end to end is tests/test_extract_resume.py (the store, its dataset
counts and its fingerprint equal the 1-process run's).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from pipeline.data import default_data as mdd
from pipeline.data.samples import tokenize_split
from pipeline.data.split_shards import (
    _my_share,
    add_counts,
    remove_staging,
    staged_split,
    staging_location,
    tokenize_packed,
)
from pipeline.store.packed_split import TOKEN_DTYPES, PackedSplit, StagedArray, StagedTexts
from tests.test_data import task, tok  # noqa: F401 (the tokenizer fixture)

FIELDS = (*TOKEN_DTYPES, "offsets", "lengths", "rows")


def write_rows(path, n: int, bad=(), long=()) -> str:
    """`n` default-task rows; rows in `bad` lack their reasoning, rows in `long` have a 3x prompt."""
    rng = random.Random(0)
    with open(path, "w") as f:
        for i in range(n):
            row = mdd.make_sample(rng)
            if i in bad:
                row.pop("reasoning")
            if i in long:
                row["prompt"] = row["prompt"] * 3
            f.write(json.dumps(row) + "\n")
    return str(path)


def packed_by_hand(samples: list[dict], rows: list[int]) -> dict[str, np.ndarray]:
    """The packed arrays spelled out directly from per-sample tensors (the layout the store holds)."""
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int32)
    out = {k: np.concatenate([s[k].numpy().astype(dt) for s in samples]) for k, dt in TOKEN_DTYPES.items()}
    out["offsets"] = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    return out | {"lengths": lengths, "rows": np.array(rows, dtype=np.int64)}


def _staged(cfg, tok, world: int, root, texts: bool = True):  # noqa: F811
    """Every rank's share of a `world`-process run (no exchange) and the split they make."""
    locs = [staging_location(root / "s.zarr", "train", r) for r in range(world)]
    shares = [_my_share(cfg, "train", tok, r, world, locs[r], texts) for r in range(world)]
    return shares, staged_split([s[0] for s in shares], locs)


def test_shares_of_any_process_count_make_the_one_process_split(tmp_path, tok):  # noqa: F811
    path = write_rows(tmp_path / "train.jsonl", 23, bad={4, 11}, long={7, 18})
    cfg = task(train_path=path, max_length=120, truncation="drop")
    samples, rows, counts = tokenize_split(cfg, "train", tok)
    assert counts["bad_rows"] == {"reasoning": 2} and counts["dropped_too_long"] == 2 and len(rows) == 19
    expected = packed_by_hand(samples, rows)
    one = PackedSplit.from_stream(zip(rows, samples), block=4)  # several joined blocks
    for name in FIELDS:
        got = getattr(one, name)
        assert got.dtype == expected[name].dtype and np.array_equal(got, expected[name]), name
    for world in (1, 2, 3, 5, 30):  # 30 shares for 23 rows: some hold no row, others only bad ones
        shares, staged = _staged(cfg, tok, world, tmp_path / f"w{world}")
        for n in FIELDS:  # the token arrays are read back from the staged shares, whole and per range
            got = getattr(staged, n)[:]
            assert got.dtype == expected[n].dtype and np.array_equal(got, expected[n]), (world, n)
        assert np.array_equal(staged.input_ids[37:300], expected["input_ids"][37:300])
        assert staged.fingerprint() == one.fingerprint() == staged.fingerprint(block=7)
        # the cross-tokenizer texts and character spans travel with their samples
        assert list(staged.texts[:]) == [s["text"] for s in samples]
        assert np.array_equal(
            staged.char_spans[:], np.concatenate([s["char_spans"].numpy() for s in samples])
        )
        assert add_counts([s[1] for s in shares]) == counts
    packed, c = tokenize_packed(cfg, "train", tok, tmp_path / "one.zarr")  # one process: no exchange
    assert packed.fingerprint() == one.fingerprint() and c == counts
    assert (tmp_path / "one.zarr.staging" / "train" / "0").is_dir()
    remove_staging(tmp_path / "one.zarr")
    assert not (tmp_path / "one.zarr.staging").exists()
    # extract.texts: false drops each sample's text and spans as it arrives; the tokens are the same
    bare, c = tokenize_packed(cfg, "train", tok, tmp_path / "bare.zarr", texts=False)
    assert bare.texts is None and bare.char_spans is None and c == counts
    assert bare.fingerprint() == one.fingerprint()
    assert _staged(cfg, tok, 2, tmp_path / "bare2", texts=False)[1].texts is None


def test_staged_array_reads_any_range_across_its_parts():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 9, size=(n, 2)) for n in (5, 0, 1, 7)]
    whole = np.concatenate(parts)
    staged = StagedArray(parts, dtype=np.int64)
    assert staged.shape == whole.shape and len(staged) == 13 and staged.nbytes == whole.nbytes
    for lo in range(14):
        for hi in range(lo, 15):
            assert np.array_equal(staged[lo:hi], whole[lo:hi]), (lo, hi)
    assert np.array_equal(staged[:], whole) and np.array_equal(staged[-3:], whole[-3:])
    with pytest.raises(TypeError, match="step 1"):
        staged[::2]
    texts = ["a", "", "héllo ✓", "x" * 40, "", "日本"]
    enc = [t.encode() for t in texts]
    raw = np.frombuffer(b"".join(enc), dtype=np.uint8)
    parts = [raw[:3], raw[3:], raw[:0]]  # the bytes split anywhere, even inside a character
    staged_texts = StagedTexts(StagedArray(parts, dtype=np.uint8), np.array([len(e) for e in enc]))
    for lo in range(7):
        for hi in range(lo, 8):
            assert list(staged_texts[lo:hi]) == texts[lo:hi], (lo, hi)


def test_texts_key_leaves_the_default_fingerprint_as_before(monkeypatch):
    """extract.texts: true (the default) is left out of the store fingerprint, so stores written before the
    key existed resume; false gives another fingerprint (another store)."""
    import dataclasses

    from pipeline.config.kvmap import ExtractConfig, KVMapConfig
    from pipeline.extraction import store_attrs

    split = PackedSplit.from_arrays(
        {k: np.ones(3, dtype=dt) for k, dt in TOKEN_DTYPES.items()},
        np.array([3], dtype=np.int32),
        np.array([0], dtype=np.int64),
    )
    attrs = {"teacher": {}, "tokenizer": {"name": "t"}, "layers": [0]}
    cfg = KVMapConfig()
    default = store_attrs.config_fingerprint(cfg, attrs, split, None)
    no_texts = dataclasses.replace(cfg, extract=ExtractConfig(texts=False))
    assert store_attrs.config_fingerprint(no_texts, attrs, split, None) != default
    to_dict = store_attrs.to_dict  # the code before the key: its extract dict had no "texts"
    monkeypatch.setattr(
        store_attrs, "to_dict", lambda x: {k: v for k, v in to_dict(x).items() if k != "texts"}
    )
    assert store_attrs.config_fingerprint(cfg, attrs, split, None) == default


def test_a_bad_row_stops_each_share_at_its_row_and_the_lowest_is_raised(tmp_path, tok):  # noqa: F811
    path = write_rows(tmp_path / "train.jsonl", 12, bad={5, 8})
    cfg = task(train_path=path, on_bad_row="error")
    shares = [
        _my_share(cfg, "train", tok, r, 2, staging_location(tmp_path / "s", "train", r)) for r in (0, 1)
    ]
    assert [s[1] for s in shares] == [5, 8]  # rank 0 reads rows 0..5; rank 1 rows 6..11
    assert "row 5" in str(shares[0][2]) and "row 8" in str(shares[1][2])
    with pytest.raises(ValueError, match=r"row 5: field 'reasoning'"):
        tokenize_packed(cfg, "train", tok, tmp_path / "s")  # one process meets row 5 first too
    shares = [
        _my_share(cfg, "train", tok, r, 3, staging_location(tmp_path / "t", "train", r)) for r in range(3)
    ]
    assert shares[0][2] is None and [s[1] for s in shares[1:]] == [5, 8]  # rows 0-3 | 4-7 | 8-11


def test_counts_add_up_key_by_key_keeping_zero_counts():
    a = {"rows": 3, "segment_tokens": {"P": 30, "R": 0, "A": 0}, "bad_rows": {}, "format": "text"}
    b = {"rows": 2, "segment_tokens": {"P": 20, "R": 0, "A": 0}, "bad_rows": {"text": 1}, "format": "text"}
    total = {
        "rows": 5,
        "segment_tokens": {"P": 50, "R": 0, "A": 0},
        "bad_rows": {"text": 1},
        "format": "text",
    }
    assert add_counts([a, b]) == total and list(add_counts([a, b])["segment_tokens"]) == ["P", "R", "A"]
