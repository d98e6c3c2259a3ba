"""Logits at the CE rows only (trainer.objective.step): same loss and gradients as full logits + masked_ce."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_student_config
from trainer.objective.losses import masked_ce
from trainer.objective.step import DistillModel, forward_step

# dtype -> (rtol, atol) for the loss and every parameter gradient
TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-3)}


def _batch(seed: int, B: int = 3, T: int = 13, vocab: int = 101):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    seg = torch.full((B, T), -1)
    for b in range(B):
        n = int(torch.randint(6, T + 1, (1,), generator=g))  # right padding after n real tokens
        cut = sorted(torch.randint(1, n, (2,), generator=g).tolist())
        seg[b, : cut[0]], seg[b, cut[0] : cut[1]], seg[b, cut[1] : n] = 0, 1, 2
    return {"input_ids": ids, "attention_mask": (seg >= 0).long(), "segment_ids": seg}


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ce_ids", [[1, 2], [0, 1, 2], [2]])
def test_selected_rows_match_full_logits_in_value_and_gradient(dtype, ce_ids):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_student_config(tie_word_embeddings=False)).to(dtype)
    model = DistillModel(student, None)
    assert model.selects_logits
    for seed in range(3):  # fresh inputs each time
        batch = _batch(seed)
        model.zero_grad()
        res = forward_step(model, batch, ce_ids=ce_ids, struct_ids=[0, 1, 2], lambda_kv=0.0)
        res.loss.backward()
        got, got_g = res.loss.detach(), _grads(model)
        assert res.logits.shape[0] < batch["input_ids"].numel()  # rows were really dropped

        model.zero_grad()
        full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        ref = masked_ce(full, batch["input_ids"], batch["segment_ids"], ce_ids)
        ref.backward()
        rtol, atol = TOL[dtype]
        torch.testing.assert_close(got, ref.detach(), rtol=rtol, atol=atol)
        ref_g = _grads(model)
        assert ref_g.keys() == got_g.keys()
        for n in ref_g:
            scale = ref_g[n].float().abs().max().clamp_min(1e-6)
            torch.testing.assert_close(
                got_g[n].float() / scale, ref_g[n].float() / scale, rtol=rtol, atol=atol
            )


def test_head_with_logit_softcapping_falls_back_to_the_models_own_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    cfg = Gemma2Config(
        vocab_size=101, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, final_logit_softcapping=5.0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    student = Gemma2ForCausalLM(cfg)
    model = DistillModel(student, None)
    assert not model.selects_logits  # decoder + lm_head by hand would skip the softcap
    batch = _batch(1)
    res = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=0.0)
    full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ref = masked_ce(full, batch["input_ids"], batch["segment_ids"], [1, 2])
    torch.testing.assert_close(res.loss, ref, rtol=1e-5, atol=1e-6)


def test_batch_without_counted_targets_gives_zero_and_finite_gradients():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = DistillModel(LlamaForCausalLM(tiny_student_config()), None)
    batch = _batch(2)
    batch["segment_ids"] = batch["segment_ids"].clamp(max=0)  # P and padding only, CE counts A only
    res = forward_step(model, batch, ce_ids=[2], struct_ids=[0], lambda_kv=0.0)
    res.loss.backward()
    assert float(res.loss.detach()) == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_with_an_aligner_the_ce_path_is_unchanged_and_the_struct_term_adds_its_gradient():
    """Capture + selected logits: CE and student gradients equal the aligner-free model at lambda 0, and
    lambda > 0 adds exactly lambda x the structural loss (value) on top of the same CE."""
    from transformers import LlamaForCausalLM

    from alignment import create_aligner, create_structural_loss
    from tests.conftest import tiny_llama_config

    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_student_config())
    teacher_cfg = tiny_llama_config()
    aligner = create_aligner("structured", teacher_cfg, student.config)
    batch = _batch(3)
    B, T = batch["input_ids"].shape
    L = len(aligner.teacher_layers)
    g = torch.Generator().manual_seed(1)
    batch["q_t"] = torch.randn(B, L, 6, T, 16, generator=g)  # (B, L_sel, H_t, T, D_t)
    batch["k_t"], batch["v_t"] = (torch.randn(B, L, 2, T, 16, generator=g) for _ in range(2))
    loss_fn = create_structural_loss(attn_target="teacher")

    plain = DistillModel(student, None)
    ref = forward_step(plain, batch, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=0.0)
    ref.loss.backward()
    ref_g = _grads(student)
    student.zero_grad()

    model = DistillModel(student, aligner)
    res0 = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=0.0, loss_fn=loss_fn)
    res0.loss.backward()
    torch.testing.assert_close(res0.terms["loss_ce"], ref.loss, rtol=1e-6, atol=1e-7)
    got_g = _grads(student)
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-5, atol=1e-7)
    res1 = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=0.5, loss_fn=loss_fn)
    assert float(res1.terms["loss_struct"].detach()) > 0
    torch.testing.assert_close(
        res1.loss, res1.terms["loss_ce"] + 0.5 * res1.terms["loss_struct"], rtol=1e-6, atol=1e-7
    )
    torch.testing.assert_close(res1.terms["loss_ce"], ref.loss, rtol=1e-6, atol=1e-7)
