"""The ablation YAML: a base experiment config, arms (named override sets) and seeds -> one resolved run each.

An ablation file looks like

    base_config: configs/default.yaml        # any KVMapConfig YAML (cwd-relative, else ablation-file-relative)
    base_overrides: [train.steps=300]         # applied to every arm (dotted list or nested mapping)
    seeds: [0, 1, 2]
    out_dir: runs/ablations/default
    control: ce_only                          # the arm the report compares every other arm against
    arms:
      - name: ce_only
        overrides: [lambda_kv=0]
      - name: v40_2
        overrides: {kv_projection_mode: structured, align: {share_dim_proj: true, init_uniform: true}}

Resolution order for one (arm, seed): base YAML <- base_overrides <- arm overrides <- `seed`, `run_dir`
(= out_dir/ARM/seed_SEED). Every (arm, seed) config is parsed strictly with `pipeline.config.configlib` before any
run starts, so a typo in the last arm fails in the first second, not after hours of training.

A nested-mapping override is flattened to dotted keys down to its leaves, so `{align: {share_dim_proj: x}}`
means exactly `align.share_dim_proj=x` (it merges into the base, it does not replace the whole section).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.config.configlib import ConfigError, from_dict, load_config, to_dict
from pipeline.config.kvmap import KVMapConfig

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The sections that define the one shared store: every arm must agree on them.
STORE_SECTIONS = ("data", "teacher", "extract")


@dataclass
class ArmConfig:
    """One arm of the matrix: a name (also its folder name) and the overrides that make it differ."""

    name: str
    overrides: list[str] | dict[str, Any] = field(default_factory=list)
    description: str = ""

    def __post_init__(self):
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"arm name {self.name!r}: expected letters, digits, '_', '.', '-' (it names a folder)"
            )


@dataclass
class AblationConfig:
    """Top level of an ablation YAML (see the module docstring for an example)."""

    base_config: str = "configs/default.yaml"
    base_overrides: list[str] | dict[str, Any] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    out_dir: str = "runs/ablations/default"
    arms: list[ArmConfig] = field(default_factory=list)
    control: str | None = None  # arm name the report's deltas are taken against (None = no delta table)
    only_arms: list[str] | None = None  # run just these arms (others keep their rows, the report shows all)
    # How each run is executed: "subprocess" (a fresh process per run: isolation, memory back to the OS),
    # "inprocess" (call trainer.train.run_training here; what multi-process `accelerate launch` needs), or
    # "auto" (inprocess when launched with WORLD_SIZE > 1, else subprocess). Tests register others.
    runner: str = "auto"
    launcher: list[str] | None = None  # subprocess prefix; None = [this python]. e.g. [accelerate, launch]
    train_entry: str | None = None  # subprocess script; None = trainer/train.py next to this file
    extract_if_missing: bool = True  # run stage 1 when the store is missing or incomplete
    report: bool = True  # build out_dir/report.md + plots at the end

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("seeds=[]: expected at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds={self.seeds!r}: expected distinct seeds")
        if not self.arms:
            raise ValueError("arms=[]: expected at least one arm")
        names = [a.name for a in self.arms]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"arms: duplicate arm name {dup[0]!r}; names must be unique")
        if self.control is not None and self.control not in names:
            raise ValueError(f"control={self.control!r}: expected one of the arm names {names}")
        for n in self.only_arms or []:
            if n not in names:
                raise ValueError(f"only_arms: {n!r} is not an arm (arms: {names})")


@dataclass
class RunSpec:
    """One planned (arm, seed) run with its fully resolved experiment config."""

    arm: str
    seed: int
    overrides: list[str]  # base_overrides + arm overrides, dotted (what the row records)
    cfg: KVMapConfig
    config_hash: str

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def key(self) -> tuple[str, int]:
        return (self.arm, self.seed)


def _yaml_scalar(value: Any) -> str:
    """`value` as text that YAML (hence load_config) reads back as the same value."""
    if isinstance(value, str):
        try:
            if yaml.safe_load(value) == value:
                return value  # plain words stay unquoted: `kv_projection_mode=flat`
        except yaml.YAMLError:
            pass
    return json.dumps(value)  # JSON is YAML flow syntax: numbers, bools, null, lists, quoted strings


def flatten_overrides(overrides: list[str] | dict[str, Any], where: str) -> list[str]:
    """Dotted `key=value` strings from a dotted list or a nested mapping (flattened to its leaves).

    Args:
        overrides: `["align.share_dim_proj=false"]` or `{"align": {"share_dim_proj": False}}`.
        where: names the source in errors (e.g. "arm 'v40_1'").
    Example:
        flatten_overrides({"train": {"lr": 1e-3}, "lambda_kv": 0}, "arm 'x'")
        # -> ["train.lr=0.001", "lambda_kv=0"]
    """
    if isinstance(overrides, dict):
        out: list[str] = []

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict) and node:
                for k, v in node.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out.append(f"{prefix}={_yaml_scalar(node)}")

        walk("", overrides)
        return out
    for item in overrides:
        if not isinstance(item, str) or "=" not in item or item.startswith("="):
            raise ConfigError(f"{where}: override {item!r}: expected 'dotted.key=value' (e.g. lambda_kv=0)")
    return list(overrides)


def non_default(current: dict, default: dict) -> dict:
    """The entries of a nested config dict that differ from the defaults' (whole values below a non-dict)."""
    out = {}
    for key, value in current.items():
        ref = default.get(key, _MISSING)
        if isinstance(value, dict) and isinstance(ref, dict):
            sub = non_default(value, ref)
            if sub:
                out[key] = sub
        elif value != ref:
            out[key] = value
    return out


_MISSING = object()


def config_hash(cfg: KVMapConfig) -> str:
    """A short stable hash of what a resolved experiment config sets away from the defaults.

    Results rows carry it to detect changed arms. Hashing only the non-default values means that a new
    config key whose default keeps the old behaviour (e.g. `train.save_final_state`) leaves every existing
    row valid, while changing a default that an arm relied on does change the hash.
    """
    blob = json.dumps(non_default(to_dict(cfg), to_dict(KVMapConfig())), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_base_path(base: str, ablation_path: str | Path | None) -> Path:
    """`base` as given if it exists (cwd-relative or absolute), else relative to the ablation YAML's folder."""
    p = Path(base)
    if p.is_file():
        return p
    if ablation_path is not None and not p.is_absolute():
        q = Path(ablation_path).parent / p
        if q.is_file():
            return q
    raise ConfigError(
        f"base_config={base!r}: file not found (looked relative to the cwd and the ablation YAML)"
    )


def load_ablation(path: str | Path | None, overrides: list[str] = ()) -> AblationConfig:
    """Load an ablation YAML strictly; `overrides` are dotted `key=value`s.

    A dotted key whose first part is an ablation field (`seeds=[0]`, `out_dir=...`) sets that field; any
    other key (`train.steps=50`) is an experiment override appended to `base_overrides`, so the CLI can
    shrink a whole matrix in one go.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"ablation config '{p}' does not exist")
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"ablation config '{p}': expected a mapping at the top, got {type(data).__name__}"
            )
    own = {f for f in AblationConfig.__dataclass_fields__}
    extra: list[str] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}': expected key=value (e.g. seeds=[0] or train.steps=50)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in own:
            data[key] = yaml.safe_load(raw) if raw != "" else ""
        elif key.split(".")[0] in own:
            raise ConfigError(f"override '{item}': ablation field '{key.split('.')[0]}' takes a whole value")
        else:
            extra.append(f"{key}={raw}")
    cfg = from_dict(AblationConfig, data)
    if extra:
        cfg.base_overrides = flatten_overrides(cfg.base_overrides, "base_overrides") + extra
    cfg.base_config = str(resolve_base_path(cfg.base_config, path))
    return cfg


def plan_runs(abl: AblationConfig) -> list[RunSpec]:
    """Resolve and validate every (arm, seed) config, arm-major; raises ConfigError naming the arm.

    Also checks that all arms share one store (identical `data`, `teacher`, `extract` sections): the point
    of the matrix is that only the stage-2 settings differ.
    """
    base = flatten_overrides(abl.base_overrides, "base_overrides")
    try:  # a typo in the base or on the command line is named as such, not as the first arm's
        load_config(KVMapConfig, abl.base_config, base)
    except ConfigError as e:
        raise ConfigError(f"base_config {abl.base_config} + base_overrides: {e}") from None
    specs: list[RunSpec] = []
    ref: tuple[str, dict] | None = None
    for arm in abl.arms:
        arm_ovr = base + flatten_overrides(arm.overrides, f"arm '{arm.name}'")
        for seed in abl.seeds:
            run_dir = Path(abl.out_dir) / arm.name / f"seed_{seed}"
            try:
                cfg = load_config(
                    KVMapConfig, abl.base_config, [*arm_ovr, f"seed={seed}", f"run_dir={run_dir}"]
                )
            except ConfigError as e:
                raise ConfigError(f"arm '{arm.name}' (seed {seed}): {e}") from None
            store_part = {s: to_dict(getattr(cfg, s)) for s in STORE_SECTIONS}
            if ref is None:
                ref = (arm.name, store_part)
            elif store_part != ref[1]:
                diff = next(s for s in STORE_SECTIONS if store_part[s] != ref[1][s])
                raise ConfigError(
                    f"arm '{arm.name}': its '{diff}' section differs from arm '{ref[0]}'; every arm must use "
                    "the same store (data/teacher/extract), so put such changes in base_overrides"
                )
            specs.append(RunSpec(arm.name, seed, arm_ovr, cfg, config_hash(cfg)))
    return specs


def record_ablation(out: Path, abl: AblationConfig) -> None:
    """Write `out/ablation.yaml` (what the report reads: arms, control, planned seeds), atomically.

    Seeds are the union with those an earlier or concurrent invocation recorded: two processes sharing
    `out_dir` with disjoint `seeds` (README, "Ablations"), or a later run adding seeds, must not hide each
    other's seeds from the report. The read-modify-write holds an exclusive lock on `.ablation.yaml.lock`:
    two invocations started together otherwise both read the old seeds and the second write drops the
    first's.
    """
    d = to_dict(abl)
    path = out / "ablation.yaml"
    with open(out / ".ablation.yaml.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if path.exists():
            before = yaml.safe_load(path.read_text()) or {}
            d["seeds"] = sorted(set(before.get("seeds") or []) | set(d["seeds"]))
        tmp = path.with_name(f".ablation.yaml.{os.getpid()}.tmp")
        tmp.write_text(yaml.safe_dump(d, sort_keys=False))
        tmp.replace(path)
