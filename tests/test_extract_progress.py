"""Extraction progress and summary units: the bar advances once per forward batch (not once per write
chunk), and a multi-process run's summary adds up every rank's work."""

from __future__ import annotations

import torch

from pipeline.extraction.chunk import chunk_batches, extract_chunk
from pipeline.extraction.summary import add_up_ranks, combine_ranks
from pipeline.models.capture import capture_qkv
from tests.conftest import tiny_llama_config
from tests.helpers_store import random_split


def test_on_batch_is_called_once_per_forward_batch_and_adds_up_to_the_chunk():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="sdpa").eval()
    packed = random_split(12, seed=3)
    start, end = 10, 10 + 96  # a chunk cutting samples at both edges
    calls: list[int] = []
    with torch.inference_mode(), capture_qkv(model, [0, 2], ("k",)) as cap:
        bufs, stats = extract_chunk(model, cap, packed, start, end, [0, 2], ["k"], "bfloat16", 1, 0,
                                    on_batch=calls.append)  # fmt: skip
    batches = chunk_batches(packed, start, end, 1)  # batch size 1: one batch per sample
    assert len(batches) >= 3 and len(calls) == len(batches)
    assert all(n > 0 for n in calls) and sum(calls) == end - start == stats["tokens"]
    assert bufs[(0, "k")].shape[0] == end - start


def test_summary_adds_up_ranks():
    # tokens and CPU seconds add up; the loop's wall time is the slowest rank's (ranks run side by side)
    assert combine_ranks([(320, 1.0, 0.5), (290, 1.25, 0.75)]) == (610, 1.25, 1.25)
    assert combine_ranks([(7, 2.0, 3.0)]) == (7, 2.0, 3.0)

    class OneProcess:
        num_processes = 1

    assert add_up_ranks(OneProcess(), 5, 1.5, 2.5) == (5, 1.5, 2.5)  # no collective in a 1-process run


def test_summary_names_why_samples_were_skipped():
    from pipeline.extraction.summary import skip_reasons

    c = {"skipped": 6, "dropped_too_long": 3, "bad_rows": {"answer": 2, "prompt": 0}, "truncated": 1}
    assert skip_reasons(c) == ' (too long 3, bad field "answer" 2, other 1; truncated 1)'
    assert skip_reasons({"skipped": 0, "dropped_too_long": 0, "bad_rows": {}, "truncated": 0}) == ""
