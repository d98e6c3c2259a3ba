"""Store schema round trips (pipeline/store/reader.py + pipeline/store/writer.py), no stored padding, chunk markers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.store.encoding import decode_states, encode_states
from pipeline.store.location import remove_store
from pipeline.store.packed_split import PackedSplit
from pipeline.store.reader import KVStore
from pipeline.store.schema import PROGRESS_DIR
from pipeline.store.writer import StoreWriter
from tests.helpers_store import D, G, H, random_split, write_random_store


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    path, train, truth = write_random_store(tmp_path / "s.zarr", dtype=dtype)
    store = KVStore(path, require_complete=True)
    assert store.dtype == dtype and store.layers == [0, 2, 3] and store.complete
    assert store.num_samples() == 7 and store.lengths().tolist() == train.lengths.tolist()
    for i in range(store.num_samples()):
        s = store.read_sample(i)
        o, n = int(train.offsets[i]), int(train.lengths[i])
        assert (
            s["input_ids"].dtype == torch.int64
            and s["input_ids"].tolist() == train.input_ids[o : o + n].tolist()
        )
        assert s["segment_ids"].tolist() == train.segment_ids[o : o + n].tolist()
        assert s["answer_mask"].dtype == torch.bool
        assert s["answer_mask"].tolist() == train.answer_mask[o : o + n].astype(bool).tolist()
        assert s["q"].shape == (3, H, n, D) and s["k"].shape == (3, G, n, D) and s["v"].shape == (3, G, n, D)
        for li, layer in enumerate(store.layers):
            for comp in "qkv":
                want = truth[(layer, comp)][o : o + n].permute(1, 0, 2)  # (X, T, D)
                got = s[comp][li]
                assert got.dtype == torch.float32
                # bit-exact: compare the 16-bit words, not float closeness
                assert np.array_equal(encode_states(got, dtype), encode_states(want, dtype))


def test_layer_and_component_selection_and_batch_read(tmp_path):
    path, train, truth = write_random_store(tmp_path / "s.zarr")
    store = KVStore(path)
    one = store.read_sample(4, layers=[3, 0], components=("k",))
    assert set(one) == {"input_ids", "segment_ids", "answer_mask", "k"} and one["k"].shape[0] == 2
    o, n = int(train.offsets[4]), int(train.lengths[4])
    assert torch.equal(one["k"][0], truth[(3, "k")][o : o + n].permute(1, 0, 2))
    assert torch.equal(one["k"][1], truth[(0, "k")][o : o + n].permute(1, 0, 2))
    batch = store.read_samples([6, 1, 6])
    for i, s in zip([6, 1, 6], batch):
        ref = store.read_sample(i)
        assert all(torch.equal(s[key], ref[key]) for key in ref)
    with pytest.raises(IndexError, match="sample index 7"):
        store.read_sample(7)
    with pytest.raises(KeyError, match="layer=1"):
        store.read_sample(0, layers=[1])
    ev = store.read_sample(2, split="eval")
    assert set(ev) == {"input_ids", "segment_ids", "answer_mask"}
    with pytest.raises(KeyError, match="split='test'"):
        store.num_samples("test")


def test_no_padding_is_stored(tmp_path):
    path, train, _ = write_random_store(tmp_path / "s.zarr", codec="none", num_samples=9)
    store = KVStore(path)
    n = int(train.lengths.sum())
    assert store.num_tokens() == n == train.num_tokens
    assert store.offsets().tolist() == np.concatenate([[0], np.cumsum(train.lengths)[:-1]]).tolist()
    raw = 0
    for layer in store.layers:
        for comp in "qkv":
            arr = store.array(layer, comp)
            assert arr.shape[0] == n  # packed: exactly the real tokens
            raw += arr.nbytes
    stored = sum(
        p.stat().st_size
        for p in (path / "train" / "layers").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    # codec "none": the chunk files hold the raw bytes of real tokens, plus each shard's small index
    assert raw <= stored <= raw * 1.05


def test_fp16_and_bf16_encoding_helpers():
    x = torch.tensor([1.0, -2.5, 1e-3, 65504.0, 3.0e38])
    b = encode_states(x, "bfloat16")
    assert b.dtype == np.uint16 and torch.equal(decode_states(b, "bfloat16"), x.to(torch.bfloat16).float())
    h = encode_states(x[:4], "float16")
    assert h.dtype == np.float16 and torch.equal(decode_states(h, "float16"), x[:4].half().float())
    with pytest.raises(ValueError, match="dtype='int8'"):
        encode_states(x, "int8")


def test_fingerprint_is_stable_and_content_sensitive(tmp_path):
    p1, _, _ = write_random_store(tmp_path / "a.zarr")
    p2, _, _ = write_random_store(tmp_path / "b.zarr")
    p3, _, _ = write_random_store(tmp_path / "c.zarr", layers=(0, 3))
    f1 = KVStore(p1).fingerprint
    assert len(f1) == 16 and f1 == KVStore(p1).fingerprint == KVStore(p2).fingerprint
    assert KVStore(p3).fingerprint != f1


def test_chunk_markers_and_incomplete_store(tmp_path):
    train = random_split(6)
    w = StoreWriter.create(
        tmp_path / "s.zarr",
        attrs={
            "layers": [1],
            "components": ["k"],
            "dtype": "bfloat16",
            "codec": "zstd",
            "compression_level": 1,
        },
        train=train,
        eval=None,
        state_shapes={"k": (G, D)},
        chunk_tokens=32,
        inner_chunk_tokens=8,
    )
    assert w.num_chunks == -(-train.num_tokens // 32) >= 3 and w.todo_chunks() == list(range(w.num_chunks))
    s, e = w.chunk_range(1)
    w.write_chunk(1, {(1, "k"): np.zeros((e - s, G, D), np.uint16)}, stats={"tokens": e - s})
    assert w.todo_chunks() == [0] + list(range(2, w.num_chunks))
    assert w.location.read_json(f"{PROGRESS_DIR}/chunk_0000001.json") == {"tokens": e - s}
    with pytest.raises(ValueError, match=r"chunk 0 layer 1 k: got \(3, 2, 16\)"):
        w.write_chunk(0, {(1, "k"): np.zeros((3, G, D), np.uint16)}, stats={})
    with pytest.raises(ValueError, match="expected"):
        w.write_chunk(0, {(2, "k"): np.zeros((32, G, D), np.uint16)}, stats={})
    with pytest.raises(RuntimeError, match="not written"):
        w.mark_complete({})
    store = KVStore(w.path)
    assert not store.complete
    with pytest.raises(ValueError, match="not complete"):
        KVStore(w.path, require_complete=True)


def test_create_validates(tmp_path):
    empty = PackedSplit.from_samples([], rows=[])
    kw = dict(
        attrs={
            "layers": [0],
            "components": ["k"],
            "dtype": "bfloat16",
            "codec": "none",
            "compression_level": 1,
        }
    )
    with pytest.raises(ValueError, match="0 tokens"):
        StoreWriter.create(
            tmp_path / "a",
            train=empty,
            eval=None,
            state_shapes={"k": (G, D)},
            chunk_tokens=8,
            inner_chunk_tokens=8,
            **kw,
        )
    with pytest.raises(ValueError, match="chunk_tokens=10, extract.inner_chunk_tokens=4"):
        StoreWriter.create(
            tmp_path / "b",
            train=random_split(2),
            eval=None,
            state_shapes={"k": (G, D)},
            chunk_tokens=10,
            inner_chunk_tokens=4,
            **kw,
        )


def test_remove_store_refuses_foreign_folders(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match="not a kvmap store"):
        remove_store(foreign)
    assert (foreign / "thesis.tex").exists()
    path, _, _ = write_random_store(tmp_path / "s.zarr")
    remove_store(path)
    assert not path.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KVStore(path)


def test_inspect_reports_sizes_and_exact_stats(tmp_path, capsys):
    from pipeline.analysis.inspect_store import inspect_store, main

    path, train, truth = write_random_store(tmp_path / "s.zarr", chunk_tokens=32, inner_chunk_tokens=8)
    r = inspect_store(path)
    assert r["splits"]["train"]["samples"] == 7 and r["splits"]["eval"]["samples"] == 3
    for (layer, comp), x in truth.items():
        s = r["stats"][f"{layer}/{comp}"]
        x = x.double()
        assert s["tokens"] == train.num_tokens and s["nan"] == 0 and s["inf"] == 0
        assert s["mean"] == pytest.approx(x.mean().item(), abs=1e-9)
        assert s["std"] == pytest.approx(x.std(unbiased=False).item(), rel=1e-9)
        assert s["absmax"] == x.abs().max().item()
    z = r["sizes"]
    assert z["state_raw_bytes"] == sum(v.numel() * 2 for v in truth.values())
    assert z["compression_ratio"] == pytest.approx(z["state_raw_bytes"] / z["state_stored_bytes"])
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "schema v2" in out and "3/v" in out and "ratio" in out
    assert main([str(tmp_path / "missing.zarr")]) == 2
    assert "does not exist" in capsys.readouterr().err
