"""`prune_meta.json`: what a pruned student kept of its teacher (written by pipeline/prune.py).

Read by `align.init: from_prune` (trainer/run/setup.py) and by `extract.layers: map` (pipeline/extract.py) to
know the exact teacher layer / head behind every student layer / head.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config.configlib import ConfigError

META_FILE = "prune_meta.json"
FORMAT = 1
REQUIRED = ("kept_layers", "kept_query_heads", "kept_kv_heads", "kept_mlp_channels", "kept_hidden_channels")


def read_prune_meta(student_cfg) -> dict:
    """The prune_meta.json of the student folder named by a ModelConfig (`student.path`).

    Raises a one-line ConfigError when the student is not a folder written by pipeline/prune.py.
    """
    where = student_cfg.path
    if where is None or where.startswith("builtin:"):
        raise ConfigError(
            f"align.init='from_prune': student.path={where!r}: expected a folder written by pipeline/prune.py"
        )
    path = Path(where).expanduser() / META_FILE
    if not path.is_file():
        raise ConfigError(
            f"align.init='from_prune': student.path={where!r} has no {META_FILE}: expected a folder written by "
            "pipeline/prune.py (or align.init: default)"
        )
    meta = json.loads(path.read_text())
    missing = [k for k in REQUIRED if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise ConfigError(
            f"align.init='from_prune': {path} lacks {missing or 'format'}: expected prune_meta format {FORMAT}"
        )
    return meta
