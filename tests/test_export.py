"""kvmap-export: a trained run's student as a folder ready to publish (weights, tokenizer, generation config,
model card), loaded back with transformers' `pipeline("text-generation")`; the Hub push up to the upload
call with the Hub client replaced; bad input is one line and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
from transformers import AutoModelForCausalLM, pipeline

from pipeline.config.configlib import from_dict
from pipeline.config.kvmap import KVMapConfig
from tests.helpers_train import make_tiny_store, tiny_train_config
from trainer.export import export_student, main
from trainer.train import run_training


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    store = make_tiny_store(tmp / "tiny.zarr", num_train=16, num_eval=8)
    cfg = from_dict(KVMapConfig, tiny_train_config(tmp, store, **{"train.steps": 2, "train.ckpt_every": 0}))
    run_training(cfg)
    return Path(cfg.run_dir)


def test_exported_folder_generates_and_its_card_names_teacher_and_store(run_dir, tmp_path):
    out = export_student(run_dir, tmp_path / "pub")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= names
    assert "tokenizer.json" in names or "tokenizer_config.json" in names
    assert not any(n.startswith("aligner") for n in names)  # kvmap's aligner stays out by default
    meta = json.loads((run_dir / "meta.json").read_text())
    card = (out / "README.md").read_text()
    assert meta["store_fingerprint"] in card and "teacher" in card and "held-out" in card.lower()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    gen = pipeline("text-generation", model=str(out), device="cpu")
    text = gen("w10 w11", max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert text.startswith("w10 w11") and len(text) > len("w10 w11")
    saved = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    again = AutoModelForCausalLM.from_pretrained(out)
    assert all((a == b).all() for a, b in zip(saved.state_dict().values(), again.state_dict().values()))


def test_push_to_hub_calls_the_hub_client_with_the_folder(run_dir, tmp_path, monkeypatch, capsys):
    calls = []

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, folder_path, repo_id, **kw):
            calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
            return type("Info", (), {"commit_url": f"https://hub.example/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    rc = main([str(run_dir), str(tmp_path / "pub"), "--push-to-hub", "me/student", "--private"])
    assert rc == 0
    assert calls[0] == (
        "create_repo",
        "me/student",
        {"repo_type": "model", "private": True, "exist_ok": True},
    )
    assert (
        calls[1][0] == "upload_folder" and "README.md" in calls[1][2] and "model.safetensors" in calls[1][2]
    )
    assert "https://hub.example/me/student/commit/1" in capsys.readouterr().out


def test_bad_input_is_one_line_and_leaves_nothing(run_dir, tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvmap-export: error: RUN_DIR=") and "\n" not in err
    (tmp_path / "taken").mkdir()
    assert main([str(run_dir), str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temporary folder left behind
    assert main([str(run_dir), str(tmp_path / "taken"), "--overwrite", "--with-aligner"]) == 0
    assert (tmp_path / "taken" / "aligner.safetensors").is_file()
