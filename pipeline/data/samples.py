"""Prompt / reasoning / answer samples -> token ids, per-token segment ids and answer masks.

Shape glossary: T tokens of one sample.

Segments (pipeline.config.kvmap.SEGMENTS): P=0 prompt, R=1 reasoning, A=2 answer. A sample is rendered as one
string and tokenised once with the teacher's fast tokenizer; each token gets the segment of the
character it starts at (offset mapping), so BPE merges across a boundary never shift a segment.

Answer-bearing tokens (`answer_mask`): tokens overlapping an occurrence of the answer string inside R
(whole-word occurrences: not preceded/followed by a letter or digit) and the answer string itself in A.

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

import re
from collections import Counter
from pathlib import Path
from typing import Any

import datasets
import torch

from pipeline.config.kvmap import SEGMENTS, DataConfig

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
    }


def _is_blank(p: Path, block: int = 1 << 20) -> bool:
    """True when the file holds nothing but whitespace (read block by block: stops at the first byte)."""
    with p.open("rb") as f:
        while chunk := f.read(block):
            if chunk.strip():
                return False
    return True


def _expected_rows(data_cfg: DataConfig) -> str:
    fields = [data_cfg.prompt_field, data_cfg.reasoning_field, data_cfg.answer_field]
    return (
        f"expected at least one row with the fields {', '.join(f for f in fields if f)} "
        f"(or {data_cfg.text_field}), one JSON object per line for .jsonl"
    )


def load_samples(data_cfg: DataConfig, split: str = "train") -> datasets.Dataset:
    """Rows of one split as a `datasets.Dataset` (JSONL / JSON / parquet file, or a saved dataset folder).

    Args:
        data_cfg: `train_path` / `eval_path` and `max_train_samples` / `max_eval_samples` (first N rows).
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
    if not p.exists():
        raise FileNotFoundError(f"data.{key}={path!r}: no such file or folder")
    if p.is_dir():
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            name = (
                split if split in ds else ("validation" if split == "eval" and "validation" in ds else None)
            )
            if name is None:
                raise ValueError(f"data.{key}={path!r}: a DatasetDict without a {split!r} split ({list(ds)})")
            ds = ds[name]
    else:
        builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix)
        if builder is None:
            raise ValueError(
                f"data.{key}={path!r}: expected a .jsonl, .json or .parquet file or a dataset folder"
            )
        if _is_blank(p):  # datasets raises a bare StopIteration / "corresponds to no data" here
            raise ValueError(f"data.{key}={path!r}: the file is empty: {_expected_rows(data_cfg)}")
        ds = datasets.load_dataset(builder, data_files=str(p), split="train", keep_in_memory=True)
    if len(ds) == 0:
        raise ValueError(f"data.{key}={path!r}: holds no rows: {_expected_rows(data_cfg)}")
    limit = data_cfg.max_train_samples if split == "train" else data_cfg.max_eval_samples
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    return ds


def _field(row: dict, name: str | None) -> str | None:
    """A usable string value or None (missing, null, empty/whitespace, or an unsupported type)."""
    if name is None:
        return None
    v = row.get(name)
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)  # `answer: 4821` read as an int column
    return v if isinstance(v, str) and v.strip() else None


def _bad(counts, data_cfg, row_index, field, row) -> None:
    if data_cfg.on_bad_row == "error":
        where = f"row {row_index}" if row_index is not None else "row"
        raise ValueError(
            f"{where}: field {field!r}={row.get(field)!r}: expected a non-empty string (data.on_bad_row=error)"
        )
    if counts is not None:
        counts["bad_rows"][field] += 1


def _render(row: dict, tokenizer, data_cfg: DataConfig, counts, row_index):
    """(text, [(start, end, segment)], answer char spans, answer) or None for a bad row."""
    fields = (data_cfg.prompt_field, data_cfg.reasoning_field, data_cfg.answer_field)
    has_psa = any(row.get(f) is not None for f in fields if f is not None)
    if not has_psa and data_cfg.text_field in row:  # a plain-text row: one P segment
        text = _field(row, data_cfg.text_field)
        if text is None:
            return _bad(counts, data_cfg, row_index, data_cfg.text_field, row)
        return text, [(0, len(text), P)], [], ""
    values = {}
    for f in fields:
        if f is None:
            continue
        values[f] = _field(row, f)
        if values[f] is None:
            return _bad(counts, data_cfg, row_index, f, row)
    prompt, answer = values[data_cfg.prompt_field], values[data_cfg.answer_field]
    reasoning = values.get(data_cfg.reasoning_field) if data_cfg.reasoning_field else None
    if data_cfg.chat_template:
        assistant = (reasoning or "") + data_cfg.answer_prefix + answer
        msgs = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(
            msgs + [{"role": "assistant", "content": assistant}], tokenize=False
        )
        if not text.startswith(head) or text.find(assistant, len(head)) != len(head):
            raise ValueError(
                "data.chat_template=True: the tokenizer's template does not render the assistant "
                "turn right after the generation prompt; set chat_template=false"
            )
        r0 = len(head)
        a0 = r0 + len(reasoning or "")
    else:
        r_text = data_cfg.reasoning_prefix + reasoning if reasoning is not None else ""
        text = prompt + r_text + data_cfg.answer_prefix + answer
        r0 = len(prompt)
        a0 = r0 + len(r_text)
    ans_start = a0 + len(data_cfg.answer_prefix)
    spans = [(0, r0, P), (r0, a0, R), (a0, len(text), A)]
    r_start = text.find(reasoning, r0) if reasoning is not None else None
    if data_cfg.answer_mask_field is not None:  # e.g. the gold answer inside teacher-written R and A
        needle = _field(row, data_cfg.answer_mask_field)
        if needle is None:
            return _bad(counts, data_cfg, row_index, data_cfg.answer_mask_field, row)
        answer_spans = [(ans_start + a, ans_start + b) for a, b in answer_occurrences(answer, needle)]
    else:
        needle = answer
        answer_spans = [(ans_start, ans_start + len(answer))]
    if reasoning is not None:  # whole-word occurrences of the answer inside R
        answer_spans += [(r_start + a, r_start + b) for a, b in answer_occurrences(reasoning, needle)]
    return text, spans, answer_spans, needle


def answer_occurrences(text: str, answer: str) -> list[tuple[int, int]]:
    """Character spans of the whole-word occurrences of `answer` in `text` (not preceded or followed by a
    letter or digit: "3907." holds 3907, "39071" does not). The rule for answer masks and `answer_match`."""
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text)]


def tokenize_sample(
    row: dict, tokenizer, data_cfg: DataConfig, counts: dict | None = None, row_index: int | None = None
) -> dict | None:
    """Tokenise one row into input_ids, segment_ids and answer_mask (see module docstring for the policy).

    Args:
        row: a dict with the configured prompt / reasoning / answer fields (or only `text_field`).
        tokenizer: a fast HF tokenizer (offset mappings are required).
        data_cfg: fields, prefixes, chat_template, max_length, truncation, on_bad_row.
        counts: optional dict from `new_counts()`, updated in place.
        row_index: only used in error messages.
    Returns:
        None for a skipped row (bad, or too long under "drop"), else a dict with
        input_ids LongTensor (T,), segment_ids LongTensor (T,) in {0, 1, 2}, answer_mask BoolTensor (T,),
        answer str, truncated bool.
    Example:
        >>> s = tokenize_sample({"prompt": "Q?", "reasoning": "It is 42.", "answer": "42"}, tok, DataConfig())
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokenizer={type(tokenizer).__name__}: expected a fast tokenizer (offset mappings)")
    if counts is not None:
        counts["rows"] += 1
    rendered = _render(row, tokenizer, data_cfg, counts, row_index)
    if rendered is None:
        return None
    text, spans, answer_spans, answer = rendered
    enc = tokenizer(
        text,
        add_special_tokens=not data_cfg.chat_template,  # the chat template already holds its specials
        return_offsets_mapping=True,
    )
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)  # (T,)
    offsets = enc["offset_mapping"]
    seg = torch.empty_like(ids)  # (T,)
    ans = torch.zeros(len(ids), dtype=torch.bool)  # (T,)
    for t, (s, e) in enumerate(offsets):
        if e == s:  # a special token added by the tokenizer (no characters): joins its left neighbour
            seg[t] = seg[t - 1] if t else P
            continue
        seg[t] = next(sid for a, b, sid in spans if a <= s < b)
        ans[t] = any(s < b and a < e for a, b in answer_spans)
    ids, seg, ans, truncated = _fit(ids, seg, ans, data_cfg)
    if ids is None:
        if counts is not None:
            counts["dropped_too_long"] += 1
        return None
    if counts is not None:
        counts["samples"] += 1
        counts["tokens"] += len(ids)
        counts["answer_tokens"] += int(ans.sum())
        counts["truncated"] += int(truncated)
    return {
        "input_ids": ids,
        "segment_ids": seg,
        "answer_mask": ans,
        "answer": answer,
        "truncated": truncated,
    }


def _fit(ids, seg, ans, data_cfg: DataConfig):
    """Apply the truncation policy; returns (ids, seg, ans, truncated) or (None, None, None, False)."""
    n = data_cfg.max_length
    if len(ids) <= n:
        return ids, seg, ans, False
    if data_cfg.truncation == "truncate_end":
        return ids[:n], seg[:n], ans[:n], True
    if data_cfg.truncation == "truncate_reasoning":
        r_pos = (seg == R).nonzero().flatten()
        excess = len(ids) - n
        if len(r_pos) >= excess:
            keep = torch.ones(len(ids), dtype=torch.bool)
            keep[r_pos[len(r_pos) - excess :]] = False  # drop the last `excess` R tokens
            return ids[keep], seg[keep], ans[keep], True
    return None, None, None, False


def tokenize_split(data_cfg: DataConfig, split: str, tokenizer) -> tuple[list[dict], list[int], dict]:
    """Load and tokenise a whole split.

    Returns:
        (samples, rows, counts): the kept samples (dicts from `tokenize_sample`), their row indices in the
        source, and the counts of `new_counts()`.
    """
    counts = new_counts()
    samples, rows = [], []
    for i, row in enumerate(load_samples(data_cfg, split)):
        s = tokenize_sample(row, tokenizer, data_cfg, counts, row_index=i)
        if s is not None:
            samples.append(s)
            rows.append(i)
    counts["bad_rows"] = dict(counts["bad_rows"])
    return samples, rows, counts
