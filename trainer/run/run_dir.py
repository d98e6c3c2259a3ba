"""The run folder must be writable before any expensive work (store checks, model load, steps).

Without this check a read-only `run_dir` surfaces as a traceback from whichever write comes first
(config.yaml, a tracker's log folder, the first checkpoint minutes later).

Example:
    check_run_dir_writable(cfg.run_dir)  # creates it; raises one line naming the folder if it cannot write
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def check_run_dir_writable(run_dir: str | Path) -> Path:
    """Create `run_dir` (and its parents) and write + delete a probe file in it (every rank may call this:
    the probe names are unique).

    Returns the folder; raises PermissionError with ONE line naming the folder, the reason and the fix.
    """
    p = Path(run_dir).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".kvmap_write_probe_"):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise PermissionError(
            f"run_dir='{p}' is not a writable folder ({reason}): choose another run_dir or fix its permissions"
        ) from None
    return p
