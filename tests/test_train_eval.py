"""Held-out evaluation: per-segment CE and answer accuracy against a naive computation, batch-size
invariance, and greedy exact match (batched left-padded decoding, answer extraction)."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config.train import EvalConfig
from pipeline.store.reader import KVStore
from tests.conftest import tiny_student_config
from tests.helpers_train import make_tiny_store, teacher_dir
from trainer.data.loader import StoreDataset
from trainer.eval.evaluate import evaluate
from trainer.eval.greedy import greedy_exact_match, greedy_generate, reference_of


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    store = make_tiny_store(tmp_path_factory.mktemp("s") / "tiny.zarr", num_train=4, num_eval=7)
    tok = AutoTokenizer.from_pretrained(teacher_dir(store))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_student_config()).eval()
    return store, tok, model


def test_eval_matches_naive_and_is_batch_size_invariant(setup):
    store, tok, model = setup
    acc = Accelerator(cpu=True)
    a = evaluate(acc, model, tok, store, "eval", EvalConfig(batch_size=3, greedy_samples=0), 0)
    b = evaluate(acc, model, tok, store, "eval", EvalConfig(batch_size=8, greedy_samples=0), 0)
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == pytest.approx(b[k], rel=1e-9), k
    ks = KVStore(store)
    sums = {j: [0.0, 0] for j in range(3)}
    hits = {1: [0, 0], 2: [0, 0]}
    with torch.no_grad():
        for i in range(ks.num_samples("eval")):
            s = ks.read_sample(i, "eval")
            logits = model(s["input_ids"][None]).logits[0]  # (T, V)
            for t in range(1, len(s["input_ids"])):
                seg = int(s["segment_ids"][t])
                target = int(s["input_ids"][t])
                sums[seg][0] += float(-torch.log_softmax(logits[t - 1].double(), -1)[target])
                sums[seg][1] += 1
                if s["answer_mask"][t] and seg in hits:
                    hits[seg][0] += int(logits[t - 1].argmax()) == target
                    hits[seg][1] += 1
    assert a["eval/ce"] == pytest.approx(
        sum(v[0] for v in sums.values()) / sum(v[1] for v in sums.values()), rel=1e-5
    )
    for j, name in enumerate("PRA"):
        assert a[f"eval/ce_{name}"] == pytest.approx(sums[j][0] / sums[j][1], rel=1e-5)
    assert a["eval/acc_R"] == hits[1][0] / hits[1][1] and a["eval/acc_A"] == hits[2][0] / hits[2][1]
    assert a["eval/samples"] == 7 and "eval/exact_match" not in a  # greedy decoding off: no nan metric


def test_batched_left_padded_greedy_equals_one_by_one(setup):
    _, _, model = setup
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
    batched = greedy_generate(model, prompts, 5, pad_id=0, eos_id=None, device="cpu")
    for p, got in zip(prompts, batched):
        assert got == greedy_generate(model, [p], 5, pad_id=0, eos_id=None, device="cpu")[0]


class _Oracle(torch.nn.Module):
    """generate() continues each prompt with a scripted continuation (tests the EM bookkeeping)."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        rows = []
        for ids, m in zip(input_ids, attention_mask):
            prompt = tuple(ids[m.bool()].tolist())
            cont = (self.script[prompt] + [0] * max_new_tokens)[:max_new_tokens]
            rows.append(ids.tolist() + cont)
        return torch.tensor(rows)


def test_exact_match_reads_the_answer_after_the_lead_in(setup):
    store, tok, _ = setup
    ds = StoreDataset(store, "eval")
    script = {}
    for i in range(len(ds)):
        s = ds[i]
        prompt, lead, answer = reference_of(s, tok)
        assert lead == "ANS" and answer.startswith("w")
        rest = s["input_ids"][len(prompt) :].tolist()  # R + A of the sample: the right continuation
        if i % 2:  # every other sample: a wrong answer token
            rest[-1] = 5 if rest[-1] != 5 else 6
        script[tuple(prompt)] = rest
    hits, n = greedy_exact_match(_Oracle(script), tok, ds, list(range(len(ds))), 8, 3, "cpu")
    assert n == 7 and hits == 4
