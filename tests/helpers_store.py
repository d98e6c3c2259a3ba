"""Tiny kvmap stores for tests (store round trips here; the trainer's tests may reuse `write_random_store`).

Sizes match the tiny teacher of tests/conftest.py: 4 layers, H=6 query heads, G=2 KV heads, D=16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.store.encoding import encode_states
from pipeline.store.packed_split import PackedSplit

H, G, D = 6, 2, 16
# teacher.attention of a 4-layer Llama-style teacher as stage 1 measures it (pipeline/models/geometry.py)
LLAMA_ATTENTION = {"scaling": [D**-0.5] * 4, "softcap": [None] * 4, "sliding_window": [None] * 4}


def word_text(ids) -> tuple[str, np.ndarray]:
    """The text of word-tokenizer ids ("w5 w17 ...", see `word_tokenizer`) and each word's (T, 2) char span."""
    words = [f"w{int(i)}" for i in ids]
    starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
    return " ".join(words), np.stack([starts, starts + [len(w) for w in words]], 1).astype(np.int32)


def random_split(
    num_samples: int,
    seed: int = 0,
    vocab: int = 101,
    min_len: int = 5,
    max_len: int = 40,
    with_text: bool = False,
):
    """A PackedSplit of random samples with P/R/A segments (each segment at least one token); with_text: each
    sample also carries its word text and char spans (`word_text`), as stage 1 records them."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(num_samples):
        t = int(rng.integers(min_len, max_len + 1))
        cut1, cut2 = sorted(rng.choice(np.arange(1, t), size=2, replace=False))
        seg = np.zeros(t, dtype=np.int64)
        seg[cut1:cut2], seg[cut2:] = 1, 2
        samples.append(
            {
                "input_ids": torch.from_numpy(rng.integers(3, vocab, size=t)),
                "segment_ids": torch.from_numpy(seg),
                "answer_mask": torch.from_numpy((rng.random(t) < 0.2) & (seg > 0)),
            }
        )
        if with_text:
            samples[-1]["text"], samples[-1]["char_spans"] = word_text(samples[-1]["input_ids"])
    return PackedSplit.from_samples(samples, rows=np.arange(num_samples) * 2)


def write_random_store(
    path: str | Path,
    num_samples: int = 7,
    layers=(0, 2, 3),
    dtype: str = "bfloat16",
    codec: str = "zstd-shuffle",
    chunk_tokens: int = 64,
    inner_chunk_tokens: int = 16,
    with_eval: bool = True,
    seed: int = 0,
    with_text: bool = False,
):
    """Write a complete store of random states; returns (path, packed train split, {(layer, comp): (N, X, D)}).

    The returned states are the float32 values *after* rounding to `dtype`, i.e. exactly what
    `KVStore.read_sample` must give back.
    """
    from pipeline.store.writer import StoreWriter

    train = random_split(num_samples, seed, with_text=with_text)
    ev = random_split(3, seed + 1, with_text=with_text) if with_eval else None
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q": (H, D), "k": (G, D), "v": (G, D)}
    truth = {}
    for layer in layers:
        for comp, (x, d) in shapes.items():
            vals = torch.randn(train.num_tokens, x, d, generator=gen) * 3.0
            truth[(layer, comp)] = vals.to(getattr(torch, dtype)).float()
    attrs = {
        "teacher": {
            "path": "tiny",
            "num_layers": 4,
            "num_heads": H,
            "num_kv_heads": G,
            "head_dim": D,
            "attention": LLAMA_ATTENTION,
        },  # fmt: skip
        "layers": list(layers),
        "components": ["q", "k", "v"],
        "dtype": dtype,
        "codec": codec,
        "compression_level": 1,
    }
    w = StoreWriter.create(
        path,
        attrs=attrs,
        train=train,
        eval=ev,
        state_shapes=shapes,
        chunk_tokens=chunk_tokens,
        inner_chunk_tokens=inner_chunk_tokens,
    )
    for c in w.todo_chunks():
        s, e = w.chunk_range(c)
        w.write_chunk(c, {key: encode_states(v[s:e], dtype) for key, v in truth.items()}, stats={})
    w.mark_complete({"tokens": train.num_tokens})
    return Path(path), train, truth


def word_tokenizer(vocab_size: int = 101):
    """A whitespace word-level fast tokenizer over "w3".."w{vocab_size-1}" (ids 0-2: pad, bos, eos)."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tmodels
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(tmodels.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_tiny_teacher(folder: str | Path, seed: int = 0, **config_overrides) -> Path:
    """Save a tiny random Llama teacher (tests/conftest.py sizes) + word tokenizer as an HF folder."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_llama_config

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(**config_overrides))
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return Path(folder)


def write_jsonl(path: str | Path, num_rows: int, seed: int = 0, bad_rows=()) -> Path:
    """Prompt/reasoning/answer rows over the word tokenizer's vocabulary; rows in `bad_rows` lack a reasoning."""
    import json

    rng = np.random.default_rng(seed)

    def words(n):
        return " ".join(f"w{int(i)}" for i in rng.integers(3, 101, size=n))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in range(num_rows):
            answer = words(int(rng.integers(1, 3)))
            row = {
                "prompt": words(int(rng.integers(4, 20))),
                "reasoning": "" if r in bad_rows else f"{words(int(rng.integers(2, 8)))} {answer}",
                "answer": answer,
            }
            f.write(json.dumps(row) + "\n")
    return path


def write_extract_config(tmp_path: Path, teacher: Path, num_rows: int = 24, bad_rows=(), **extract) -> Path:
    """A YAML config extracting the tiny teacher over fresh JSONL data into tmp_path/store.zarr."""
    import yaml

    train = write_jsonl(tmp_path / "data" / "train.jsonl", num_rows, seed=0, bad_rows=bad_rows)
    heldout = write_jsonl(tmp_path / "data" / "heldout.jsonl", 5, seed=1)
    cfg = {
        "data": {
            "train_path": str(train),
            "eval_path": str(heldout),
            "reasoning_prefix": " ",
            "answer_prefix": " w99 ",  # the word tokenizer knows only w3..w100
            "max_length": 64,
        },
        "teacher": {"path": str(teacher)},
        "student": {"config": dict(TINY_STUDENT)},
        "extract": {
            "store": str(tmp_path / "store.zarr"),
            "layers": "map",
            "batch_size": 3,
            "chunk_tokens": 64,
            "inner_chunk_tokens": 16,
            **extract,
        },
    }
    path = tmp_path / "extract.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _tiny_student_dict() -> dict:
    from tests.conftest import tiny_student_config

    d = tiny_student_config().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keep += ("num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")
    return {"model_type": "llama", **{k: d[k] for k in keep}}


TINY_STUDENT = _tiny_student_dict()


def store_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Every array of a store (by zarr path) as numpy, for bit-exact comparisons between stores."""
    from pipeline.store.codecs import quiet_codecs
    from pipeline.store.location import StoreLocation

    out = {}
    with quiet_codecs():
        g = StoreLocation(path).open_group("r")  # a folder, a URL or a StoreLocation
        for name, arr in _walk(g):
            out[name] = np.asarray(arr[:])
    return out


def _walk(group, prefix=""):
    for name, member in group.members():
        if hasattr(member, "shape"):
            yield prefix + name, member
        else:
            yield from _walk(member, prefix + name + "/")
