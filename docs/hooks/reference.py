"""mkdocs hook: the Reference pages, generated from the code of the checkout being built.

- reference/configuration.md: every config key (pipeline/config/reference.py), with configs/default.yaml's values;
- reference/ablation-yaml.md: the keys of an ablation YAML (trainer/ablation/config.py);
- reference/commands.md: every console script of pyproject.toml and every `python -m` command, with the
  `--help` its own parser prints;
- reference/store-schema.md: pipeline/store/schema.py (its docstring, ARRAYS, ATTRS and constants).

The pages are added to the build in `on_files` (mkdocs' File.generated), never written under docs/, so a
clean clone builds them with `mkdocs build --strict` and nothing generated is committed. kvmap's own modules
are imported inside the page functions, after `on_files` has put this checkout first on sys.path.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import os
import sys
from pathlib import Path
from unittest import mock

import yaml
from mkdocs.structure.files import File

try:  # Python >= 3.11; pytest's own dependency on 3.10
    import tomllib
except ModuleNotFoundError:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "trainer", "alignment")
HELP_COLUMNS = "100"  # argparse wraps --help to $COLUMNS: a fixed width makes the page reproducible


def on_files(files, config):
    """Add the generated reference pages to the site's files."""
    sys.path.insert(0, str(ROOT))  # document this checkout, not whichever kvmap the environment installed
    try:
        for uri, text in generate_pages().items():
            files.append(File.generated(config, uri, content=text))
    finally:
        sys.path.remove(str(ROOT))
    return files


def generate_pages() -> dict[str, str]:
    """{docs-relative path: Markdown} of every generated reference page."""
    return {
        "reference/configuration.md": configuration_page(),
        "reference/ablation-yaml.md": ablation_page(),
        "reference/commands.md": commands_page(),
        "reference/store-schema.md": store_schema_page(),
    }


def configuration_page() -> str:
    from pipeline.config.reference import config_reference_markdown

    example = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    return config_reference_markdown(example, "configs/default.yaml")


def ablation_page() -> str:
    from pipeline.config.reference import config_reference_markdown
    from trainer.ablation.config import AblationConfig

    intro = inspect.getdoc(importlib.import_module(AblationConfig.__module__)) or ""
    return config_reference_markdown(root=AblationConfig, title="Ablation YAML", preface=_text_block(intro))


def commands_page() -> str:
    """Every command with its `--help`, console scripts first, then `python -m` modules."""
    out = [
        "# Commands",
        "",
        "Generated from `[project.scripts]` in `pyproject.toml` and the modules that run as `python -m` "
        "(those with a `main` and a `__main__` guard): each command's `--help`, as its own parser prints it. "
        "`pip install -e .` installs the console scripts; `python pipeline/extract.py` / "
        "`python trainer/train.py` and `accelerate launch` of those files work the same.",
        "",
    ]
    for name, target in command_targets().items():
        out += [f"## `{name}`", "", f"Entry point: `{target}`.", ""]
        out += ["```text", command_help(target), "```", ""]
    return "\n".join(out)


def command_targets() -> dict[str, str]:
    """{command as typed: "module:function"}: the console scripts, then the `python -m` modules."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    modules = {t.partition(":")[0] for t in scripts.values()}
    runnable = {f"python -m {m}": f"{m}:main" for m in module_commands() if m not in modules}
    return {**scripts, **runnable}


def module_commands() -> list[str]:
    """Modules of the kvmap packages that define `main` and run it under `if __name__ == "__main__"`."""
    found = []
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text())
            names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
            if "main" in names and any(_is_main_guard(n) for n in tree.body):
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


def _is_main_guard(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)


def command_help(target: str) -> str:
    """The `--help` text of `module:function`, called in this process (its parser prints and exits)."""
    module, _, func = target.partition(":")
    main = getattr(importlib.import_module(module), func)
    buf = io.StringIO()
    columns = mock.patch.dict(os.environ, {"COLUMNS": HELP_COLUMNS})
    with columns, contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):
        main(["--help"])  # argparse prints the help and exits 0
    return buf.getvalue().rstrip()


def store_schema_page() -> str:
    """pipeline/store/schema.py as a page: layout (docstring), arrays, attributes, constants."""
    from pipeline.config.reference import comments_by_name, markdown_cell, yaml_value
    from pipeline.store import schema

    notes = comments_by_name(inspect.getsource(schema))
    consts = [n for n in vars(schema) if n.isupper() and n not in ("ARRAYS", "ATTRS")]
    out = [
        "# Store schema",
        "",
        "Generated from `pipeline/store/schema.py`, the one definition of the layout.",
    ]
    out += ["", _text_block(inspect.getdoc(schema) or ""), "", "## Arrays of one split", ""]
    out += ["| array | shape | dtype | meaning |", "|---|---|---|---|"]
    out += [
        f"| `{k}` | `{shape}` | {dtype} | {markdown_cell(text)} |" for k, shape, dtype, text in schema.ARRAYS
    ]
    out += ["", "## Group attributes", "", "| attribute | meaning |", "|---|---|"]
    out += [f"| `{k}` | {markdown_cell(v)} |" for k, v in schema.ATTRS.items()]
    out += ["", "## Constants", "", "| name | value | note |", "|---|---|---|"]
    out += [
        f"| `{n}` | `{yaml_value(getattr(schema, n))}` | {markdown_cell(notes.get(n, ''))} |" for n in consts
    ]
    return "\n".join(out) + "\n"


def _text_block(doc: str) -> str:
    """A docstring as Markdown. An rST literal block (a paragraph ending `::` and the indented lines after it)
    becomes a fenced text block up to its first blank line; its later indented paragraphs become prose."""
    out, state = [], "prose"  # prose | fenced (the literal's first paragraph) | literal (its later prose)
    for line in doc.splitlines():
        indented = line.startswith("    ")
        if state == "fenced" and not line.strip():
            if out[-1] != "```text":  # blank lines before the literal's first line stay inside the fence
                out += ["```", ""]
                state = "literal"
            continue
        if state == "literal" and line.strip() and not indented:
            state = "prose"
        if state == "prose" and line.rstrip().endswith("::"):
            out += [line.rstrip()[:-1], "", "```text"]
            state = "fenced"
            continue
        out.append(line[4:] if state != "prose" else line)
    return "\n".join(out + (["```"] if state == "fenced" else []))
