"""`train.fsdp`: the student sharded over 2 gloo processes on CPU trains like 1 unsharded process.

Same argument as tests/test_train_multiprocess.py: every tiny-store sample has the same length, so the mean
over the two ranks' micro-batches equals the 1-process mean over the global batch, and the loss curves agree
to float tolerance. The saved student is checked against the run's own distributed checkpoint of the last
step, gathered here by torch (`dcp_to_torch_save`), not against the code that wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from tests.helpers_train import losses, make_tiny_store, tiny_train_config, write_config
from trainer.train import run_training

REPO = Path(__file__).resolve().parent.parent


def launch(config: Path, *extra: str, launch_args=("--multi_gpu", "--num_processes", "2")) -> None:
    """`accelerate launch` of trainer/train.py (2 gloo processes on CPU); asserts it exits 0."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launch_args, "--main_process_port", "0"]
    cmd += [str(REPO / "trainer" / "train.py"), "--config", str(config), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]


def eval_ces(run_dir) -> list[float]:
    """eval/ce of every evaluation row of metrics.jsonl (steps 2, 4 and the end)."""
    rows = (json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
    return [r["eval/ce"] for r in rows if "eval/ce" in r]


def gathered_checkpoint(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    """The model weights of a distributed checkpoint, gathered by torch into one file and read back."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt / "fsdp"), str(out))
    return torch.load(out, weights_only=False)["model"]


@pytest.mark.slow
def test_fsdp_two_processes_train_like_one_and_save_the_gathered_student(tmp_path):
    from transformers import AutoModelForCausalLM

    store = make_tiny_store(tmp_path / "s.zarr", num_train=16, num_eval=6)
    # eval at step 2 and 4 too: the student is called outside the sharded forward, then trains on
    common = {"train.steps": 5, "train.num_workers": 0, "eval.every": 2, "train.log_every": 1}
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    one = tiny_train_config(
        tmp_path / "one", store, **common, **{"train.batch_size": 4, "train.ckpt_every": 0}
    )
    # 2 processes x 1 sample x 2 micro-batches = the 1-process batch of 4; checkpoints at steps 3 and 5
    two = tiny_train_config(
        tmp_path / "two",
        store,
        **common,
        **{
            "train.batch_size": 1,
            "train.grad_accum": 2,
            "train.ckpt_every": 3,
            "train.save_final_state": True,
        },
    )
    m1 = run_training(from_dict(KVMapConfig, one))
    # the FSDP launch config turns train.fsdp on (the config file does not set it)
    fsdp_yaml = ("--config_file", str(REPO / "configs" / "accelerate" / "fsdp.yaml"))
    launch(write_config(tmp_path / "two", two), launch_args=fsdp_yaml)
    run = Path(two["run_dir"])
    assert json.loads((run / "meta.json").read_text())["num_processes"] == 2
    assert "fsdp: true" in (run / "config.yaml").read_text()
    assert losses(run) == pytest.approx(losses(one["run_dir"]), rel=1e-4)
    assert eval_ces(run) == pytest.approx(eval_ces(one["run_dir"]), rel=1e-5) and len(eval_ces(run)) == 3
    m2 = json.loads((run / "metrics.json").read_text())
    assert m2["eval/ce"] == pytest.approx(m1["eval/ce"], rel=1e-5)
    assert m2["eval/exact_match"] == m1["eval/exact_match"] and m2["eval/samples"] == 6

    # the saved student reloads as a plain HF model equal to the gathered shards of the last step
    full = gathered_checkpoint(run / "checkpoints" / "step_000005", tmp_path / "full.pt")
    student = AutoModelForCausalLM.from_pretrained(run / "student").state_dict()
    for name, w in student.items():
        assert torch.equal(w, full["student." + name]), name
    aligner = load_file(str(run / "student" / "aligner.safetensors"))
    assert aligner and all(torch.equal(w, full["aligner." + k]) for k, w in aligner.items())
    unsharded = AutoModelForCausalLM.from_pretrained(Path(one["run_dir"]) / "student").state_dict()
    for name, w in student.items():
        torch.testing.assert_close(w, unsharded[name], rtol=1e-4, atol=1e-5)

    # resume from the step-3 checkpoint (train.fsdp now from the key): steps 4-5 as uninterrupted
    uninterrupted = losses(run)
    shutil.rmtree(run / "checkpoints" / "step_000005")
    shutil.rmtree(run / "student")
    (run / "metrics.json").unlink()
    two["train"]["fsdp"] = True
    launch(write_config(tmp_path / "two", two), "--resume")
    assert losses(run) == pytest.approx(uninterrupted, rel=1e-6)
    full = gathered_checkpoint(run / "checkpoints" / "step_000005", tmp_path / "full2.pt")
    resumed = AutoModelForCausalLM.from_pretrained(run / "student").state_dict()
    assert all(torch.equal(w, full["student." + n]) for n, w in resumed.items())


def test_fsdp_refusals_name_the_key(tmp_path):
    store = make_tiny_store(tmp_path / "s.zarr", num_train=8, num_eval=0)
    base = tiny_train_config(tmp_path, store, **{"train.steps": 1, "train.fsdp": True})
    with pytest.raises(
        ConfigError, match=r"'train.fsdp': got true with 1 process, expected a launch of >= 2"
    ):
        run_training(from_dict(KVMapConfig, base))
    assert not Path(base["run_dir"]).exists()
    with pytest.raises(ConfigError, match=r"'train.grad_probe_every': got 2 with train.fsdp, expected 0"):
        from_dict(KVMapConfig, {**base, "train": {**base["train"], "grad_probe_every": 2}})
    lora = {**base, "student": {**base["student"], "lora": {"r": 2}}}
    with pytest.raises(ConfigError, match=r"'student.lora': got adapters with train.fsdp, expected null"):
        run_training(from_dict(KVMapConfig, lora))
