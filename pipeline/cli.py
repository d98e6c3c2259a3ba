"""One command-line style for every kvmap entry point: argparse, plus `key=value` config overrides.

Every command answers `--help` with its usage, what it does, the config sections it reads and two examples;
config-driven commands take `--config PATH` and any number of dotted `key=value` overrides anywhere on the
line (`kvmap-train --config configs/default.yaml train.lr=3e-4 --resume`).

Every command fails the same way, through `run_command`: one line `NAME: error: ...` on stderr, no
traceback. Exit 2 (USAGE_ERROR, argparse's status too) when the command cannot use what it was given: bad
arguments, a config key or value (the line names the key, the value and what was expected), a missing or
unusable file or store. Exit 1 (FAILURE) when it ran and found something wrong: the body raises
`CommandFailed` (a damaged chunk, non-finite teacher states). Results go to stdout, errors to stderr.

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

USAGE_ERROR = 2  # the command cannot use what it was given (argparse exits 2 for bad arguments too)
FAILURE = 1  # the command ran and found something wrong

# Errors a command reports as one line (exit 2) instead of a traceback: bad config keys/values, missing or
# unwritable files, the ValueErrors our readers raise for bad stores or data, and the trainer's NaN/inf stop.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ConfigError,
    ValueError,
    FileNotFoundError,
    PermissionError,
    FloatingPointError,
)


class CommandFailed(Exception):
    """Raised in a command's body for a failure found while running (exit 1, the message as one line)."""


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
    """Run `body` (its int return is the exit status, anything else means 0). `CommandFailed` becomes exit
    FAILURE, a user error (USER_ERRORS + `extra`) exit USAGE_ERROR, each as one line `NAME: error: ...` on
    stderr."""
    try:
        rc = body()
        return rc if isinstance(rc, int) else 0  # a body may return its result (a dict): success
    except CommandFailed as e:
        _print_error(name, e)
        return FAILURE
    except USER_ERRORS + extra as e:
        _print_error(name, e)
        return USAGE_ERROR


def _print_error(name: str, e: BaseException) -> None:
    """The one error line of command `name` on stderr: `NAME: error: ` + the first line of the message."""
    # str(KeyError) is the repr of its message (quoted): print the message itself
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    msg = text.splitlines()[0] if text else type(e).__name__
    print(f"{name}: error: {msg}", file=sys.stderr, flush=True)
