"""Issue-13 stage-2 wiring: head selection, staged (lambda_until) and auto-weighted lambda, relation and sink arms."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from alignment.mapping.head_select import HeadSelection, select_heads
from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from tests.conftest import tiny_llama_config, tiny_student_config
from tests.helpers_train import make_tiny_store, tiny_train_config
from tests.test_step_logits import _batch
from trainer.objective.schedules import auto_lambda, lambda_kv_at
from trainer.objective.step import DistillModel, forward_step
from trainer.train import run_training


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr", num_train=16, num_eval=4)


def _student_aligner_batch(seed=0):
    from transformers import LlamaForCausalLM

    from alignment import create_aligner

    torch.manual_seed(seed)
    student = LlamaForCausalLM(tiny_student_config())
    aligner = create_aligner("structured", tiny_llama_config(), student.config)
    batch = _batch(seed + 3)
    B, T = batch["input_ids"].shape
    L = len(aligner.teacher_layers)
    g = torch.Generator().manual_seed(seed + 1)
    batch["q_t"] = torch.randn(B, L, 6, T, 16, generator=g)  # (B, L_sel, H_t, T, D_t)
    batch["k_t"], batch["v_t"] = (torch.randn(B, L, 2, T, 16, generator=g) for _ in range(2))
    return student, aligner, batch


def _attn_only(**kw):
    from alignment import create_structural_loss

    return create_structural_loss(alpha_k=0.0, alpha_v=0.0, alpha_attn=1.0, attn_target="teacher", **kw)


def test_selection_of_all_heads_with_the_uniform_mixer_reproduces_todays_step_exactly():
    student, aligner, batch = _student_aligner_batch()
    model, loss_fn = DistillModel(student, aligner), _attn_only()
    kw = dict(ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=1.0, loss_fn=loss_fn)
    a = forward_step(model, batch, **kw)
    ga = torch.autograd.grad(a.loss, list(student.parameters()))
    L_s, H_s, H_t = len(aligner.layer_map), aligner.H_s, aligner.H_t
    mix = (
        aligner.q_head_mix().detach().expand(L_s, H_s, H_t).clone()
    )  # the uniform GQA mixer as a "selection"
    aligner.set_head_selection(HeadSelection([], mix, torch.ones(L_s, H_s, dtype=torch.bool)))
    b = forward_step(model, batch, **kw)
    gb = torch.autograd.grad(b.loss, list(student.parameters()))
    assert a.loss.item() == b.loss.item() and a.logs["attn_kl"] == b.logs["attn_kl"]
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def _one_update(model, batch, lam, loss_fn):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95))
    res = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=lam, loss_fn=loss_fn)
    res.loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.5)
    opt.step()
    return res


def test_staged_off_steps_give_exactly_the_ce_only_update():
    assert [lambda_kv_at(s, 0.7, "step", 0, 10, until=3) for s in range(5)] == [0.7, 0.7, 0.7, 0.0, 0.0]
    student, aligner, batch = _student_aligner_batch(1)
    ce_student = copy.deepcopy(student)
    res = _one_update(
        DistillModel(student, aligner), batch, lambda_kv_at(5, 1.0, "step", 0, 10, 3), _attn_only()
    )
    ref = _one_update(DistillModel(ce_student, None), batch, 0.0, None)
    assert res.aligned is None and "loss_struct" not in res.terms  # the structural forward was skipped
    assert res.loss.item() == ref.loss.item()
    for (n, p), q in zip(student.named_parameters(), ce_student.parameters()):
        assert torch.equal(p, q), n


def test_auto_lambda_is_the_detached_clipped_ratio():
    assert auto_lambda(2.0, 0.5, 0.01, 100.0) == 4.0
    assert auto_lambda(2.0, 1e-9, 0.01, 100.0) == 100.0 and auto_lambda(1e-9, 2.0, 0.01, 100.0) == 0.01
    with pytest.raises(ValueError, match="lambda_auto_range"):
        auto_lambda(1.0, 1.0, 2.0, 1.0)
    student, aligner, batch = _student_aligner_batch(2)
    model, loss_fn = DistillModel(student, aligner), _attn_only()
    res = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv="auto", loss_fn=loss_fn,
                       lambda_auto_range=(0.01, 100.0))  # fmt: skip
    ce, st = res.terms["loss_ce"], res.terms["loss_struct"]
    lam = float(ce.detach()) / float(st.detach())
    assert res.logs["lambda_kv"] == pytest.approx(lam)
    torch.testing.assert_close(res.loss, ce + lam * st)
    # the weight is a constant: d loss = d ce + lam d struct (no gradient through the ratio)
    g = torch.autograd.grad(res.loss, list(student.parameters()), retain_graph=True)
    want = torch.autograd.grad(ce + lam * st, list(student.parameters()))
    for a, b in zip(g, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_assignment_rule_and_bad_selections():
    scores = {
        "layers": [0, 1, 2, 3],
        "retrieval": [[0.1] * 6, [0.0, 0.9, 0, 0, 0, 0.5], [0] * 6, [0.7] + [0] * 5],
    }
    scores["answer_mass"] = scores["retrieval"]
    sel = select_heads("top_retrieval", [1, 3], 6, 4, top=3, scores=scores)
    # ranked 1.h1 (0.9), 3.h0 (0.7), 1.h5 (0.5); student layer of teacher layer 1 is 0, of 3 is 1
    assert [p[:4] for p in sel.pairs] == [(0, 0, 1, 1), (1, 0, 3, 0), (0, 1, 1, 5)]
    assert sel.head_mask.tolist() == [[True, True, False, False], [True, False, False, False]]
    assert sel.head_mix[0, 1].tolist() == [0, 0, 0, 0, 0, 1.0]
    assert "student L0.h0 <- teacher L1.h1 (0.900)" in sel.describe()
    assert select_heads("all", [1, 3], 6, 4) is None
    for kw, match in (
        (
            dict(method="list", heads=[[1, 6]]),
            r"heads: \[1, 6\]: expected \[teacher layer in the layer map \[1, 3\]",
        ),
        (dict(method="list", heads=[[2, 0]]), r"heads: \[2, 0\]"),
        (dict(method="top_retrieval", top=13, scores=scores), r"top=13: expected an int in \[1, 12\]"),
        (dict(method="top_attention", top=1), r"method='top_attention'"),
        (dict(method="list", heads=[[1, h] for h in range(5)]), "teacher layer 1 gets more chosen heads"),
    ):
        with pytest.raises(ValueError, match=match) as e:
            select_heads(layer_map=[1, 3], H_t=6, H_s=4, **kw)
        assert "\n" not in str(e.value)


ATTN_ONLY = {"loss_config.attn_target": "teacher", "loss_config.alpha_k": 0.0, "loss_config.alpha_v": 0.0}


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({**ATTN_ONLY, "align.head_select": {"method": "list", "heads": [[0, 9]]}}, r"heads: \[0, 9\]"),
        ({**ATTN_ONLY, "align.head_select": {"method": "top_retrieval", "top": 99}}, "top=99"),
        ({"align.head_select": {"method": "top_retrieval", "top": 2}}, "attn_target=teacher"),
        (
            {"loss_config.relation": {"components": ["q"], "heads": 3, "weight": 1.0}},
            "relation.heads=3: expected a positive int dividing the student q width 32",
        ),  # fmt: skip
        (
            {"loss_config.relation": {"components": ["q"], "heads": "selected", "weight": 1.0}},
            "'selected' with align.head_select.method='all': expected a head selection",
        ),  # fmt: skip
        ({"train.lambda_schedule": "step"}, "train.lambda_until"),
        ({"lambda_kv": "auto", "train.lambda_schedule": "linear"}, "'auto' with train.lambda_schedule"),
    ],
)
def test_bad_structural_configs_stop_before_any_step(tmp_path, store, overrides, match):
    data = tiny_train_config(tmp_path, store, **overrides)
    with pytest.raises(ConfigError, match=match) as e:  # from the config classes or the preflight
        run_training(from_dict(KVMapConfig, data))
    assert "\n" not in str(e.value) and not (Path(data["run_dir"]) / "metrics.jsonl").exists()


def test_unknown_method_is_a_config_error(tmp_path, store):
    with pytest.raises(ConfigError, match="align.head_select.method"):
        from_dict(
            KVMapConfig, tiny_train_config(tmp_path, store, **{"align.head_select": {"method": "best"}})
        )


def test_new_arms_train_end_to_end(tmp_path, store, capsys):
    arms = {
        "heads_top": {
            **ATTN_ONLY,
            "loss_config.sink": "drop",
            "align.head_select": {"method": "top_retrieval", "top": 2, "samples": 8},
        },  # fmt: skip
        "relation": {"loss_config.alpha_attn": 0.0, "loss_config.relation": {"heads": 4, "weight": 1.0}},
        "staged": {**ATTN_ONLY, "train.lambda_schedule": "step", "train.lambda_until": 2},
        "auto": {**ATTN_ONLY, "lambda_kv": "auto"},
    }
    for name, ov in arms.items():
        cfg = from_dict(KVMapConfig, tiny_train_config(tmp_path / name, store, **{"train.steps": 3, **ov}))
        run_training(cfg)
        rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
        rows = [r for r in rows if "loss" in r]
        assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), name
        if name == "relation":
            assert all(r["rel_q"] > 0 and "attn_kl" not in r for r in rows)
        if name == "staged":
            assert [r["lambda_kv"] for r in rows] == [1.0, 1.0, 0.0] and "loss_struct" not in rows[2]
        if name == "auto":
            want = [min(100.0, max(0.01, r["loss_ce"] / r["loss_struct"])) for r in rows]  # default range
            assert [r["lambda_kv"] for r in rows] == pytest.approx(want, rel=1e-4)
    assert "head_select: 2 heads one-to-one: student L0.h0 <- teacher" in capsys.readouterr().err


def test_a_pruned_students_chosen_heads_go_to_the_heads_cut_from_them():
    """cut_from (align.init: from_prune): teacher head (t, h) -> the student head that was cut from it."""
    scores = {"layers": [4, 9], "retrieval": [[0.0, 0.1, 0.9, 0.0], [0.8, 0.0, 0.0, 0.7]]}
    plain = select_heads("top_retrieval", [4, 9], 4, 3, top=3, scores=scores)
    assert [p[:4] for p in plain.pairs] == [(0, 0, 4, 2), (1, 0, 9, 0), (1, 1, 9, 3)]  # lowest free head
    kept = [[0, 1, 2], [3, 1, 0]]  # student layer 1's heads were teacher heads 3, 1, 0
    sel = select_heads("top_retrieval", [4, 9], 4, 3, top=4, scores=scores, cut_from=kept)
    assert [p[:4] for p in sel.pairs] == [(0, 2, 4, 2), (1, 2, 9, 0), (1, 0, 9, 3), (0, 1, 4, 1)]
    for ls, hs, _, h, _ in sel.pairs:
        assert sel.head_mask[ls, hs] and sel.head_mix[ls, hs, h] == 1.0 and kept[ls][hs] == h
    narrow = select_heads(
        "top_retrieval", [4, 9], 4, 3, top=2, scores=scores, cut_from=[[0, 1, 3], [1, 2, 3]]
    )
    assert [p[:4] for p in narrow.pairs] == [(0, 0, 4, 2), (1, 0, 9, 0)]  # pruned-away heads: lowest free
