"""Stage-1 extraction in-process on a tiny random teacher: values, schema, re-run, refusals, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config.configlib import load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.samples import tokenize_split
from pipeline.extract import main, run_extraction
from pipeline.models.capture import capture_qkv
from pipeline.models.load import load_model
from pipeline.store.reader import KVStore
from tests.helpers_store import save_tiny_teacher, store_arrays, write_extract_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def _cfg(path, *overrides):
    return load_config(KVMapConfig, path, list(overrides))


def test_stored_states_equal_a_direct_forward(tmp_path, teacher):
    cfg = _cfg(write_extract_config(tmp_path, teacher))
    summary = run_extraction(cfg)
    store = KVStore(cfg.extract.store, require_complete=True)
    # layers "map": uniform map of the 3-layer student onto the 4-layer teacher = [1, 2, 3]
    assert store.layers == [1, 2, 3] and store.components == ["q", "k", "v"]
    t = store.attrs["teacher"]
    assert (t["num_layers"], t["num_heads"], t["num_kv_heads"], t["head_dim"]) == (4, 6, 2, 16)
    assert store.attrs["tokenizer"]["vocab_size"] == 101 and store.attrs["dtype"] == "bfloat16"
    model, tok = load_model(cfg.teacher)
    samples, rows, counts = tokenize_split(cfg.data, "train", tok)
    assert store.num_samples() == len(samples) == 24 and summary["samples"]["train"]["kept"] == 24
    assert store.num_tokens() == summary["tokens"] == sum(len(s["input_ids"]) for s in samples)
    assert store.rows().tolist() == rows
    assert 0 <= summary["teacher_acc_all"] <= 1 and summary["compression_ratio"] > 1.0
    for i in (0, 7, 23):
        got = store.read_sample(i)
        assert torch.equal(got["input_ids"], samples[i]["input_ids"])
        assert torch.equal(got["segment_ids"], samples[i]["segment_ids"])
        assert torch.equal(got["answer_mask"], samples[i]["answer_mask"])
        with torch.no_grad(), capture_qkv(model) as cap:
            model(samples[i]["input_ids"][None], use_cache=False)
        for li, layer in enumerate(store.layers):
            for comp in "qkv":
                ref = getattr(cap, comp)[layer][0]  # (X, T, D) unpadded single-sample forward
                # the extraction batch is padded: allow float noise, then bf16 rounding (rel 2^-8)
                torch.testing.assert_close(got[comp][li], ref, rtol=8e-3, atol=1e-5)
    eval_samples, _, _ = tokenize_split(cfg.data, "eval", tok)
    ev = store.read_sample(4, split="eval")
    assert set(ev) == {"input_ids", "segment_ids", "answer_mask"}
    assert torch.equal(ev["input_ids"], eval_samples[4]["input_ids"])


def test_rerun_is_noop_and_other_config_is_refused(tmp_path, teacher, capsys):
    path = write_extract_config(tmp_path, teacher, layers="all")
    run_extraction(_cfg(path))
    before = store_arrays(tmp_path / "store.zarr")
    fp = KVStore(tmp_path / "store.zarr").fingerprint
    capsys.readouterr()
    assert main(["--config", str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert KVStore(tmp_path / "store.zarr").fingerprint == fp
    # a different dtype is a different store: refused with one line, store untouched
    assert main(["--config", str(path), "extract.dtype=float16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the weight-loading progress bar)
    assert err.startswith("extract: error: ")
    assert "different config" in err and "--overwrite" in err
    after = store_arrays(tmp_path / "store.zarr")
    assert all(np.array_equal(before[k], after[k]) for k in before)
    assert main(["--config", str(path), "extract.dtype=float16", "--overwrite"]) == 0
    assert KVStore(tmp_path / "store.zarr", require_complete=True).dtype == "float16"


def _poison(teacher_dir, out_dir, fn):
    from transformers import AutoModelForCausalLM

    from tests.helpers_store import word_tokenizer

    m = AutoModelForCausalLM.from_pretrained(teacher_dir)
    with torch.no_grad():
        fn(m)
    m.save_pretrained(out_dir)
    word_tokenizer().save_pretrained(out_dir)
    return out_dir


def test_fp16_overflow_is_an_error_naming_sample_and_layer(tmp_path, teacher):
    bad = _poison(teacher, tmp_path / "big", lambda m: m.model.layers[2].self_attn.q_proj.weight.mul_(1e6))
    cfg = _cfg(write_extract_config(tmp_path, bad, dtype="float16"))
    with pytest.raises(
        ValueError,
        match=r"overflow float16 .*train sample \d+ \(dataset row \d+\), teacher layer 2, component q",
    ) as e:
        run_extraction(cfg)
    assert "\n" not in str(e.value)
    # the overflow is in chunk 0, which the plan's probe computes before the store is made: nothing written
    assert not (tmp_path / "store.zarr").exists()
    # bf16 has the range: the same teacher extracts fine
    run_extraction(
        _cfg(
            write_extract_config(tmp_path, bad, dtype="bfloat16"), "extract.store=" + str(tmp_path / "b.zarr")
        )
    )
    assert KVStore(tmp_path / "b.zarr").complete


def test_nan_states_name_the_sample_that_has_them(tmp_path, teacher):
    cfg = _cfg(write_extract_config(tmp_path, teacher))
    model, tok = load_model(cfg.teacher)
    samples, rows, _ = tokenize_split(cfg.data, "train", tok)
    # poison a token that only one sample (not the first) contains
    counts = torch.bincount(torch.cat([s["input_ids"].unique() for s in samples]), minlength=101)
    target, tid = next(
        (i, t) for i, s in enumerate(samples) if i > 0 for t in s["input_ids"].tolist() if counts[t] == 1
    )
    bad = _poison(teacher, tmp_path / "nan", lambda m: m.model.embed_tokens.weight[tid].fill_(float("nan")))
    cfg = _cfg(write_extract_config(tmp_path, bad))
    with pytest.raises(
        ValueError,
        match=rf"NaN/inf: train sample {target} \(dataset row {rows[target]}\), teacher layer 1, component q$",
    ):
        run_extraction(cfg)
    assert not KVStore(cfg.extract.store).complete


def test_bad_rows_error_or_skip(tmp_path, teacher):
    path = write_extract_config(tmp_path, teacher, bad_rows=(4, 11))
    with pytest.raises(ValueError, match="row 4: field 'reasoning'"):
        run_extraction(_cfg(path, "data.on_bad_row=error"))
    assert not (tmp_path / "store.zarr").exists()
    summary = run_extraction(_cfg(path))  # on_bad_row=skip (default)
    assert summary["samples"]["train"]["kept"] == 22 and summary["samples"]["train"]["skipped"] == 2
    store = KVStore(tmp_path / "store.zarr", require_complete=True)
    assert 4 not in store.rows().tolist()
    assert store.attrs["dataset"]["train"]["skipped"] == 2


def test_bad_layer_spec_and_foreign_folder(tmp_path, teacher):
    path = write_extract_config(tmp_path, teacher)
    with pytest.raises(ValueError, match=r"extract.layers=\[0, 4\]: expected .* in \[0, 4\)"):
        run_extraction(_cfg(path, "extract.layers=[0,4]"))
    (tmp_path / "store.zarr").mkdir()
    (tmp_path / "store.zarr" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a kvmap store"):
        run_extraction(_cfg(path), overwrite=True)
    assert (tmp_path / "store.zarr" / "notes.txt").exists()
