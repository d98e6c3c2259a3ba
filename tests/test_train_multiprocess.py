"""A 2-process accelerate run (gloo on CPU) trains and matches a 1-process run with the same global batch.

Every tiny-store sample has the same length, so the mean of the two ranks' per-token means equals the
1-process mean over the whole global batch: the loss curves must agree to float tolerance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from tests.helpers_train import losses, make_tiny_store, tiny_train_config, write_config
from trainer.train import run_training

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_two_process_run_equals_one_process_run(tmp_path):
    store = make_tiny_store(tmp_path / "s.zarr", num_train=16, num_eval=6)
    common = {"train.steps": 3, "train.ckpt_every": 0, "train.num_workers": 1, "eval.every": 0}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = tiny_train_config(tmp_path / "one", store, **common, **{"train.batch_size": 4})
    two = tiny_train_config(tmp_path / "two", store, **common, **{"train.batch_size": 2})
    m1 = run_training(from_dict(KVMapConfig, one))
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--main_process_port", "0", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(REPO / "trainer" / "train.py"), "--config", str(write_config(tmp_path / "two", two)),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("eval/ce=") == 1  # only the main rank prints
    meta = json.loads((Path(two["run_dir"]) / "meta.json").read_text())
    assert meta["num_processes"] == 2
    assert losses(two["run_dir"]) == pytest.approx(losses(one["run_dir"]), rel=1e-5)
    m2 = json.loads((Path(two["run_dir"]) / "metrics.json").read_text())
    assert m2["eval/ce"] == pytest.approx(m1["eval/ce"], rel=1e-5)
    assert m2["eval/samples"] == m1["eval/samples"] == 6


@pytest.mark.slow
def test_a_two_process_run_resumed_with_one_process_finishes_the_same_samples(tmp_path):
    """Elastic resume: the step-2 checkpoint of a 2-process run (batch 2 per rank) resumed by 1 process with
    grad_accum 2 (the same 4 samples per step) gives the uninterrupted run's losses for steps 3-4."""
    store = make_tiny_store(tmp_path / "s.zarr", num_train=16, num_eval=6)
    two = tiny_train_config(
        tmp_path,
        store,
        **{"train.steps": 4, "train.ckpt_every": 2, "train.save_final_state": True, "train.num_workers": 1},
        **{"train.batch_size": 2, "eval.every": 0, "train.log_every": 1},
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--main_process_port",
        "0",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        str(REPO / "trainer" / "train.py"),
        "--config",
        str(write_config(tmp_path, two)),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = Path(two["run_dir"])
    uninterrupted = losses(run)
    # back to the moment after step 2: the later checkpoint, the end products and steps 3-4 are gone
    shutil.rmtree(run / "checkpoints" / "step_000004")
    shutil.rmtree(run / "student")
    (run / "metrics.json").unlink()
    one = {**two, "train": {**two["train"], "batch_size": 2, "grad_accum": 2}}
    cfg = from_dict(KVMapConfig, one)
    run_training(cfg, resume=True)
    assert losses(run) == pytest.approx(uninterrupted, rel=1e-5)
    with pytest.raises(ConfigError, match="consumed 4 samples per step"):
        shutil.rmtree(run / "checkpoints" / "step_000004")
        (run / "metrics.json").unlink()
        run_training(from_dict(KVMapConfig, {**two, "train": {**two["train"], "batch_size": 2}}), resume=True)
