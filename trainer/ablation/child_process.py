"""Run one command as a child process that Ctrl-C stops cleanly, with a progress bar read from its run folder.

Shapes: none (processes). Why this exists: a sweep (trainer/ablate.py) trains each run in a fresh process
whose output goes to a log file, so the console showed only "runs x/N"; and a SIGINT sent to the sweep
alone (`kill -INT`, or a shell that started it in the background, where SIGINT starts out ignored) left the
training child running. Here SIGINT and SIGTERM become KeyboardInterrupt in the parent, the child gets
SIGINT and `grace_s` seconds to stop (it is resumable from its last checkpoint) before SIGKILL, and a bar
follows the child's metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tqdm.auto import tqdm


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def interrupt_on_signals() -> None:
    """SIGINT and SIGTERM raise KeyboardInterrupt in this process, even where SIGINT started out ignored."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)


def last_logged_step(metrics_jsonl: Path) -> tuple[int, float | None]:
    """(step, loss) of the newest train row of a metrics.jsonl being written (0, None if none yet)."""
    try:
        with open(metrics_jsonl, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 8192))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return 0, None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a line cut by the 8 KiB window or being written
        if "loss" in row:
            return int(row["step"]), float(row["loss"])
    return 0, None


def stop(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGINT to the child, then SIGKILL if it has not exited after `grace_s` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_child(
    cmd: Sequence[str],
    log: Path | None,
    env: dict[str, str],
    progress: tuple[Path, int, str] | None = None,
    grace_s: float = 30.0,
) -> int:
    """Run `cmd` with stdout+stderr appended to `log`; returns its exit code.

    Args:
        cmd, log, env: the command, its log file (None: this process's stdout/stderr), its environment.
        progress: (metrics.jsonl to follow, total steps, bar label), or None for no bar.
        grace_s: how long an interrupted child may take to stop before SIGKILL.
    Raises:
        KeyboardInterrupt: after stopping the child, when this process was interrupted.
    Example:
        rc = run_child([sys.executable, "trainer/train.py", "--config", "r.yaml"], Path("r.log"), os.environ.copy())
    """
    bar = None
    if progress is not None:
        path, total, label = progress
        bar = tqdm(total=total, desc=label, unit="step", leave=False, position=1, dynamic_ncols=True)
    with open(log, "a") if log is not None else contextlib.nullcontext() as f:
        proc = subprocess.Popen(list(cmd), stdout=f, stderr=subprocess.STDOUT if f else None, env=env)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=2.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                if bar is not None:
                    step, loss = last_logged_step(path)
                    bar.n = step
                    bar.set_postfix_str("" if loss is None else f"loss {loss:.4f}", refresh=True)
        except (
            BaseException
        ):  # KeyboardInterrupt from SIGINT/SIGTERM, or anything else: never orphan the child
            stop(proc, grace_s)
            raise
        finally:
            if bar is not None:
                bar.close()
    return rc
