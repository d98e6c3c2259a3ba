"""trainer/ablate.py with stand-in trainers: planning/validation, resume after an interrupted sweep,
and rows never duplicated (the sweep killed from outside: tests/test_ablate_signals.py).

The real-trainer sweep on tiny models lives in tests/test_ablate_real.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipeline.config.configlib import ConfigError
from tests.helpers_store import write_random_store
from trainer import ablate
from trainer.ablation.config import flatten_overrides, load_ablation, plan_runs
from trainer.ablation.results import read_results

ROOT = Path(__file__).resolve().parent.parent


def write_base(tmp_path: Path) -> Path:
    """A base experiment config that parses (the stand-in trainers never load its models)."""
    base = {
        "data": {"train_path": str(tmp_path / "train.jsonl"), "eval_path": None},
        "teacher": {"path": "tiny-teacher"},
        "student": {"config": {"model_type": "llama", "num_hidden_layers": 3}},
        "extract": {"store": str(tmp_path / "store.zarr")},
        "train": {"steps": 6},
    }
    p = tmp_path / "base.yaml"
    p.write_text(yaml.safe_dump(base))
    if not (tmp_path / "store.zarr").exists():
        write_random_store(tmp_path / "store.zarr", layers=(0, 1, 2, 3))
    return p


def write_ablation(tmp_path: Path, arms=None, **extra) -> Path:
    doc = {
        "base_config": str(write_base(tmp_path)),
        "seeds": [0, 1],
        "out_dir": str(tmp_path / "out"),
        "control": None if arms else "ce_only",
        "arms": arms
        or [
            {"name": "ce_only", "overrides": ["lambda_kv=0"]},
            {
                "name": "struct",
                "overrides": {"kv_projection_mode": "structured", "align": {"share_dim_proj": False}},
            },
        ],
        **extra,
    }
    p = tmp_path / "abl.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def fake_metrics(cfg) -> dict:
    return {
        "eval/ce_trained": 1.0 + 0.1 * cfg.seed - 0.05 * cfg.lambda_kv,
        "eval/ce": 2.0 + 0.1 * cfg.seed - 0.05 * cfg.lambda_kv,
        "eval/acc_R": 0.1 + 0.01 * cfg.seed,
        "align/params": 100 if cfg.kv_projection_mode == "structured" else 50,
        "steps": cfg.train.steps,
        "train/cos_k_layer": [0.5, 0.6, 0.7],
    }


class FakeTrainer:
    """Stand-in runner: writes what train.py writes; can die mid-run (checkpoint, no metrics.json) or
    just after finishing (metrics.json, but the sweep dies before the row)."""

    def __init__(self, die_mid_at=None, die_after_at=None):
        self.calls: list[tuple[str, int, bool]] = []
        self.die_mid_at, self.die_after_at = die_mid_at, die_after_at

    def __call__(self, spec, resume, abl):
        self.calls.append((spec.arm, spec.seed, resume))
        rd = spec.run_dir
        if not resume:
            assert not rd.exists() or not any(rd.iterdir()), f"fresh run into a non-empty folder {rd}"
        (rd / "checkpoints" / "step_3").mkdir(parents=True, exist_ok=True)
        with open(rd / "metrics.jsonl", "a") as f:
            for step in (1, 3, 6):
                f.write(json.dumps({"step": step, "loss_ce": 2.0 / step}) + "\n")
        if (spec.arm, spec.seed) == self.die_mid_at:
            raise KeyboardInterrupt
        (rd / "metrics.json").write_text(json.dumps(fake_metrics(spec.cfg)))
        if (spec.arm, spec.seed) == self.die_after_at:
            raise KeyboardInterrupt


@pytest.fixture
def fake(monkeypatch):
    def install(**kw):
        f = FakeTrainer(**kw)
        monkeypatch.setitem(ablate.RUNNERS, "fake", f)
        return f

    return install


def test_sweep_resumes_after_interruption_without_duplicates(tmp_path, fake):
    abl = load_ablation(write_ablation(tmp_path, runner="fake"))
    out = Path(abl.out_dir)
    f = fake(die_mid_at=("struct", 0))
    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablation(abl)
    assert [(r["arm"], r["seed"]) for r in read_results(out / "results.jsonl")] == [
        ("ce_only", 0),
        ("ce_only", 1),
    ]
    assert f.calls == [("ce_only", 0, False), ("ce_only", 1, False), ("struct", 0, False)]

    f = fake()
    rows = ablate.run_ablation(abl)  # resumes the killed run from its checkpoint, then the last one
    assert f.calls == [("struct", 0, True), ("struct", 1, False)]
    keys = [(r["arm"], r["seed"]) for r in rows]
    assert (
        sorted(keys) == [("ce_only", 0), ("ce_only", 1), ("struct", 0), ("struct", 1)] and len(set(keys)) == 4
    )
    row = rows[2]
    assert row["resumed"] is True and row["run_dir"] == str(out / "struct" / "seed_0")
    assert row["overrides"] == ["kv_projection_mode=structured", "align.share_dim_proj=false"]
    assert row["aligner_params"] == 100 and row["metrics"]["eval/ce_trained"] == pytest.approx(0.95)
    assert row["store_fingerprint"] and row["config_hash"] and row["wall_s"] >= 0

    f = fake()
    assert len(ablate.run_ablation(abl)) == 4 and f.calls == []  # nothing left to do
    md = (out / "report.md").read_text()
    assert (
        "| ce_only | 2 | 1.0500 ± 0.0707 | 2.0500 ± 0.0707 |" in md
        and "## Delta vs the control `ce_only`" in md
    )


def test_finished_run_whose_row_was_lost_is_recorded_without_retraining(tmp_path, fake):
    abl = load_ablation(write_ablation(tmp_path, runner="fake", report=False))
    fake(die_after_at=("ce_only", 1))
    with pytest.raises(KeyboardInterrupt):
        ablate.run_ablation(abl)
    f = fake()
    rows = ablate.run_ablation(abl)
    assert ("ce_only", 1, False) not in f.calls and ("ce_only", 1, True) not in f.calls
    assert len(rows) == 4 and rows[1]["seed"] == 1 and rows[1]["resumed"] is False


def test_stale_run_folder_restarts_cleanly(tmp_path, fake):
    abl = load_ablation(write_ablation(tmp_path, runner="fake", report=False))
    junk = Path(abl.out_dir) / "ce_only" / "seed_0"
    junk.mkdir(parents=True)
    (junk / "metrics.json").write_text("{}")  # no config beside it: not from this arm, cannot count
    f = fake()
    rows = ablate.run_ablation(abl)
    assert f.calls[0] == ("ce_only", 0, False) and rows[0]["metrics"]["eval/ce_trained"] == pytest.approx(1.0)


def test_bad_arm_fails_before_any_run(tmp_path, fake):
    f = fake()
    arms = [
        {"name": "ok", "overrides": ["lambda_kv=0"]},
        {"name": "typo", "overrides": ["align.share_dim_prj=false"]},
    ]
    with pytest.raises(ConfigError, match=r"arm 'typo' \(seed 0\): unknown config key 'align.share_dim_prj'"):
        ablate.run_ablation(load_ablation(write_ablation(tmp_path, arms=arms, runner="fake")))
    arms[1] = {"name": "badval", "overrides": {"train": {"steps": "many"}}}
    with pytest.raises(ConfigError, match=r"arm 'badval'.*'train.steps': got 'many', expected an int"):
        ablate.run_ablation(load_ablation(write_ablation(tmp_path, arms=arms, runner="fake")))
    arms[1] = {"name": "other_store", "overrides": ["extract.dtype=float16"]}
    with pytest.raises(ConfigError, match="arm 'other_store': its 'extract' section differs"):
        ablate.run_ablation(load_ablation(write_ablation(tmp_path, arms=arms, runner="fake")))
    arms[1] = {"name": "deep", "overrides": ["align.layer_map=[0, 0, 2]"]}
    abl = load_ablation(write_ablation(tmp_path, arms=arms, runner="fake"))
    shutil.rmtree(tmp_path / "store.zarr")
    write_random_store(tmp_path / "store.zarr", layers=(1, 2, 3))  # what "uniform" needs, not "deep"
    with pytest.raises(ValueError, match=r"arm 'deep': its layer map needs teacher layers \[0, 2\]"):
        ablate.run_ablation(abl)
    assert f.calls == []
    for bad, msg in [
        ({"arms": [{"name": "a/b"}]}, "arm name 'a/b'"),
        ({"arms": [{"name": "a"}, {"name": "a"}]}, "duplicate arm name 'a'"),
        ({"arms": [{"name": "a"}], "seeds": [1, 1]}, "distinct seeds"),
        ({"arms": [{"name": "a"}], "control": "b"}, "control='b'"),
        ({"arms": [{"name": "a"}], "sedes": [1]}, "unknown config key 'sedes'"),
        ({"arms": [{"name": "a", "overrides": ["lambda_kv"]}]}, "expected 'dotted.key=value'"),
    ]:
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump({"base_config": str(tmp_path / "base.yaml"), **bad}))
        with pytest.raises(ConfigError, match=msg):
            plan_runs(load_ablation(p))
    with pytest.raises(ConfigError, match="runner='nope'"):
        ablate.run_ablation(load_ablation(write_ablation(tmp_path, runner="nope")))


def test_changed_arm_refuses_its_old_rows(tmp_path, fake):
    path = write_ablation(tmp_path, runner="fake", report=False, seeds=[0])
    fake()
    ablate.run_ablation(load_ablation(path))
    with pytest.raises(ConfigError, match="row for arm 'ce_only' seed 0 was made with another config"):
        ablate.run_ablation(load_ablation(path, ["train.lr=0.5"]))


def test_rows_survive_a_new_config_key_with_its_default(tmp_path, fake):
    """The hash covers only non-default values: a key added with a behaviour-keeping default (here: set
    explicitly to its default) keeps the rows; a row hashed by an older kvmap (over every key) is checked
    against the run's saved resolved config instead."""
    path = write_ablation(tmp_path, runner="fake", report=False, seeds=[0])
    fake()
    rows = ablate.run_ablation(load_ablation(path))
    same = load_ablation(path, ["train.save_final_state=false", "train.progress=true"])
    assert [s.config_hash for s in plan_runs(same)] == [r["config_hash"] for r in rows]
    results = tmp_path / "out" / "results.jsonl"
    legacy = [{**json.loads(x), "config_hash": "0123456789abcdef"} for x in results.read_text().splitlines()]
    results.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    assert len(ablate.run_ablation(load_ablation(path))) == 2  # accepted through the saved configs
    with pytest.raises(ConfigError, match="was made with another config"):
        ablate.run_ablation(load_ablation(path, ["train.lr=0.5"]))


def test_cli_overrides_and_mapping_equals_dotted(tmp_path):
    path = write_ablation(tmp_path)
    abl = load_ablation(path, ["seeds=[3]", "train.steps=2", "only_arms=[struct]"])
    assert abl.seeds == [3] and abl.base_overrides == ["train.steps=2"] and abl.only_arms == ["struct"]
    specs = plan_runs(abl)
    assert [(s.arm, s.seed, s.cfg.train.steps) for s in specs] == [("ce_only", 3, 2), ("struct", 3, 2)]
    assert (
        specs[1].cfg.align.share_dim_proj is False
        and specs[1].run_dir == Path(abl.out_dir) / "struct" / "seed_3"
    )
    dotted = ["kv_projection_mode=structured", "align.share_dim_proj=false"]
    mapping = {"kv_projection_mode": "structured", "align": {"share_dim_proj": False}}
    assert flatten_overrides(mapping, "x") == dotted
    with pytest.raises(ConfigError, match=r"base_overrides: unknown config key 'train.stepz'"):
        plan_runs(load_ablation(path, ["train.stepz=2"]))
    with pytest.raises(ConfigError, match="ablation field 'seeds' takes a whole value"):
        load_ablation(path, ["seeds.0=1"])


def test_cli_fails_one_way_a_failed_run_1_bad_input_2(tmp_path, monkeypatch, capsys):
    """kvmap-ablate's errors are one line `ablate: error: ...` on stderr: exit 1 when a run fails, 2 for bad
    input; the dry-run list is the result, on stdout, and progress messages go to stderr."""

    def failing(spec, resume, abl):
        raise RuntimeError(f"arm '{spec.arm}' seed {spec.seed}: training exited with code 1\nlog tail")

    monkeypatch.setitem(ablate.RUNNERS, "failing", failing)
    path = write_ablation(tmp_path, runner="failing", report=False)
    assert ablate.main(["--config", str(path), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "  ce_only seed 0: lambda_kv=0 [new]" in out and "[ablate] 2 arms x 2 seeds" in err
    assert ablate.main(["--config", str(path)]) == 1
    errors = [ln for ln in capsys.readouterr().err.splitlines() if "error:" in ln]
    assert errors == ["ablate: error: arm 'ce_only' seed 0: training exited with code 1"]
    assert ablate.main(["--config", str(path), "train.stepz=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ablate: error: ") and "unknown config key 'train.stepz'" in err


def test_default_matrix_resolves_every_arm():
    abl = load_ablation(ROOT / "configs" / "ablations" / "default.yaml")
    specs = plan_runs(abl)
    arms = {s.arm: s.cfg for s in specs if s.seed == 0}
    assert list(arms) == [
        "ce_only", "kd_only", "kd_v40_2", "kd_attn_teacher", "baseline_flat", "v40_1", "v40_2", "v40_3",
        "v40_2_rope", "attn_teacher", "attn_teacher_decay", "combo", "kd_heads_top", "kd_relation", "kd_staged",
        "kd_auto",
    ]  # fmt: skip
    assert abl.seeds == [0, 1, 2] and len(specs) == 48 and abl.control == "ce_only"
    for a in (
        "kd_only",
        "kd_v40_2",
        "kd_attn_teacher",
        "kd_heads_top",
        "kd_relation",
        "kd_staged",
        "kd_auto",
    ):
        assert arms[a].loss_config.alpha_logit == 1.0, a
    assert arms["kd_only"].lambda_kv == 0 and arms["kd_auto"].lambda_kv == "auto"
    assert arms["kd_staged"].train.lambda_schedule == "step" and arms["kd_staged"].train.lambda_until == 100
    assert arms["kd_heads_top"].loss_config.sink == "drop"
    c = arms["combo"]
    assert c.align.rope_consistent and c.loss_config.attn_target == "teacher" and c.loss_config.alpha_k == 1.0
    assert c.train.lambda_schedule == "linear" and c.train.steps == 300 and c.train.batch_size == 16
    assert arms["ce_only"].lambda_kv == 0 and arms["baseline_flat"].kv_projection_mode == "flat"
    got = {a: (c.kv_projection_mode, c.align.share_dim_proj, c.align.init_uniform) for a, c in arms.items()}
    assert got["v40_1"] == ("structured", True, False) and got["v40_2"] == ("structured", True, True)
    assert got["v40_3"] == ("structured", False, True) and arms["v40_2_rope"].align.rope_consistent is True
    for a in ("attn_teacher", "attn_teacher_decay"):
        lc = arms[a].loss_config
        assert (lc.attn_target, lc.alpha_k, lc.alpha_v) == ("teacher", 0.0, 0.0)
    assert arms["attn_teacher_decay"].train.lambda_schedule == "linear"
    assert arms["attn_teacher"].train.lambda_schedule == "constant"


def test_invocations_with_disjoint_seeds_share_out_dir_and_the_report_sees_every_seed(tmp_path, fake):
    """Two `kvmap-ablate ... 'seeds=[..]'` sharing out_dir (README's two-process recipe) must not overwrite
    each other's planned seeds in ablation.yaml: the report would call the other's arms incomplete."""
    path = write_ablation(tmp_path, runner="fake")
    fake()
    ablate.run_ablation(load_ablation(path, ["seeds=[1]"]))
    ablate.run_ablation(load_ablation(path, ["seeds=[0]"]))
    out = Path(load_ablation(path).out_dir)
    assert yaml.safe_load((out / "ablation.yaml").read_text())["seeds"] == [0, 1]
    assert "Incomplete arms" not in (out / "report.md").read_text()
    assert not list(out.glob(".ablation.yaml.*.tmp"))  # the atomic write leaves no temp file


def test_concurrent_invocations_starting_together_keep_every_seed(tmp_path, monkeypatch):
    """Processes started at the same moment (one per seed) all read ablation.yaml before any writes it;
    without the lock the last write drops the others' seeds. A slow dump widens that window."""
    import threading
    import time

    import trainer.ablation.config as ablation_config

    path = write_ablation(tmp_path, runner="fake")
    configs = [load_ablation(path, [f"seeds=[{s}]"]) for s in range(8)]
    out = Path(configs[0].out_dir)
    out.mkdir(parents=True)
    dump = yaml.safe_dump

    def slow_dump(*a, **k):
        time.sleep(0.02)
        return dump(*a, **k)

    monkeypatch.setattr(ablation_config.yaml, "safe_dump", slow_dump)
    go = threading.Barrier(8)

    def one(abl):
        go.wait()
        ablation_config.record_ablation(out, abl)

    threads = [threading.Thread(target=one, args=(a,)) for a in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert yaml.safe_load((out / "ablation.yaml").read_text())["seeds"] == list(range(8))
