"""The ablation results file: one JSON object per finished (arm, seed), appended, never rewritten.

Why append-only JSON lines: a sweep can be killed at any instant. A row is written with a single
`write` + `fsync` after its run has finished, so a row present means a finished run; a kill during the
write leaves at most one truncated last line, which `read_results` ignores (with a warning) and
`append_result` cuts off before appending, so the file never holds a half row glued to a whole one.

Row keys (written by trainer/ablate.py, read by trainer/ablation/report.py):
    arm, seed, overrides (list of dotted key=value), run_dir, config_hash, store_fingerprint,
    metrics (the run's final metrics.json), wall_s (runner-measured seconds, process start included),
    aligner_params, lambda_kv, resumed (bool), finished_at (UTC ISO time), git_sha
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

RESULTS_NAME = "results.jsonl"
REQUIRED_KEYS = ("arm", "seed", "metrics")


def read_results(path: str | Path) -> list[dict]:
    """All complete rows of a results file (missing file -> []).

    Raises ValueError on a malformed row that is not the last line (the file was edited by hand or
    corrupted), naming the line; a truncated last line (a kill mid-write) is skipped with a warning.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: ignoring a truncated last line (an interrupted write)", stacklevel=2)
                continue
            raise ValueError(f"{path}:{i + 1}: not a JSON object; fix or delete that line") from None
        missing = [k for k in REQUIRED_KEYS if k not in row] if isinstance(row, dict) else list(REQUIRED_KEYS)
        if missing:
            raise ValueError(
                f"{path}:{i + 1}: row lacks key {missing[0]!r} (expected {', '.join(REQUIRED_KEYS)})"
            )
        rows.append(row)
    return rows


def append_result(path: str | Path, row: dict) -> None:
    """Append one row durably (one write + fsync); cuts off a truncated last line (a killed write) first."""
    missing = [k for k in REQUIRED_KEYS if k not in row]
    if missing:
        raise ValueError(f"append_result: row lacks key {missing[0]!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = ""
    if path.exists() and path.stat().st_size > 0:
        raw = path.read_bytes()
        if not raw.endswith(b"\n"):
            cut = raw.rfind(b"\n") + 1
            try:
                json.loads(raw[cut:])
                prefix = "\n"  # a whole row lacking its newline (a hand-written file): keep it
            except json.JSONDecodeError:
                with open(path, "r+b") as f:
                    f.truncate(cut)  # drop the fragment after the last complete row
    data = prefix + json.dumps(row, sort_keys=False, default=str) + "\n"
    with open(path, "a") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def done_keys(rows: list[dict]) -> dict[tuple[str, int], dict]:
    """{(arm, seed): row}; a duplicate (arm, seed) is an error (the runner never writes one)."""
    out: dict[tuple[str, int], dict] = {}
    for row in rows:
        key = (row["arm"], int(row["seed"]))
        if key in out:
            raise ValueError(f"results file holds two rows for arm {key[0]!r} seed {key[1]}; delete one")
        out[key] = row
    return out


def resolve_run_dir(out_dir: Path, row: dict) -> Path:
    """The row's run folder (as recorded, else out_dir/ARM/seed_SEED: the report may run from another cwd)."""
    p = Path(row.get("run_dir", ""))
    if row.get("run_dir") and (p / "metrics.jsonl").is_file():
        return p
    return out_dir / row["arm"] / f"seed_{row['seed']}"


def read_curve(run_dir: Path, keys: tuple[str, ...]) -> dict[int, float]:
    """{step: value} of the first of `keys` present in each metrics.jsonl row (later rows win per step)."""
    path = run_dir / "metrics.jsonl"
    curve: dict[int, float] = {}
    if not path.is_file():
        return curve
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        step = rec.get("step")
        val = next((rec[k] for k in keys if k in rec), None)
        if isinstance(step, int) and isinstance(val, (int, float)) and math.isfinite(val):
            curve[step] = float(val)
    return curve
