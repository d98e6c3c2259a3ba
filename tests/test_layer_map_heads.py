"""`align.layer_map: heads`: a selected-head arm reads the teacher layers of the store's best heads, one per
student layer, for any student depth; stage 1 cannot resolve it from `extract.layers: map`."""

from __future__ import annotations

import pytest

from alignment.mapping.head_select import layers_of_ranked_heads
from pipeline.analysis.head_scores import load_or_compute, ranked_heads
from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import resolve_layers
from tests.helpers_train import make_tiny_store, tiny_train_config
from trainer.train import run_training


def test_layers_of_ranked_heads_takes_distinct_layers_in_rank_order_then_sorts():
    ranked = [(17, 2, 0.9), (6, 0, 0.8), (17, 5, 0.7), (23, 1, 0.6), (7, 0, 0.5)]
    assert layers_of_ranked_heads(ranked, 2) == [6, 17]
    assert layers_of_ranked_heads(ranked, 4) == [6, 7, 17, 23]
    assert layers_of_ranked_heads(ranked, 6) == [
        6,
        6,
        7,
        17,
        17,
        23,
    ]  # fewer layers than student layers: repeat
    with pytest.raises(ValueError, match="no ranked teacher head"):
        layers_of_ranked_heads([], 2)


def test_a_selected_head_arm_trains_with_the_layers_of_its_best_heads(tmp_path):
    store = make_tiny_store(tmp_path / "s.zarr", num_train=16, num_eval=4)
    over = {
        "train.steps": 1,
        "align.layer_map": "heads",
        "align.head_select": {"method": "top_retrieval", "top": 2, "samples": 8},
        "loss_config.attn_target": "teacher",
        "loss_config.alpha_k": 0.0,
        "loss_config.alpha_v": 0.0,
    }
    cfg = from_dict(KVMapConfig, tiny_train_config(tmp_path, store, **over))
    ranked = ranked_heads(load_or_compute(store, "train", 8), by="retrieval")
    L_s = cfg.student.config["num_hidden_layers"]
    expected = layers_of_ranked_heads(ranked, L_s)
    run_training(cfg)
    meta = (tmp_path / "run" / "student" / "aligner.json").read_text()
    assert f'"layer_map": {expected}'.replace(" ", "") in meta.replace(" ", "").replace("\n", "")


def test_stage_one_cannot_map_heads_before_the_store_exists():
    cfg = KVMapConfig()
    cfg.align.layer_map = "heads"
    with pytest.raises(ConfigError, match="align.layer_map='heads'"):
        resolve_layers(cfg, 30)
