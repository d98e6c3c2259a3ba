"""The bad-input catalogue: every way a new user hit a traceback or a silent success, as ONE table.

Each row = (what, how to provoke it, the expected outcome, fragments the message must name). A row passes
when the command exits with the expected status (or the call raises the expected exception) AND its error
is exactly one line holding every fragment (the file / array / chunk / key), with no traceback.
Commands run in-process through their `main(argv)` (the console scripts' entry points): no Python start-up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from pipeline.store.reader import KVStore
from tests.helpers_store import write_random_store
from tests.helpers_train import make_tiny_store, tiny_train_config, write_config

# bf16 NaN as the stored uint16 word (states are stored as raw bf16 words)
BF16_NAN = np.uint16(0x7FC0)


@dataclass
class Ctx:
    """Paths the rows provoke their failures with (built once per module)."""

    tmp: Path
    train_store: Path  # a real tiny store of the tiny teacher (kvmap-train rows)
    random_store: Path  # a complete store of random states (store / inspect rows)


@dataclass
class Outcome:
    status: int | str  # an exit status, or the name of the exception raised
    message: str  # stderr of a command, or str(exception)


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    tmp = tmp_path_factory.mktemp("bad")
    train_store = make_tiny_store(tmp / "tiny.zarr", num_train=8, num_eval=4)
    random_store, _, _ = write_random_store(tmp / "random.zarr")  # 2+ shards of 64 tokens per state array
    return Ctx(tmp, train_store, random_store)


def _copy_store(ctx: Ctx, name: str) -> Path:
    dst = ctx.tmp / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(ctx.random_store, dst)
    return dst


def _cli(main: Callable, argv: list[str], capsys) -> Outcome:
    capsys.readouterr()  # drop what earlier rows printed
    rc = main(argv)
    return Outcome(rc, capsys.readouterr().err)


def _raises(fn: Callable) -> Outcome:
    try:
        fn()
    except Exception as e:  # the row names the exception type it expects
        return Outcome(type(e).__name__, str(e))
    return Outcome("no exception", "")


# --- how each failure is provoked ---


def _corrupt_shard(ctx: Ctx) -> Path:
    """Flip a byte of the shard index of train/layers/2/k chunk 1: zarr's crc32c check fails."""
    store = _copy_store(ctx, "corrupt.zarr")
    f = store / "train" / "layers" / "2" / "k" / "c" / "1" / "0" / "0"
    b = bytearray(f.read_bytes())
    b[-3] ^= 0xFF
    f.write_bytes(bytes(b))
    return store


def _nan_store(ctx: Ctx) -> Path:
    """NaN teacher states at tokens 70..72 of train/layers/3/v (chunk 1), written as valid chunks."""
    store = _copy_store(ctx, "nan.zarr")
    import zarr

    from pipeline.store.codecs import quiet_codecs

    with quiet_codecs():
        a = zarr.open_array(store=str(store), path="train/layers/3/v", mode="r+")
    a[70:72] = BF16_NAN
    return store


def _missing_shard(ctx: Ctx) -> Path:
    store = _copy_store(ctx, "missing.zarr")
    (store / "train" / "layers" / "0" / "q" / "c" / "1" / "0" / "0").unlink()
    return store


def _read_only(folder: Path) -> bool:
    """Make `folder` unwritable even for root (chattr +i); False when that is not possible here."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return True
    return subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0


def _writable_again(folder: Path) -> None:
    if os.geteuid() != 0:
        folder.chmod(0o755)
    else:
        subprocess.run(["chattr", "-i", str(folder)], capture_output=True)


def _train(ctx: Ctx, capsys, *overrides: str, **cfg_overrides) -> Outcome:
    from trainer.train import main

    cfg = tiny_train_config(ctx.tmp, ctx.train_store, **{"train.steps": 1, **cfg_overrides})
    return _cli(main, ["--config", str(write_config(ctx.tmp, cfg)), *overrides], capsys)


def _train_read_only(ctx: Ctx, capsys) -> Outcome:
    ro = ctx.tmp / "read_only"
    if not _read_only(ro):
        pytest.skip("cannot make a read-only folder here (root without chattr)")
    try:
        return _train(ctx, capsys, run_dir=str(ro / "run"))
    finally:
        _writable_again(ro)


def _run_dir_check_read_only(ctx: Ctx, capsys) -> Outcome:
    from trainer.run.run_dir import check_run_dir_writable

    ro = ctx.tmp / "read_only_2"
    if not _read_only(ro):
        pytest.skip("cannot make a read-only folder here (root without chattr)")
    try:
        return _raises(lambda: check_run_dir_writable(ro))
    finally:
        _writable_again(ro)


def _empty_jsonl(ctx: Ctx, capsys) -> Outcome:
    from pipeline.config.kvmap import DataConfig
    from pipeline.data.samples import load_samples

    (ctx.tmp / "empty.jsonl").write_text("\n")
    return _raises(lambda: load_samples(DataConfig(train_path=str(ctx.tmp / "empty.jsonl")), "train"))


def _inspect(*argv: str):
    def run(ctx: Ctx, capsys, make: Callable[[Ctx], Path]) -> Outcome:
        from pipeline.analysis.inspect_store import main

        return _cli(main, [str(make(ctx)), *argv], capsys)

    return run


def _read_truncated_lengths(ctx: Ctx, capsys) -> Outcome:
    """Cut the (unsharded) train/lengths chunk file in half: its zstd frame no longer decodes."""
    store = _copy_store(ctx, "truncated.zarr")
    f = store / "train" / "lengths" / "c" / "0"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return _raises(lambda: KVStore(store).read_sample(0))


def _read_corrupt(ctx: Ctx, capsys) -> Outcome:
    store = KVStore(_corrupt_shard(ctx))
    return _raises(lambda: store.read_samples(range(store.num_samples())))


def _extract_into_a_file(ctx: Ctx, capsys) -> Outcome:
    """extract.store names a plain file; the teacher path is bogus, so a message about the store proves the
    store was checked before any model loads."""
    from pipeline.extract import main
    from tests.helpers_store import write_extract_config

    (ctx.tmp / "plain_file").write_text("not a store")
    cfg = write_extract_config(ctx.tmp / "x", ctx.tmp / "no-teacher-here")
    return _cli(main, ["--config", str(cfg), f"extract.store={ctx.tmp / 'plain_file'}"], capsys)


def _train_on_all_prompt_store(ctx: Ctx, capsys) -> Outcome:
    """A store whose every token is P (plain text rows as P) under train.ce_segments [R, A]."""
    import zarr

    store = ctx.tmp / "all_p.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(ctx.train_store, store)
    seg = zarr.open_array(store=str(store), path="train/segment_ids", mode="r+")
    seg[:] = 0
    return _train(
        ctx, capsys, f"extract.store={store}", "train.ce_segments=[R,A]", run_dir=str(ctx.tmp / "run_p")
    )


def _train_store_is_a_file(ctx: Ctx, capsys) -> Outcome:
    (ctx.tmp / "store_file").write_text("not a store")
    return _train(ctx, capsys, f"extract.store={ctx.tmp / 'store_file'}", run_dir=str(ctx.tmp / "run_f"))


# (what, provoke(ctx, capsys) -> Outcome, expected status, fragments(ctx) the one-line message must hold)
CASES = [
    (
        "corrupt shard, read by the trainer's loader",
        _read_corrupt,
        "ValueError",
        lambda c: [str(c.tmp / "corrupt.zarr"), "array train/layers/2/k chunk 1", "checksum", "--overwrite"],
    ),
    (
        "truncated per-sample array, read by the trainer's loader",
        _read_truncated_lengths,
        "ValueError",
        lambda c: [str(c.tmp / "truncated.zarr"), "array train/lengths chunk 0 (samples 0-7", "Zstd"],
    ),
    (
        "corrupt shard under kvmap-inspect --check",
        lambda c, cap: _inspect("--check")(c, cap, _corrupt_shard),
        1,
        lambda c: ["array train/layers/2/k chunk 1", "c/1/0/0", "damaged"],
    ),
    (
        "NaN store under kvmap-inspect --check",
        lambda c, cap: _inspect("--check")(c, cap, _nan_store),
        1,
        lambda c: ["array train/layers/3/v chunk 1", "non-finite", "first at token 70"],
    ),
    (
        "NaN store under plain kvmap-inspect (sampled statistics)",
        lambda c, cap: _inspect()(c, cap, _nan_store),
        1,
        lambda c: [str(c.tmp / "nan.zarr"), "non-finite", "3/v", "--check"],
    ),
    (
        "missing shard under kvmap-inspect --check",
        lambda c, cap: _inspect("--check")(c, cap, _missing_shard),
        1,
        lambda c: ["array train/layers/0/q chunk 1", "missing"],
    ),
    (
        "missing store under kvmap-inspect",
        lambda c, cap: _inspect()(c, cap, lambda c: c.tmp / "nowhere.zarr"),
        2,
        lambda c: [str(c.tmp / "nowhere.zarr"), "does not exist"],
    ),
    (
        "extract.store is a plain file (checked before the teacher loads)",
        _extract_into_a_file,
        2,
        lambda c: [f"extract.store='{c.tmp / 'plain_file'}' is a file", "stores/name.zarr"],
    ),
    (
        "kvmap-train on a store whose trained segments hold no token (and no empty run_dir left)",
        _train_on_all_prompt_store,
        2,
        lambda c: [f"train.store='{c.tmp / 'all_p.zarr'}'", "train.ce_segments=['R', 'A'] selects no token"],
    ),
    (
        "train.store is a plain file (and no empty run_dir left)",
        _train_store_is_a_file,
        2,
        lambda c: [f"train.store='{c.tmp / 'store_file'}' is a file", "extract.store"],
    ),
    (
        "empty JSONL dataset",
        _empty_jsonl,
        "ValueError",
        lambda c: ["data.train_path", str(c.tmp / "empty.jsonl"), "empty", "prompt"],
    ),
    (
        "read-only run_dir under kvmap-train",
        _train_read_only,
        2,
        lambda c: [str(c.tmp / "read_only" / "run")],
    ),
    (
        "read-only run_dir, trainer.run.run_dir.check_run_dir_writable",
        _run_dir_check_read_only,
        "PermissionError",
        lambda c: [f"run_dir='{c.tmp / 'read_only_2'}'", "not a writable folder"],
    ),
    (
        "unknown config key",
        lambda c, cap: _train(c, cap, "train.stepz=3"),
        2,
        lambda c: ["train.stepz"],
    ),
    (
        "bad config value",
        lambda c, cap: _train(c, cap, "train.lr=fast"),
        2,
        lambda c: ["train.lr", "fast"],
    ),
    (
        "missing store under kvmap-train",
        lambda c, cap: _train(c, cap, f"extract.store={c.tmp / 'nowhere.zarr'}"),
        2,
        lambda c: [str(c.tmp / "nowhere.zarr"), "does not exist"],
    ),
]


@pytest.mark.parametrize("what, provoke, status, fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_naming_it(ctx, capsys, what, provoke, status, fragments):
    out = provoke(ctx, capsys)
    assert out.status == status, f"{what}: got {out.status!r}, message:\n{out.message[-2000:]}"
    assert "Traceback" not in out.message, out.message[-2000:]
    if isinstance(status, int):  # a command: its stderr holds exactly one error line (bars may surround it)
        lines = [ln for ln in out.message.splitlines() if "error:" in ln]
    else:
        lines = out.message.splitlines()
    assert len(lines) == 1, f"{what}: expected one line, got {lines}"
    for frag in fragments(ctx):
        assert frag in lines[0], f"{what}: {frag!r} not in {lines[0]!r}"


def test_a_failed_start_leaves_no_empty_run_folder(ctx, capsys):
    for provoke, run in ((_train_on_all_prompt_store, "run_p"), (_train_store_is_a_file, "run_f")):
        assert provoke(ctx, capsys).status == 2
        assert not (ctx.tmp / run).exists(), run
