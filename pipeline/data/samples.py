"""Rows from anywhere `datasets` reads -> token ids, per-token segment ids and answer masks.

Shape glossary: T tokens of one sample.

Segments (pipeline.config.kvmap.SEGMENTS): P=0 prompt, R=1 reasoning, A=2 answer. A row is rendered as one
string by its format (pipeline/data/formats.py: prr, messages, prompt_completion, text) and tokenised once
with the teacher's fast tokenizer; each token gets the segment of the character it starts at (offset
mapping), so BPE merges across a boundary never shift a segment.

Answer-bearing tokens (`answer_mask`): tokens overlapping an answer span of the rendered row (the answer
string in A and its whole-word occurrences inside R; for chat formats the whole answer of a trained turn).

Truncation policy (`DataConfig.truncation`, applied when a sample has more than `max_length` tokens):
- "drop": the sample is skipped and counted in `dropped_too_long`;
- "truncate_reasoning": the end of R is cut so that P + R + A fit; if P + A alone exceed `max_length`
  the sample is dropped;
- "truncate_end": the first `max_length` tokens are kept (A, and its answer tokens, may be lost).

Bad rows (a required field missing, null, empty or whitespace-only, or not a string/int): with
`on_bad_row="skip"` they are skipped and counted per field in `counts["bad_rows"]`; with "error" the first
one raises a one-line ValueError naming the row and field.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import torch

from pipeline.config.kvmap import SEGMENTS, DataConfig
from pipeline.data.formats import BadRow, detect_format, render_row
from pipeline.data.trained_tokens import segment_token_counts

P, R, A = SEGMENTS["P"], SEGMENTS["R"], SEGMENTS["A"]
SPLITS = ("train", "eval")


def new_counts() -> dict[str, Any]:
    """Counters filled by `tokenize_sample` (the extract summary prints them)."""
    return {
        "rows": 0,
        "samples": 0,
        "tokens": 0,
        "answer_tokens": 0,
        "bad_rows": Counter(),  # field name -> rows skipped for it
        "dropped_too_long": 0,
        "truncated": 0,
        "segment_tokens": Counter(),  # segment name -> tokens of the kept samples
    }


def _is_blank(p: Path, block: int = 1 << 20) -> bool:
    """True when the file holds nothing but whitespace (read block by block: stops at the first byte)."""
    with p.open("rb") as f:
        while chunk := f.read(block):
            if chunk.strip():
                return False
    return True


def _expected_rows(data_cfg: DataConfig) -> str:
    return (
        "expected rows of one format: messages, prompt + completion, "
        f"{data_cfg.prompt_field} + {data_cfg.answer_field}, or {data_cfg.text_field} (one JSON object per line "
        "for .jsonl)"
    )


def load_samples(data_cfg: DataConfig, split: str = "train") -> datasets.Dataset | datasets.IterableDataset:
    """Rows of one split: a JSONL / JSON / parquet / CSV file, a saved dataset folder or a Hub dataset name,
    with `data.columns` renames and the first `max_{train,eval}_samples` rows.

    Args:
        data_cfg: `train_path` / `eval_path`, `split` / `eval_split`, `subset`, `streaming`, `columns`.
        split: "train" or "eval".
    Example:
        >>> rows = load_samples(DataConfig(train_path="data/default/train.jsonl"), "train")
        >>> rows[0]["prompt"]
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: expected one of {SPLITS}")
    key = "train_path" if split == "train" else "eval_path"
    path = getattr(data_cfg, key)
    if path is None:
        raise ValueError(f"data.{key}=None: no {split} data configured")
    p = Path(path).expanduser()
    if p.is_dir():
        ds = _load_folder(p, key, path, data_cfg, split)
    elif p.is_file():
        ds = _load_file(p, key, path, data_cfg)
    elif p.suffix in FILE_BUILDERS or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"data.{key}={path!r}: no such file or folder")
    else:
        ds = _load_hub(path, key, data_cfg, split)
    if data_cfg.columns:
        present = {k: v for k, v in data_cfg.columns.items() if k in (ds.column_names or [])}
        ds = ds.rename_columns(present) if present else ds
    limit = data_cfg.max_train_samples if split == "train" else data_cfg.max_eval_samples
    if isinstance(ds, datasets.IterableDataset):
        return ds.take(limit) if limit is not None else ds
    if len(ds) == 0:
        raise ValueError(f"data.{key}={path!r}: holds no rows: {_expected_rows(data_cfg)}")
    return ds.select(range(limit)) if limit is not None and limit < len(ds) else ds


FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _split_name(data_cfg: DataConfig, split: str, available) -> str | None:
    """The split to read from a DatasetDict / Hub dataset: `data.split` for train; `data.eval_split`, else
    the first of validation / test / eval that exists, for eval."""
    if split == "train":
        return data_cfg.split if data_cfg.split in available else None
    if data_cfg.eval_split is not None:
        return data_cfg.eval_split if data_cfg.eval_split in available else None
    return next((s for s in ("validation", "test", "eval") if s in available), None)


def _load_folder(p: Path, key: str, path: str, data_cfg: DataConfig, split: str) -> datasets.Dataset:
    ds = datasets.load_from_disk(str(p))
    if isinstance(ds, datasets.DatasetDict):
        name = _split_name(data_cfg, split, ds)
        if name is None:
            raise ValueError(f"data.{key}={path!r}: a DatasetDict without the {split} split ({list(ds)})")
        ds = ds[name]
    return ds


def _load_file(p: Path, key: str, path: str, data_cfg: DataConfig):
    builder = FILE_BUILDERS.get(p.suffix)
    if builder is None:
        raise ValueError(
            f"data.{key}={path!r}: expected a .jsonl, .json, .parquet or .csv file, a dataset folder or a "
            "Hub dataset name"
        )
    if _is_blank(p):  # datasets raises a bare StopIteration / "corresponds to no data" here
        raise ValueError(f"data.{key}={path!r}: the file is empty: {_expected_rows(data_cfg)}")
    if data_cfg.streaming:  # rows are read as they are tokenised: memory stays flat for a large file
        return datasets.load_dataset(builder, data_files=str(p), split="train", streaming=True)
    return datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True)


def _load_hub(name: str, key: str, data_cfg: DataConfig, split: str):
    """A Hub dataset through `datasets` (its cache; offline with HF_HUB_OFFLINE=1)."""
    try:
        splits = datasets.get_dataset_split_names(name, data_cfg.subset)
        chosen = _split_name(data_cfg, split, splits)
        if chosen is None:
            raise ValueError(
                f"data.{key}={name!r}: no {split} split among {splits} (set data.split / data.eval_split)"
            )
        return datasets.load_dataset(name, data_cfg.subset, split=chosen, streaming=data_cfg.streaming)
    except ValueError as e:
        if str(e).startswith(f"data.{key}="):
            raise
        raise ValueError(_hub_error(name, key, e)) from e
    except Exception as e:  # datasets raises many types (ConnectionError, DatasetNotFoundError, OSError...)
        raise ValueError(_hub_error(name, key, e)) from e


def _hub_error(name: str, key: str, e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:160]
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    where = f"the Hub cache {datasets.config.HF_DATASETS_CACHE}"
    hint = (
        f"offline (HF_HUB_OFFLINE=1) it must already be in {where}"
        if offline
        else f"looked in {where} and the Hub"
    )
    return (
        f"data.{key}={name!r}: not a local file or folder, and no Hub dataset of that name could be loaded "
        f"({type(e).__name__}: {first}); {hint}"
    )


def _bad(counts, data_cfg, row_index, bad: BadRow, row, fmt: str) -> None:
    if data_cfg.on_bad_row == "error":
        where = f"row {row_index}" if row_index is not None else "row"
        value = repr(row.get(bad.field))[:80]
        raise ValueError(
            f"{where}: field {bad.field!r}={value}: {bad.why} (data.format={fmt}, data.on_bad_row=error)"
        )
    if counts is not None:
        counts["bad_rows"][bad.field] += 1


def _renamed(row: dict, data_cfg: DataConfig) -> dict:
    """A row with `data.columns` applied (streamed rows are renamed here, not by `datasets`)."""
    if not data_cfg.columns:
        return row
    return {data_cfg.columns.get(k, k): v for k, v in row.items()}


def tokenize_sample(
    row: dict,
    tokenizer,
    data_cfg: DataConfig,
    counts: dict | None = None,
    row_index: int | None = None,
    fmt: str | None = None,
) -> dict | None:
    """Tokenise one row into input_ids, segment_ids and answer_mask (see module docstring for the policy).

    Args:
        row: a row of one format (pipeline/data/formats.py).
        tokenizer: a fast HF tokenizer (offset mappings are required).
        data_cfg: format, fields, prefixes, chat_template, max_length, truncation, on_bad_row.
        counts: optional dict from `new_counts()`, updated in place.
        row_index: only used in error messages.
        fmt: the row's format (default: `detect_format` of this row).
    Returns:
        None for a skipped row (bad, or too long under "drop"), else a dict with
        input_ids LongTensor (T,), segment_ids LongTensor (T,) in {0, 1, 2}, answer_mask BoolTensor (T,),
        answer str, truncated bool, text str (the rendered row), char_spans IntTensor (T, 2) (each token's
        [start, end) in `text`; (-1, -1) for a template token: no character of the row's content).
    Example:
        >>> s = tokenize_sample({"prompt": "Q?", "reasoning": "It is 42.", "answer": "42"}, tok, DataConfig())
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer={type(tokenizer).__name__}: expected a fast tokenizer (offset mappings)")
    if counts is not None:
        counts["rows"] += 1
    fmt = fmt or detect_format(row, data_cfg)
    try:
        r = render_row(row, tokenizer, data_cfg, fmt)
    except BadRow as bad:
        return _bad(counts, data_cfg, row_index, bad, row, fmt)
    ids, seg, ans, spans = _token_segments(r, tokenizer)
    ids, seg, ans, spans, truncated = _fit(ids, seg, ans, spans, data_cfg)
    if ids is None:
        if counts is not None:
            counts["dropped_too_long"] += 1
        return None
    if counts is not None:
        _count(counts, seg, ans, truncated)
    return {
        "input_ids": ids,
        "segment_ids": seg,
        "answer_mask": ans,
        "answer": r.answer,
        "truncated": truncated,
        "text": r.text,
        "char_spans": spans,
    }


def _token_segments(r, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, segment_ids, answer_mask) (T,) and char_spans (T, 2): a token takes the segment of the
    character it starts at; a special token the tokenizer added (no characters) joins its left neighbour.
    A token with no character inside `r.content` (template markup, added special tokens) gets the span
    (-1, -1): cross-tokenizer alignment gives it no counterpart."""
    enc = tokenizer(r.text, add_special_tokens=r.add_special_tokens, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # (T,)
    seg = torch.empty_like(ids)  # (T,)
    ans = torch.zeros(len(ids), dtype=torch.bool)  # (T,)
    content = r.content if r.content is not None else [(0, len(r.text))]
    spans = torch.tensor(
        [(s, e) if any(s < b and a < e for a, b in content) else (-1, -1) for s, e in enc["offset_mapping"]],
        dtype=torch.int32,
    ).reshape(-1, 2)  # (T, 2)
    for t, (s, e) in enumerate(enc["offset_mapping"]):
        if e == s:
            seg[t] = seg[t - 1] if t else P
            continue
        seg[t] = next(sid for a, b, sid in r.spans if a <= s < b)
        ans[t] = any(s < b and a < e for a, b in r.answer_spans)
    return ids, seg, ans, spans


def token_segments(r, tokenizer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A rendered row (`formats.render_row`) tokenised as stage 1 does: input_ids, segment_ids, answer_mask (T,)
    and char_spans (T, 2) ((-1, -1) = template token). Stage 2 renders a cross-tokenizer student's rows with it."""
    return _token_segments(r, tokenizer)


def _count(counts: dict, seg: torch.Tensor, ans: torch.Tensor, truncated: bool) -> None:
    counts["samples"] += 1
    counts["tokens"] += len(seg)
    counts["answer_tokens"] += int(ans.sum())
    counts["truncated"] += int(truncated)
    counts["segment_tokens"].update(segment_token_counts(seg))


def _fit(ids, seg, ans, spans, data_cfg: DataConfig):
    """Apply the truncation policy; returns (ids, seg, ans, spans, truncated) or Nones and False."""
    n = data_cfg.max_length
    if len(ids) <= n:
        return ids, seg, ans, spans, False
    if data_cfg.truncation == "truncate_end":
        return ids[:n], seg[:n], ans[:n], spans[:n], True
    if data_cfg.truncation == "truncate_reasoning":
        r_pos = (seg == R).nonzero().flatten()
        excess = len(ids) - n
        if len(r_pos) >= excess:
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[r_pos[len(r_pos) - excess :]] = False  # drop the last `excess` R tokens
            return ids[keep], seg[keep], ans[keep], spans[keep], True
    return None, None, None, None, False


def count_rows(data_cfg: DataConfig, split: str) -> int:
    """Rows of a split (a streamed dataset is read through once to count them)."""
    ds = load_samples(data_cfg, split)
    if isinstance(ds, datasets.IterableDataset):
        return sum(1 for _ in ds)
    return len(ds)


def iter_rows(data_cfg: DataConfig, split: str, tokenizer, counts: dict, lo: int = 0, hi: int | None = None):
    """Tokenise rows lo..hi-1 of a split (hi None: to the end), in order; yields (row index, sample) for the
    kept ones and fills `counts` (`new_counts()`; "format" too). The format is detected once, from row 0,
    whatever `lo` is, as with one process; a streamed dataset is read (not tokenised) up to `lo`."""
    ds = load_samples(data_cfg, split)
    streaming = isinstance(ds, datasets.IterableDataset)
    first = next(iter(ds), None)
    if first is None:
        return
    counts["format"] = counts.get("format") or detect_format(
        _renamed(first, data_cfg) if streaming else first, data_cfg
    )
    if streaming:
        rows = itertools.islice(ds, lo, hi)
    else:
        rows = ds.select(range(lo, len(ds) if hi is None else min(hi, len(ds))))
    for i, row in enumerate(rows, start=lo):
        row = _renamed(row, data_cfg) if streaming else row
        s = tokenize_sample(row, tokenizer, data_cfg, counts, row_index=i, fmt=counts["format"])
        if s is not None:
            yield i, s


def tokenize_split(data_cfg: DataConfig, split: str, tokenizer) -> tuple[list[dict], list[int], dict]:
    """Load and tokenise a whole split; the format is detected once, from its first row.

    Returns:
        (samples, rows, counts): the kept samples (dicts from `tokenize_sample`), their row indices in the
        source, and the counts of `new_counts()` (with "format").
    """
    counts = new_counts()
    samples, rows = [], []
    for i, s in iter_rows(data_cfg, split, tokenizer, counts):
        samples.append(s)
        rows.append(i)
    counts["bad_rows"] = dict(counts["bad_rows"])
    counts["segment_tokens"] = dict(counts["segment_tokens"])
    return samples, rows, counts
