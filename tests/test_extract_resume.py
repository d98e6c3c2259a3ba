"""Extraction as users run it (subprocesses): killed from outside (SIGKILL, and SIGINT as Ctrl-C) once chunks
are done, then resumed, and a 2-process accelerate run: all bit-identical to an uninterrupted 1-process run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.config.configlib import load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import run_extraction
from pipeline.store.reader import KVStore
from pipeline.store.schema import PROGRESS_DIR
from tests.helpers_kill import files_exist, run_until
from tests.helpers_store import save_tiny_teacher, store_arrays, write_extract_config

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "pipeline" / "extract.py")
pytestmark = pytest.mark.slow


def _env(**extra):
    # PYTHONPATH: the subprocess imports this checkout's packages, not whichever one is installed
    return dict(
        os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), **extra
    )


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


def _tear_first_unfinished_chunk(store: Path) -> int:
    """Write garbage into half of the arrays of the first chunk without a done-marker: what a process
    killed in the middle of writing a chunk leaves (zarr writes each shard atomically; a chunk spans all
    arrays). Returns the chunk index; resume must recompute it, not trust what is on disk."""
    from pipeline.store.writer import StoreWriter

    w = StoreWriter(store)
    c = w.todo_chunks()[0]
    start, end = w.chunk_range(c)
    keys = w.chunk_keys(w.chunk_split(c))
    rng = np.random.default_rng(0)
    for key in keys[: len(keys) // 2 or 1]:
        a = w._array(key, w.chunk_split(c))
        a[start:end] = rng.integers(0, 2**15, size=(end - start, *a.shape[1:])).astype(a.dtype)
    return c


def _todo_train_tokens(store: Path) -> int:
    from pipeline.store.writer import StoreWriter

    w = StoreWriter(store)
    ranges = [w.chunk_range(c) for c in w.todo_chunks() if w.chunk_split(c) == "train"]
    return sum(end - start for start, end in ranges)


def _interrupt_then_resume(cfg, ref, store, sig, min_done):
    """Start the extraction, send `sig` once `min_done` chunks are marked done, tear the next chunk, resume
    with the same command, and compare with the uninterrupted reference bit for bit."""
    cmd = [sys.executable, SCRIPT, "--config", str(cfg), f"extract.store={store}"]
    # one writer thread: markers appear in chunk order (writer_threads is not part of the fingerprint)
    r = run_until([*cmd, "extract.writer_threads=1"], files_exist(store / PROGRESS_DIR, "chunk_*.json", min_done),
                  sig, cwd=ROOT, env=_env())  # fmt: skip
    assert r.fired, (
        f"the extraction ended (rc {r.returncode}) before {min_done} chunks were done: {r.stderr[-2000:]}"
    )
    partial = KVStore(store)
    assert not partial.complete
    done = sorted(p.name for p in (store / PROGRESS_DIR).glob("chunk_*.json"))
    num_chunks = -(-partial.num_tokens() // 64)
    assert num_chunks >= 6 and min_done <= len(done) < num_chunks
    _tear_first_unfinished_chunk(store)
    todo_tokens = _todo_train_tokens(store)
    summary = run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={store}"]))  # the same command
    resumed = KVStore(store, require_complete=True)
    assert summary == resumed.attrs["summary"]
    # exactly the unfinished chunks were recomputed, the torn one among them
    assert 64 <= resumed.attrs["summary"]["tokens_computed_last_run"] == todo_tokens
    assert todo_tokens <= resumed.num_tokens() - min_done * 64
    _assert_same_store(store, ref)
    return r


def test_sigkill_then_resume_equals_uninterrupted(setup, tmp_path):
    cfg, ref = setup
    r = _interrupt_then_resume(cfg, ref, tmp_path / "killed.zarr", signal.SIGKILL, min_done=2)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]


def test_ctrl_c_stops_cleanly_then_resumes(setup, tmp_path):
    """SIGINT (Ctrl-C): the queued chunks are finished (their markers stay valid), the process exits
    with the interrupt, and the resumed store equals the reference."""
    cfg, ref = setup
    r = _interrupt_then_resume(cfg, ref, tmp_path / "ctrl_c.zarr", signal.SIGINT, min_done=1)
    assert r.returncode in (-signal.SIGINT, 130, 1), r.stderr[-2000:]
    assert "KeyboardInterrupt" in r.stderr


def test_two_processes_equal_one(setup, tmp_path):
    cfg, ref = setup
    store = tmp_path / "two.zarr"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    r = _run([*launch, SCRIPT, "--config", str(cfg), f"extract.store={store}"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr  # really two processes (the progress bar names the world size)
    _assert_same_store(store, ref)
    # each rank tokenised half the rows: the exchanged shares give the same dataset counts and fingerprint
    for key in ("dataset", "config_fingerprint"):
        assert KVStore(store).attrs[key] == KVStore(ref).attrs[key], key
    # the summary counts both ranks' work, not rank 0's half
    summary = KVStore(store).attrs["summary"]
    assert summary["processes_last_run"] == 2
    assert summary["tokens_computed_last_run"] == KVStore(store).num_tokens() == summary["tokens"]
    assert "all 2 process(es) together" in r.stdout


def test_two_processes_equal_one_int8(setup, tmp_path):
    """int8 states (per write-chunk scales) from 2 ranks are the 1-rank store bit for bit, scales too."""
    cfg, _ = setup
    ref, store = tmp_path / "ref8.zarr", tmp_path / "two8.zarr"
    run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={ref}", "extract.dtype=int8"]))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    r = _run([*launch, SCRIPT, "--config", str(cfg), f"extract.store={store}", "extract.dtype=int8"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr
    assert KVStore(store).dtype == "int8" and any(k.endswith("_scale") for k in store_arrays(store))
    _assert_same_store(store, ref)
