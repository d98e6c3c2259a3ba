"""YAML -> dataclass configs with dotted CLI overrides and strict keys.

Every entry script (extract, train, ablate, profile, ...) reads the same YAML schema
(`pipeline.config.kvmap.KVMapConfig`) through these helpers; the command line itself is `pipeline/cli.py`:

    cfg = load_config(KVMapConfig, "configs/default.yaml", ["train.lr=3e-4", "extract.batch_size=8"])

Rules (engineering assumptions, stated once here):
- Unknown keys are errors, at any depth, in the YAML and on the command line; the message names the
  dotted key and lists the known ones.
- Values are checked against the dataclass annotations (int, float, bool, str, Optional, Literal, list,
  dict, nested dataclasses); an int or a numeric string (PyYAML reads `3e-4` as a string) is accepted for
  a float field, nothing else is coerced.
- CLI values are parsed as YAML scalars/flow collections (`a.b=[1,2]`, `a.c=null`, `a.d=true`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A bad config key or value; the message is one line naming the key, the value and what was expected."""


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp) if a is not type(None))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp` (only dataclass-from-dict and int->float), or raise ConfigError."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _check_union(key, value, tp)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"config key '{key}': got {value!r}, expected one of {_type_name(tp)}")
        return value
    if dataclasses.is_dataclass(tp) or origin in (list, tuple, dict):
        return _check_nested(key, value, tp)
    if tp in (float, int, bool, str):
        return _check_scalar(key, value, tp)
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")
    return value


def _check_union(key: str, value: Any, tp: Any) -> Any:
    """The first member of `tp` (Optional, `A | B`) that accepts `value`; None only where `tp` allows it."""
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    sections = [a for a in args if dataclasses.is_dataclass(a)]
    if isinstance(value, dict) and len(sections) == 1:
        # An optional section (e.g. student.lora) given as a mapping: its own error names the inner key.
        return _check_value(key, value, sections[0])
    for arg in args:
        if arg is type(None):
            continue
        with contextlib.suppress(ConfigError):
            return _check_value(key, value, arg)
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_type_name(tp)}")


def _check_nested(key: str, value: Any, tp: Any) -> Any:
    """A nested dataclass (from a mapping), a list / tuple (as a list) or a dict, checked item by item."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a mapping for {tp.__name__}")
        return _from_dict(tp, value, prefix=key + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}': got {value!r}, expected a mapping")
    _, val_tp = get_args(tp) or (Any, Any)
    return {k: _check_value(f"{key}.{k}", v, val_tp) for k, v in value.items()}


def _check_scalar(key: str, value: Any, tp: type) -> Any:
    """float, int, bool or str; a bool is never a number, and a float key also takes an int or a number
    written as a string."""
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads `3e-4` as a string; accept anything float() parses.
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a float")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': got {value!r}, expected an int")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': got {value!r}, expected true or false")
        return value
    if not isinstance(value, str):
        raise ConfigError(f"config key '{key}': got {value!r}, expected a string")
    return value


def _from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys under '{prefix or '<top>'}': "
            f"{', '.join(sorted(fields))})"
        )
    kwargs = {name: _check_value(prefix + name, value, hints[name]) for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # __post_init__ validation
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<top>'}': {e}") from None
    return obj


def from_dict(cls: type[T], data: dict | None) -> T:
    """Build dataclass `cls` from a nested dict, strictly (unknown keys and wrong types raise ConfigError)."""
    return _from_dict(cls, data or {})


def to_dict(cfg: Any) -> dict:
    """A plain nested dict of a config dataclass (YAML/JSON serialisable)."""
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict, dotted: str, value: Any, cls: type) -> None:
    parts = dotted.split(".")
    node, tp = data, cls
    for i, part in enumerate(parts):
        key = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(tp):
            # Inside a free-form dict field (e.g. student.config): just nest.
            if i == len(parts) - 1:
                node[part] = value
            else:
                node = node.setdefault(part, {})
            continue
        names = {f.name: f for f in dataclasses.fields(tp)}
        if part not in names:
            raise ConfigError(f"unknown config key '{key}' (known: {', '.join(sorted(names))})")
        if i == len(parts) - 1:
            node[part] = value
            return
        hint = get_type_hints(tp)[part]
        # Optional[Dataclass] -> Dataclass
        inner = [a for a in get_args(hint) if a is not type(None)] if get_origin(hint) else []
        tp = inner[0] if len(inner) == 1 else hint
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] = ()) -> T:
    """Load YAML `path` (optional) into `cls`, then apply `key.sub=value` overrides.

    Args:
        cls: the config dataclass (e.g. `KVMapConfig`).
        path: a YAML file; missing keys take the dataclass defaults.
        overrides: dotted `key=value` strings; values parse as YAML (`3e-4`, `[0, 2]`, `null`).
    Example:
        cfg = load_config(KVMapConfig, "configs/default.yaml", ["train.lr=3e-4"])
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}': expected a mapping at the top, got {type(data).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. train.lr=3e-4)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw != "" else "", cls)
    return from_dict(cls, data)


def git_sha(repo_dir: str | os.PathLike | None = None) -> str:
    """The current git commit (with '-dirty' when the tree has changes), or 'unknown' outside git."""
    cwd = repo_dir or Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_run_metadata(run_dir: str | os.PathLike, cfg: Any, seed: int, extra: dict | None = None) -> None:
    """Record what a run folder needs to be reproduced: resolved config, git SHA, seed, argv."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    meta = {"git_sha": git_sha(), "seed": seed, "argv": sys.argv, **(extra or {})}
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
