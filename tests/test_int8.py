"""int8 states (`extract.dtype: int8`): the quantiser vs a naive reference, extraction, reads, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config.configlib import load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import run_extraction
from pipeline.store.int8 import INT8_SCHEMES, expand_scales, quantize
from pipeline.store.reader import KVStore
from pipeline.store.schema import PROGRESS_DIR, scale_key
from tests.helpers_store import save_tiny_teacher, store_arrays, write_extract_config


def naive_quantize(x: np.ndarray, scheme: str, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Loop-level reference: symmetric int8 with absmax / qmax scales (0 -> 0) per the scheme's groups."""
    n, heads, dim = x.shape
    q = np.zeros(x.shape, dtype=np.int8)
    if scheme == "channel":
        scale = np.zeros((1, heads, dim), dtype=np.float32)
        for h in range(heads):
            for d in range(dim):
                s = np.float32(np.abs(x[:, h, d]).max()) / np.float32(qmax)
                scale[0, h, d] = s
                if s > 0:
                    q[:, h, d] = np.clip(np.round(x[:, h, d] / s), -qmax, qmax)
    else:
        scale = np.zeros((n, heads), dtype=np.float32)
        for t in range(n):
            for h in range(heads):
                s = np.float32(np.abs(x[t, h]).max()) / np.float32(qmax)
                scale[t, h] = s
                if s > 0:
                    q[t, h] = np.clip(np.round(x[t, h] / s), -qmax, qmax)
    return q, scale


@pytest.mark.parametrize("scheme", ["channel", "token"])
@pytest.mark.parametrize("src, qmax", [(torch.float32, 127), (torch.bfloat16, 127), (torch.float32, 45)])
def test_quantize_equals_naive_reference(scheme, src, qmax):
    g = torch.Generator().manual_seed(hash((scheme, str(src), qmax)) % 2**31)
    x = torch.randn(50, 3, 8, generator=g) * torch.logspace(-3, 2, 8)  # channels over 5 decades
    x[:, 1, 2] = 0  # an all-zero channel
    x[7] = 0  # an all-zero token
    x = x.to(src)
    q, s = quantize(x, scheme, qmax)
    q_ref, s_ref = naive_quantize(x.float().numpy(), scheme, qmax)
    np.testing.assert_array_equal(s.numpy(), s_ref)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    full = s if scheme == "channel" else s.unsqueeze(-1)
    deq = q.float() * full
    # round-to-nearest: every value within half a step of its scale (float32 slack)
    err = (deq - x.float()).abs()
    assert bool((err <= full * 0.5 * (1 + 1e-5) + 1e-30).all())
    assert bool((deq[7] == 0).all()) and bool((deq[:, 1, 2] == 0).all())


def test_expand_scales_maps_tokens_to_their_chunk():
    rows = np.arange(3, dtype=np.float32)[:, None, None] * np.ones(
        (3, 2, 4), dtype=np.float32
    )  # chunk c -> c
    got = expand_scales(rows[1:3], "channel", start=70, end=140, chunk_tokens=64)  # chunks 1 and 2
    assert got.shape == (70, 2, 4)
    assert (got[: 128 - 70] == 1).all() and (got[128 - 70 :] == 2).all()


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same extraction as bf16, as int8 (the default schemes: per chunk, head, channel) and as int8 with
    per-(token, head) V scales (chunks of 64 tokens, every layer)."""
    tmp = tmp_path_factory.mktemp("int8")
    teacher = save_tiny_teacher(tmp / "teacher")
    cfg = write_extract_config(
        tmp, teacher, num_rows=16, layers="all", chunk_tokens=64, inner_chunk_tokens=16
    )
    out = {}
    for name, dtype, v_scheme in (
        ("bfloat16", "bfloat16", None),
        ("int8", "int8", None),
        ("int8_vtoken", "int8", "token"),
    ):
        path = tmp / f"{name}.zarr"
        saved = dict(INT8_SCHEMES)
        try:
            if v_scheme:
                INT8_SCHEMES["v"] = v_scheme  # the dict extraction reads (attrs and quantiser alike)
            run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={path}", f"extract.dtype={dtype}"]))
        finally:
            INT8_SCHEMES.update(saved)
        out[name] = path
    return cfg, out


@pytest.mark.parametrize("name", ["int8", "int8_vtoken"])
def test_int8_store_schema_and_reads_equal_naive_dequant(stores, name):
    _, paths = stores
    st = KVStore(paths[name], require_complete=True)
    assert st.dtype == "int8" and st.attrs["storage_dtype"] == "int8"
    schemes = {**INT8_SCHEMES, "v": "token"} if name == "int8_vtoken" else INT8_SCHEMES
    assert st.quantization == schemes == st.attrs["quantization"]
    ct, n = st.chunk_tokens, st.num_tokens()
    raw = store_arrays(paths[name])
    assert raw["train/layers/0/q_scale"].shape == (-(-n // ct), 6, 16)  # per chunk, head, channel
    v_shape = (
        (n, 2) if name == "int8_vtoken" else (-(-n // ct), 2, 16)
    )  # per (token, head) | (chunk, head, ch)
    assert raw["train/layers/0/v_scale"].shape == v_shape
    ref = KVStore(paths["bfloat16"])
    for i in range(st.num_samples()):
        got, bf = st.read_sample(i), ref.read_sample(i)
        a, b = int(st.offsets()[i]), int(st.offsets()[i] + st.lengths()[i])
        for layer_i, layer in enumerate(st.layers):
            for c in ("q", "k", "v"):
                words = raw[f"train/layers/{layer}/{c}"][a:b].astype(np.float32)  # (T, X, D)
                sc = raw[f"train/layers/{layer}/{scale_key(c)}"]
                if schemes[c] == "channel":
                    naive = np.stack([words[t] * sc[(a + t) // ct] for t in range(b - a)])
                else:
                    naive = words * sc[a:b, :, None]
                torch.testing.assert_close(
                    got[c][layer_i], torch.from_numpy(naive).permute(1, 0, 2), rtol=0, atol=0
                )
                # and close to the bf16 store: half a quantisation step + bf16 rounding
                step = np.abs(sc).max()
                assert float((got[c][layer_i] - bf[c][layer_i]).abs().max()) <= 0.5 * step + 2**-7 * float(
                    bf[c][layer_i].abs().max()
                )


@pytest.mark.parametrize("name", ["int8", "int8_vtoken"])
def test_int8_preload_equals_store_reads(stores, name):
    from trainer.data.preload import PreloadedSplit

    _, paths = stores
    st = KVStore(paths[name])
    pre = PreloadedSplit(st, "train", st.layers[1:3], ("q", "k", "v"))
    idx = list(range(st.num_samples()))
    for a, b in zip(pre.read_samples(idx), st.read_samples(idx, layers=st.layers[1:3])):
        for c in ("q", "k", "v"):
            assert torch.equal(a[c], b[c])


def test_int8_resume_is_bit_exact(stores, tmp_path):
    """Drop two chunks' markers (and scribble over their data), mark incomplete, resume: the same bits."""
    cfg, paths = stores
    import shutil

    import zarr

    path = tmp_path / "resumed.zarr"
    shutil.copytree(paths["int8"], path)
    g = zarr.open_group(str(path), mode="r+")
    g.attrs.update({"complete": False})
    ct = int(g.attrs["chunk_tokens"])
    from pipeline.store.writer import StoreWriter

    w = StoreWriter(path)
    for c in range(w.num_chunks):
        if c not in (1, 3):
            w.location.write_json(f"{PROGRESS_DIR}/chunk_{c:07d}.json", {"tokens": 0})
    g["train/layers/0/q"][ct : 2 * ct] = 5
    g["train/layers/0/q_scale"][3] = 1.0
    g["train/layers/2/v_scale"][1] = 9.0
    s = run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={path}", "extract.dtype=int8"]))
    assert s["tokens_computed_last_run"] <= 2 * ct
    a, b = store_arrays(path), store_arrays(paths["int8"])
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(a[k], b[k]), k


def test_extraction_summary_counts_int8_words_as_one_byte(stores):
    """The summary keeps the 16-bit reference and adds the stored words' own raw size (int8: half of it)."""
    _, paths = stores
    bf, q = (KVStore(paths[n]).attrs["summary"] for n in ("bfloat16", "int8"))
    assert bf["raw_word_state_bytes"] == bf["raw_16bit_state_bytes"] == q["raw_16bit_state_bytes"]
    assert q["raw_word_state_bytes"] * 2 == q["raw_16bit_state_bytes"]
    from pipeline.extraction.summary import _word_note

    assert _word_note(bf) == "" and _word_note(q).startswith("; raw int8 words ")


def test_int8_reads_through_the_shard_cache_equal_plain_reads(stores):
    from trainer.data.loader import StoreDataset

    _, paths = stores
    for name in ("int8", "int8_vtoken"):
        plain = StoreDataset(paths[name], "train", layers=[0, 3], components=("q", "k", "v"))
        cached = StoreDataset(paths[name], "train", layers=[0, 3], components=("q", "k", "v"), shard_cache=1)
        idx = list(range(len(plain)))[::-1]
        for a, b in zip(plain.__getitems__(idx), cached.__getitems__(idx)):
            assert all(torch.equal(a[k], b[k]) for k in a)
