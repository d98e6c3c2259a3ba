"""Every command: one CLI style (pipeline/cli.py), `--help` exits 0 with usage, sections and examples; the
console scripts in pyproject.toml point at real `main` functions; scripts run without sys.path edits."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from pipeline.cli import CommandFailed, command_parser, config_from_args, parse_args, run_command
from pipeline.config.configlib import ConfigError
from pipeline.config.kvmap import KVMapConfig

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = [
    "pipeline.extract",
    "pipeline.prune",
    "pipeline.analysis.inspect_store",
    "pipeline.data.completions",
    "pipeline.data.default_data",
    "pipeline.analysis.attention_profile",
    "trainer.train",
    "trainer.ablate",
    "trainer.ablation.report",
    "trainer.profile_alignment",
    "trainer.eval.eval_student",
]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_command_answers_help(module, capsys):
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert out.startswith("usage: ") and "examples:" in out, out[:300]
    assert out.count("\n  ") >= 2  # at least two example lines (plus options)


def test_console_scripts_point_at_main():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    want = {"kvmap-extract", "kvmap-prune", "kvmap-train", "kvmap-ablate", "kvmap-report", "kvmap-inspect"}
    assert want | {"kvmap-profile"} <= set(scripts)
    for name, target in scripts.items():
        module, func = target.split(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_no_module_shadows_the_standard_library_and_no_sys_path_edits():
    files = [p for d in ("pipeline", "trainer", "alignment") for p in (ROOT / d).glob("*.py")]
    assert not [p.name for p in files if p.stem in sys.stdlib_module_names]
    assert not [p.name for p in files if "sys.path" in p.read_text()]


@pytest.mark.parametrize("script", ["pipeline/extract.py", "trainer/train.py", "trainer/ablate.py"])
def test_scripts_run_by_path(script):
    """`python pipeline/extract.py --help` (what `accelerate launch` runs): imports resolve from any folder."""
    r = subprocess.run(
        [sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True, cwd="/"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "usage:" in r.stdout


def test_overrides_between_options_and_errors_are_one_line(tmp_path, capsys):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("seed: 7\n")
    p = command_parser("kvmap-x", "Doc.", sections=["train"], examples=["a", "b"])
    p.add_argument("--resume", action="store_true")
    args = parse_args(p, ["train.steps=5", "--config", str(cfg_file), "--resume", "train.lr=0.5"])
    cfg = config_from_args(KVMapConfig, args)
    assert (cfg.seed, cfg.train.steps, cfg.train.lr, args.resume) == (7, 5, 0.5, True)
    with pytest.raises(SystemExit) as e:
        parse_args(p, ["--resumee"])
    assert e.value.code == 2 and "unrecognized arguments: --resumee" in capsys.readouterr().err
    bad = parse_args(p, ["train.stepz=5"])
    assert run_command("x", lambda: config_from_args(KVMapConfig, bad)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "x: error: unknown config key 'train.stepz'" in err

    def boom():
        raise ConfigError("line one\nline two")

    assert run_command("x", boom) == 2
    assert capsys.readouterr().err == "x: error: line one\n"


def test_a_failure_exits_1_and_a_key_error_prints_its_message(capsys):
    def damaged():
        raise CommandFailed("array train/layers/0/k chunk 3: damaged\nmore")

    assert run_command("x", damaged) == 1
    assert capsys.readouterr().err == "x: error: array train/layers/0/k chunk 3: damaged\n"

    def missing():
        raise KeyError("split='test': the store has splits ['train']")

    assert run_command("x", missing, extra=(KeyError,)) == 2
    assert capsys.readouterr().err == "x: error: split='test': the store has splits ['train']\n"


def test_a_body_returning_its_result_exits_0():
    # kvmap-extract's body returns the summary dict: that is success, not sys.exit(dict) (exit 1)
    assert run_command("x", lambda: {"tokens": 3}) == 0
    assert run_command("x", lambda: 3) == 3
