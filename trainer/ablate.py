"""Run an ablation matrix (arms x seeds) of stage-2 trainings on ONE teacher-state store, resumably.

    accelerate launch trainer/ablate.py --config configs/ablations/default.yaml [key=value ...] [--dry-run]
    python trainer/ablate.py --config configs/ablations/default.yaml train.steps=50 seeds=[0]

`key=value` sets an ablation field (`seeds=[0,1]`, `out_dir=runs/x`, `only_arms=[ce_only]`) or, for any
other key, an experiment override applied to every arm (`train.steps=50`). The YAML format is documented
in trainer/ablation/config.py.

What it does, in order:
1. Resolves and validates every (arm, seed) config strictly (unknown keys, bad values, arms that would
   need a different store) before anything runs.
2. Extracts the store (pipeline/extract.py) only if it is missing or incomplete; checks that it holds the
   teacher layers every arm's layer map needs.
3. For each (arm, seed) not already in OUT_DIR/results.jsonl: trains into OUT_DIR/ARM/seed_SEED (a fresh
   process per run by default), then appends one row (see trainer/ablation/results.py). A run folder left
   by a killed sweep resumes from its checkpoint (same config) or restarts cleanly; it never counts as done
   until its row is written. A finished run whose row was lost (killed between the two) is recorded
   without retraining.
4. Writes OUT_DIR/report.md and plots (trainer/ablation/report.py) and prints the table.

Runners (the `runner` field) are a dict, RUNNERS, so tests and users can add their own:
`runner(spec, resume, abl) -> None` trains `spec.cfg` into `spec.run_dir` and leaves metrics.json there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from accelerate import PartialState
from tqdm.auto import tqdm

from alignment.mapping.layer_map import build_layer_map
from pipeline.cli import CommandFailed, command_parser, parse_args, run_command
from pipeline.config.configlib import ConfigError, git_sha, load_config, to_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import run_extraction
from pipeline.store.reader import KVStore
from trainer.ablation.child_process import interrupt_on_signals, run_child
from trainer.ablation.config import (
    AblationConfig,
    RunSpec,
    config_hash,
    load_ablation,
    plan_runs,
    record_ablation,
)
from trainer.ablation.report import build_report
from trainer.ablation.results import RESULTS_NAME, append_result, done_keys, read_results
from trainer.ablation.store_plan import store_plan

REPO_ROOT = Path(__file__).resolve().parent.parent


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def tell(text: str) -> None:
    """A progress message on stderr (stdout carries the results: the dry-run list and the report)."""
    print(text, file=sys.stderr, flush=True)


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def config_path(spec: RunSpec) -> Path:
    """The resolved config ablate writes for a run (beside its run folder: the trainer owns the folder)."""
    return spec.run_dir.parent / f"{spec.run_dir.name}.yaml"


def log_path(spec: RunSpec) -> Path:
    """The run's training log (beside its run folder, like its config)."""
    return spec.run_dir.parent / f"{spec.run_dir.name}.log"


def run_subprocess(spec: RunSpec, resume: bool, abl: AblationConfig) -> None:
    """Train in a fresh process: `[*launcher, train_entry, --config RUN.yaml, [--resume]]`, output to RUN.log."""
    entry = abl.train_entry or str(REPO_ROOT / "trainer" / "train.py")
    cmd = [*(abl.launcher or [sys.executable]), entry, "--config", str(config_path(spec))]
    if resume:
        cmd.append("--resume")
    log = log_path(spec)
    with open(log, "a") as f:
        f.write(f"\n# {_dt.datetime.now(_dt.timezone.utc).isoformat()} $ {' '.join(cmd)}\n")
    watch = (spec.run_dir / "metrics.jsonl", spec.cfg.train.steps, f"{spec.arm} seed {spec.seed}")
    rc = run_child(cmd, log, _child_env(), progress=watch if _is_main() else None)
    if rc != 0:
        raise RuntimeError(
            f"arm '{spec.arm}' seed {spec.seed}: training exited with code {rc} (log: {log})\n"
            f"last lines of the log:\n{_tail(log)}"
        )


def run_inprocess(spec: RunSpec, resume: bool, abl: AblationConfig) -> None:
    """Train in this process via trainer.train.run_training (every rank of a multi-process launch calls it)."""
    # Lazy: only this runner trains here; the default subprocess sweep's process never loads transformers.
    from trainer.train import run_training

    run_training(spec.cfg, resume=resume)


RUNNERS: dict[str, Callable[[RunSpec, bool, AblationConfig], None]] = {
    "subprocess": run_subprocess,
    "inprocess": run_inprocess,
}


def pick_runner(abl: AblationConfig) -> tuple[str, Callable]:
    """The runner the config names ("auto" = inprocess under a multi-process launch, else subprocess)."""
    name = abl.runner
    if name == "auto":
        name = "inprocess" if _world_size() > 1 else "subprocess"
    if name not in RUNNERS:
        raise ConfigError(f"runner={abl.runner!r}: expected 'auto' or one of {sorted(RUNNERS)}")
    if name == "subprocess" and _world_size() > 1:
        raise ConfigError(
            "runner='subprocess' under a multi-process launch would run every run once per process: use "
            "runner=inprocess, or launch ablate.py as one process with launcher=[accelerate,launch,...]"
        )
    return name, RUNNERS[name]


def ensure_store(abl: AblationConfig, specs: list[RunSpec], inprocess: bool) -> str:
    """Extract the shared store if it is missing or incomplete; return its fingerprint.

    `inprocess` runs `pipeline.extract.run_extraction` here (every rank of a multi-process launch takes
    its share of chunks); otherwise `[*launcher, pipeline/extract.py, --config ...]` runs as a subprocess,
    so the teacher's memory is returned to the OS before training starts. An incomplete store resumes.
    Raises ValueError when the store lacks teacher layers an arm's layer map needs (before any run).
    """
    paths = sorted({s.cfg.train.store or s.cfg.extract.store for s in specs})  # what each arm trains from
    if len(paths) != 1:
        raise ConfigError(f"arms train from different stores {paths}: the matrix must share one store")
    path = Path(paths[0])

    def is_complete() -> bool:
        try:
            return KVStore(path).complete
        except FileNotFoundError:
            return False

    if not is_complete():
        if not abl.extract_if_missing:
            raise FileNotFoundError(f"store '{path}' is missing or incomplete and extract_if_missing=false")
        cfg = specs[0].cfg  # every arm has the same data/teacher/extract sections (plan_runs checked)
        if inprocess:
            if _is_main():
                tell(f"[ablate] store '{path}' missing or incomplete: extracting in-process")
            run_extraction(cfg)
        else:
            cfg_file = Path(abl.out_dir) / "extract_config.yaml"
            cfg_file.parent.mkdir(parents=True, exist_ok=True)
            cfg_file.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
            cmd = [*(abl.launcher or [sys.executable]), str(REPO_ROOT / "pipeline" / "extract.py")]
            cmd += ["--config", str(cfg_file)]
            tell(f"[ablate] store '{path}' missing or incomplete: {' '.join(cmd)}")
            rc = run_child(cmd, None, _child_env())
            if rc != 0:
                raise RuntimeError(
                    f"extraction of store '{path}' failed (exit code {rc}); see its output above"
                )
        if not is_complete():
            raise RuntimeError(f"extraction finished but store '{path}' is not marked complete")
    store = KVStore(path)
    check_layers(store, specs)
    return store.fingerprint


def check_layers(store, specs: list[RunSpec]) -> None:
    """Every arm's layer map must point at stored teacher layers (checked where the student's depth is known)."""
    L_t = int(store.attrs.get("teacher", {}).get("num_layers", 0))
    if not L_t:
        return
    for spec in specs:
        scfg = spec.cfg.student.config or {}
        L_s = scfg.get("num_hidden_layers")
        chosen = spec.cfg.align.layer_map == "heads" or spec.cfg.align.head_select.method != "all"
        if not isinstance(L_s, int) or chosen:
            continue  # a student from a path; layers or heads chosen from head scores: checked at training
        need = sorted(set(build_layer_map(spec.cfg.align.layer_map, L_t, L_s)))
        missing = [layer for layer in need if layer not in store.layers]
        if missing:
            raise ValueError(
                f"arm '{spec.arm}': its layer map needs teacher layers {need} but store '{store.path}' holds "
                f"{store.layers}; set extract.layers to cover every arm in base_overrides"
            )


def run_state(spec: RunSpec) -> str:
    """'finished' (metrics.json from this exact config), 'resumable', 'stale' (restart) or 'new'."""
    cfg_file = config_path(spec)
    same = False
    if cfg_file.is_file():
        try:
            same = config_hash(load_config(KVMapConfig, cfg_file)) == spec.config_hash
        except ConfigError:
            same = False
    if not spec.run_dir.exists():
        return "new"
    if not same:
        return "stale"
    if (spec.run_dir / "metrics.json").is_file():
        return "finished"
    ckpt = spec.run_dir / "checkpoints"
    return "resumable" if ckpt.is_dir() and any(ckpt.iterdir()) else "stale"


def make_row(spec: RunSpec, wall_s: float, resumed: bool, fingerprint: str | None) -> dict:
    """The results row of a finished run (trainer/ablation/results.py lists its keys)."""
    metrics_file = spec.run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise RuntimeError(f"arm '{spec.arm}' seed {spec.seed}: training ended without {metrics_file}")
    metrics = json.loads(metrics_file.read_text())
    return {
        "arm": spec.arm,
        "seed": spec.seed,
        "overrides": spec.overrides,
        "run_dir": str(spec.run_dir),
        "config_hash": spec.config_hash,
        "store_fingerprint": fingerprint,
        "lambda_kv": spec.cfg.lambda_kv,
        "metrics": metrics,
        "wall_s": round(wall_s, 3),
        "aligner_params": metrics.get("align/params"),
        "resumed": resumed,
        "finished_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
    }


def _same_config(row: dict, spec: RunSpec) -> bool:
    """The row's hash matches; or (a row hashed by an older kvmap, over every key) the run's saved resolved
    config, read with today's schema, hashes the same."""
    if row.get("config_hash") in (None, spec.config_hash):
        return True
    try:
        return config_hash(load_config(KVMapConfig, config_path(spec))) == spec.config_hash
    except ConfigError:
        return False


def check_rows(rows: dict, specs: list[RunSpec], fingerprint: str | None, results: Path) -> None:
    """Rows already present must come from the same config and store as the run they stand for."""
    by_key = {s.key: s for s in specs}
    for key, row in rows.items():
        spec = by_key.get(key)
        if spec is not None and not _same_config(row, spec):
            raise ConfigError(
                f"{results}: the row for arm '{key[0]}' seed {key[1]} was made with another config "
                f"(hash {row.get('config_hash')} != {spec.config_hash}): restore the arm, rename it, use "
                "another out_dir, or delete that row"
            )
        fp = row.get("store_fingerprint")
        if spec is not None and fingerprint and fp and fp != fingerprint:
            raise ConfigError(
                f"{results}: the row for arm '{key[0]}' seed {key[1]} came from store {fp}, the store is now "
                f"{fingerprint}: use another out_dir or delete the old rows"
            )


def run_ablation(abl: AblationConfig, dry_run: bool = False) -> list[dict]:
    """Run every missing (arm, seed) of `abl`; returns all rows of the results file afterwards.

    Example:
        abl = load_ablation("configs/ablations/default.yaml", ["train.steps=20", "seeds=[0]"])
        rows = run_ablation(abl)
    """
    specs = plan_runs(abl)  # raises on any bad arm before anything runs
    runner_name, runner = pick_runner(abl)
    out = Path(abl.out_dir)
    results = out / RESULTS_NAME
    todo_arms = set(abl.only_arms or [a.name for a in abl.arms])
    rows = done_keys(read_results(results))
    check_rows(rows, specs, None, results)
    todo = [s for s in specs if s.arm in todo_arms and s.key not in rows]
    if _is_main():
        tell(
            f"[ablate] {len(abl.arms)} arms x {len(abl.seeds)} seeds -> {out} ({runner_name}); "
            f"{len(specs) - len(todo)} done or skipped, {len(todo)} to run"
        )
    if dry_run:
        for s in todo:
            print(f"  {s.arm} seed {s.seed}: {' '.join(s.overrides) or '(base)'} [{run_state(s)}]")
        return list(rows.values())
    if _is_main():
        out.mkdir(parents=True, exist_ok=True)
        record_ablation(out, abl)
    fingerprint = ensure_store(abl, specs, inprocess=runner_name != "subprocess") if todo else None
    if fingerprint:
        check_rows(rows, specs, fingerprint, results)
    with tqdm(total=len(todo), desc="ablation runs", unit="run", disable=not _is_main()) as bar:
        for spec in todo:
            bar.set_postfix_str(f"{spec.arm} seed {spec.seed}")
            train_and_record(spec, runner, abl, results, fingerprint)
            bar.update(1)
    _barrier()  # the main rank has appended its last row
    all_rows = read_results(results) if results.exists() else []
    if abl.report and _is_main() and all_rows:
        print(build_report(out, control=abl.control))
    return all_rows


def train_and_record(
    spec: RunSpec, runner: Callable, abl: AblationConfig, results: Path, fingerprint
) -> None:
    """Train one (arm, seed) unless its folder holds a finished run (resuming a stopped one), then append
    its row to the results file."""
    state = run_state(spec)
    t0 = time.perf_counter()
    if state != "finished":
        _barrier()  # every rank has read the folder's state before the main one changes it
        if _is_main():
            if state == "stale":
                shutil.rmtree(spec.run_dir)  # half-written by a killed run with no usable checkpoint
            spec.run_dir.parent.mkdir(parents=True, exist_ok=True)
            config_path(spec).write_text(yaml.safe_dump(to_dict(spec.cfg), sort_keys=False))
        _barrier()
        runner(spec, state == "resumable", abl)
    if _is_main():
        append_result(results, make_row(spec, time.perf_counter() - t0, state == "resumable", fingerprint))


def _barrier() -> None:
    if _world_size() > 1:
        PartialState().wait_for_everyone()


def main(argv: list[str] | None = None) -> int:
    """`kvmap-ablate` / `accelerate launch trainer/ablate.py`: see the module docstring."""
    p = command_parser(
        "kvmap-ablate",
        __doc__,
        sections=["the ablation YAML (trainer/ablation/config.py)", "every experiment key as an override"],
        examples=[
            "kvmap-ablate --config configs/ablations/demo.yaml",
            "kvmap-ablate --config configs/ablations/default.yaml train.steps=50 'seeds=[0]' --dry-run",
        ],
    )
    p.add_argument("--dry-run", action="store_true", help="list the runs still to do, run nothing")
    p.add_argument(
        "--plan-store",
        action="store_true",
        help="print what every arm reads of the store and the union stage 1 must extract, run nothing",
    )
    args = parse_args(p, argv)
    if args.config is None:
        p.error("--config PATH is required (e.g. configs/ablations/default.yaml)")

    def body() -> None:
        abl = load_ablation(args.config, args.overrides)
        if args.plan_store:
            print("\n".join(store_plan(abl)), flush=True)
            return
        try:
            run_ablation(abl, dry_run=args.dry_run)
        except (RuntimeError, FloatingPointError) as e:  # a run or the extraction failed: not bad input
            raise CommandFailed(str(e)) from e

    interrupt_on_signals()
    try:
        return run_command("ablate", body)
    except KeyboardInterrupt:
        print(
            "ablate: interrupted; finished runs are in results.jsonl and a stopped run resumes from its last "
            "checkpoint: run the same command again to continue",
            file=sys.stderr,
            flush=True,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
