"""Logit KD in stage 2: offline (from the store) = online (teacher in-process), the objective's weights,
masked rows, preload, held-out teacher-fidelity metrics, and the errors before any step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alignment.losses.logit_kd import LogitKDLoss
from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.extraction.teacher_outputs import topk_logprobs
from pipeline.store.encoding import decode_logprobs, encode_logprobs
from pipeline.store.reader import KVStore
from tests.conftest import tiny_student_config
from tests.helpers_train import make_tiny_store, teacher_dir, tiny_train_config
from trainer.data.loader import StoreDataset, collate_right_pad
from trainer.objective.step import DistillModel, KDTerm, forward_step
from trainer.train import run_training

K = 12


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_tiny_store(tmp_path_factory.mktemp("kd") / "kd.zarr", num_train=16, num_eval=6, top_k=K)


def _student(seed=0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_student_config(), attn_implementation="sdpa")


def _batch(store, split="train", idx=(0, 3, 5, 9)):
    ds = StoreDataset(store, split, components=("logits",))
    return collate_right_pad(ds.__getitems__(list(idx)), pad_id=0)


def test_store_round_trip_and_preload(store):
    s = KVStore(store)
    assert s.has_logits("train") and s.has_logits("eval") and s.logits["top_k"] == K
    a = StoreDataset(store, "train", components=("logits",)).__getitems__([2, 7])
    b = StoreDataset(store, "train", components=("logits",), preload=True).__getitems__([2, 7])
    for x, y in zip(a, b):
        assert x["topk_logprobs"].shape == (x["input_ids"].shape[0], K)
        assert torch.equal(x["topk_logprobs"], y["topk_logprobs"])
        assert torch.equal(x["topk_indices"], y["topk_indices"])
        assert (x["topk_logprobs"].diff(dim=-1) <= 0).all()  # sorted descending


def test_offline_step_equals_online_teacher(store):
    """The KD step from the store = the same step with the teacher run in-process on the same batch."""
    from transformers import AutoModelForCausalLM

    batch = _batch(store)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir(store)).eval()
    with torch.no_grad():
        logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    vals, idx = topk_logprobs(logits, K)  # (B, T, K)
    online = dict(batch, topk_logprobs=decode_logprobs(encode_logprobs(vals)), topk_indices=idx)
    kd = KDTerm(LogitKDLoss("forward_kl", "bucket"), 1.0)
    results = []
    for b in (batch, online):
        model = DistillModel(_student(), None)
        res = forward_step(model, b, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=0.0, kd=kd)
        res.loss.backward()
        results.append((res.terms["loss_kd"].detach(), model.student.lm_head.weight.grad.clone()))
    (kd_a, g_a), (kd_b, g_b) = results
    torch.testing.assert_close(kd_a, kd_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_a, g_b, rtol=1e-3, atol=1e-6)


def test_objective_weights_and_masked_rows(store):
    batch = _batch(store)
    kd = KDTerm(LogitKDLoss("jsd", "renormalize", 2.0, 0.3), 0.7)
    res = forward_step(DistillModel(_student(), None), batch, ce_ids=[1, 2], struct_ids=[0], lambda_kv=0.0,
                       kd=kd, ce_weight=0.25)  # fmt: skip
    t = res.terms
    assert res.loss.item() == pytest.approx(0.25 * t["loss_ce"].item() + 0.7 * t["loss_kd"].item(), rel=1e-6)
    # rows CE does not count (prompt targets, padding) do not reach the KD term either
    noisy = dict(batch)
    seg_t = torch.nn.functional.pad(batch["segment_ids"][:, 1:], (0, 1), value=-1)  # target segments
    counted = (seg_t == 1) | (seg_t == 2)
    noisy["topk_logprobs"] = batch["topk_logprobs"].masked_fill(~counted[..., None], -3.0)
    noisy["topk_indices"] = batch["topk_indices"].masked_fill(~counted[..., None], 7)
    res2 = forward_step(DistillModel(_student(), None), noisy, ce_ids=[1, 2], struct_ids=[0], lambda_kv=0.0,
                        kd=kd, ce_weight=0.25)  # fmt: skip
    assert res2.terms["loss_kd"].item() == res.terms["loss_kd"].item()


def test_kd_training_run_logs_kd_and_teacher_fidelity(tmp_path, store):
    cfg = from_dict(
        KVMapConfig,
        tiny_train_config(
            tmp_path,
            store,
            **{
                "lambda_kv": 0.0,
                "loss_config.alpha_logit": 1.0,
                "loss_config.kd_tail": "bucket",  # the full-mass divergence: far from 0 at the start
                "eval.greedy_samples": 0,
                "train.ckpt_every": 0,
            },
        ),  # fmt: skip
    )
    m = run_training(cfg)
    assert m["train/loss_kd"] > 0
    assert 0 <= m["eval/agree_top1"] <= 1 and m["eval/kl_teacher"] > 0
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    kd = [r["loss_kd"] for r in rows if "loss_kd" in r]
    assert len(kd) == cfg.train.steps and kd[-1] < kd[0]  # the student moves toward the teacher


def test_kd_on_a_store_without_logits_is_a_one_line_error(tmp_path):
    plain = make_tiny_store(tmp_path / "plain.zarr", num_train=4, num_eval=0)
    cfg = from_dict(KVMapConfig, tiny_train_config(tmp_path, plain, **{"loss_config.alpha_logit": 1.0}))
    with pytest.raises(ConfigError, match=r"holds no teacher logits.*extract.components") as e:
        run_training(cfg)
    assert "\n" not in str(e.value) and str(plain) in str(e.value)
    assert not (Path(cfg.run_dir) / "metrics.jsonl").exists()


def test_schema_v1_store_reads_as_no_logits(tmp_path):
    plain = make_tiny_store(tmp_path / "old.zarr", num_train=4, num_eval=0)
    meta = json.loads((plain / "zarr.json").read_text())
    meta["attributes"]["schema_version"] = 1
    (plain / "zarr.json").write_text(json.dumps(meta))
    s = KVStore(plain)
    assert s.logits is None and not s.has_logits("train")
    assert s.read_sample(0)["k"].shape[0] == 4  # the structural arms keep working


def test_bad_kd_keys_are_one_line_errors(tmp_path, store):
    for key, value in (("kd_loss", "kl"), ("kd_tail", "zero"), ("kd_temperature", 0.0), ("kd_beta", 2.0),
                       ("alpha_logit", -1.0), ("ce_weight", float("nan"))):  # fmt: skip
        with pytest.raises(ConfigError, match=f"loss_config.{key}") as e:
            from_dict(KVMapConfig, tiny_train_config(tmp_path, store, **{f"loss_config.{key}": value}))
        assert "\n" not in str(e.value)


def test_stored_ids_past_the_student_head_are_refused(tmp_path, store):
    big = tmp_path / "big.zarr"
    import shutil

    shutil.copytree(store, big)
    shutil.copytree(teacher_dir(store), teacher_dir(big))
    meta = json.loads((big / "zarr.json").read_text())
    meta["attributes"]["teacher"]["vocab_size"] = 4096  # a teacher head larger than the student's 101 rows
    (big / "zarr.json").write_text(json.dumps(meta))
    import zarr

    from pipeline.store.codecs import quiet_codecs

    with quiet_codecs():
        arr = zarr.open_array(str(big / "train" / "logits" / "indices"), mode="r+")
        ids = np.asarray(arr[:])
        ids[3, 0] = 300
        arr[:] = ids
    cfg = from_dict(KVMapConfig, tiny_train_config(tmp_path, big, **{"loss_config.alpha_logit": 1.0}))
    with pytest.raises(ConfigError, match="token id 300 >= the student's 101 head rows"):
        run_training(cfg)


def test_ce_with_the_shared_log_sum_exp_equals_cross_entropy(store):
    """With KD at temperature 1 the step computes CE from the log-sum-exp KD reuses: same value, same grad."""
    batch = _batch(store)
    kd = KDTerm(LogitKDLoss("forward_kl", "bucket"), 0.0)  # alpha 0: the loss is CE alone
    grads = []
    for term in (kd, None):
        model = DistillModel(_student(), None)
        res = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[0], lambda_kv=0.0, kd=term)
        res.loss.backward()
        grads.append((res.terms["loss_ce"].detach(), model.student.lm_head.weight.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)
