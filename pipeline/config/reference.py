"""The configuration reference, read from the config dataclasses themselves (the docs site renders it).

Every key of the schema is a dotted path (`train.lr`, `data.generation.top_p`) with its type as written in
the source, its default (from a default-constructed root, so `teacher.path` shows the factory's value) and
its doc: the `# comments` on the field's line(s) and the comment block right above it, read from the source
with `tokenize`, so the comments next to the code stay the one place a key is documented.

    keys = config_keys()                                   # list[KeyDoc], KVMapConfig by default
    page = config_reference_markdown(yaml.safe_load(open("configs/default.yaml")), "configs/default.yaml")

The docs build (docs/hooks/reference.py) writes `page` into the site; tests/test_docs_reference.py checks
that every key of configs/default.yaml and every dataclass field is in it.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.config.kvmap import KVMapConfig

REQUIRED = "(required)"  # the default shown for a field without one
LIST_ITEM = "[]"  # path part of a list of sections, e.g. `arms[].name`


@dataclass(frozen=True)
class KeyDoc:
    """One config key: dotted path, type as written, default value (or REQUIRED) and its source comments."""

    key: str
    type: str
    default: Any
    doc: str


@dataclass(frozen=True)
class SectionDoc:
    """One config section (a nested dataclass): its dotted prefix ("" = top level) and class docstring."""

    prefix: str
    doc: str


def comments_by_name(source: str) -> dict[str, str]:
    """Names assigned at the top level of `source` (a class body or a module) -> their comments.

    A name's doc is the block of whole-line comments directly above its assignment plus the comments on the
    assignment's own lines (a trailing `# ...`, or one inside a multi-line value), joined as one paragraph.
    """
    source = textwrap.dedent(source)
    tree = ast.parse(source)
    body = tree.body[0].body if len(tree.body) == 1 and isinstance(tree.body[0], ast.ClassDef) else tree.body
    comments = _comment_lines(source)
    lines = source.splitlines()
    docs = {}
    for node in body:
        name = _assigned_name(node)
        if name is None:
            continue
        above = []
        row = node.lineno - 1  # 1-based line above the statement
        while row >= 1 and lines[row - 1].strip().startswith("#"):
            above.insert(0, comments[row])
            row -= 1
        own = [comments[r] for r in range(node.lineno, node.end_lineno + 1) if r in comments]
        docs[name] = " ".join(above + own)
    return docs


def _comment_lines(source: str) -> dict[int, str]:
    """1-based line -> the text of the comment on it (without `#`), found by tokenize (not inside strings)."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            found[tok.start[0]] = tok.string.lstrip("#").strip()
    return found


def _assigned_name(node: ast.stmt) -> str | None:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id
    return None


def config_keys(root: type = KVMapConfig) -> list[KeyDoc]:
    """Every leaf key of the `root` config dataclass, depth first in declaration order."""
    return [k for k, section in _walk(root, _default_instance(root), "") if section is None]


def config_sections(root: type = KVMapConfig) -> list[SectionDoc]:
    """The root and every nested section (dataclass-typed field, or a list of them) with its docstring."""
    sections = [SectionDoc("", _docstring(root))]
    for key, cls in _walk(root, _default_instance(root), ""):
        if cls is not None:
            sections.append(SectionDoc(key.key, _docstring(cls)))
    return sections


def _walk(cls: type, instance: Any, prefix: str):
    """Yield (KeyDoc, None) for each leaf and (KeyDoc, section class) before each section's own keys."""
    hints = typing.get_type_hints(cls)
    docs = comments_by_name(inspect.getsource(cls))
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        default = getattr(instance, f.name) if instance is not None else _field_default(f)
        doc = KeyDoc(key, f.type if isinstance(f.type, str) else repr(f.type), default, docs.get(f.name, ""))
        section, item = _section_type(hints[f.name])
        if section is None:
            yield doc, None
            continue
        yield doc, section
        if item:  # a list of sections: its items' keys, with the class defaults (no item exists by default)
            yield from _walk(section, None, f"{key}{LIST_ITEM}.")
        else:
            yield from _walk(section, default, f"{key}.")


def _section_type(tp: Any) -> tuple[type | None, bool]:
    """(dataclass, is_list_item) when `tp` is a dataclass or a list of one; (None, False) otherwise."""
    if dataclasses.is_dataclass(tp):
        return tp, False
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0], True
    return None, False


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


def _default_instance(root: type) -> Any:
    """`root()` when it builds from its defaults alone, else None (then each field's own default is read)."""
    try:
        return root()
    except (TypeError, ValueError):  # a required field, or a check that the defaults alone do not pass
        return None


def _docstring(cls: type) -> str:
    return inspect.cleandoc(cls.__doc__ or "")


def yaml_value(value: Any) -> str:
    """A value as it would be written in a YAML config, on one line (`null`, `true`, `[q, k]`, `{P: 1.0}`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):  # YAML's own quoting, but one line: JSON escapes for control characters
        if "\n" in value or value != value.strip():
            return json.dumps(value)
        return yaml.safe_dump(value, width=10**9).splitlines()[0]
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """A nested YAML mapping -> {dotted key: leaf value} (lists are leaves)."""
    flat = {}
    for k, v in mapping.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def config_reference_markdown(
    example: dict | None = None,
    example_name: str = "",
    root: type = KVMapConfig,
    title: str = "Configuration",
    preface: str = "",
) -> str:
    """The reference page: one table per section (key, type, default, doc), plus the value each key has in
    `example` (a loaded YAML such as configs/default.yaml, named `example_name`) when one is given; `preface`
    (Markdown) goes under the page's introduction."""
    flat = flatten(example or {})
    keys = config_keys(root)
    header = ["key", "type", "default"] + ([f"`{example_name}`"] if example else []) + ["doc"]
    out = [f"# {title}", "", _INTRO.format(root=root.__name__, module=root.__module__), ""]
    out += [preface, ""] if preface else []
    for section in config_sections(root):
        rows = [k for k in keys if _parent(k.key) == section.prefix]
        out += [f"## `{section.prefix}`" if section.prefix else "## Top level", ""]
        if section.doc:
            out += [markdown_cell(line) if line.strip() else "" for line in section.doc.splitlines()] + [""]
        if not rows:
            continue
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for k in rows:
            cells = [f"`{k.key}`", markdown_cell(k.type), f"`{yaml_value(k.default)}`"]
            value = [f"`{yaml_value(flat[k.key])}`" if k.key in flat else ""] if example else []
            out.append(_row(cells + value + [markdown_cell(k.doc) if k.doc else "*(no doc in the source)*"]))
            for sub in [s for s in flat if s.startswith(k.key + ".")]:  # entries of a mapping key, YAML order
                entry = [f"`{sub}`", f"entry of `{k.key}`", "", f"`{yaml_value(flat[sub])}`", ""]
                out.append(_row(entry))
        out.append("")
    return "\n".join(out)


_INTRO = (
    "Generated from the config dataclasses (root `{root}` in `{module}`) when the site is built: every key "
    "as a dotted path, its type as written in the source, its default, and its doc (the comments beside the "
    "field in the source). Set a key in a YAML config, or on any command line as `key=value` "
    "(`train.lr=3e-4 align.layer_map=[7,14,22,29]`); unknown keys and badly typed values stop with one line "
    "naming the key."
)


def _parent(key: str) -> str:
    return key.rpartition(".")[0].removesuffix(LIST_ITEM)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown_cell(text: str) -> str:
    """Source text as Markdown on one table-safe line: outside code spans, `|` and `*` are escaped."""
    indent = text[: len(text) - len(text.lstrip())]
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = parts[i].replace("|", "\\|").replace("*", "\\*")
    return indent + "`".join(parts)
