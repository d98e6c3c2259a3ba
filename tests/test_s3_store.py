"""Stores on object storage, against a real local S3 server (moto, tests/s3_server.py): extraction, SIGKILL +
resume, refusal of a mismatched store, inspect, attention profile, loader workers, preload and training all
give the bits a local folder gives; credentials never reach a store, a run folder or a log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.configlib import from_dict, load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import run_extraction
from pipeline.store.location import StoreLocation, check_storage_options
from pipeline.store.reader import KVStore
from pipeline.store.schema import PROGRESS_DIR
from tests.helpers_store import save_tiny_teacher, store_arrays, write_extract_config
from tests.s3_server import FAKE_KEY_ID, FAKE_SECRET

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _assert_same(a, b):
    xa, xb = store_arrays(a), store_arrays(b)
    assert sorted(xa) == sorted(xb) and len(xa) > 10
    for name in xa:
        assert xa[name].dtype == xb[name].dtype and np.array_equal(xa[name], xb[name]), name


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, s3):
    """One config (q/k/v of the mapped layers + top-k logits, ~8 write chunks), extracted to a folder and to S3."""
    tmp = tmp_path_factory.mktemp("s3")
    teacher = save_tiny_teacher(tmp / "teacher")
    cfg = write_extract_config(
        tmp, teacher, num_rows=20, layers=[1, 3], chunk_tokens=64, inner_chunk_tokens=32,
        components=["q", "k", "v", "logits"], logits_top_k=8, writer_threads=1,
    )  # fmt: skip
    ref = tmp / "ref.zarr"
    run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={ref}"]))
    url = s3.url("store.zarr")
    opts = [f"extract.store={url}", f"extract.storage_options={{endpoint_url: {s3.endpoint_url}}}"]
    run_extraction(load_config(KVMapConfig, cfg, opts))
    return cfg, ref, StoreLocation(url, s3.storage_options)


def test_s3_extraction_equals_local_and_refuses_a_mismatch(extracted, s3, capsys):
    cfg, ref, loc = extracted
    _assert_same(loc, ref)
    remote, local = KVStore(loc, require_complete=True), KVStore(ref)
    assert remote.fingerprint == local.fingerprint
    assert remote.attrs["summary"]["stored_state_bytes"] == local.attrs["summary"]["stored_state_bytes"] > 0
    assert not loc.list(PROGRESS_DIR)  # the done-markers are gone once complete
    over = [f"extract.store={loc.url}"]  # AWS_ENDPOINT_URL in the env suffices without storage_options
    run_extraction(load_config(KVMapConfig, cfg, over))
    assert "nothing to do" in capsys.readouterr().out
    with pytest.raises(ValueError, match="different config"):
        run_extraction(load_config(KVMapConfig, cfg, [*over, "extract.dtype=float16"]))
    _assert_same(loc, ref)  # untouched


def test_inspect_and_attention_profile_read_s3(extracted):
    from pipeline.analysis.attention_profile import attention_profile
    from pipeline.analysis.inspect_store import inspect_store

    _, ref, loc = extracted
    a, b = inspect_store(loc.url), inspect_store(ref)
    assert a["stats"] == b["stats"] and a["logits"] == b["logits"]
    sizes = ("state_stored_bytes", "state_raw_bytes", "compression_ratio")  # store_bytes: attrs hold timings
    assert all(a["sizes"][k] == b["sizes"][k] for k in sizes)
    assert attention_profile(loc.url, num_samples=4) == attention_profile(ref, num_samples=4)


def test_loader_workers_and_preload_read_s3(extracted):
    from trainer.data.loader import StoreDataset, make_loader

    _, ref, loc = extracted
    kw = dict(layers=[1, 3], components=("q", "k", "v", "logits"))
    want = list(make_loader(StoreDataset(ref, "train", **kw), 5, pad_id=0))
    for preload, cache in ((False, 0), (True, 0), (False, 2)):  # cache: whole-shard reads (train.shuffle)
        remote = StoreDataset(loc, "train", preload=preload, shard_cache=cache, **kw)
        workers = 0 if preload else 2  # forked workers reopen the S3 store (clients are not fork-safe)
        got = list(make_loader(remote, 5, pad_id=0, num_workers=workers))
        assert len(got) == len(want) >= 3
        for x, y in zip(got, want):
            assert sorted(x) == sorted(y)
            assert all(torch.equal(x[k], y[k]) for k in x)


def test_sigkill_mid_extraction_then_resume_on_s3(extracted, s3, tmp_path):
    """A subprocess extracting into S3 is SIGKILLed by the test once a done-marker appears; resuming gives
    the bits of the uninterrupted local run; no credential in its output."""
    cfg, ref, _ = extracted
    url = s3.url("killed.zarr")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable,
        str(ROOT / "pipeline" / "extract.py"),
        "--config",
        str(cfg),
        f"extract.store={url}",
    ]
    fs = s3.fs()
    markers = f"{url.removeprefix('s3://')}/{PROGRESS_DIR}"
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            fs.invalidate_cache()
            if fs.exists(markers) and fs.find(markers):
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        out = proc.communicate(timeout=60)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    partial = KVStore(url)
    assert not partial.complete
    fs.invalidate_cache()
    done = len(fs.find(markers))
    num_chunks = -(-partial.num_tokens() // 64)
    assert 1 <= done < num_chunks
    summary = run_extraction(load_config(KVMapConfig, cfg, [f"extract.store={url}"]))
    assert summary["tokens_computed_last_run"] < partial.num_tokens()  # only what was left
    _assert_same(url, ref)
    assert FAKE_SECRET not in out and FAKE_KEY_ID not in out


def test_two_ranks_extract_into_s3_like_one_local_process(extracted, s3):
    """`accelerate launch --num_processes 2` writing one S3 store (ranks take every other chunk, markers on
    S3): the bits of the 1-process local store; no credential in the output."""
    cfg, ref, _ = extracted
    url = s3.url("two_ranks.zarr")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    cmd = [*launch, str(ROOT / "pipeline" / "extract.py"), "--config", str(cfg), f"extract.store={url}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0/2" in r.stderr and "all 2 process(es) together" in r.stdout
    _assert_same(url, ref)
    assert KVStore(url, require_complete=True).fingerprint == KVStore(ref).fingerprint
    assert FAKE_SECRET not in r.stdout + r.stderr and FAKE_KEY_ID not in r.stdout + r.stderr


def test_train_from_s3_equals_local_and_keeps_credentials_out(tmp_path, s3, capfd):
    from tests.helpers_train import make_tiny_store, tiny_train_config
    from trainer.train import run_training

    store = make_tiny_store(tmp_path / "tiny.zarr", num_train=8, num_eval=4)
    url = s3.url("tiny.zarr")
    s3.fs().put(str(store), url.removeprefix("s3://"), recursive=True)
    _assert_same(url, store)
    runs = {}
    for name, over in (
        ("local", {}),
        ("s3", {"train.store": url, "train.storage_options": s3.storage_options}),
    ):
        d = tmp_path / name
        d.mkdir()
        short = {"train.steps": 2, "train.ckpt_every": 0, "eval.max_samples": 4, "eval.greedy_samples": 2,
                 "eval.max_new_tokens": 2}  # fmt: skip
        cfg = from_dict(KVMapConfig, tiny_train_config(d, store, **short, **over))
        runs[name] = (run_training(cfg), Path(cfg.run_dir))
    (m_local, _), (m_s3, run_s3) = runs["local"], runs["s3"]
    assert m_s3["train/loss_ce"] == m_local["train/loss_ce"] and m_s3["eval/ce"] == m_local["eval/ce"]
    logs = capfd.readouterr()
    assert logs.err.count("train.shuffle=shards reads whole shards instead") == 1  # the s3 run's hint only
    texts = [logs.out, logs.err]
    texts += [p.read_bytes().decode("latin-1") for p in run_s3.rglob("*") if p.is_file()]
    fs = s3.fs()
    texts += [fs.cat(p).decode("latin-1") for p in fs.find(url.removeprefix("s3://")) if p.endswith(".json")]
    assert url in (run_s3 / "config.yaml").read_text()  # the run records where it read from ...
    assert all(FAKE_SECRET not in t and FAKE_KEY_ID not in t for t in texts)  # ... never with what key


def test_storage_options_refuse_credentials_and_memory_urls_work(tmp_path):
    from pipeline.config.configlib import ConfigError
    from tests.helpers_store import write_random_store

    assert check_storage_options({"endpoint_url": "http://x", "client_kwargs": {"region_name": "r"}}) == {
        "endpoint_url": "http://x",
        "client_kwargs": {"region_name": "r"},
    }
    for bad in (
        {"secret": "s"},
        {"key": "k"},
        {"client_kwargs": {"aws_secret_access_key": "s"}},
        {"token": "t"},
    ):
        with pytest.raises((ValueError, ConfigError), match="credential"):
            from_dict(KVMapConfig, {"extract": {"storage_options": bad}})
    with pytest.raises((ValueError, ConfigError), match="train.storage_options"):
        from_dict(KVMapConfig, {"train": {"storage_options": {"password": "p"}}})
    url = f"memory://kvmap-tests/{tmp_path.name}/x.zarr"
    _, _, truth = write_random_store(url, num_samples=5)
    st = KVStore(url, require_complete=True)
    assert str(st.path) == url and "memory" in repr(st)
    s = st.read_sample(2, layers=[2])
    a, b = int(st.offsets()[2]), int(st.offsets()[2] + st.lengths()[2])
    assert torch.equal(s["k"][0], truth[(2, "k")][a:b].permute(1, 0, 2))
    StoreLocation(url).delete()
    assert not StoreLocation(url).exists()
