"""kvmap-ablate stopped from outside (subprocess runner, stand-in trainer): SIGKILL of the sweep and SIGINT /
SIGTERM of it and its child, then resume; and the child's progress reader. Split from tests/test_ablate.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.test_ablate import ROOT, write_ablation
from trainer import ablate
from trainer.ablation.results import read_results

FAKE_TRAIN = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    import yaml
    cfg = yaml.safe_load(open(sys.argv[sys.argv.index("--config") + 1]))
    rd = Path(cfg["run_dir"]); resume = "--resume" in sys.argv
    with open(os.environ["FAKE_CALLS"], "a") as f:
        f.write(json.dumps([rd.parent.name, cfg["seed"], resume]) + "\\n")
    (rd / "checkpoints" / "step_1").mkdir(parents=True, exist_ok=True)
    (rd / "pid").write_text(str(os.getpid()))
    if os.environ.get("FAKE_HANG") == rd.parent.name and not resume:
        time.sleep(120)  # the test kills the whole sweep here
    (rd / "metrics.json").write_text(json.dumps({"eval/ce": 1.0 + cfg["seed"], "wall_s": 0.1}))
    """
)


def _rows(path: Path) -> list:
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _start_sweep(path: Path, env: dict, ignore_sigint: bool = False) -> subprocess.Popen:
    """`trainer/ablate.py --config PATH` in its own session (so a test can kill the whole group);
    `ignore_sigint` starts it with SIGINT ignored, as a shell's background job is."""
    return subprocess.Popen(
        [sys.executable, str(ROOT / "trainer" / "ablate.py"), "--config", str(path)],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=(lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None,
    )


def test_sigkilled_sweep_resumes_with_subprocess_runner(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    path = write_ablation(tmp_path, runner="subprocess", train_entry=str(script), report=False)
    results = tmp_path / "out" / "results.jsonl"
    env = {**os.environ, "FAKE_CALLS": str(calls), "FAKE_HANG": "struct"}
    proc = _start_sweep(path, env)
    try:
        deadline = time.time() + 60
        while len(_rows(calls)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert len(_rows(results)) == 2  # both ce_only rows written; struct seed 0 hangs mid-run
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training child, like a lost machine
        proc.wait()
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_HANG", raising=False)
    assert ablate.main(["--config", str(path)]) == 0
    assert _rows(calls) == [
        ["ce_only", 0, False],
        ["ce_only", 1, False],
        ["struct", 0, False],
        ["struct", 0, True],
        ["struct", 1, False],
    ]
    rows = read_results(results)
    assert [(r["arm"], r["seed"]) for r in rows] == [
        ("ce_only", 0),
        ("ce_only", 1),
        ("struct", 0),
        ("struct", 1),
    ]
    assert "--resume" in (tmp_path / "out" / "struct" / "seed_0.log").read_text()


def test_sigint_stops_the_sweep_and_its_child_and_the_sweep_resumes(tmp_path, monkeypatch):
    """SIGINT to the sweep process alone -- started with SIGINT ignored, as a shell's background job is --
    stops it (exit 130, one message) and its training child; the same command then finishes the matrix."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.jsonl"
    path = write_ablation(tmp_path, runner="subprocess", train_entry=str(script), report=False)
    env = {**os.environ, "FAKE_CALLS": str(calls), "FAKE_HANG": "struct"}
    proc = _start_sweep(path, env, ignore_sigint=True)
    try:
        deadline = time.time() + 60
        while len(_rows(calls)) < 3 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.1)
        child = int((tmp_path / "out" / "struct" / "seed_0" / "pid").read_text())
        os.kill(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = proc.stderr.read().decode()
    assert rc == 130 and "ablate: interrupted" in err, err[-2000:]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the training child is gone, not orphaned
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    monkeypatch.delenv("FAKE_HANG", raising=False)
    assert ablate.main(["--config", str(path)]) == 0
    assert [(r["arm"], r["seed"]) for r in read_results(tmp_path / "out" / "results.jsonl")] == [
        ("ce_only", 0), ("ce_only", 1), ("struct", 0), ("struct", 1),
    ]  # fmt: skip


def test_last_logged_step_follows_a_growing_metrics_file(tmp_path):
    from trainer.ablation.child_process import last_logged_step

    f = tmp_path / "metrics.jsonl"
    assert last_logged_step(f) == (0, None)
    f.write_text(
        '{"step": 1, "loss": 2.5}\n{"step": 10, "loss": 1.25}\n{"step": 10, "eval/ce": 3.0}\n{"step": 2'
    )
    assert last_logged_step(f) == (10, 1.25)
