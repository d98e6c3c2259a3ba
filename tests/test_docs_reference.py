"""The generated configuration reference (pipeline/config/reference.py) covers every key.

Every key of configs/default.yaml must appear with the value that file gives it, and every field of the
config dataclasses must have its row, so a key added to the code shows up in the docs site on its own; a new
key without a comment beside it fails here until it gets one.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.config.kvmap import KVMapConfig
from pipeline.config.reference import (
    REQUIRED,
    comments_by_name,
    config_keys,
    config_reference_markdown,
    flatten,
    yaml_value,
)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_YAML = ROOT / "configs" / "default.yaml"

# Keys whose field has no comment in the source yet (their section's docstring or the docs pages explain
# them). The list may only shrink: a key missing from it and without a comment fails the test below.
KNOWN_UNDOCUMENTED: set[str] = set()


def rows(page: str) -> dict[str, list[str]]:
    """Table rows of the page by key: {key: cells}, split on the pipes Markdown splits on (not inside code
    spans, not escaped)."""
    out = {}
    for line in page.splitlines():
        if not line.startswith("| `"):
            continue
        cells, cell, in_code, prev = [], "", False, ""
        for ch in line.strip()[1:-1]:
            if ch == "`":
                in_code = not in_code
            if ch == "|" and not in_code and prev != "\\":
                cells.append(cell.strip())
                cell = ""
            else:
                cell += ch
            prev = ch
        cells.append(cell.strip())
        out[cells[0].strip("`")] = cells
    return out


def dataclass_paths(cls: type, prefix: str = "") -> list[str]:
    """Every leaf field of a config dataclass as a dotted path, walked independently of the reference."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            paths += dataclass_paths(hints[f.name], f"{prefix}{f.name}.")
        else:
            paths.append(f"{prefix}{f.name}")
    return paths


@pytest.fixture(scope="module")
def default_yaml() -> dict:
    return yaml.safe_load(DEFAULT_YAML.read_text())


@pytest.fixture(scope="module")
def page(default_yaml) -> str:
    return config_reference_markdown(default_yaml, "configs/default.yaml")


def test_every_key_of_default_yaml_is_listed_with_its_value(page, default_yaml):
    table = rows(page)
    flat = flatten(default_yaml)
    assert len(flat) > 40  # the walk reached the nested sections
    missing = [k for k in flat if k not in table]
    assert not missing, f"keys of configs/default.yaml missing from the reference: {missing}"
    wrong = {k: table[k][3] for k in flat if table[k][3] != f"`{yaml_value(flat[k])}`"}
    assert not wrong, f"rows that do not show configs/default.yaml's value: {wrong}"


def test_every_dataclass_field_has_a_row_with_its_default(page):
    table = rows(page)
    paths = dataclass_paths(KVMapConfig)
    assert set(paths) == {k.key for k in config_keys()}
    assert not [p for p in paths if p not in table], "fields without a row in the reference"
    defaults = KVMapConfig()
    for k in config_keys():
        value = defaults
        for part in k.key.split("."):
            value = getattr(value, part)
        assert table[k.key][2] == f"`{yaml_value(value)}`", k.key
    assert table["train.lr"][1:3] == ["float", "`0.001`"]
    # the default_factory's value, not the class default (None)
    assert table["teacher.path"][2] == "`builtin:smollm2-135m-instruct`"


def test_a_new_key_without_a_comment_fails():
    undocumented = {k.key for k in config_keys() if not k.doc}
    new = sorted(undocumented - KNOWN_UNDOCUMENTED)
    assert not new, f"config keys without a `# comment` beside their field (add one; it is their doc): {new}"


def test_comments_beside_above_and_inside_a_field_are_its_doc():
    docs = comments_by_name(
        '''
class Section:
    """A section."""

    # Above the field,
    # two lines.
    a: int = 1  # and beside it
    b: str = "x#y"  # a '#' in a string is not a comment
    c: float = (
        0.5  # inside a multi-line value
    )

    d: int = 0
'''
    )
    assert docs == {
        "a": "Above the field, two lines. and beside it",
        "b": "a '#' in a string is not a comment",
        "c": "inside a multi-line value",
        "d": "",
    }


def test_the_coverage_checks_can_fail(default_yaml):
    """A key the reference lacks, or one shown with another value, is caught by the checks above."""
    extra = {**default_yaml, "train": {**default_yaml["train"], "not_a_key": 3}}
    table = rows(config_reference_markdown(default_yaml, "configs/default.yaml"))
    assert "train.not_a_key" in flatten(extra) and "train.not_a_key" not in table
    changed = {**default_yaml, "seed": 7}
    assert rows(config_reference_markdown(changed, "x"))["seed"][3] == "`7`" != table["seed"][3]


def test_values_read_as_yaml():
    assert [yaml_value(v) for v in (None, True, "\n", "no", 1e-3, ["q", "k"], {"P": 1.0})] == [
        "null",
        "true",
        '"\\n"',
        "'no'",
        "0.001",
        "[q, k]",
        "{P: 1.0}",
    ]
    assert yaml.safe_load(yaml_value("\nSo the answer is ")) == "\nSo the answer is "
    assert yaml_value(REQUIRED) == REQUIRED


@dataclasses.dataclass
class _Arm:
    name: str  # folder name


@dataclasses.dataclass
class _Matrix:
    """A matrix."""

    arms: list[_Arm] = dataclasses.field(default_factory=list)


def test_list_sections_and_required_fields():
    keys = {k.key: k for k in config_keys(_Matrix)}
    assert keys["arms[].name"].default == REQUIRED and keys["arms[].name"].doc == "folder name"
    assert re.search(r"^## `arms`$", config_reference_markdown(root=_Matrix), re.M)
