"""trainer/ablate.py end to end with the real stages on tiny random models: the store is extracted by the
sweep itself (it is missing), 2 arms x 2 seeds train with trainer.train, one training process is SIGKILLed
mid-run by the test (the sweep dies with it), and the rerun resumes that run from its checkpoint and completes the
matrix without duplicate rows; then the report is built from the results.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from pipeline.store.reader import KVStore
from tests.helpers_kill import KillChildWhen, files_exist
from tests.helpers_store import save_tiny_teacher, write_extract_config
from trainer import ablate
from trainer.ablation.config import load_ablation
from trainer.ablation.results import read_results

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher") / "t")


def write_matrix(tmp_path, teacher):
    base = yaml.safe_load(write_extract_config(tmp_path, teacher, num_rows=16).read_text())
    base.update(
        kv_projection_mode="structured",
        train={
            "steps": 4,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 1,
            "ckpt_every": 2,
            "log_every": 1,
            "num_workers": 0,
            "progress": False,
        },
        eval={"every": 2, "batch_size": 8, "greedy_samples": 0},
    )
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    abl = {
        "base_config": str(tmp_path / "base.yaml"),
        "seeds": [0, 1],
        "out_dir": str(tmp_path / "out"),
        "control": "ce_only",
        "runner": "inprocess",
        "arms": [
            {"name": "ce_only", "overrides": ["lambda_kv=0"]},
            {"name": "v40_2", "overrides": {"align": {"share_dim_proj": True, "init_uniform": True}}},
        ],
    }
    (tmp_path / "abl.yaml").write_text(yaml.safe_dump(abl, sort_keys=False))
    return load_ablation(tmp_path / "abl.yaml")


@pytest.mark.slow  # one real training subprocess (~6 s of imports and steps on an idle 2-core machine)
def test_real_sweep_extracts_survives_a_killed_run_and_resumes(tmp_path, teacher, monkeypatch):
    abl = write_matrix(tmp_path, teacher)
    out = tmp_path / "out"
    real_inprocess = ablate.RUNNERS["inprocess"]
    calls = []

    def first_sweep(spec, resume, a):
        calls.append((spec.arm, spec.seed, resume))
        if len(calls) < 2:
            return real_inprocess(spec, resume, a)
        return ablate.run_subprocess(spec, resume, a)  # the second run trains in a child process

    monkeypatch.setitem(ablate.RUNNERS, "inprocess", first_sweep)
    # the test SIGKILLs that child from outside once its first checkpoint (step 2 of 4) is on disk
    child_ckpts = out / "ce_only" / "seed_1" / "checkpoints"
    watcher = KillChildWhen(
        files_exist(child_ckpts, "step_??????"), match=str(out / "ce_only" / "seed_1.yaml")
    )
    with watcher, pytest.raises(RuntimeError, match=r"arm 'ce_only' seed 1: training exited with code -9"):
        ablate.run_ablation(abl)
    assert len(watcher.killed) == 1
    assert KVStore(tmp_path / "store.zarr").complete  # extracted by the sweep, once
    rows = read_results(out / "results.jsonl")
    assert [(r["arm"], r["seed"]) for r in rows] == [("ce_only", 0)]
    killed = out / "ce_only" / "seed_1"
    assert not (killed / "metrics.json").exists() and any((killed / "checkpoints").iterdir())
    assert ablate.run_state(abl_spec(abl, "ce_only", 1)) == "resumable"

    calls.clear()

    def counting(spec, resume, a):
        calls.append((spec.arm, spec.seed, resume))
        return real_inprocess(spec, resume, a)

    monkeypatch.setitem(ablate.RUNNERS, "inprocess", counting)
    rows = ablate.run_ablation(abl)
    assert calls == [("ce_only", 1, True), ("v40_2", 0, False), ("v40_2", 1, False)]
    keys = [(r["arm"], r["seed"]) for r in rows]
    assert keys == [("ce_only", 0), ("ce_only", 1), ("v40_2", 0), ("v40_2", 1)]
    fp = KVStore(tmp_path / "store.zarr").fingerprint
    for r in rows:
        m = r["metrics"]
        assert r["store_fingerprint"] == fp and m["steps"] == 4
        assert math.isfinite(m["eval/ce"]) and 0 <= m["eval/acc_R"] <= 1
        meta = json.loads((out / r["arm"] / f"seed_{r['seed']}" / "meta.json").read_text())
        assert meta["seed"] == r["seed"]
    assert rows[1]["resumed"] is True
    assert [r["aligner_params"] for r in rows][:2] == [0, 0] and rows[2]["aligner_params"] > 0
    assert len(rows[2]["metrics"]["train/cos_k_layer"]) == 3  # one per student layer
    # different seeds give different runs; the same seed in another arm starts from the same student
    assert rows[2]["metrics"]["eval/ce"] != rows[3]["metrics"]["eval/ce"]

    calls.clear()
    assert len(ablate.run_ablation(abl)) == 4 and calls == []  # complete: nothing reruns
    md = (out / "report.md").read_text()
    assert "| ce_only | 2 |" in md and "| v40_2 | 2 |" in md and "Delta vs the control `ce_only`" in md
    assert (out / "loss_curves.png").stat().st_size > 5000 and (out / "cos_layers.png").exists()


def abl_spec(abl, arm, seed):
    from trainer.ablation.config import plan_runs

    return next(s for s in plan_runs(abl) if s.key == (arm, seed))
