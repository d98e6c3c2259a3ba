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


def test_an_assembled_builtin_is_joined_by_its_package_into_the_cache(tmp_path, monkeypatch):
    """`builtin:gemma3-270m`'s package holds chunks and an `assemble(path)`; kvmap calls it with a path in its
    cache (here a stand-in package: the real one is installed by `make teacher-gemma`)."""
    import sys

    from pipeline.models import load as models

    pkg = tmp_path / "site" / "fake_chunks"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\n"
        "def assemble(path):\n"
        "    Path(path).parent.mkdir(parents=True, exist_ok=True)\n"
        "    Path(path).write_bytes(b'GGUF')\n"
        "    return Path(path)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("KVMAP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.BUILTINS, "fake", ("fake_chunks", "fake.gguf"))
    monkeypatch.setattr(models, "ASSEMBLED", {"fake"})
    path = models.builtin_gguf("fake")
    assert path == tmp_path / "cache" / "gguf" / "fake.gguf" and path.read_bytes() == b"GGUF"
    sys.modules.pop("fake_chunks", None)
    monkeypatch.setitem(models.BUILTIN_INSTALL, "absent", "make teacher-x")
    monkeypatch.setitem(models.BUILTINS, "absent", ("no_such_pkg_xyz", "x.gguf"))
    with pytest.raises(FileNotFoundError, match="not installed \\(make teacher-x\\)"):
        models.builtin_gguf("absent")
