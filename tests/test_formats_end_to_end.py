"""Every hand-made 16-row format file through both stages: stage 1 writes segment ids equal to an independent
rendering with the teacher's chat template, and two training steps on each store have non-zero CE and KD.

The teacher is a tiny random Llama carrying the embedded teacher's tokenizer (SmolLM2's vocabulary and ChatML
template), so the formats meet a real chat template at test speed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config.configlib import from_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.samples import load_samples
from pipeline.extract import run_extraction
from pipeline.models.load import load_tokenizer
from pipeline.store.reader import KVStore
from tests.conftest import tiny_llama_config, tiny_student_config
from tests.helpers_formats import write_format_files
from tests.test_formats import VARIANTS, reference_segments
from trainer.train import run_training

VOCAB = 49152


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("chat_teacher") / "t"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_llama_config(vocab_size=VOCAB)).save_pretrained(folder)
    load_tokenizer("builtin:smollm2-135m-instruct").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_format_files(tmp_path_factory.mktemp("format_files"))


def _config(tmp: Path, teacher: Path, data: Path) -> KVMapConfig:
    student = tiny_student_config(vocab_size=VOCAB).to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    keep += ("num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings")
    return from_dict(
        KVMapConfig,
        {
            "run_dir": str(tmp / "run"),
            "data": {"train_path": str(data), "eval_path": None, "max_length": 128},
            "teacher": {"path": str(teacher)},
            "student": {
                "tokenizer": str(teacher),
                "config": {"model_type": "llama", **{k: student[k] for k in keep}},
            },
            "extract": {
                "store": str(tmp / "s.zarr"),
                "components": ["logits"],
                "logits_top_k": 8,
                "chunk_tokens": 512,
            },
            "lambda_kv": 0.0,
            "loss_config": {"alpha_logit": 1.0},
            "train": {
                "steps": 2,
                "batch_size": 4,
                "num_workers": 0,
                "ce_segments": ["R", "A"],
                "progress": False,
            },
            "eval": {"every": 0, "greedy_samples": 0},
        },
    )


@pytest.mark.parametrize("variant", [*VARIANTS, "saved_folder"])
def test_both_stages_on_each_format(teacher, files, tmp_path, variant):
    cfg = _config(tmp_path, teacher, files[variant])
    run_extraction(cfg)
    store, tok = KVStore(cfg.extract.store), load_tokenizer(str(teacher))
    same = total = 0
    for i, row in enumerate(load_samples(cfg.data, "train")):
        _, ref = reference_segments(tok, row)
        stored = store.read_sample(i, components=())["segment_ids"]
        same += int((stored == torch.tensor(ref)).sum())
        total += len(ref)
    assert store.num_samples() == 16 and same / total >= 0.995, f"{variant}: {same}/{total}"
    metrics = run_training(cfg)
    assert metrics["train/loss_ce"] > 0 and metrics["train/loss_kd"] > 0
