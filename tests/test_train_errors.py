"""Bad inputs stop stage 2 with a clear one-line error before any step (no metrics row is ever written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.config.configlib import ConfigError, from_dict, load_config
from pipeline.config.kvmap import KVMapConfig
from tests.helpers_train import make_tiny_store, tiny_train_config, write_config
from trainer.run.store_checks import check_tokenizer, tokenizer_fingerprint
from trainer.train import main, run_training


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("store") / "tiny.zarr", num_train=8, num_eval=0)


def _expect_error(tmp_path, store, match, exc=ValueError, **overrides):
    """Config-key errors raise while the config is built; store/model errors in run_training's preflight."""
    data = tiny_train_config(tmp_path, store, **overrides)
    with pytest.raises(exc, match=match) as info:
        run_training(from_dict(KVMapConfig, data))
    assert "\n" not in str(info.value)
    assert not (Path(data["run_dir"]) / "metrics.jsonl").exists()  # no step ran
    return info


def test_missing_store(tmp_path, store):
    _expect_error(
        tmp_path, store, "does not exist", FileNotFoundError, **{"extract.store": str(tmp_path / "no.zarr")}
    )


def test_incomplete_store(tmp_path):
    s = make_tiny_store(tmp_path / "partial.zarr", num_train=4, num_eval=0, complete=False)
    _expect_error(tmp_path, s, "incomplete")


def test_corrupt_store(tmp_path, store):
    bad = tmp_path / "corrupt.zarr"
    shutil.copytree(store, bad)
    (bad / "zarr.json").write_text("{not json")
    _expect_error(tmp_path, bad, "not a readable kvmap store")


def test_store_with_wrong_schema(tmp_path, store):
    bad = tmp_path / "schema.zarr"
    shutil.copytree(store, bad)
    meta = json.loads((bad / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 99
    (bad / "zarr.json").write_text(json.dumps(meta))
    _expect_error(tmp_path, bad, "schema_version")


def test_layer_map_needs_a_layer_the_store_lacks(tmp_path):
    s = make_tiny_store(tmp_path / "few.zarr", num_train=4, num_eval=0, layers=(0, 3))
    info = _expect_error(tmp_path, s, r"needs teacher layers \[1, 2, 3\]")
    assert "missing [1, 2]" in str(info.value)


def test_explicit_layer_map_out_of_range(tmp_path, store):
    _expect_error(tmp_path, store, r"layer_map\[2\]=7", **{"align": {"layer_map": [0, 1, 7]}})


def test_store_without_queries_when_the_attention_term_needs_them(tmp_path):
    s = make_tiny_store(tmp_path / "kv.zarr", num_train=4, num_eval=0, components=("k", "v"))
    _expect_error(tmp_path, s, "components")
    # ... but K/V-only training on it is fine
    cfg = from_dict(
        KVMapConfig, tiny_train_config(tmp_path, s, **{"loss_config": {"alpha_attn": 0.0}, "train.steps": 1})
    )
    assert run_training(cfg)["steps"] == 1


def test_student_vocab_smaller_than_store(tmp_path, store):
    student = tiny_train_config(tmp_path, store)["student"]["config"] | {"vocab_size": 60}
    _expect_error(tmp_path, store, "vocab_size=60", **{"student": {"config": student}})


def test_unknown_mode_and_key_and_segment(tmp_path, store):
    path = write_config(tmp_path, tiny_train_config(tmp_path, store))
    with pytest.raises(ConfigError, match="kv_projection_mode"):
        load_config(KVMapConfig, path, ["kv_projection_mode=diagonal"])
    with pytest.raises(ConfigError, match="unknown config key 'train.lrr'"):
        load_config(KVMapConfig, path, ["train.lrr=1"])
    _expect_error(
        tmp_path, store, r"'train.ce_segments': got \['P', 'Q'\]", **{"train.ce_segments": ["P", "Q"]}
    )
    _expect_error(tmp_path, store, "train.steps", **{"train.steps": 0})
    _expect_error(tmp_path, store, "lambda_kv", **{"lambda_kv": -1.0})


def test_cli_reports_errors_in_one_line(tmp_path, store, capsys):
    path = write_config(tmp_path, tiny_train_config(tmp_path, store))
    assert main(["--config", str(path), "train.bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("train: error: unknown config key 'train.bogus'") and "\n" not in err
    with pytest.raises(SystemExit) as e:
        main(["--config", str(path), "--resum"])
    assert e.value.code == 2


class _Tok:
    name_or_path = "other"

    def __init__(self, vocab):
        self._v = vocab

    def get_vocab(self):
        return self._v


def test_tokenizer_mismatch(tmp_path):
    theirs = _Tok({f"t{i}": i for i in range(101)})
    s = make_tiny_store(
        tmp_path / "tok.zarr",
        num_train=4,
        num_eval=0,
        tokenizer_record={"name": "theirs", "vocab_size": 101, "hash": tokenizer_fingerprint(theirs)},
    )
    from pipeline.store.reader import KVStore

    ks = KVStore(s)
    check_tokenizer(ks, theirs, 101)  # same vocabulary: fine
    ours = _Tok({f"u{i}": i for i in range(101)})
    with pytest.raises(ValueError, match="differs from the store's 'theirs'"):
        check_tokenizer(ks, ours, 101)


def test_resume_with_a_changed_training_config_is_refused(tmp_path, store):
    cfg = from_dict(
        KVMapConfig, tiny_train_config(tmp_path, store, **{"train.steps": 2, "train.ckpt_every": 1})
    )
    run_training(cfg)
    changed = from_dict(
        KVMapConfig, tiny_train_config(tmp_path, store, **{"train.steps": 2, "train.lr": 1e-4})
    )
    with pytest.raises(ConfigError, match="config key 'train.lr' was 0.003 in the checkpoint, now 0.0001"):
        run_training(changed, resume=True)
    # bookkeeping-only keys may change
    ok = from_dict(
        KVMapConfig, tiny_train_config(tmp_path, store, **{"train.steps": 2, "train.log_every": 5})
    )
    assert run_training(ok, resume=True)["steps"] == 2


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "accelerate launch trainer/train.py" in capsys.readouterr().out


def test_nan_loss_stops_naming_step_and_term(tmp_path):
    s = make_tiny_store(tmp_path / "nan.zarr", num_train=4, num_eval=0, poison=True)  # NaN in a teacher key
    cfg = from_dict(KVMapConfig, tiny_train_config(tmp_path, s, **{"train.batch_size": 4}))
    with pytest.raises(FloatingPointError, match=r"^step 1: loss_struct is not finite \(nan\)"):
        run_training(cfg)
    assert not list((Path(cfg.run_dir) / "checkpoints").glob("step_*"))  # nothing saved after a NaN


def test_nan_stop_under_the_cli_is_a_failure_exit_1(tmp_path, capsys):
    s = make_tiny_store(tmp_path / "nan.zarr", num_train=4, num_eval=0, poison=True)
    path = write_config(tmp_path, tiny_train_config(tmp_path, s, **{"train.batch_size": 4}))
    assert main(["--config", str(path)]) == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert len(errors) == 1 and errors[0].startswith("train: error: step 1: loss_struct is not finite (nan)")


def test_resume_with_another_samples_per_step_is_refused(tmp_path, store):
    """Another process count resumes only with equal samples per step (tests/test_train_multiprocess.py)."""
    from trainer.run.checkpoint import STATE_FILE, latest_checkpoint

    cfg = from_dict(
        KVMapConfig,
        tiny_train_config(
            tmp_path, store, **{"train.steps": 2, "train.ckpt_every": 1, "train.save_final_state": True}
        ),
    )
    run_training(cfg)
    state_file = latest_checkpoint(cfg.run_dir) / STATE_FILE
    state = json.loads(state_file.read_text())
    assert state["num_processes"] == 1
    state_file.write_text(json.dumps({**state, "num_processes": 2}))
    with pytest.raises(ConfigError, match=r"consumed 8 samples per step .* this launch 4 \(1 process"):
        run_training(cfg, resume=True)
