"""One command-line style for every kvmap entry point: argparse, plus `key=value` config overrides.

Every command answers `--help` with its usage, what it does, the config sections it reads and two examples;
config-driven commands take `--config PATH` and any number of dotted `key=value` overrides anywhere on the
line (`kvmap-train --config configs/default.yaml train.lr=3e-4 --resume`). Errors in a config key or value
exit 2 with one line naming the key, the value and what was expected.

    p = command_parser("kvmap-extract", __doc__, sections=["teacher", "data", "extract"], examples=[...])
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    return run_command("extract", lambda: do_it(config_from_args(KVMapConfig, p.parse_args(argv))))
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

from pipeline.config.configlib import ConfigError, load_config

T = TypeVar("T")

# Errors a command reports as one line (exit 2) instead of a traceback: bad config keys/values, missing or
# unwritable files, the ValueErrors our readers raise for bad stores or data, and the trainer's NaN/inf stop.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    FloatingPointError,
)


def command_parser(
    prog: str,
    doc: str | None,
    *,
    sections: Sequence[str] = (),
    examples: Sequence[str] = (),
    config: bool = True,
) -> argparse.ArgumentParser:
    """An ArgumentParser with kvmap's common shape.

    Args:
        prog: the console-script name shown in usage (e.g. "kvmap-train").
        doc: the module docstring; its first paragraph is the description.
        sections: the config sections the command reads (listed under --help).
        examples: command lines shown under --help (give two).
        config: add `--config PATH` and the positional `key=value` overrides.
    Example:
        p = command_parser("kvmap-train", __doc__, sections=["student", "train"], examples=["kvmap-train ..."])
    """
    epilog = []
    if sections:
        epilog.append("config sections read: " + ", ".join(sections) + " (README, 'Config reference')")
    if examples:
        epilog.append("examples:\n" + "\n".join(f"  {e}" for e in examples))
    p = argparse.ArgumentParser(
        prog=prog,
        description=(doc or "").strip().split("\n\n")[0],
        epilog="\n\n".join(epilog) or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # a typo such as --resum must be an error, never a silent prefix match
    )
    if config:
        p.add_argument("--config", metavar="PATH", help="YAML config; keys it omits take their defaults")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="dotted config overrides parsed as YAML values, e.g. train.lr=3e-4 align.layers=[0,2]",
        )
    return p


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_intermixed_args`: overrides may come before, between or after the options."""
    return parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    """Load `args.config` into `cls` and apply `args.overrides` (see `pipeline.config.configlib.load_config`)."""
    return load_config(cls, args.config, args.overrides)


def run_command(
    name: str, body: Callable[[], int | None], extra: tuple[type[BaseException], ...] = ()
) -> int:
    """Run `body` (its int return is the exit status, anything else means 0); a user error (USER_ERRORS +
    `extra`) becomes one line `NAME: error: ...` on stderr, exit 2."""
    try:
        rc = body()
        return rc if isinstance(rc, int) else 0  # a body may return its result (a dict): success
    except USER_ERRORS + extra as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{name}: error: {msg}", file=sys.stderr, flush=True)
        return 2
