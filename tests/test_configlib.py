"""The strict YAML -> dataclass config layer, and every YAML under configs/ parses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from pipeline.config.configlib import ConfigError, load_config, to_dict, write_run_metadata
from pipeline.config.kvmap import KVMapConfig

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_and_dotted_overrides():
    cfg = load_config(KVMapConfig, None, ["train.lr=3e-4", "align.layer_map=[0, 2, 3]", "lambda_kv=0"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.align.layer_map == [0, 2, 3]
    assert cfg.lambda_kv == 0.0 and isinstance(cfg.lambda_kv, float)


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.lrr=3", "unknown config key 'train.lrr'"),
        ("nope=1", "unknown config key 'nope'"),
        ("kv_projection_mode=diagonal", "'kv_projection_mode': got 'diagonal'"),
        ("train.steps=1.5", "'train.steps': got 1.5, expected an int"),
        ("train.lr=fast", "'train.lr': got 'fast', expected a float"),
        ("data.chat_template=maybe", "'data.chat_template': got 'maybe', expected true or false"),
        ("train", "expected key=value"),
    ],
)
def test_bad_overrides_give_one_line_errors(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(KVMapConfig, None, [override])
    msg = str(err.value)
    assert needle in msg and "\n" not in msg


def test_unknown_key_in_yaml_is_an_error(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  steps: 3\n  stepz: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'train.stepz'"):
        load_config(KVMapConfig, p)


def test_missing_file_and_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(KVMapConfig, tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(KVMapConfig, p)


def test_round_trip_and_run_metadata(tmp_path):
    cfg = load_config(KVMapConfig, ROOT / "configs" / "default.yaml", ["seed=3"])
    write_run_metadata(tmp_path / "run", cfg, cfg.seed, {"store_fingerprint": "abc"})
    again = load_config(KVMapConfig, tmp_path / "run" / "config.yaml")
    assert to_dict(again) == to_dict(cfg)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["store_fingerprint"] == "abc" and meta["git_sha"]


def _experiment_yamls():
    return sorted(p for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _experiment_yamls(), ids=lambda p: p.name)
def test_every_experiment_yaml_parses(path):
    cfg = load_config(KVMapConfig, path)
    assert yaml.safe_load(yaml.safe_dump(to_dict(cfg)))  # serialisable


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "ablations").glob("*.yaml")), ids=lambda p: p.name
)
def test_every_ablation_yaml_resolves(path):
    from trainer.ablation.config import load_ablation, plan_runs

    abl = load_ablation(path)
    runs = plan_runs(abl)  # every (arm, seed) config parsed strictly
    assert len(runs) == len(abl.arms) * len(abl.seeds) > 0
