"""Stage-2 loop on tiny random models and a tiny real-capture store: a few CPU steps each.

Covers: finite + falling loss + checkpoints + saved student reloads; lambda_kv=0 equals a plain HF CE loop;
both projection modes train; SIGKILL from outside (once a checkpoint exists) + --resume equals an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.config.configlib import from_dict
from pipeline.config.kvmap import KVMapConfig
from tests.helpers_kill import files_exist, run_until
from tests.helpers_train import losses, make_tiny_store, tiny_train_config, write_config
from trainer.run.checkpoint import latest_checkpoint, read_metrics
from trainer.train import run_training

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr", num_train=32, num_eval=8)


def _cfg(tmp_path, store, **kw) -> KVMapConfig:
    return from_dict(KVMapConfig, tiny_train_config(tmp_path, store, **kw))


def test_few_steps_finite_falling_checkpointed_and_reloadable(tmp_path, store):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, store, **{"train.steps": 8, "train.lr": 1e-2, "train.ckpt_every": 4})
    m = run_training(cfg)
    run = Path(cfg.run_dir)
    curve = losses(run)
    assert len(curve) == 8 and all(math.isfinite(x) for x in curve)
    assert sum(curve[-3:]) / 3 < curve[0] - 0.05, curve
    for key in (
        "eval/ce",
        "eval/ce_P",
        "eval/ce_R",
        "eval/ce_A",
        "eval/acc_R",
        "eval/acc_A",
        "train/loss_ce",
    ):
        assert math.isfinite(m[key]), key
    for key in ("train/cos_k", "train/cos_v", "train/attn_kl", "align/eff_rank_q", "align/eff_rank_k"):
        assert math.isfinite(m[key]), key
    assert len(m["train/cos_k_layer"]) == 3 and len(m["train/cos_v_layer"]) == 3
    assert m["steps"] == 8 and m["align/params"] > 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8
    meta = json.loads((run / "meta.json").read_text())
    assert meta["store_fingerprint"] and meta["seed"] == 0 and "git_sha" in meta
    # a finished run keeps the student and its metrics, not the optimizer state (train.save_final_state)
    assert not (run / "checkpoints").exists()
    # the saved student is a normal HF folder, and the aligner weights are beside it
    student = AutoModelForCausalLM.from_pretrained(run / "student").eval()
    assert student.config.num_hidden_layers == 3
    assert torch.isfinite(student(torch.randint(3, 100, (2, 9))).logits).all()
    weights = load_file(str(run / "student" / "aligner.safetensors"))
    assert sum(v.numel() for v in weights.values()) >= m["align/params"]
    aligner_meta = json.loads((run / "student" / "aligner.json").read_text())
    assert aligner_meta["mode"] == "structured" and aligner_meta["layer_map"] == [1, 2, 3]


def test_saved_student_equals_trained_weights(tmp_path, store):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tmp_path, store, **{"train.steps": 2, "train.ckpt_every": 0, "train.save_final_state": True})
    run_training(cfg)
    saved = AutoModelForCausalLM.from_pretrained(Path(cfg.run_dir) / "student")
    # the final checkpoint (accelerate's copy of student + aligner) holds the same student weights
    ckpt = latest_checkpoint(cfg.run_dir)
    state = load_file(str(next(ckpt.glob("model*.safetensors"))))
    checked = 0
    for name, p in saved.named_parameters():
        if f"student.{name}" in state:
            assert torch.equal(state[f"student.{name}"], p.detach()), name
            checked += 1
    assert checked == len(list(saved.parameters()))


def test_lambda_zero_equals_plain_ce_training(tmp_path, store):
    """With lambda_kv=0 the trainer is exactly a plain causal-LM loop (HF's own loss on the same batches)."""
    from pipeline.models.load import load_model
    from pipeline.store.reader import KVStore
    from trainer.data.loader import ResumableSampler
    from trainer.objective.schedules import lr_multiplier

    steps, B = 5, 4
    cfg = _cfg(tmp_path, store, **{"lambda_kv": 0.0, "train.steps": steps, "train.batch_size": B})
    m = run_training(cfg)
    got = losses(cfg.run_dir)
    assert m["align/params"] == 0 and "train/cos_k" not in m

    torch.manual_seed(cfg.seed)
    model, _ = load_model(cfg.student, for_training=True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.train.lr,
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_multiplier(s, cfg.train.warmup_steps, steps, cfg.train.min_lr_ratio)
    )
    ks = KVStore(store)
    order = list(ResumableSampler(ks.num_samples(), cfg.seed, steps * B))
    ref = []
    for s in range(steps):
        samples = [ks.read_sample(i, components=()) for i in order[s * B : (s + 1) * B]]
        T = max(len(x["input_ids"]) for x in samples)
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for b, x in enumerate(samples):
            ids[b, : len(x["input_ids"])] = x["input_ids"]
            mask[b, : len(x["input_ids"])] = 1
        labels = ids.masked_fill(mask == 0, -100)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
        opt.step()
        sched.step()
        opt.zero_grad()
        ref.append(float(loss.detach()))
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_flat_mode_trains(tmp_path, store):
    cfg = _cfg(tmp_path, store, **{"kv_projection_mode": "flat", "train.steps": 4, "train.lr": 1e-2})
    m = run_training(cfg)
    curve = losses(cfg.run_dir)
    assert all(math.isfinite(x) for x in curve) and curve[-1] < curve[0]
    rows = [r for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl") if "loss_struct" in r]
    assert rows[-1]["loss_struct"] < rows[0]["loss_struct"]  # the flat projector learns too
    assert m["align/params"] > 0


def test_shard_window_order_trains_with_cached_whole_shard_reads(tmp_path, store, capsys):
    kw = {"train.steps": 4, "train.lr": 1e-2}
    m = run_training(
        _cfg(tmp_path / "s", store, **kw, **{"train.shuffle": "shards", "train.shuffle_window": 2})
    )
    assert "train.shuffle=shards:" in capsys.readouterr().err and math.isfinite(m["train/loss_ce"])
    run_training(_cfg(tmp_path / "g", store, **kw))
    assert losses(tmp_path / "s" / "run") != losses(tmp_path / "g" / "run")  # another sample order


def test_segments_and_lambda_schedule_are_applied(tmp_path, store):
    cfg = _cfg(
        tmp_path,
        store,
        **{
            "train.steps": 4,
            "train.ce_segments": ["R", "A"],
            "train.struct_segments": ["R"],
            "train.lambda_schedule": "linear",
            "loss_config": {"attn_target": "teacher"},
            "align": {"rope_consistent": True},
        },
    )
    run_training(cfg)
    rows = [r for r in read_metrics(Path(cfg.run_dir) / "metrics.jsonl") if "lambda_kv" in r]
    assert [r["lambda_kv"] for r in rows] == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert all(math.isfinite(r["attn_kl"]) for r in rows)


def _cli(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "trainer" / "train.py"), "--config", str(config), *extra]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def test_sigkill_then_resume_equals_uninterrupted(tmp_path, store):
    # ckpt every 2 steps; SIGKILL from outside as soon as the first checkpoint folder appears: the run dies
    # somewhere in steps 3..6, so it resumes from step 2 or 4, and a train/* window (log_every 3: steps
    # 1-3 or 4-6) spans the resume point either way.
    base = {
        "train.steps": 6,
        "train.ckpt_every": 2,
        "train.log_every": 3,
        "train.num_workers": 1,
        "train.grad_accum": 2,
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg_a = tiny_train_config(tmp_path / "a", store, **base)
    cfg_b = tiny_train_config(tmp_path / "b", store, **base)
    run_training(from_dict(KVMapConfig, cfg_a))  # uninterrupted (in-process: saves a Python start-up)
    ckpts = Path(cfg_b["run_dir"]) / "checkpoints"
    killed = run_until(
        _cli(write_config(tmp_path / "b", cfg_b)), files_exist(ckpts, "step_??????"), cwd=REPO, env=_env()
    )
    assert killed.fired and killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert latest_checkpoint(cfg_b["run_dir"]).name in ("step_000002", "step_000004")
    assert not (Path(cfg_b["run_dir"]) / "metrics.json").exists()
    resumed = subprocess.run(
        _cli(write_config(tmp_path / "b", cfg_b), "--resume"),
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows_a = read_metrics(Path(cfg_a["run_dir"]) / "metrics.jsonl")
    rows_b = read_metrics(Path(cfg_b["run_dir"]) / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [1, 3, 6, 6]  # 3 train rows + eval
    for ra, rb in zip(rows_a, rows_b):
        for k, v in ra.items():
            if isinstance(v, float) and k != "step_s":
                assert rb[k] == pytest.approx(v, rel=1e-6, abs=1e-7), k
    ea = json.loads((Path(cfg_a["run_dir"]) / "metrics.json").read_text())
    eb = json.loads((Path(cfg_b["run_dir"]) / "metrics.json").read_text())
    for k in ("eval/ce", "eval/acc_R", "train/loss", "train/loss_ce", "train/cos_k", "train/attn_kl"):
        assert eb[k] == pytest.approx(ea[k], rel=1e-6), k
    assert eb["train/cos_k_layer"] == pytest.approx(ea["train/cos_k_layer"], rel=1e-6)


def test_restart_over_existing_run_is_refused_without_flag(tmp_path, store):
    cfg = _cfg(tmp_path, store, **{"train.steps": 2})
    first = run_training(cfg)
    with pytest.raises(ValueError, match="holds a finished run"):
        run_training(cfg)
    assert run_training(cfg, resume=True) == json.loads((Path(cfg.run_dir) / "metrics.json").read_text())
    with pytest.raises(ValueError, match="config key 'train.steps' was 2 in the checkpoint, now 3"):
        run_training(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=3)), resume=True)
    assert run_training(cfg, overwrite=True)["eval/ce"] == pytest.approx(first["eval/ce"], rel=1e-6)


def test_save_final_state_keeps_the_optimizer(tmp_path, store):
    """With train.save_final_state the finished run keeps a full checkpoint; --resume of it re-evaluates."""
    cfg = _cfg(tmp_path, store, **{"train.steps": 3, "train.ckpt_every": 2, "train.save_final_state": True})
    first = run_training(cfg)
    run = Path(cfg.run_dir)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    assert (run / "checkpoints" / "step_000003" / "optimizer.bin").is_file()
    again = run_training(cfg, resume=True)
    assert again["eval/ce"] == pytest.approx(first["eval/ce"], rel=1e-6) and again["steps"] == 3


def test_unwritable_run_dir_is_one_line(tmp_path, store):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = _cfg(tmp_path, store, **{"run_dir": str(blocker / "run")})  # a folder below a file: never writable
    with pytest.raises(PermissionError, match=r"run_dir='.*a_file/run' is not a writable folder") as e:
        run_training(cfg)
    assert "\n" not in str(e.value)
