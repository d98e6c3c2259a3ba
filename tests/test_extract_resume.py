"""Extraction as users run it (subprocesses): SIGKILL mid-run then resume, and a 2-process accelerate run,
both bit-identical to an uninterrupted 1-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import KVMapConfig
from pipeline.configlib import load_config
from pipeline.extract import run_extraction
from pipeline.store import PROGRESS_DIR, KVStore
from pipeline.writer import KILL_ENV
from tests.helpers_store import save_tiny_teacher, store_arrays, write_extract_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "pipeline" / "extract.py")
pytestmark = pytest.mark.slow


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop(KILL_ENV, None)
    env.update(extra)
    return env


def _run(cmd, **env):
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config (6+ write chunks) and the reference store of an uninterrupted 1-process run."""
    tmp = tmp_path_factory.mktemp("resume")
    teacher = save_tiny_teacher(tmp / "teacher")
    # Q/K/V of every layer and the top-k log-probs (train + held-out chunks): all must resume bit-exactly.
    cfg = write_extract_config(
        tmp, teacher, num_rows=30, layers="all", chunk_tokens=64, inner_chunk_tokens=16,
        components=["q", "k", "v", "logits"], logits_top_k=16,
    )  # fmt: skip
    ref = tmp / "ref.zarr"
    run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={ref}"]))  # in-process: saves a start-up
    assert KVStore(ref).complete and not (ref / PROGRESS_DIR).exists()
    assert KVStore(ref).has_logits("train") and KVStore(ref).has_logits("eval")
    return cfg, ref


def _assert_same_store(a, b):
    xa, xb = store_arrays(a), store_arrays(b)
    assert sorted(xa) == sorted(xb) and len(xa) > 10
    for name in xa:
        assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), name
    assert KVStore(a).fingerprint == KVStore(b).fingerprint


def test_sigkill_then_resume_equals_uninterrupted(setup, tmp_path):
    cfg, ref = setup
    store = tmp_path / "killed.zarr"
    cmd = [sys.executable, SCRIPT, "--config", str(cfg), f"extract.store={store}"]
    # dies by SIGKILL while writing its 3rd chunk: 2 chunks done, the 3rd half on disk without a marker
    # (one writer thread so that exactly 2 markers exist; writer_threads is not part of the fingerprint)
    r = _run([*cmd, "extract.writer_threads=1"], **{KILL_ENV: "2"})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    partial = KVStore(store)
    assert not partial.complete
    done = sorted(p.name for p in (store / PROGRESS_DIR).glob("chunk_*.json"))
    assert len(done) == 2
    num_chunks = -(-partial.num_tokens() // 64)
    assert num_chunks >= 6
    summary = run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={store}"]))  # the same command
    resumed = KVStore(store, require_complete=True)
    assert summary == resumed.attrs["summary"]
    # only the unfinished chunks were recomputed
    assert resumed.attrs["summary"]["tokens_computed_last_run"] < resumed.num_tokens()
    assert resumed.attrs["summary"]["tokens_computed_last_run"] >= resumed.num_tokens() - 2 * 64
    _assert_same_store(store, ref)


def test_two_processes_equal_one(setup, tmp_path):
    cfg, ref = setup
    store = tmp_path / "two.zarr"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    r = _run([*launch, SCRIPT, "--config", str(cfg), f"extract.store={store}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr  # really two processes (the progress bar names the world size)
    _assert_same_store(store, ref)
