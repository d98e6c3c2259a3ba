"""Interrupt a command from outside, the way a user or a lost machine does: wait for a progress marker the
command writes anyway (a chunk's done-marker in a store, a checkpoint folder in a run folder), then signal it.

Production code has no test hooks; the price is timing: the command keeps running between the moment the
marker appears and the moment the signal lands, so tests assert what must hold wherever that moment falls
(e.g. "at least 2 chunks done and not complete"), not an exact count.

Example:
    r = run_until([sys.executable, "trainer/train.py", "--config", cfg], files_exist(run / "checkpoints", "step_*"))
    assert r.returncode == -signal.SIGKILL and r.fired, r.stderr
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

POLL_S = 0.002  # the marker check is a directory listing: cheap enough to poll this often


@dataclass
class Interrupted:
    returncode: int
    stdout: str
    stderr: str
    fired: bool  # the marker appeared and the signal was sent (False: the command ended first)


def files_exist(folder: str | Path, pattern: str, count: int = 1) -> Callable[[], bool]:
    """A marker: at least `count` entries of `folder` match the glob `pattern`."""
    folder = Path(folder)
    return lambda: folder.is_dir() and sum(1 for _ in folder.glob(pattern)) >= count


def run_until(
    cmd: list[str],
    marker: Callable[[], bool],
    sig: int = signal.SIGKILL,
    *,
    cwd: str | Path | None = None,
    env: dict | None = None,
    timeout: float = 300.0,
) -> Interrupted:
    """Run `cmd`; as soon as `marker()` is true send it `sig`; wait for it to end (up to `timeout` s)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        fired, t_end = False, time.monotonic() + timeout
        try:
            while proc.poll() is None and time.monotonic() < t_end:
                if marker():
                    proc.send_signal(sig)
                    fired = True
                    break
                time.sleep(POLL_S)
            rc = proc.wait(timeout=max(t_end - time.monotonic(), 1.0))
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        out.seek(0)
        err.seek(0)
        return Interrupted(rc, out.read(), err.read(), fired)


class KillChildWhen:
    """A watcher thread: when `marker()` turns true, send `sig` to every child process of this process
    whose command line contains `match` (a command some code under test starts, e.g. ablate's trainer).

    Example:
        with KillChildWhen(files_exist(run / "checkpoints", "step_*"), match=str(cfg_path)) as w:
            run_the_sweep()
        assert w.killed
    """

    def __init__(self, marker: Callable[[], bool], match: str, sig: int = signal.SIGKILL):
        self.marker, self.match, self.sig = marker, match, sig
        self.killed: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _targets(self) -> list[psutil.Process]:
        found = []
        for p in psutil.Process().children(recursive=True):
            try:
                if any(self.match in part for part in p.cmdline()):
                    found.append(p)
            except psutil.Error:  # ended meanwhile
                continue
        return found

    def _watch(self) -> None:
        while not self._stop.is_set():
            if self.marker():
                for p in self._targets():
                    p.send_signal(self.sig)
                    self.killed.append(p.pid)
                return
            time.sleep(POLL_S)

    def __enter__(self) -> KillChildWhen:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
