"""Held-out metrics of every trained student of an A/B matrix, per held-out set and per row group
(e.g. the retrieval task's question `type` at the training length and at twice it), with needle attention.

    python -m trainer.ablation.by_group runs/ablations/NAME \\
        --eval heldout stores/retrieval.zarr eval data/retrieval/heldout.jsonl \\
        --eval heldout_long stores/retrieval_long.zarr train data/retrieval/heldout_long.jsonl \\
        --by type --control kd_only

Shapes: none (wraps `trainer.eval.evaluate`'s sums and `trainer.eval.needle`).

Each `--eval NAME STORE SPLIT SOURCE` is a store split and the rows it was extracted from (the store's `rows`
record says which source row each sample is; `--by` names the row field that groups them). For every
finished run of the matrix (`results.jsonl`) the student in `run_dir/student` is evaluated: CE on the trained
segments, answer-token accuracy in R and A, greedy exact match (decoding R and A from the prompt), top-1
agreement and KL to the teacher (the store's top-k), and needle attention (`trainer.eval.needle`; the
teacher's is computed once and cached). Results go to `run_dir/grouped_eval.json` (an existing one is reused:
the command resumes), the table to `grouped_report.md` beside `results.jsonl`: mean ± std over seeds and
the difference to the control, marked where it is beyond 2 SE, and those differences with ± 2 SE bars in
`grouped_deltas.png`.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from pipeline.cli import command_parser, run_command
from pipeline.config.kvmap import SEGMENTS, ModelConfig
from pipeline.config.train import EvalConfig
from pipeline.models.load import load_model, pad_token_id
from pipeline.store.reader import KVStore
from trainer.ablation.plots import plot_grouped_deltas
from trainer.ablation.results import RESULTS_NAME, read_results, resolve_run_dir
from trainer.ablation.stats import delta, mean_std, verdict
from trainer.data.loader import StoreDataset
from trainer.eval.evaluate import eval_metrics, teacher_forced_sums
from trainer.eval.greedy import greedy_exact_match
from trainer.eval.needle import (
    best_head,
    head_needle_stats,
    needle_agreement,
    needle_positions,
    use_eager_attention,
)

OUT_NAME = "grouped_eval.json"
# column key -> (header, which way is better)
COLUMNS = {
    "eval/exact_match": ("exact match", "higher"),
    "eval/acc_R": ("acc R", "higher"),
    "eval/acc_A": ("acc A", "higher"),
    "eval/ce_trained": ("CE (R+A)", "lower"),
    "eval/agree_top1": ("agree top-1", "higher"),
    "eval/kl_teacher": ("KL(t‖s)", "lower"),
    "needle/mass": ("needle mass", "higher"),
    "needle/agree": ("needle agree", "higher"),
}


def group_indices(store_path: str, split: str, source: str, by: str) -> dict[str, list[int]]:
    """{group value: dataset indices} of a store split, read off its source rows' `by` field."""
    rows = [json.loads(x) for x in Path(source).read_text().splitlines() if x.strip()]
    src = KVStore(store_path).rows(split)
    groups: dict[str, list[int]] = {"all": list(range(len(src)))}
    for i, r in enumerate(src):
        if int(r) >= len(rows) or by not in rows[int(r)]:
            raise ValueError(
                f"--eval source {source}: row {int(r)} has no field {by!r} (expected --by in it)"
            )
        groups.setdefault(str(rows[int(r)][by]), []).append(i)
    return groups


def needle_stats(model, ds: StoreDataset, desc: str, limit: int) -> dict[int, tuple[float, bool]]:
    """{dataset index: (best head's needle mass, whether it points at the needle)} over the first `limit`
    samples of a split (eager attention over every layer is the slow part of this evaluation)."""
    use_eager_attention(model)
    out = {}
    for i in tqdm(range(min(limit, len(ds))), desc=desc, leave=False):
        s = ds[i]
        pos = needle_positions(s["input_ids"], s["segment_ids"], s["answer_mask"])
        if pos is not None:
            out[i] = best_head(*head_needle_stats(model, s["input_ids"], *pos))
    return out


def teacher_needles(
    teacher: str, evals: list, cache: Path, limit: int
) -> dict[str, dict[int, tuple[float, bool]]]:
    """The teacher's needle stats per held-out set, computed once and cached in `cache` (JSON)."""
    have = json.loads(cache.read_text()) if cache.is_file() else {}
    if have.get("limit") != limit:
        have = {"limit": limit}
    todo = [e for e in evals if e[0] not in have]
    if todo:
        model, _ = load_model(ModelConfig(path=teacher))
        model.eval()
        for name, store, split, _ in todo:
            stats = needle_stats(model, StoreDataset(store, split), f"teacher needles {name}", limit)
            have[name] = {str(i): v for i, v in stats.items()}
        cache.write_text(json.dumps(have))
    return {k: {int(i): tuple(v) for i, v in d.items()} for k, d in have.items() if k != "limit"}


def group_sums(groups: dict[str, list[int]], sums) -> dict[str, torch.Tensor]:
    """`sums(indices)` for every group; "all" is added up from the others when they split it exactly.

    Teacher-forced sums are additive over samples, so the forward over every row runs once, not twice
    (the "all" group and its parts); a grouping that does not partition "all" is computed directly.
    """
    parts = {g: sums(idx) for g, idx in groups.items() if g != "all"}
    if "all" in groups:
        split = sorted(i for g, idx in groups.items() if g != "all" for i in idx) == sorted(groups["all"])
        parts["all"] = torch.stack(list(parts.values())).sum(0) if split and parts else sums(groups["all"])
    return parts


def evaluate_groups(student, tok, evals, groups, teacher, eval_cfg, ce_ids, needle_samples: int = 32) -> dict:
    """{eval name: {group: metrics}} of one student (see the module docstring)."""
    acc = Accelerator(cpu=True)
    pad_id = pad_token_id(tok)
    res = {}
    for name, store, split, _ in evals:
        fidelity = KVStore(store).has_logits(split)
        ds = StoreDataset(store, split, components=("logits",) if fidelity else ())
        mine = needle_stats(student, ds, f"student needles {name}", needle_samples)
        res[name] = {}
        one = partial(teacher_forced_sums, acc, student, ds, batch_size=eval_cfg.batch_size, pad_id=pad_id)
        sums_of = group_sums(groups[name], partial(one, ce_ids=ce_ids, fidelity=fidelity))
        for g, idx in groups[name].items():
            sums = sums_of[g]
            g_idx = idx[: eval_cfg.greedy_samples]
            hits, n = greedy_exact_match(
                student, tok, ds, g_idx, eval_cfg.max_new_tokens, eval_cfg.batch_size, acc.device
            )
            m = eval_metrics(sums, torch.tensor([hits, n], dtype=torch.float64), len(idx), ce_ids, fidelity)
            both = [i for i in idx if i in mine and i in teacher[name]]
            m["needle/mass"] = sum(mine[i][0] for i in both) / max(len(both), 1)
            m["needle/hit"] = sum(mine[i][1] for i in both) / max(len(both), 1)
            m["needle/teacher_hit"] = sum(teacher[name][i][1] for i in both) / max(len(both), 1)
            m["needle/teacher_mass"] = sum(teacher[name][i][0] for i in both) / max(len(both), 1)
            m["needle/agree"] = needle_agreement(
                [mine[i][1] for i in both], [teacher[name][i][1] for i in both]
            )
            m["needle/samples"] = len(both)
            res[name][g] = m
    return res


def evaluate_matrix(
    matrix: Path, evals, by: str, teacher: str, eval_cfg, ce_ids, needle_samples: int = 32
) -> list[dict]:
    """Evaluate every finished run of the matrix that has no `grouped_eval.json` yet; return all rows."""
    rows = read_results(matrix / RESULTS_NAME)
    if not rows:
        raise ValueError(f"{matrix}: no finished run in {RESULTS_NAME} (expected an ablation output folder)")
    groups = {e[0]: group_indices(e[1], e[2], e[3], by) for e in evals}
    tstats = teacher_needles(teacher, evals, matrix / "teacher_needles.json", needle_samples)
    for row in rows:
        run = resolve_run_dir(matrix, row)
        out = run / OUT_NAME
        if not out.is_file():
            torch.manual_seed(0)
            student, tok = load_model(ModelConfig(path=str(run / "student")))
            student.eval()
            res = evaluate_groups(student, tok, evals, groups, tstats, eval_cfg, ce_ids, needle_samples)
            tmp = out.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1))
            tmp.replace(out)
            print(f"{row['arm']} seed {row['seed']}: {json.dumps(res[evals[0][0]]['all'])[:160]}...")
        row["grouped"] = json.loads(out.read_text())
    return rows


def grouped_report(rows: list[dict], control: str | None) -> str:
    """Markdown tables: per held-out set and group, each arm's seed count, mean ± std and Δ vs the control
    (2-SE marks). A column no arm has a value for (exact match with `--greedy 0`) is left out, and said so."""
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    seeds = {a: sum(r["arm"] == a for r in rows) for a in arms}
    lines, left_out = [], set()
    first = rows[0]["grouped"]
    for name in first:
        for g in first[name]:
            stats = {
                a: {
                    k: mean_std([r["grouped"][name][g].get(k) for r in rows if r["arm"] == a])
                    for k in COLUMNS
                }
                for a in arms
            }
            cols = {k: v for k, v in COLUMNS.items() if any(stats[a][k][2] for a in arms)}
            left_out |= {h for k, (h, _) in COLUMNS.items() if k not in cols}
            head = ["arm", "seeds"] + [h for h, _ in cols.values()]
            lines += [f"### {name}, {g}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            for a in arms:
                cells = [f"`{a}`", str(seeds[a])]
                for k, (_, better) in cols.items():
                    m, s, _ = stats[a][k]
                    cell = f"{m:.3f} ± {s:.3f}"
                    if control in stats and a != control:
                        d, se = delta(stats, a, control, k)
                        v = verdict(d, se, better)
                        cell += f" ({d:+.3f}{', **' + v + '**' if v in ('better', 'worse') else ''})"
                    cells.append(cell)
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    if left_out:
        lines.append(
            f"Not measured in this evaluation (no run has a value): {', '.join(sorted(left_out))}.\n"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.ablation.by_group`: see the module docstring."""
    p = command_parser("python -m trainer.ablation.by_group", __doc__, config=False)
    p.add_argument("matrix", help="an ablation output folder (holds results.jsonl)")
    p.add_argument(
        "--eval", nargs=4, action="append", required=True, metavar=("NAME", "STORE", "SPLIT", "SOURCE")
    )
    p.add_argument("--by", default="type", help="the source rows' field that groups samples")
    p.add_argument(
        "--teacher", default="builtin:smollm2-135m-instruct", help="for the teacher's needle stats"
    )
    p.add_argument("--control", default=None, help="the arm the differences are taken to")
    p.add_argument("--ce-segments", default="R,A", help="the segments CE (R+A) counts, as training's")
    p.add_argument("--greedy", type=int, default=48, help="rows per group decoded for exact match")
    p.add_argument("--max-new-tokens", type=int, default=48, help="greedy budget (R and A)")
    p.add_argument(
        "--needle-samples", type=int, default=32, help="samples per held-out set for needle attention"
    )
    a = p.parse_args(argv)

    def run() -> int:
        ce_ids = [SEGMENTS[s.strip()] for s in a.ce_segments.split(",")]
        cfg = EvalConfig(greedy_samples=a.greedy, max_new_tokens=a.max_new_tokens, batch_size=8)
        matrix = Path(a.matrix)
        rows = evaluate_matrix(matrix, a.eval, a.by, a.teacher, cfg, ce_ids, a.needle_samples)
        text = f"# Held-out metrics by {a.by}: {matrix}\n\n" + grouped_report(rows, a.control)
        if plot_grouped_deltas(matrix, rows, a.control) is not None:
            text += "\n![grouped deltas](grouped_deltas.png)\n"
        (matrix / "grouped_report.md").write_text(text)
        print(text)
        return 0

    return run_command("by_group", run)


if __name__ == "__main__":
    sys.exit(main())
