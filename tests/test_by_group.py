"""Every student of a matrix re-evaluated per held-out set and row group (trainer/ablation/by_group.py): the
groups partition the split, the `all` group equals the matrix's own evaluator on the whole split, results
resume, and the report marks differences beyond 2 SE."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from accelerate import Accelerator

from pipeline.config.kvmap import ModelConfig
from pipeline.config.train import EvalConfig
from pipeline.models.load import load_model, pad_token_id
from tests.helpers_train import make_tiny_store, teacher_dir
from trainer.ablation.by_group import OUT_NAME, evaluate_matrix, group_indices, grouped_report
from trainer.ablation.results import append_result
from trainer.eval.evaluate import evaluate


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("by_group")
    store = make_tiny_store(tmp / "s.zarr", num_train=8, num_eval=6, top_k=8)
    src = tmp / "heldout.jsonl"
    src.write_text("".join(json.dumps({"type": "ab"[i % 2]}) + "\n" for i in range(6)))
    out = tmp / "m"
    for arm in ("ctl", "arm"):
        for seed in (0, 1):
            run = out / arm / f"seed_{seed}"
            shutil.copytree(teacher_dir(store), run / "student")
            if arm == "arm":  # a different student: perturbed weights
                m, tok = load_model(ModelConfig(path=str(run / "student")))
                torch.manual_seed(seed)
                with torch.no_grad():
                    for p in m.parameters():
                        p.add_(0.3 * torch.randn_like(p))
                m.save_pretrained(run / "student")
            append_result(
                out / "results.jsonl", {"arm": arm, "seed": seed, "metrics": {}, "run_dir": str(run)}
            )
    return store, src, out


def test_groups_partition_the_split(matrix):
    store, src, _ = matrix
    g = group_indices(str(store), "eval", str(src), "type")
    assert g["a"] == [0, 2, 4] and g["b"] == [1, 3, 5] and g["all"] == list(range(6))
    with pytest.raises(ValueError, match="no field 'kind'"):
        group_indices(str(store), "eval", str(src), "kind")


def test_all_group_equals_the_matrix_evaluator_and_reruns_resume(matrix):
    store, src, out = matrix
    evals = [["heldout", str(store), "eval", str(src)]]
    cfg = EvalConfig(greedy_samples=4, max_new_tokens=4, batch_size=4)
    rows = evaluate_matrix(out, evals, "type", str(teacher_dir(store)), cfg, [1, 2], needle_samples=6)
    run = out / "arm" / "seed_1"
    got = json.loads((run / OUT_NAME).read_text())["heldout"]
    student, tok = load_model(ModelConfig(path=str(run / "student")))
    ref = evaluate(Accelerator(cpu=True), student, tok, str(store), "eval", cfg, pad_token_id(tok), [1, 2])
    for k in ("eval/ce_trained", "eval/acc_R", "eval/agree_top1", "eval/kl_teacher", "eval/exact_match"):
        a, b = got["all"][k], ref[k]
        assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6), k
    # the student identical to the teacher looks where the teacher does on every sample it has a needle for
    same = json.loads((out / "ctl" / "seed_0" / OUT_NAME).read_text())["heldout"]["all"]
    assert same["needle/samples"] == 6
    assert same["needle/mass"] == pytest.approx(same["needle/teacher_mass"], rel=1e-5)
    # a rerun reuses the files (a changed file is read back, not recomputed)
    before = (run / OUT_NAME).stat().st_mtime_ns
    evaluate_matrix(out, evals, "type", str(teacher_dir(store)), cfg, [1, 2], needle_samples=6)
    assert (run / OUT_NAME).stat().st_mtime_ns == before
    text = grouped_report(rows, "ctl")
    assert "### heldout, a" in text and "### heldout, b" in text and "`arm`" in text


def test_report_marks_differences_beyond_two_se():
    def row(arm, seed, em):
        return {"arm": arm, "seed": seed, "grouped": {"h": {"all": {"eval/exact_match": em}}}}

    rows = [row("c", 0, 0.10), row("c", 1, 0.12), row("x", 0, 0.50), row("x", 1, 0.52), row("y", 0, 0.11)]
    rows += [row("y", 1, 0.13)]
    text = grouped_report(rows, "c")
    line_x = next(x for x in text.splitlines() if x.startswith("| `x`"))
    line_y = next(x for x in text.splitlines() if x.startswith("| `y`"))
    assert "+0.400, **better**" in line_x
    assert "**" not in line_y and "+0.010" in line_y


def test_report_leaves_out_a_column_no_run_measured_and_counts_seeds():
    def row(arm, seed, acc):
        m = {"eval/exact_match": math.nan, "eval/acc_A": acc}
        return {"arm": arm, "seed": seed, "grouped": {"h": {"all": m}}}

    text = grouped_report([row("c", 0, 0.1), row("c", 1, 0.2), row("x", 0, 0.3)], "c")
    header = next(x for x in text.splitlines() if x.startswith("| arm"))
    assert "exact match" not in header and "acc A" in header
    assert "| `c` | 2 | 0.150" in text and "| `x` | 1 | 0.300" in text
    note = next(x for x in text.splitlines() if x.startswith("Not measured in this evaluation"))
    assert "exact match" in note and "acc A" not in note


def test_grouped_deltas_plot_is_drawn_with_a_control_and_skipped_without(tmp_path):
    from trainer.ablation.plots import plot_grouped_deltas

    def row(arm, seed, acc, mass):
        m = {"eval/acc_R": acc, "eval/ce_trained": 1.0 - acc, "eval/agree_top1": 0.5, "needle/mass": mass}
        return {"arm": arm, "seed": seed, "grouped": {"h": {"all": m, "a": m}, "long": {"all": m}}}

    rows = [row("c", s, 0.1 + 0.01 * s, 0.02) for s in range(3)]
    rows += [row("x", s, 0.3 + 0.01 * s, 0.05) for s in range(3)]
    path = plot_grouped_deltas(tmp_path, rows, "c")
    assert path == tmp_path / "grouped_deltas.png" and path.stat().st_size > 10_000
    assert plot_grouped_deltas(tmp_path / "none", rows, None) is None
    assert plot_grouped_deltas(tmp_path / "none", rows, "absent") is None


def test_group_sums_adds_up_all_from_a_partition_and_computes_it_otherwise():
    from trainer.ablation.by_group import group_sums

    calls = []

    def sums(idx):
        calls.append(list(idx))
        return torch.tensor([float(sum(idx)), float(len(idx))], dtype=torch.float64)

    out = group_sums({"all": [0, 1, 2, 3], "a": [0, 2], "b": [3, 1]}, sums)
    assert calls == [[0, 2], [3, 1]]  # "all" is not run again
    assert torch.equal(out["all"], sums([0, 1, 2, 3])) and torch.equal(
        out["a"], torch.tensor([2.0, 2.0]).double()
    )
    calls.clear()
    out = group_sums({"all": [0, 1, 2, 3], "a": [0, 2]}, sums)  # not a partition: computed directly
    assert calls == [[0, 2], [0, 1, 2, 3]] and out["all"][0] == 6
