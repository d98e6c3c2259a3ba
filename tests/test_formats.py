"""Dataset formats on the embedded teacher's tokenizer (SmolLM2, ChatML template with an injected default
system prompt): segment ids equal an independent rendering with `apply_chat_template`; sources, renames and
the rules around them (default system prompt, eval split, Hub names offline, auto detection)."""

from __future__ import annotations

import pytest
import torch

from pipeline.config.kvmap import DataConfig
from pipeline.data.samples import load_samples, tokenize_sample, tokenize_split
from pipeline.models.load import load_tokenizer
from tests.helpers_formats import messages_rows, write_format_files

# What SmolLM2's template writes when a conversation has no system turn (kvmap removes it).
SMOL_DEFAULT_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)
EOT = "<|im_end|>"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:smollm2-135m-instruct")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_format_files(tmp_path_factory.mktemp("formats"))


def _fold(m: dict) -> dict:
    """A turn as the template sees it: a reasoning_content field inside the think tags."""
    rc = m.get("reasoning_content")
    return {"role": m["role"], "content": f"<think>{rc}</think>{m['content']}" if rc else m["content"]}


def _conversation(row: dict) -> list[dict]:
    if "messages" in row:
        return [_fold(m) for m in row["messages"]]
    p, c = row["prompt"], row["completion"]
    p = p if isinstance(p, list) else [{"role": "user", "content": p}]
    c = c if isinstance(c, list) else [{"role": "assistant", "content": c}]
    return [_fold(m) for m in p + c]


def _render(tok, msgs: list[dict], **kw) -> str:
    text = tok.apply_chat_template(msgs, tokenize=False, **kw)
    if msgs[0]["role"] != "system":
        assert text.startswith(SMOL_DEFAULT_SYSTEM)  # the template injects it; the row did not ask for it
        text = text[len(SMOL_DEFAULT_SYSTEM) :]
    return text


def reference_segments(tok, row: dict) -> tuple[str, list[int]]:
    """(text, segment per token) computed independently: P = the render up to the last assistant turn's
    generation prompt, R = its <think> span, A = the rest of that turn through <|im_end|>, then P."""
    if "text" in row:
        return row["text"], [2] * len(tok(row["text"])["input_ids"])
    msgs = _conversation(row)
    full, head = _render(tok, msgs), _render(tok, msgs[:-1], add_generation_prompt=True)
    assert full.startswith(head)
    content = msgs[-1]["content"]
    r_len = content.index("</think>") + len("</think>") if "</think>" in content else 0
    bounds = [
        (len(head), 0),
        (len(head) + r_len, 1),
        (len(head) + len(content) + len(EOT), 2),
        (len(full), 0),
    ]
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    segs = [next(s for end, s in bounds if start < end) for start, _ in enc["offset_mapping"]]
    return full, segs


VARIANTS = [
    "messages",
    "reasoning_content",
    "prompt_completion",
    "prompt_completion_messages",
    "text",
    "parquet",
]


@pytest.mark.parametrize("variant", [*VARIANTS, "saved_folder"])
def test_segments_equal_an_independent_template_rendering(tok, files, variant):
    cfg = DataConfig(train_path=str(files[variant]), eval_path=None)
    samples, rows, counts = tokenize_split(cfg, "train", tok)
    assert len(samples) == 16 and counts["bad_rows"] == {}
    same = total = 0
    for s, row in zip(samples, load_samples(cfg, "train")):
        text, ref = reference_segments(tok, row)
        assert tok.decode(s["input_ids"]) == text  # the same string the template renders
        same += int((s["segment_ids"] == torch.tensor(ref)).sum())
        total += len(ref)
    assert same / total >= 0.995, f"{variant}: {same}/{total} tokens in the reference segment"
    seg = counts["segment_tokens"]
    assert seg["A"] > 0 and (variant == "text" or (seg["P"] > 0 and seg["R"] > 0))


def test_answer_mask_marks_a_and_the_gold_answer_inside_r(tok):
    row = messages_rows()[3]
    s = tokenize_sample(row, tok, DataConfig())
    a, r = s["segment_ids"] == 2, s["segment_ids"] == 1
    assert (s["answer_mask"] & a).sum() == a.sum() - 1  # every A token but the end-of-turn token
    assert tok.decode(s["input_ids"][s["answer_mask"] & r]).strip() == row["answer"]


def test_system_prompt_is_added_only_when_asked(tok):
    row = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    plain = tok.decode(tokenize_sample(row, tok, DataConfig())["input_ids"])
    assert "SmolLM" not in plain and plain.startswith("<|im_start|>user\nHi")
    own = tok.decode(tokenize_sample(row, tok, DataConfig(system_prompt="Be terse."))["input_ids"])
    assert own.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi")


def test_all_turns_trains_every_assistant_turn(tok):
    row = messages_rows()[0]
    last = tokenize_sample(row, tok, DataConfig())
    every = tokenize_sample(row, tok, DataConfig(train_turns="all"))
    first_reply = tok("Hi, how can I help?", add_special_tokens=False)["input_ids"]
    assert (
        int((every["segment_ids"] == 2).sum()) == int((last["segment_ids"] == 2).sum()) + len(first_reply) + 1
    )


def test_text_rows_train_on_every_token_and_columns_rename(tok, tmp_path):
    p = tmp_path / "corpus.jsonl"
    p.write_text('{"body": "One line of prose."}\n{"body": "Another line."}\n')
    cfg = DataConfig(train_path=str(p), eval_path=None, columns={"body": "text"})
    samples, _, counts = tokenize_split(cfg, "train", tok)
    assert counts["format"] == "text" and all((s["segment_ids"] == 2).all() for s in samples)


def test_unknown_columns_name_the_formats(tok, tmp_path):
    p = tmp_path / "odd.jsonl"
    p.write_text('{"question": "q", "response": "r"}\n')
    with pytest.raises(
        ValueError, match=r"data.format=auto: a row with the columns \['question', 'response'\]"
    ):
        tokenize_split(DataConfig(train_path=str(p), eval_path=None), "train", tok)


def test_default_heldout_never_evaluates_other_data():
    assert DataConfig(train_path="mine.jsonl").eval_path is None
    assert DataConfig().eval_path == "data/default/heldout.jsonl"
    assert DataConfig(train_path="mine.jsonl", eval_path="mine_eval.jsonl").eval_path == "mine_eval.jsonl"


def test_hub_dataset_not_cached_fails_offline_in_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError) as e:
        load_samples(DataConfig(train_path="someone/not-a-cached-set", eval_path=None), "train")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("data.train_path='someone/not-a-cached-set'")
    assert "HF_HUB_OFFLINE=1" in msg and "cache" in msg
    assert not (tmp_path / "someone").exists()  # nothing written where the name points


def test_generate_default_writes_only_the_default_train_file(tmp_path, monkeypatch):
    from pipeline.config.kvmap import KVMapConfig
    from pipeline.data.default_data import generate_default_data

    monkeypatch.chdir(tmp_path)
    cfg = KVMapConfig(data=DataConfig(train_path="openai/gsm8k", generate_default=True))
    generate_default_data(cfg)  # a Hub name: nothing generated, nothing written
    assert list(tmp_path.iterdir()) == []


def test_a_config_that_trains_on_no_token_fails_before_extraction(tmp_path, capsys):
    from pipeline.extract import main
    from tests.helpers_store import save_tiny_teacher, write_extract_config

    cfg = write_extract_config(tmp_path, save_tiny_teacher(tmp_path / "teacher"))
    rows = tmp_path / "corpus.jsonl"
    rows.write_text("".join(f'{{"text": "w{5 + i} w{6 + i} w{7 + i}"}}\n' for i in range(8)))
    argv = ["--config", str(cfg), f"data.train_path={rows}", "data.eval_path=null", "data.text_segment=P"]
    assert main(argv + ["train.ce_segments=[R,A]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # above it: the teacher's loading progress
    assert err.startswith(f"extract: error: data.train_path='{rows}' (text format)")
    assert "train.ce_segments=['R', 'A'] selects no token (tokens per segment: P 24, R 0, A 0)" in err
    assert not (tmp_path / "store.zarr").exists()
    assert main(argv + ["train.ce_segments=[P]"]) == 0  # the same rows train once the key names their segment


def test_streaming_reads_the_same_samples(tok, files):
    plain = DataConfig(train_path=str(files["messages"]), eval_path=None, max_train_samples=5)
    streamed = DataConfig(
        train_path=str(files["messages"]), eval_path=None, max_train_samples=5, streaming=True
    )
    a, rows_a, _ = tokenize_split(plain, "train", tok)
    b, rows_b, _ = tokenize_split(streamed, "train", tok)
    assert rows_a == rows_b == list(range(5))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
