"""trainer/ablation/report.py: tables (mean ± std over seeds, deltas vs control) and plots from hand-written results."""

from __future__ import annotations

import json
import math
import random
import re
import statistics

import pytest
import yaml

from trainer.ablation.report import build_report, main
from trainer.ablation.results import append_result, read_results
from trainer.ablation.stats import delta, mean_std, verdict

# Hand-written final metrics: arm -> seed -> metrics (the numbers the tables must reproduce).
CE = {"ce_only": {0: 0.9, 1: 1.0, 2: 1.1}, "v40_2": {0: 0.8, 1: 0.9}}
ACC_R = {"ce_only": {0: 0.1, 1: 0.2, 2: 0.3}, "v40_2": {0: 0.70, 1: 0.72}}


def _metrics(arm, seed):
    m = {
        "eval/ce_trained": CE[arm][seed] - 0.5,
        "eval/ce": CE[arm][seed],
        "eval/ce_P": 2.0 + seed,
        "eval/ce_R": 0.5,
        "eval/ce_A": 0.25,
        "eval/acc_R": ACC_R[arm][seed],
        "eval/acc_A": 0.5,
        "eval/exact_match": 0.0,
        "train/loss_ce": 1.0,
        "align/params": 1234,
        "train/step_s": 0.5 if arm == "ce_only" else 0.7 + 0.1 * seed,  # v40_2: mean 0.75 = 1.5x
        "wall_s": 10.0 + seed,
        "steps": 6,
    }
    if arm != "ce_only":  # the control has no structural terms: its cells must read '–'
        m.update({"train/cos_k": 0.5, "train/cos_v": 0.25, "train/attn_kl": 0.125})
        m.update({"train/cos_k_layer": [0.1 * seed, 0.2, 0.3], "train/cos_v_layer": [0.4, 0.5, 0.6 + seed]})
    return m


@pytest.fixture
def ablation_dir(tmp_path):
    out = tmp_path / "abl"
    for arm, seeds in CE.items():
        for seed in seeds:
            run = out / arm / f"seed_{seed}"
            run.mkdir(parents=True)
            with open(run / "metrics.jsonl", "w") as f:
                for step in (1, 3, 6):
                    f.write(
                        json.dumps({"step": step, "loss": 3.0 / step, "loss_ce": 3.0 / step + seed}) + "\n"
                    )
                    f.write(json.dumps({"step": step, "eval/ce": 2.0 / step + 0.1 * seed}) + "\n")
                f.write('{"step": 7, "loss_c')  # a line cut by a kill: ignored
            append_result(
                out / "results.jsonl",
                {
                    "arm": arm,
                    "seed": seed,
                    "overrides": ["lambda_kv=0"] if arm == "ce_only" else ["kv_projection_mode=structured"],
                    "run_dir": str(run),
                    "lambda_kv": 0.0 if arm == "ce_only" else 1.0,
                    "metrics": _metrics(arm, seed),
                    "wall_s": 11.0,
                    "store_fingerprint": "fp",
                    "git_sha": "abc",
                },
            )
    meta = {
        "seeds": [0, 1, 2],
        "control": "ce_only",
        "arms": [{"name": "ce_only", "description": "control"}, {"name": "v40_2"}, {"name": "never_ran"}],
    }
    (out / "ablation.yaml").write_text(yaml.safe_dump(meta))
    return out


def _row_cells(md: str, section: str, arm: str) -> list[str]:
    block = md.split(f"## {section}")[1].split("\n## ")[0]
    for line in block.splitlines():
        if line.startswith(f"| {arm} |"):
            return [c.strip() for c in line.strip("|").split("|")]
    raise AssertionError(f"no row for {arm} in {section}")


def test_tables_hold_means_stds_and_deltas(ablation_dir):
    md = build_report(ablation_dir)
    assert (ablation_dir / "report.md").read_text() == md
    q = _row_cells(md, "Held-out quality", "ce_only")
    # arm, n, CE trained segs, CE all, CE P, CE R, CE A, acc R, acc A, EM
    assert q[:4] == ["ce_only", "3", "0.5000 ± 0.1000", "1.0000 ± 0.1000"]
    assert q[4] == "3.0000 ± 1.0000"  # ce_P = 2 + seed over seeds 0, 1, 2
    assert q[7] == "0.200 ± 0.100"
    q2 = _row_cells(md, "Held-out quality", "v40_2")
    assert q2[:4] == ["v40_2", "2", f"0.3500 ± {statistics.stdev([0.8, 0.9]):.4f}", "0.8500 ± 0.0707"]
    assert q2[7] == f"0.710 ± {statistics.stdev([0.70, 0.72]):.3f}"
    a = _row_cells(md, "Alignment and cost", "ce_only")
    assert a[2:5] == ["–", "–", "–"]  # no structural terms in the control
    assert a[8] == "1,234" and a[9] == "0.500 ± 0.000" and a[10] == "11.0 ± 1.0" and a[11] == "6"
    assert (
        "Step cost ÷ `ce_only` (mean seconds per optimiser step, evaluation excluded): `ce_only` 1.00x, `v40_2` 1.50x."
        in md
    )
    a2 = _row_cells(md, "Alignment and cost", "v40_2")
    assert a2[2:5] == ["0.500 ± 0.000", "0.250 ± 0.000", "0.1250 ± 0.0000"]
    d = _row_cells(md, "Delta vs the control `ce_only`", "v40_2")
    se_ce = math.sqrt(statistics.variance([0.8, 0.9]) / 2 + statistics.variance([0.9, 1.0, 1.1]) / 3)
    assert d[1] == d[2] == f"-0.1500 ± {se_ce:.4f}"  # |Δ| = 0.15 < 2 SE = 0.18: within noise, not marked
    se_acc = math.sqrt(statistics.variance([0.70, 0.72]) / 2 + statistics.variance([0.1, 0.2, 0.3]) / 3)
    assert d[5] == f"+0.510 ± {se_acc:.3f} **better**"
    assert "`never_ran` (0/3 seeds)" in md and "`v40_2` (2/3 seeds)" in md
    assert "- `ce_only`: control — `lambda_kv=0` — seeds 0, 1, 2" in md


def test_plots_are_written_as_png(ablation_dir):
    md = build_report(ablation_dir)
    for name in ("loss_curves.png", "cos_layers.png", "deltas.png"):
        data = (ablation_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
        assert f"]({name})" in md


def test_mean_std_matches_statistics_on_random_values():
    rng = random.Random(0)
    for n in (2, 3, 7):
        xs = [rng.uniform(-5, 5) for _ in range(n)]
        m, s, k = mean_std(xs + [None, float("nan"), "x"])  # non-numbers are skipped
        assert (
            k == n and m == pytest.approx(statistics.fmean(xs)) and s == pytest.approx(statistics.stdev(xs))
        )
    m, s, k = mean_std([2.5])
    assert (m, k) == (2.5, 1) and math.isnan(s)
    assert mean_std([])[2] == 0


def test_delta_and_verdict_directions():
    stats = {"a": {"x": (1.0, 0.1, 3)}, "c": {"x": (2.0, 0.1, 3)}}
    d, se = delta(stats, "a", "c", "x")
    assert d == pytest.approx(-1.0) and se == pytest.approx(math.sqrt(0.02 / 3))
    assert verdict(d, se, "lower") == "better" and verdict(d, se, "higher") == "worse"
    assert verdict(0.01, se, "lower") == "noise" and verdict(d, math.nan, "lower") == ""


def test_control_without_rows_gives_no_deltas(ablation_dir):
    md = build_report(ablation_dir, control="never_ran", plots=False)
    assert "No deltas: the control `never_ran` has no finished runs yet." in md and "Δ" not in md


def test_control_falls_back_to_lambda_zero_and_cli(ablation_dir, capsys):
    (ablation_dir / "ablation.yaml").unlink()
    md = build_report(ablation_dir, plots=False)
    assert "## Delta vs the control `ce_only`" in md and "Incomplete" not in md
    assert main([str(ablation_dir), "--no-plots", "--control", "v40_2"]) == 0
    assert "## Delta vs the control `v40_2`" in capsys.readouterr().out
    assert main([str(ablation_dir), "--control", "nope"]) == 2
    assert "control='nope'" in capsys.readouterr().err
    assert main([str(ablation_dir / "missing")]) == 2


def test_results_file_survives_a_killed_write(tmp_path):
    path = tmp_path / "results.jsonl"
    append_result(path, {"arm": "a", "seed": 0, "metrics": {}})
    with open(path, "a") as f:
        f.write('{"arm": "a", "seed": 1, "metr')  # killed mid-write
    with pytest.warns(UserWarning, match="truncated last line"):
        assert [r["seed"] for r in read_results(path)] == [0]
    append_result(path, {"arm": "a", "seed": 1, "metrics": {}})
    assert [r["seed"] for r in read_results(path)] == [0, 1]
    path.write_text('{"arm": "a", "seed": 0, "metrics": {}}')  # a whole row lacking its newline is kept
    append_result(path, {"arm": "a", "seed": 1, "metrics": {}})
    assert [r["seed"] for r in read_results(path)] == [0, 1]
    path.write_text('garbage\n{"arm": "a", "seed": 0, "metrics": {}}\n')
    with pytest.raises(ValueError, match=re.escape("results.jsonl:1: not a JSON object")):
        read_results(path)


def test_gradient_probe_table_first_and_mean(ablation_dir):
    """Runs that logged `gprobe/*` rows get a table: value at the first probe / mean over probes, over seeds."""
    assert "## Gradient probe" not in build_report(ablation_dir, plots=False)  # no run probed
    for seed in (0, 1):
        path = ablation_dir / "v40_2" / f"seed_{seed}" / "metrics.jsonl"
        with open(path, "a") as f:
            f.write("\n")
            for step, struct, cos in ((10, 0.5, -0.25), (20, 1.0 + seed, 0.25)):
                row = {"step": step, "gprobe/norm_ce": 2.0, "gprobe/norm_kd": 1.0, "gprobe/norm_struct": struct,
                       "gprobe/cos_ce_kd": 0.5, "gprobe/cos_ce_struct": 0.0, "gprobe/cos_kd_struct": cos}  # fmt: skip
                f.write(json.dumps(row) + "\n")
    md = build_report(ablation_dir, plots=False)
    cells = _row_cells(md, "Gradient probe", "v40_2")
    # struct ÷ KD: first 0.5 both seeds; means (0.5 + 1.0) / 2 = 0.75 and (0.5 + 2.0) / 2 = 1.25 -> 1.0
    # last: (1.0 + 2.0) / 2 = 1.5 struct ÷ KD
    assert cells[1] == "0.500 / 1.000 / 1.500" and cells[2] == "0.250 / 0.500 / 0.750"
    assert cells[3] == "0.500 / 0.500 / 0.500" and cells[6] == "-0.250 / 0.000 / 0.250"
    assert "| ce_only |" not in md.split("## Gradient probe")[1].split("\n## ")[0]  # the control never probed
