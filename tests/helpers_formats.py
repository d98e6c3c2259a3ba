"""16-row data files in every supported format, made by hand (deterministic), for the format tests.

Rows use a small fact-lookup task so reasoning and answers are real strings: multi-turn `messages` (half
with their own system turn), `<think>` traces, a `reasoning_content` field, TRL `prompt`/`completion` as
strings and as message lists, and `text`; the messages rows also as parquet and as a saved `datasets`
folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets

NAMES = [
    "Ada",
    "Bo",
    "Cy",
    "Di",
    "Ed",
    "Flo",
    "Gus",
    "Hal",
    "Ivy",
    "Jo",
    "Kit",
    "Lu",
    "Mo",
    "Ned",
    "Oz",
    "Pia",
]
ROWS = 16


def _fact(i: int) -> tuple[str, str, str]:
    """(context, question, answer) of row i."""
    name, code = NAMES[i % len(NAMES)], str(1000 + 37 * i)
    other = NAMES[(i + 5) % len(NAMES)]
    ctx = f"{name}'s locker code is {code}. {other}'s locker code is {2000 + i}."
    return ctx, f"What is {name}'s locker code?", code


def messages_rows() -> list[dict]:
    rows = []
    for i in range(ROWS):
        ctx, q, a = _fact(i)
        msgs = [{"role": "system", "content": "Answer with the code only."}] if i % 2 else []
        msgs += [
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi, how can I help?"},
            {"role": "user", "content": f"{ctx}\n{q}"},
            {
                "role": "assistant",
                "content": f"<think>The text says the code is {a}.</think>The code is {a}.",
            },
        ]
        rows.append({"messages": msgs, "answer": a})
    return rows


def reasoning_content_rows() -> list[dict]:
    rows = []
    for i in range(ROWS):
        ctx, q, a = _fact(i)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"{ctx}\n{q}"},
                    {
                        "role": "assistant",
                        "content": f"It is {a}.",
                        "reasoning_content": f"Looking it up: {a}.",
                    },
                ]
            }
        )
    return rows


def prompt_completion_rows(as_messages: bool) -> list[dict]:
    rows = []
    for i in range(ROWS):
        ctx, q, a = _fact(i)
        prompt, completion = f"{ctx}\n{q}", f"<think>It is {a}.</think> {a}"
        if as_messages:
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "completion": [{"role": "assistant", "content": completion}],
                }
            )
        else:
            rows.append({"prompt": prompt, "completion": completion})
    return rows


def text_rows() -> list[dict]:
    return [{"text": " ".join(_fact(i)[:2]) + f" {_fact(i)[2]}."} for i in range(ROWS)]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_format_files(folder: str | Path) -> dict[str, Path]:
    """{variant: path} of every hand-made 16-row file (jsonl, parquet, saved folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {
        "messages": _jsonl(folder / "messages.jsonl", messages_rows()),
        "reasoning_content": _jsonl(folder / "reasoning_content.jsonl", reasoning_content_rows()),
        "prompt_completion": _jsonl(folder / "pc.jsonl", prompt_completion_rows(False)),
        "prompt_completion_messages": _jsonl(folder / "pc_messages.jsonl", prompt_completion_rows(True)),
        "text": _jsonl(folder / "text.jsonl", text_rows()),
    }
    ds = datasets.Dataset.from_list(messages_rows())
    ds.to_parquet(str(folder / "messages.parquet"))
    out["parquet"] = folder / "messages.parquet"
    ds.save_to_disk(str(folder / "messages_saved"))
    out["saved_folder"] = folder / "messages_saved"
    return out
