"""The chat-data guide's commands, exactly as docs/guides/chat-data.md writes them, on a few of its example
rows: extract (messages detected, tokens per segment), train (non-zero CE and KD), export (a folder that
transformers' text-generation pipeline loads and chats with)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from transformers import pipeline

from pipeline.analysis.inspect_store import main as inspect_main
from pipeline.extract import main as extract_main
from trainer.export import main as export_main
from trainer.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "guides" / "chat-data.md"
COMMANDS = {"kvmap-extract": extract_main, "kvmap-train": train_main, "kvmap-export": export_main}
# A tiny run of the same job: fewer rows and steps (appended as overrides to the config-driven commands).
FAST = {
    "kvmap-extract": ["data.max_train_samples=6", "data.max_eval_samples=3"],
    "kvmap-train": [
        "data.max_train_samples=6",
        "data.max_eval_samples=3",
        "train.steps=2",
        "train.batch_size=2",
        "eval.every=0",
        "eval.greedy_samples=2",
    ],
}


def guide_commands() -> list[list[str]]:
    """The lines of the guide's '## 3. The commands' bash block, split into words."""
    section = GUIDE.read_text().split("## 3. The commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split() for line in block.strip().splitlines()]


def test_the_guide_runs_from_chat_rows_to_a_published_student(tmp_path, monkeypatch, capsys):
    shutil.copytree(REPO / "docs" / "guides" / "examples", tmp_path / "docs" / "guides" / "examples")
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "chat_data.yaml", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    commands = guide_commands()
    assert [c[0] for c in commands] == ["kvmap-extract", "kvmap-train", "kvmap-export"]
    for name, *argv in commands:
        assert COMMANDS[name](argv + FAST.get(name, [])) == 0, name
    out = capsys.readouterr().out
    assert "tokens per segment, train (messages format): P " in out
    metrics = (tmp_path / "runs" / "chat_data" / "metrics.json").read_text()
    assert '"train/loss_ce"' in metrics and '"train/loss_kd"' in metrics
    m = json.loads(metrics)
    assert m["train/loss_ce"] > 0 and m["train/loss_kd"] > 0
    assert inspect_main(["stores/chat_data.zarr"]) == 0
    card = (tmp_path / "exports" / "chat-student" / "README.md").read_text()
    assert "builtin:smollm2-135m-instruct" in card and "fingerprint" in card
    chat = pipeline("text-generation", model="exports/chat-student", device="cpu")
    reply = chat([{"role": "user", "content": "Hi"}], max_new_tokens=4, do_sample=False)
    assert reply[0]["generated_text"][-1]["role"] == "assistant"
