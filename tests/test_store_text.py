"""Stage 1 keeps the text: rendered texts and per-token char spans (template tokens marked), read back."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config.kvmap import DataConfig
from pipeline.data.samples import tokenize_sample
from pipeline.models.load import load_tokenizer
from pipeline.store.reader import KVStore
from tests.helpers_store import word_text, write_random_store


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("builtin:smollm2-135m-instruct")


ROW = {"prompt": "What is 6 x 7?", "reasoning": "Six sevens are 42.", "answer": "42"}


def test_plain_rows_have_spans_on_every_content_token(tok):
    s = tokenize_sample(ROW, tok, DataConfig(reasoning_prefix="\n", answer_prefix="\nSo "))
    spans, text = s["char_spans"].numpy(), s["text"]
    assert spans.shape == (len(s["input_ids"]), 2)
    assert text == "What is 6 x 7?\nSix sevens are 42.\nSo 42"
    # each content token's span decodes to its own characters
    for i, (a, b) in zip(s["input_ids"].tolist(), spans.tolist()):
        assert a >= 0 and tok.decode([i]) == text[a:b]


def test_chat_template_tokens_are_marked_and_content_spans_stay_inside_content(tok):
    s = tokenize_sample(ROW, tok, DataConfig(chat_template=True))
    spans, text = s["char_spans"].numpy(), s["text"]
    template = (spans == -1).all(1)
    assert template.any() and not template.all()
    decoded = [tok.decode([i]) for i in s["input_ids"][template].tolist()]
    assert "<|im_start|>" in decoded and "<|im_end|>" in decoded
    content = "".join(text[a:b] for a, b in spans[~template])
    assert ROW["prompt"] in content and ROW["answer"] in content


def test_store_round_trip_and_old_stores(tmp_path):
    path, train, _ = write_random_store(tmp_path / "s.zarr", num_samples=4, with_text=True)
    store = KVStore(path)
    assert store.has_text("train") and store.has_text("eval")
    got = store.read_texts([2, 0])
    for (text, spans), i in zip(got, [2, 0]):
        ids = store.read_sample(i, components=())["input_ids"].numpy()
        want_text, want_spans = word_text(ids)
        assert text == want_text and np.array_equal(spans, want_spans)
    old, _, _ = write_random_store(tmp_path / "old.zarr", num_samples=2)
    old_store = KVStore(old)
    assert not old_store.has_text() and old_store.read_sample(0)["input_ids"].numel() > 0
    with pytest.raises(KeyError, match="holds no texts / char_spans"):
        old_store.read_texts([0])
