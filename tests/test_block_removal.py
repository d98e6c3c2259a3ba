"""Depth pruning by measured removal cost (`prune.layers: contiguous`, pipeline/pruning/block_removal.py).

References are built the slow way: each candidate student is cut with `build_pruned_model` (a separate
model) and its loss computed by HF's own `labels=` path; the search must pick what that brute force picks.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config.configlib import ConfigError
from pipeline.prune import run_prune
from pipeline.pruning.block_removal import (
    candidate_windows,
    drop_contiguous_blocks,
    lm_loss,
    only_layers,
    search_evaluations,
)
from pipeline.pruning.importance import compute_importance
from pipeline.pruning.select import check_counts, make_plan
from pipeline.pruning.slicing import build_pruned_model, teacher_shape
from tests.conftest import tiny_llama_config, tiny_qwen2_config
from tests.test_prune import _cfg

ARCHS = {"llama": tiny_llama_config, "qwen2": tiny_qwen2_config}


def _teacher(arch: str, layers: int = 6):
    torch.manual_seed(0)
    cfg = ARCHS[arch](num_hidden_layers=layers)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    out = []
    for B, T in ((3, 11), (2, 7)):
        ids = torch.randint(3, 101, (B, T), generator=g)
        mask = torch.ones_like(ids)
        mask[0, T - 3 :] = 0  # right padding: must not count
        out.append((ids, mask))
    return out


@torch.no_grad()
def _hf_loss(model, batches) -> float:
    """Token-weighted mean of HF's own shifted CE (labels = ids, padding -100)."""
    total = count = 0
    for ids, mask in batches:
        labels = ids.masked_fill(mask == 0, -100)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
        count += n
    return total / count


def _cut(teacher, kept, batches):
    shape = teacher_shape(teacher)
    from pipeline.config.prune import PruneConfig

    plan = make_plan(kept, check_counts(PruneConfig(), shape), compute_importance(teacher, batches), shape)
    return build_pruned_model(teacher, plan)


@pytest.mark.parametrize("arch", ARCHS)
def test_lm_loss_matches_hf_and_the_layer_view_matches_a_cut_model(arch):
    teacher, batches = _teacher(arch), _batches(0)
    assert lm_loss(teacher, batches) == pytest.approx(_hf_loss(teacher, batches), rel=1e-5)
    kept = [0, 3, 5]
    with only_layers(teacher, kept):
        view = lm_loss(teacher, batches)
    assert len(teacher.model.layers) == 6 and teacher.config.num_hidden_layers == 6  # restored
    assert view == pytest.approx(_hf_loss(_cut(teacher, kept, batches), batches), rel=1e-5)
    assert view != pytest.approx(lm_loss(teacher, batches), rel=1e-3)  # the view really dropped layers


def test_windows_never_include_the_last_layer():
    assert candidate_windows([0, 1, 2, 3, 4, 5], 3) == [[0, 1, 2], [1, 2, 3], [2, 3, 4]]
    assert candidate_windows([0, 2, 5, 7], 2) == [[0, 2], [2, 5]]
    assert search_evaluations(6, 3) == 3 and search_evaluations(6, 2, block=1) == 5 + 4 + 3 + 2


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("keep, block", [(3, 0), (2, 1), (2, 2)])
def test_greedy_search_picks_the_cheapest_window_by_brute_force(arch, keep, block):
    teacher, batches = _teacher(arch), _batches(1)
    kept, rounds = drop_contiguous_blocks(teacher, batches, keep, block)
    assert len(kept) == keep and kept[-1] == 5 and kept == sorted(kept)
    present = list(range(6))
    for r in rounds:  # replay every round against separately cut models
        size = len(r["removed"])
        brute = {}
        for w in candidate_windows(present, size):
            rest = [i for i in present if i not in w]
            brute[(w[0], w[-1])] = _hf_loss(_cut(teacher, rest, batches), batches)
        best = min(brute, key=lambda k: (brute[k], k))
        assert (r["removed"][0], r["removed"][-1]) == best
        assert r["loss"] == pytest.approx(brute[best], rel=1e-5)
        assert len(r["candidates"]) == len(brute)
        present = [i for i in present if i not in r["removed"]]
    assert present == kept
    assert sum(len(r["candidates"]) for r in rounds) == search_evaluations(6, keep, block)


def test_contiguous_prune_writes_the_search_into_prune_meta(tmp_path):
    cfg = _cfg(tmp_path, layers="contiguous", num_layers=2)
    meta = run_prune(cfg)
    saved = json.loads((tmp_path / "students" / "p" / "prune_meta.json").read_text())
    assert saved["kept_layers"] == meta["kept_layers"] and saved["kept_layers"][-1] == 3
    (only,) = saved["block_removal"]
    assert len(only["removed"]) == 2 and set(only["candidates"]) == {"0-1", "1-2"}
    assert only["loss"] == min(only["candidates"].values())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "students" / "p")
    assert model.config.num_hidden_layers == 2


def test_bad_drop_block_is_one_line_and_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, layers="contiguous", num_layers=2, drop_block=3)
    with pytest.raises(ConfigError) as e:
        run_prune(cfg)
    assert "prune.drop_block=3: expected at most 2 (the teacher's 4 layers minus the 2 kept" in str(e.value)
    assert "\n" not in str(e.value) and not (tmp_path / "students").exists()
