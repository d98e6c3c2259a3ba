"""Stage 1's tokenisation in shares (pipeline/data/split_shards.py): the shares of any process count merge into
the packed split of one process, counts included, and a bad row stops every share at the first bad row.

The 2-process extraction that uses it end to end is tests/test_extract_resume.py (the store, its dataset
counts and its fingerprint equal the 1-process run's).
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from pipeline.data import default_data as mdd
from pipeline.data.samples import tokenize_split
from pipeline.data.split_shards import _my_share, add_counts, tokenize_packed
from pipeline.store.packed_split import TOKEN_DTYPES, PackedSplit
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


def test_shares_of_any_process_count_merge_into_the_one_process_split(tmp_path, tok):  # noqa: F811
    path = write_rows(tmp_path / "train.jsonl", 23, bad={4, 11}, long={7, 18})
    cfg = task(train_path=path, max_length=120, truncation="drop")
    samples, rows, counts = tokenize_split(cfg, "train", tok)
    assert counts["bad_rows"] == {"reasoning": 2} and counts["dropped_too_long"] == 2 and len(rows) == 19
    expected = packed_by_hand(samples, rows)
    one = PackedSplit.from_stream(zip(rows, samples), block=4)  # several joined blocks
    for name in FIELDS:
        got = getattr(one, name)
        assert got.dtype == expected[name].dtype and np.array_equal(got, expected[name]), name
    for world in (1, 2, 3):
        shares = [_my_share(cfg, "train", tok, r, world) for r in range(world)]
        merged = PackedSplit.merge([s[0] for s in shares])
        assert all(np.array_equal(getattr(merged, n), expected[n]) for n in FIELDS), world
        assert merged.fingerprint() == one.fingerprint()
        # the cross-tokenizer texts and character spans travel with their samples
        assert merged.texts == [s["text"] for s in samples] and merged.texts == one.texts
        assert np.array_equal(merged.char_spans, np.concatenate([s["char_spans"].numpy() for s in samples]))
        assert add_counts([s[1] for s in shares]) == counts
    packed, c = tokenize_packed(cfg, "train", tok)  # one process: no exchange
    assert packed.fingerprint() == one.fingerprint() and c == counts
    # extract.texts: false drops each sample's text and spans as it arrives; the tokens are the same
    bare, c = tokenize_packed(cfg, "train", tok, texts=False)
    assert bare.texts is None and bare.char_spans is None and c == counts
    assert bare.fingerprint() == one.fingerprint()
    assert _my_share(cfg, "train", tok, 1, 2, texts=False)[0].texts is None


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
    shares = [_my_share(cfg, "train", tok, r, 2) for r in range(2)]
    assert [s[1] for s in shares] == [8, 5]  # rank 0 reads rows 0, 2, ..; rank 1 rows 1, 3, 5, ..
    assert "row 5" in str(shares[1][2]) and "row 8" in str(shares[0][2])
    with pytest.raises(ValueError, match=r"row 5: field 'reasoning'"):
        tokenize_packed(cfg, "train", tok)  # one process meets row 5 first too


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


def test_empty_shares_merge(tok):  # noqa: F811
    empty = PackedSplit.from_stream([])
    sample = {k: torch.tensor([1, 2, 3]) for k in TOKEN_DTYPES}
    one = PackedSplit.from_stream([(0, sample)])
    merged = PackedSplit.merge([empty, one, empty])
    assert merged.num_tokens == 3 and merged.rows.tolist() == [0] and merged.offsets.tolist() == [0]
