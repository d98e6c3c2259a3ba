"""Teachers and students named by Hub id, through a Hub cache laid out by hand (no network): offline a cached
id loads and the store records its repo id and commit; an id that is not cached is one line naming the config
key and the cache, before anything loads."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import constants as hub_constants

from pipeline.config.configlib import load_config
from pipeline.config.kvmap import KVMapConfig, ModelConfig
from pipeline.extract import main, run_extraction
from pipeline.models.load import hub_source, load_model, resolve_path
from pipeline.store.reader import KVStore
from tests.helpers_store import save_tiny_teacher, write_extract_config

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding `me/tiny-teacher` at COMMIT (refs/main -> COMMIT), read offline."""
    cache = tmp_path / "hub"
    repo = cache / "models--me--tiny-teacher"
    save_tiny_teacher(repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_a_cached_hub_id_loads_offline_at_main_and_at_its_commit(hub_cache):
    path = resolve_path("me/tiny-teacher")
    assert path.name == COMMIT and hub_source(path) == {"repo_id": "me/tiny-teacher", "revision": COMMIT}
    model, tok = load_model(ModelConfig(path="me/tiny-teacher", revision=COMMIT, device="cpu"))
    assert model.config.num_hidden_layers > 0 and tok is not None


def test_the_store_records_the_teacher_repo_id_and_commit(hub_cache, tmp_path):
    cfg_path = write_extract_config(tmp_path, hub_cache / "unused")
    cfg = load_config(KVMapConfig, cfg_path, ["teacher.path=me/tiny-teacher"])
    run_extraction(cfg)
    teacher = KVStore(cfg.extract.store).attrs["teacher"]
    assert teacher["repo_id"] == "me/tiny-teacher" and teacher["revision"] == COMMIT


def test_a_hub_id_not_cached_fails_offline_in_one_line_before_loading(hub_cache, tmp_path, capsys):
    cfg_path = write_extract_config(tmp_path, hub_cache / "unused")
    shutil.rmtree(hub_cache / "models--me--tiny-teacher")
    rc = main(["--config", str(cfg_path), "teacher.path=me/tiny-teacher"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err
    assert err.startswith(
        "extract: error: teacher.path='me/tiny-teacher': a Hub id that is not in the Hub cache"
    )
    assert str(hub_cache) in err and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "store.zarr").exists()  # nothing written
