"""trainer/objective/grad_probe.py (`train.grad_probe_every`): per-term gradient norms and cosines on the student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from tests.helpers_train import make_tiny_store, tiny_train_config
from trainer.objective.grad_probe import grad_probe, term_gradients, term_weights
from trainer.train import run_training

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # dtype -> tolerance of norms / cosines vs the reference


def _terms(dtype, seed):
    """Three scalar terms of a small two-layer net on fresh random inputs; returns (params, terms builder)."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(5, 7, generator=g, dtype=dtype, requires_grad=True)
    w2 = torch.randn(3, 5, generator=g, dtype=dtype, requires_grad=True)
    unused = torch.randn(4, generator=g, dtype=dtype, requires_grad=True)  # no term reaches it
    x, y = torch.randn(9, 7, generator=g, dtype=dtype), torch.randn(9, 3, generator=g, dtype=dtype)

    def build():
        h = torch.tanh(x @ w1.T)  # (9, 5)
        out = h @ w2.T  # (9, 3)
        return {"loss_ce": ((out - y) ** 2).mean(), "loss_kd": out.exp().mean(), "loss_struct": (h**2).sum()}

    return [w1, w2, unused], build


def _reference(params, build, key, weight):
    """Naive: a fresh graph, `.backward()` of the weighted term, read `.grad`."""
    for p in params:
        p.grad = None
    (weight * build()[key]).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_term_gradients_norms_and_cosines_match_separate_backwards(dtype, seed):
    params, build = _terms(dtype, seed)
    weights = term_weights(0.7, 1.3, 0.25)
    got = term_gradients(build(), weights, params)
    ref = {
        n: _reference(params, build, k, weights[k])
        for k, n in (("loss_ce", "ce"), ("loss_kd", "kd"), ("loss_struct", "struct"))
    }
    tol = TOL[dtype]
    for n in ref:
        assert torch.allclose(got[n].double(), ref[n].double(), rtol=tol, atol=tol), n
        assert got[n][-4:].abs().max() == 0  # the unused parameter's slot is zero, not missing
    logs = grad_probe(build(), weights, params)
    for a, b in (("ce", "kd"), ("ce", "struct"), ("kd", "struct")):
        want = torch.nn.functional.cosine_similarity(ref[a].double(), ref[b].double(), dim=0).item()
        assert logs[f"gprobe/cos_{a}_{b}"] == pytest.approx(want, abs=tol * 10)
    assert logs["gprobe/norm_struct"] == pytest.approx(ref["struct"].double().norm().item(), rel=tol * 10)


def test_absent_or_zero_weight_terms_are_skipped():
    params, build = _terms(torch.float64, 3)
    logs = grad_probe(build(), term_weights(1.0, None, 0.0), params)  # no KD, structural weight 0
    assert set(logs) == {"gprobe/norm_ce"}
    terms = build()
    del terms["loss_kd"]
    assert set(term_gradients(terms, term_weights(1.0, 1.0, 1.0), params)) == {"ce", "struct"}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("gp") / "gp.zarr", num_train=16, num_eval=4, top_k=8)


def _run(tmp_path, store, **overrides):
    ov = {"train.steps": 4, "loss_config.alpha_logit": 1.0, "eval.every": 0, "eval.greedy_samples": 0}
    cfg = from_dict(KVMapConfig, tiny_train_config(tmp_path, store, **{**ov, **overrides}))
    metrics = run_training(cfg)
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return metrics, [r for r in rows if "loss" in r]


def test_a_probed_run_trains_exactly_like_an_unprobed_one(tmp_path, store):
    plain, plain_rows = _run(tmp_path / "plain", store, **{"train.log_every": 1})
    probed, rows = _run(tmp_path / "probed", store, **{"train.grad_probe_every": 2, "train.log_every": 3})
    by_step = {r["step"]: r["loss"] for r in plain_rows}
    assert len(by_step) == 4 and all(r["loss"] == by_step[r["step"]] for r in rows)
    assert probed["eval/ce"] == plain["eval/ce"]  # the same trained student
    probe_rows = [r for r in rows if "gprobe/norm_ce" in r]
    assert [r["step"] for r in probe_rows] == [2, 4]  # logged on probe steps even off the log_every grid
    for r in probe_rows:
        assert r["gprobe/norm_ce"] > 0 and r["gprobe/norm_kd"] > 0 and r["gprobe/norm_struct"] > 0
        assert all(-1.0 <= r[f"gprobe/cos_{p}"] <= 1.0 for p in ("ce_kd", "ce_struct", "kd_struct"))
    assert not any("gprobe/norm_ce" in r for r in plain_rows)


def test_grad_probe_every_must_be_non_negative(tmp_path, store):
    with pytest.raises(ConfigError, match="train.grad_probe_every"):
        from_dict(KVMapConfig, tiny_train_config(tmp_path, store, **{"train.grad_probe_every": -1}))
