"""`kvmap-extract --plan`: the estimate against the bytes a finished store holds, the JSON keys, the
free-space refusal and `--force`, and that planning writes no store (tiny random teacher)."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from pipeline.extract import main
from pipeline.extraction.plan import (
    dataset_counts,
    estimate,
    head_split,
    raw_bytes_per_token,
)
from pipeline.extraction.plan_report import format_plan, free_space
from pipeline.store.location import StoreLocation
from pipeline.store.reader import KVStore
from tests.helpers_store import random_split, save_tiny_teacher, write_extract_config

torch.set_num_threads(1)

QWEN7B = {"layers": 28, "heads": 28, "kv_heads": 4, "head_dim": 128, "vocab": 152064}
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def _plan_json(cfg, capsys, *extra) -> dict:
    capsys.readouterr()
    assert main(["--config", str(cfg), "--plan", "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "extract",
    [
        {},  # bf16 states of the mapped layers
        {"dtype": "int8", "components": ["q", "k", "v", "logits"], "logits_top_k": 8, "layers": "all"},
        {"components": ["logits"], "logits_top_k": 8, "texts": False},  # the smallest store: no texts
    ],
    ids=["bf16", "int8-logits", "logits-no-texts"],
)
def test_estimate_is_within_15_percent_of_the_stored_bytes(tmp_path, teacher, capsys, extract):
    cfg = write_extract_config(tmp_path, teacher, num_rows=40, **extract)
    plan = _plan_json(cfg, capsys)
    assert not (tmp_path / "store.zarr").exists()  # --plan writes no store
    assert {"bytes_total", "bytes_per_token", "tokens", "components", "seconds_estimate"} <= set(plan)
    comps = set(plan["components"])
    states = extract.get("components", ["q"]) != ["logits"]
    assert {"tokens", "metadata"} <= comps and ({"q", "k", "v"} <= comps) == states
    assert ("texts" in comps) == extract.get("texts", True)
    if extract.get("dtype") == "int8":
        assert {"q_scale", "k_scale", "v_scale", "logits_values", "logits_indices"} <= comps
    assert plan["bytes_total"] == sum(c["bytes"] for c in plan["components"].values())
    assert main(["--config", str(cfg)]) == 0
    store = KVStore(tmp_path / "store.zarr", require_complete=True)
    assert plan["train_tokens"] == store.num_tokens()
    assert store.has_text("train") == store.has_text("eval") == extract.get("texts", True)
    assert plan["tokens"] == store.num_tokens() + store.num_tokens("eval")
    real = store.stored_bytes()
    assert abs(plan["bytes_total"] / real - 1) < 0.15, (plan["bytes_total"], real)
    assert plan["seconds_estimate"] > 0


def test_free_space_refusal_and_force(tmp_path, teacher, capsys, monkeypatch):
    cfg = write_extract_config(tmp_path, teacher)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    capsys.readouterr()
    assert main(["--config", str(cfg)]) == 2
    err = [x for x in capsys.readouterr().err.strip().splitlines() if x.startswith("extract: ")]
    assert len(err) == 1 and err[0].startswith("extract: error: extract.store=")
    assert "1000 bytes" in err[0] and "--force" in err[0] and "the plan estimates" in err[0]
    assert not (tmp_path / "store.zarr").exists()  # refused before the store was made
    plan = _plan_json(cfg, capsys)  # the plan itself says so, and still exits 0
    assert plan["free_space"]["free_bytes"] == 1000 and plan["bytes_needed"] > 1000
    assert main(["--config", str(cfg), "--plan"]) == 0
    assert "NOT enough" in capsys.readouterr().out
    assert main(["--config", str(cfg), "--force"]) == 0
    assert "estimate:" in capsys.readouterr().err  # every extraction prints the estimate first
    assert KVStore(tmp_path / "store.zarr", require_complete=True).num_tokens() > 0


def test_json_needs_plan(tmp_path, teacher, capsys):
    cfg = write_extract_config(tmp_path, teacher)
    with pytest.raises(SystemExit) as e:
        main(["--config", str(cfg), "--json"])
    assert e.value.code == 2 and "--json" in capsys.readouterr().err
    assert not (tmp_path / "store.zarr").exists()


def test_url_store_skips_the_free_space_check(monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: pytest.fail("a URL store has no local disk"))
    space = free_space(StoreLocation("memory://plan/x.zarr"))
    assert space["free_bytes"] is None and "URL store" in space["skipped"]


def test_raw_bytes_per_token_from_the_geometry():
    raw = raw_bytes_per_token(QWEN7B, 8, ["q", "k", "v"], "bfloat16", top_k=128, index_dtype="uint32")
    assert raw == {
        "q": 8 * 28 * 128 * 2,
        "k": 8 * 4 * 128 * 2,
        "v": 8 * 4 * 128 * 2,
        "logits_values": 256,
        "logits_indices": 512,
    }
    int8 = raw_bytes_per_token(QWEN7B, 28, ["k"], "int8", chunk_tokens=4096)
    assert int8["k"] == 28 * 4 * 128 and int8["k_scale"] == pytest.approx(28 * 4 * 128 * 4 / 4096)


def test_head_split_keeps_chunk_zero():
    packed = random_split(20, seed=3)
    head = head_split(packed, 64)
    assert head.num_tokens >= 64 and head.num_tokens < 64 + packed.lengths.max()
    assert np.array_equal(head.input_ids, packed.input_ids[: head.num_tokens])
    assert np.array_equal(head.samples_in(0, 64), packed.samples_in(0, 64))
    assert head.texts is None and head.char_spans is None  # random_split keeps no texts


def test_estimate_scales_chunk_zero_to_the_dataset():
    train, ev = random_split(50, seed=1), random_split(5, seed=2)
    attrs = {"logits": {"splits": ["train", "eval"]}}
    n = dataset_counts(train, ev, attrs, chunk_tokens=64)
    raw = {"k": 100.0, "k_scale": 100 * 4 / 64, "logits_values": 16}
    probe = {
        "tokens": 64,
        "split_tokens": 80,
        "split_samples": 4,
        "compute_s": 2.0,
        "write_s": 1.0,
        "stored": {"k": 3200, "k_scale": 300, "logits_values": 512, "tokens": 160},
        "metadata": 1000,
    }
    plan = estimate(probe, raw, n, writer_threads=2, processes=2)
    comps = plan["components"]
    assert comps["k"]["ratio"] == pytest.approx(2.0) and comps["k"]["bytes"] == 50 * n["train"]
    assert comps["k_scale"]["bytes"] == 300 * n["chunks"]
    assert comps["logits_values"]["bytes"] == 8 * (n["train"] + n["eval"])
    assert comps["tokens"]["bytes"] == 2 * n["all_tokens"]
    assert plan["bytes_total"] == sum(c["bytes"] for c in comps.values())
    assert plan["seconds_estimate"] == pytest.approx(n["forward"] * 2.0 / 64 / 2)
    plan["bytes_needed"], plan["free_space"] = plan["bytes_total"], {"free_bytes": None, "skipped": "URL"}
    text = format_plan(plan, "s3://b/x.zarr")
    assert "estimate:" in text[1] and text[2].strip() == "URL" and len(text) == 4 + len(comps)
