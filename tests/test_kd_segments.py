"""CE and logit KD on different segments (`train.kd_segments`): the fused step against a naive full-logits
reference in value and gradient, the default path unchanged, the config errors, and a run whose held-out
metrics count the rows either loss trains."""

from __future__ import annotations

import pytest
import torch

from alignment.losses.logit_kd import LogitKDLoss
from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.trained_tokens import check_trained_tokens
from tests.conftest import tiny_student_config
from tests.helpers_train import make_tiny_store, tiny_train_config
from trainer.objective.losses import masked_ce, segment_mask, shifted_targets
from trainer.objective.step import DistillModel, KDTerm, forward_step, loss_rows, token_terms
from trainer.train import run_training

K = 7
# dtype -> (rtol, atol) for the loss and every gradient (scaled by the gradient's largest entry). The token
# losses run in float32 for any student dtype (`logits.float()`), so float64 students get float32 tolerances.
TOL = {
    torch.float64: (1e-5, 1e-6),
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2e-2, 1e-2),
}  # bf16: 8-bit mantissa, eps 7.8e-3


def _batch(seed: int, B: int = 3, T: int = 15, vocab: int = 101):
    """Random P/R/A rows with right padding and random teacher top-K log-probs at every position."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    seg = torch.full((B, T), -1)
    for b in range(B):
        n = int(torch.randint(8, T + 1, (1,), generator=g))
        cut = sorted(torch.randint(1, n, (2,), generator=g).tolist())
        seg[b, : cut[0]], seg[b, cut[0] : cut[1]], seg[b, cut[1] : n] = 0, 1, 2
    logp = torch.log_softmax(torch.randn(B, T, vocab, generator=g, dtype=torch.float64), -1)
    vals, idx = logp.topk(K, dim=-1)
    return {
        "input_ids": ids,
        "attention_mask": (seg >= 0).long(),
        "segment_ids": seg,
        "topk_logprobs": vals.float(),
        "topk_indices": idx,
    }


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _naive(student, batch, ce_ids, kd_ids, kd: KDTerm):
    """Full (B, T, V) logits; CE = masked_ce over ce_ids; KD = the loss on the rows whose target is in
    kd_ids, selected from the full logits by a (B, T) mask (no fused log-sum-exp)."""
    full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ce = masked_ce(full, batch["input_ids"], batch["segment_ids"], ce_ids)
    _, target_seg = shifted_targets(batch["input_ids"], batch["segment_ids"])
    m = segment_mask(target_seg, kd_ids)
    loss_kd = kd.loss_fn(full[m].float(), batch["topk_logprobs"][m], batch["topk_indices"][m])
    return ce + kd.alpha * loss_kd, ce, loss_kd


def _close(got, ref, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.double(), ref.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("tau", [1.0, 2.0])  # 1.0: CE and KD share one log-sum-exp; 2.0: separate passes
@pytest.mark.parametrize("ce_ids,kd_ids", [([2], [1, 2]), ([1, 2], [2]), ([0], [1])])
def test_split_segments_match_naive_full_logits(dtype, tau, ce_ids, kd_ids):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_student_config(tie_word_embeddings=False)).to(dtype)
    model = DistillModel(student, None)
    kd = KDTerm(LogitKDLoss("forward_kl", "bucket", tau), 0.7)
    for seed in range(3):  # fresh inputs each time
        batch = _batch(seed)
        model.zero_grad()
        res = forward_step(model, batch, ce_ids=ce_ids, kd_ids=kd_ids, struct_ids=[0], lambda_kv=0.0, kd=kd)
        res.loss.backward()
        got_g = _grads(model)
        model.zero_grad()
        ref, ref_ce, ref_kd = _naive(student, batch, ce_ids, kd_ids, kd)
        ref.backward()
        ref_g = _grads(model)
        _close(res.terms["loss_ce"].detach(), ref_ce.detach(), dtype)
        _close(res.terms["loss_kd"].detach(), ref_kd.detach(), dtype)
        _close(res.loss.detach(), ref.detach(), dtype)
        assert ref_g.keys() == got_g.keys()
        for n in ref_g:
            scale = ref_g[n].double().abs().max().clamp_min(1e-12)
            _close(got_g[n] / scale, ref_g[n] / scale, dtype)


def test_kd_segments_equal_to_ce_segments_is_the_default_path():
    """kd_ids == ce_ids counts the same rows as kd_ids None: the same loss and gradient, bit for bit in f32."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(1)
    model = DistillModel(LlamaForCausalLM(tiny_student_config(tie_word_embeddings=False)), None)
    kd = KDTerm(LogitKDLoss("forward_kl", "renormalize"), 1.0)
    batch = _batch(5)
    out = []
    for kd_ids in (None, [1, 2]):
        model.zero_grad()
        res = forward_step(model, batch, ce_ids=[1, 2], kd_ids=kd_ids, struct_ids=[0], lambda_kv=0.0, kd=kd)
        res.loss.backward()
        out.append((res.loss.detach(), _grads(model)))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(out[0][1][n], out[1][1][n]) for n in out[0][1])


def test_cross_tokenizer_rows_and_kd_segments_both_apply():
    """With `kd_rows` in the batch (cross-tokenizer), KD counts the rows both masks keep."""
    g = torch.Generator().manual_seed(3)
    batch = _batch(7)
    keep, targets, ce_rows, kd_rows = loss_rows(batch["input_ids"], batch["segment_ids"], [2], [1, 2])
    assert (
        ce_rows.shape == kd_rows.shape == targets.shape and kd_rows.all() and 0 < ce_rows.sum() < len(targets)
    )
    batch["kd_rows"] = torch.rand(keep.shape, generator=g) < 0.6
    logits = torch.randn(int(keep.sum()), 101, generator=g, requires_grad=True)
    kd = KDTerm(LogitKDLoss("forward_kl", "bucket"), 1.0)
    terms = token_terms(logits, targets, batch, keep, kd, ce_rows, kd_rows)
    both = batch["kd_rows"][keep] & kd_rows
    ref = kd.loss_fn(logits[both], batch["topk_logprobs"][keep][both], batch["topk_indices"][keep][both])
    torch.testing.assert_close(terms["loss_kd"], ref)
    ref_ce = torch.nn.functional.cross_entropy(logits[ce_rows], targets[ce_rows])
    torch.testing.assert_close(terms["loss_ce"], ref_ce)


def test_kd_segments_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"'train.kd_segments'.*'X'") as e:
        from_dict(KVMapConfig, {"train": {"kd_segments": ["R", "X"]}})
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"'train.kd_segments'.*alpha_logit 0") as e:
        from_dict(KVMapConfig, {"train": {"kd_segments": ["R", "A"]}, "loss_config": {"alpha_logit": 0.0}})
    assert "\n" not in str(e.value)
    cfg = from_dict(
        KVMapConfig,
        {"train": {"ce_segments": ["A"], "kd_segments": ["R"]}, "loss_config": {"alpha_logit": 1.0}},
    )
    with pytest.raises(ValueError, match=r"train.kd_segments=\['R'\] selects no token"):
        check_trained_tokens(cfg, {"P": 10, "R": 0, "A": 4}, "messages", "data.train_path='x.jsonl'")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("kdseg") / "s.zarr", num_train=16, num_eval=6, top_k=K)


def test_run_with_ce_on_answer_and_kd_on_reasoning_and_answer(tmp_path, store):
    """A run trains; its held-out CE 'trained' counts R and A (the union), so it compares with a CE + KD on
    [R, A] run."""
    common = {"lambda_kv": 0.0, "loss_config.alpha_logit": 1.0, "eval.greedy_samples": 0,
              "train.ckpt_every": 0, "train.steps": 3}  # fmt: skip
    split = from_dict(
        KVMapConfig,
        tiny_train_config(tmp_path / "a", store, **common, **{"train.ce_segments": ["A"],
                                                              "train.kd_segments": ["R", "A"]}),
    )  # fmt: skip
    m = run_training(split)
    assert m["train/loss_kd"] > 0 and m["train/loss_ce"] > 0
    # eval/ce_trained = CE over R and A tokens together, between the per-segment CEs
    lo, hi = sorted((m["eval/ce_R"], m["eval/ce_A"]))
    assert lo - 1e-9 <= m["eval/ce_trained"] <= hi + 1e-9
    assert m["eval/ce_trained"] != pytest.approx(m["eval/ce_A"])
