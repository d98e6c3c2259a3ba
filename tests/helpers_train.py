"""Tiny learnable stores for the trainer's tests, written with stage 1's own pieces.

The teacher is the tiny random Llama of tests/conftest.py (4 layers / 6 heads / 2 KV heads / head_dim 16);
its states are captured with `pipeline.models.capture.capture_qkv` and written with `pipeline.store.writer.StoreWriter`
in the store schema, so the trainer reads exactly what extraction would write. The task is a toy
key->value retrieval with a learnable structure (so CE falls within a few steps):

    P: k1 v1 k2 v2 k3 v3 SEP q        R: q v(q)        A: ANS v(q)

`v(q)` is answer-bearing in R and A (not trivially: with tied embeddings an untrained model already
"copies" the current token, so A repeats nothing). Token ids live in [3, TINY_VOCAB).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from pipeline.store.encoding import encode_states
from pipeline.store.packed_split import PackedSplit
from tests.conftest import TINY_VOCAB, tiny_llama_config, tiny_student_config
from trainer.run.store_checks import tokenizer_fingerprint

SEP, ANS = 3, 4
KEYS = range(10, 50)
VALUES = range(50, TINY_VOCAB)


def tiny_tokenizer():
    """A word-level fast tokenizer over the tiny vocab: "<pad>" 0, "<s>" 1, "</s>" 2, "SEP" 3, "ANS" 4, "w5".."w100"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "SEP": SEP, "ANS": ANS} | {
        f"w{i}": i for i in range(5, TINY_VOCAB)
    }
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def teacher_dir(store: str | Path) -> Path:
    """Where `make_tiny_store` saves the tiny teacher + tokenizer (an HF folder) next to the store."""
    return Path(store).with_suffix(".teacher")


def retrieval_samples(n: int, seed: int, facts: int = 3) -> list[dict]:
    """Tokenised samples (input_ids, segment_ids, answer_mask) of the toy retrieval task."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        keys = rng.choice(list(KEYS), size=facts, replace=False)
        vals = rng.choice(list(VALUES), size=facts, replace=False)
        j = int(rng.integers(facts))
        prompt = [int(x) for kv in zip(keys, vals) for x in kv] + [SEP, int(keys[j])]
        reasoning = [int(keys[j]), int(vals[j])]
        answer = [ANS, int(vals[j])]
        ids = prompt + reasoning + answer
        seg = [0] * len(prompt) + [1] * len(reasoning) + [2] * len(answer)
        ans = [0] * len(prompt) + [0, 1] + [0, 1]
        out.append(
            {
                "input_ids": torch.tensor(ids),
                "segment_ids": torch.tensor(seg),
                "answer_mask": torch.tensor(ans, dtype=torch.bool),
            }
        )
    return out


def with_texts(samples: list[dict], tok) -> list[dict]:
    """Samples with the text of their words and the tokenizer's own char spans (what stage 1 records)."""
    out = []
    for s in samples:
        text = " ".join(tok.convert_ids_to_tokens(s["input_ids"].tolist()))
        enc = tok(text, return_offsets_mapping=True)
        assert enc["input_ids"] == s["input_ids"].tolist()
        out.append({**s, "text": text, "char_spans": torch.tensor(enc["offset_mapping"], dtype=torch.int32)})
    return out


def char_tokenizer():
    """A character-level fast tokenizer (ids < TINY_VOCAB): a student tokenizer unlike `tiny_tokenizer`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("SEPANSw0123456789 "))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {c: i + 3 for i, c in enumerate(chars)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def make_tiny_store(
    path: str | Path,
    num_train: int = 32,
    num_eval: int = 8,
    layers=(0, 1, 2, 3),
    components=("q", "k", "v"),
    dtype: str = "bfloat16",
    seed: int = 0,
    complete: bool = True,
    tokenizer_record: dict | None = None,
    poison: bool = False,
    top_k: int = 0,
    with_text: bool = False,
) -> Path:
    """Write a tiny store of the tiny teacher's real Q/K/V on the retrieval task; returns its path.

    The teacher and its tokenizer are saved as an HF folder at `teacher_dir(path)` (for live-teacher tools).
    `poison=True` writes a NaN into the teacher keys of the first sample (for NaN-detection tests).
    `top_k > 0` also stores the teacher's top-k log-probs of both splits (as stage 1 computes them:
    `pipeline.extraction.teacher_outputs.topk_logprobs` on an unpadded forward).
    `with_text`: also the rendered texts and char spans stage 1 keeps (`with_texts`).
    """
    from transformers import AutoModelForCausalLM

    from pipeline.extraction.teacher_outputs import topk_logprobs
    from pipeline.models.capture import capture_qkv
    from pipeline.store.encoding import encode_logprobs
    from pipeline.store.writer import StoreWriter

    torch.manual_seed(seed)
    tcfg = tiny_llama_config()
    teacher = AutoModelForCausalLM.from_config(tcfg, attn_implementation="sdpa").eval()
    tok = tiny_tokenizer()
    teacher.save_pretrained(teacher_dir(path))
    tok.save_pretrained(teacher_dir(path))
    train_s, eval_s = retrieval_samples(num_train, seed), retrieval_samples(num_eval, seed + 1)
    if with_text:
        train_s, eval_s = with_texts(train_s, tok), with_texts(eval_s, tok)
    train = PackedSplit.from_samples(train_s, rows=range(num_train))
    ev = PackedSplit.from_samples(eval_s, rows=range(num_eval)) if num_eval else None
    H, G, D = tcfg.num_attention_heads, tcfg.num_key_value_heads, tcfg.head_dim
    shapes = {"q": (H, D), "k": (G, D), "v": (G, D)}
    hf = tcfg.to_dict()
    attrs = {
        "teacher": {
            "path": "tiny",
            "model_type": "llama",
            "num_layers": tcfg.num_hidden_layers,
            "num_heads": H,
            "num_kv_heads": G,
            "head_dim": D,
            "hidden_size": tcfg.hidden_size,
            "vocab_size": TINY_VOCAB,
            "rope": {k: hf[k] for k in ("rope_parameters", "rope_theta") if hf.get(k) is not None},
            "attention": {
                k: [v] * tcfg.num_hidden_layers
                for k, v in (("scaling", D**-0.5), ("softcap", None), ("sliding_window", None))
            },  # fmt: skip
        },
        "tokenizer": tokenizer_record
        or {"name": "tiny", "vocab_size": len(tok), "hash": tokenizer_fingerprint(tok)},
        "layers": list(layers),
        "components": list(components),
        "dtype": dtype,
        "codec": "zstd-shuffle",
        "compression_level": 1,
        "segments": {"P": 0, "R": 1, "A": 2},
    }
    if top_k:
        splits = ["train", "eval"] if num_eval else ["train"]
        attrs["logits"] = {"top_k": top_k, "dtype": "float16", "index_dtype": "uint16", "splits": splits}
    states = {(layer, c): [] for layer in layers for c in components}
    topk = {"train": [], "eval": []}
    with torch.no_grad(), capture_qkv(teacher, layers=layers, components=components) as cap:
        for split, samples in (("train", train_s), ("eval", eval_s)):
            for s in samples:
                logits = teacher(input_ids=s["input_ids"][None], use_cache=False).logits[0]  # (T, V)
                if top_k:
                    topk[split].append(topk_logprobs(logits, top_k))
                if split == "train":
                    for (layer, c), acc in states.items():
                        acc.append(getattr(cap, c)[layer][0].transpose(0, 1))  # (T, X, D)
    full = {key: torch.cat(v) for key, v in states.items()}  # (N, X, D)
    for split, rows in topk.items():
        if rows:
            vals, idx = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])  # (N, K)
            topk[split] = {("logits", "values"): encode_logprobs(vals), ("logits", "indices"): idx.numpy()}
    if poison:
        full[(layers[-1], "k")][1, 0, 0] = float("nan")
    w = StoreWriter.create(
        path,
        attrs=attrs,
        train=train,
        eval=ev,
        state_shapes={c: shapes[c] for c in components},
        chunk_tokens=128,
        inner_chunk_tokens=32,
    )
    for c in w.todo_chunks():
        s, e = w.chunk_range(c)
        split = w.chunk_split(c)
        arrays = {key: encode_states(v[s:e], dtype) for key, v in full.items()} if split == "train" else {}
        if top_k:
            arrays[("logits", "values")] = topk[split][("logits", "values")][s:e]
            arrays[("logits", "indices")] = topk[split][("logits", "indices")][s:e].astype(np.uint16)
        w.write_chunk(c, arrays, stats={})
    if complete:
        w.mark_complete({"tokens": train.num_tokens})
    return Path(path)


def tiny_train_config(tmp_path: Path, store: Path, **overrides) -> dict:
    """A config dict for a few fast CPU steps of the tiny student on `store` (dotted keys in overrides)."""
    scfg = tiny_student_config().to_dict()
    keep = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ]
    student = {"model_type": "llama", **{k: scfg[k] for k in keep if k in scfg}}
    cfg = {
        "seed": 0,
        "run_dir": str(tmp_path / "run"),
        "student": {"config": student, "tokenizer": str(teacher_dir(store))},
        "teacher": {"path": str(teacher_dir(store))},
        "extract": {"store": str(store)},
        "kv_projection_mode": "structured",
        "lambda_kv": 1.0,
        "train": {
            "steps": 6,
            "batch_size": 4,
            "lr": 3e-3,
            "warmup_steps": 1,
            "ckpt_every": 3,
            "log_every": 1,
            "num_workers": 0,
            "progress": False,
        },
        "eval": {"every": 0, "batch_size": 8, "greedy_samples": 8, "max_new_tokens": 6},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def write_config(tmp_path: Path, cfg: dict) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]
