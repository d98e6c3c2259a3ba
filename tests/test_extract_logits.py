"""Stage 1 with `logits`: the stored top-k log-probs of both splits equal a direct forward's, and
`pipeline.analysis.inspect_store` reports them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config.configlib import ConfigError, load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.samples import tokenize_split
from pipeline.extract import run_extraction
from pipeline.models.load import load_model
from pipeline.store.reader import KVStore
from tests.helpers_store import save_tiny_teacher, write_extract_config

torch.set_num_threads(1)
K = 10


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("logits")
    teacher = save_tiny_teacher(tmp / "teacher")
    path = write_extract_config(
        tmp, teacher, num_rows=12, components=["q", "k", "v", "logits"], logits_top_k=K
    )
    cfg = load_config(KVMapConfig, path, [])
    return cfg, run_extraction(cfg)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_stored_topk_equals_a_direct_forward(extracted, split):
    cfg, summary = extracted
    store = KVStore(cfg.extract.store, require_complete=True)
    assert store.logits == {
        "top_k": K,
        "dtype": "float16",
        "index_dtype": "uint16",
        "splits": ["train", "eval"],
    }
    model, tok = load_model(cfg.teacher)
    samples, _, _ = tokenize_split(cfg.data, split, tok)
    for i in range(len(samples)):
        got = store.read_samples([i], split=split, components=("logits",))[0]
        with torch.no_grad():
            ref = torch.log_softmax(
                model(samples[i]["input_ids"][None], use_cache=False).logits[0].float(), -1
            )
        vals, idx = got["topk_logprobs"], got["topk_indices"]  # (T, K)
        assert vals.shape == (len(samples[i]["input_ids"]), K)
        assert (vals.diff(dim=-1) <= 0).all()
        # the stored value of each id is the teacher's log-prob (fp16 rounding + padded-batch noise) ...
        torch.testing.assert_close(vals, ref.gather(1, idx), rtol=1e-3, atol=2e-3)
        # ... and those ids are the top-k (up to near-ties at the k-th value)
        kth = ref.topk(K, -1).values[:, -1:]  # (T, 1)
        assert (ref.gather(1, idx) >= kth - 2e-3).all()
    assert 0 < summary["topk_mass_mean"] <= 1 and 0 < summary["eval_topk_mass_mean"] <= 1
    assert summary["teacher_ce_R"] > 0 and summary["teacher_eval_ce_A"] > 0


def test_inspect_shows_the_logits(extracted, capsys):
    from pipeline.analysis.inspect_store import inspect_store, main

    cfg, summary = extracted
    r = inspect_store(cfg.extract.store)["logits"]
    assert r["top_k"] == K and set(r["splits"]) == {"train", "eval"}
    assert r["splits"]["train"]["mean_topk_mass"] == pytest.approx(summary["topk_mass_mean"], rel=1e-2)
    assert main([str(cfg.extract.store)]) == 0
    assert "top-10 log-probs" in capsys.readouterr().out


def test_top_k_larger_than_the_vocabulary_is_refused(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    path = write_extract_config(tmp_path, teacher, num_rows=4, components=["logits"], logits_top_k=500)
    with pytest.raises(ConfigError, match=r"extract.logits_top_k=500: expected an int in \[1, 101\]"):
        run_extraction(load_config(KVMapConfig, path, []))
    assert not (tmp_path / "store.zarr").exists()


def test_logits_only_store(tmp_path):
    teacher = save_tiny_teacher(tmp_path / "teacher")
    path = write_extract_config(tmp_path, teacher, num_rows=6, components=["logits"], logits_top_k=4)
    run_extraction(load_config(KVMapConfig, path, []))
    store = KVStore(tmp_path / "store.zarr", require_complete=True)
    assert store.layers == [] and store.components == [] and store.has_logits("train")
    s = store.read_samples([1], components=("logits",))[0]
    assert s["topk_indices"].shape[1] == 4 and np.isfinite(s["topk_logprobs"].numpy()).all()
