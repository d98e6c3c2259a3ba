"""Shared fixtures: tiny random-weight HF configs with odd, unequal sizes so swapped axes fail.

Teacher: 4 layers / 6 query heads / 2 KV heads / head_dim 16.  Student: 3 / 4 / 2 / 8.
Hidden sizes deliberately differ from heads*head_dim where the architecture allows.
"""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)

TINY_VOCAB = 101


# Shared by the tiny teacher architectures: 4 layers, 6 query heads, 2 KV heads.
_TEACHER_KW = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=48,
    intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=6,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=10000.0,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    return LlamaConfig(**{**_TEACHER_KW, "head_dim": 16, "tie_word_embeddings": True, **overrides})


def tiny_student_config(**overrides):
    kw = dict(
        hidden_size=24,
        intermediate_size=40,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    kw.update(overrides)
    return tiny_llama_config(**kw)


def tiny_qwen2_config(**overrides):
    from transformers import Qwen2Config

    return Qwen2Config(**{**_TEACHER_KW, **overrides})  # head_dim = 48 / 6 = 8


@pytest.fixture
def teacher_config():
    return tiny_llama_config()


@pytest.fixture
def student_config():
    return tiny_student_config()


# The local S3 server (moto) fixture `s3` for the object-storage tests (tests/test_s3_store.py).
from tests.s3_server import s3  # noqa: E402, F401
