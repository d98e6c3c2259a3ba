"""Students that do not fit one device: gradient checkpointing and LoRA students (trainer/run/student_wrap.py).

Covers: captured Q/K/V, logits and every gradient are the same with non-reentrant checkpointing as
without; a run with checkpointing gives the plain run's losses (structural loss and KD on); a LoRA run
trains only the adapter (base weights bit-identical), saves the adapter and a merged folder that
`from_pretrained` loads with the peft model's logits, exports the merged folder, and resumes exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import trainer.train as train_mod
from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.models.capture import capture_qkv
from pipeline.models.load import load_model
from tests.conftest import tiny_student_config
from tests.helpers_train import losses, make_tiny_store, tiny_train_config
from trainer.export import export_student
from trainer.run.checkpoint import read_metrics
from trainer.run.student_wrap import enable_checkpointing
from trainer.train import run_training

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("scale") / "kd.zarr", num_train=16, num_eval=6, top_k=8)


def _captured_loss(student, ids):
    """Logits and every captured Q/K/V in one scalar (each with its own weight), as the trainer uses them."""
    with capture_qkv(student, detach=False) as cap:
        logits = student(input_ids=ids, use_cache=False).logits
    loss = logits.float().pow(2).mean()
    for i, c in enumerate(("q", "k", "v")):
        loss = loss + (i + 1) * cap.stack(c).pow(2).mean()
    return loss


def test_checkpointing_keeps_captured_states_and_gradients():
    torch.manual_seed(0)
    cfg = tiny_student_config()
    cfg._attn_implementation = "sdpa"
    plain = AutoModelForCausalLM.from_config(cfg).train()
    ckpt = AutoModelForCausalLM.from_config(cfg).train()
    ckpt.load_state_dict(plain.state_dict())
    enable_checkpointing(ckpt)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.modules())
    ids = torch.randint(5, cfg.vocab_size, (2, 12))
    ref, got = _captured_loss(plain, ids), _captured_loss(ckpt, ids)
    ref.backward()
    got.backward()
    assert got.item() == pytest.approx(ref.item(), abs=1e-6)
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_checkpointing_run_gives_the_plain_losses(tmp_path, store):
    kw = {"train.steps": 3, "loss_config.alpha_logit": 1.0, "lambda_kv": 1.0, "train.ckpt_every": 0}
    runs = {}
    for gc in (False, True):
        cfg = tiny_train_config(tmp_path / str(gc), store, **kw, **{"train.gradient_checkpointing": gc})
        run_training(from_dict(KVMapConfig, cfg))
        runs[gc] = read_metrics(tmp_path / str(gc) / "run" / "metrics.jsonl")
    for a, b in zip(runs[False], runs[True]):
        for key in ("loss", "loss_ce", "loss_kd", "loss_struct", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], abs=1e-5), (a["step"], key)
    assert "loss_kd" in runs[True][0] and "loss_struct" in runs[True][0]


def _initial_student(cfg: KVMapConfig):
    """The student as the run built it before training (random init seeded by `seed`, like preflight)."""
    set_seed(cfg.seed)
    return load_model(cfg.student, for_training=True)[0]


def name(key: str) -> str:
    """A checkpoint key of the peft-wrapped student -> the plain HF model's parameter name."""
    return key.removeprefix("student.base_model.model.").replace(".base_layer", "")


def test_lora_trains_the_adapter_only_and_saves_a_merged_model(tmp_path, store):
    raw = tiny_train_config(tmp_path, store, **{"student.lora": LORA, "train.save_final_state": True})
    cfg = from_dict(KVMapConfig, raw)
    run_training(cfg)
    assert all(map(torch.isfinite, map(torch.tensor, losses(cfg.run_dir))))
    student = tmp_path / "run" / "student"
    assert (student / "adapter_model.safetensors").is_file() and (student / "adapter_config.json").is_file()
    assert (student / "aligner.safetensors").is_file()
    # the final checkpoint holds the whole trained state: base weights as they started, adapters moved
    state = load_file(str(tmp_path / "run" / "checkpoints" / "step_000006" / "model.safetensors"))
    init = _initial_student(cfg).state_dict()
    base = {k: v for k, v in state.items() if k.startswith("student.") and "lora_" not in k}
    # accelerate drops the tied output head from the file; every other base weight is there
    assert set(init) - {name(k) for k in base} == {"lm_head.weight"}
    for k, v in base.items():
        assert torch.equal(v, init[name(k)]), k
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    peft = PeftModel.from_pretrained(_initial_student(cfg), str(student)).eval()
    merged = AutoModelForCausalLM.from_pretrained(student / "merged").eval()
    ids = torch.randint(5, 100, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, peft(ids).logits, rtol=0, atol=1e-5)
    out = export_student(tmp_path / "run", tmp_path / "export", with_aligner=True)
    assert not (out / "adapter_config.json").exists() and (out / "aligner.safetensors").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, merged(ids).logits, rtol=0, atol=0)


def test_lora_resume_continues_the_same_losses(tmp_path, store, monkeypatch):
    kw = {"student.lora": LORA, "train.ckpt_every": 3, "train.gradient_checkpointing": True}
    cfg_a = from_dict(KVMapConfig, tiny_train_config(tmp_path / "a", store, **kw))
    cfg_b = from_dict(KVMapConfig, tiny_train_config(tmp_path / "b", store, **kw))
    run_training(cfg_a)
    step = train_mod.train_step

    def dies_at_step_5(run, i):
        if i == 4:
            raise KeyboardInterrupt  # killed after the checkpoint at step 3 and one more step
        return step(run, i)

    monkeypatch.setattr(train_mod, "train_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg_b)
    monkeypatch.setattr(train_mod, "train_step", step)
    run_training(cfg_b, resume=True)
    rows_a = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    rows_b = read_metrics(tmp_path / "b" / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        for k, v in ra.items():
            if isinstance(v, float) and k != "step_s":
                assert rb[k] == pytest.approx(v, rel=1e-6, abs=1e-7), (ra["step"], k)
    ea, eb = (json.loads((tmp_path / x / "run" / "metrics.json").read_text()) for x in "ab")
    assert eb["eval/ce"] == pytest.approx(ea["eval/ce"], rel=1e-6)


def test_lora_bad_target_module_is_one_line(tmp_path, store):
    cfg = from_dict(
        KVMapConfig, tiny_train_config(tmp_path, store, **{"student.lora": {"target_modules": ["nope"]}})
    )
    with pytest.raises(ValueError, match=r"config key 'student.lora.target_modules': got \['nope'\]") as e:
        run_training(cfg)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="config key 'teacher.lora'"):
        from_dict(KVMapConfig, tiny_train_config(tmp_path, store, **{"teacher.lora": {"r": 2}}))
