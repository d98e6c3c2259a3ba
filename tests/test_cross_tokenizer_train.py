"""Stage 2 across tokenizers: the cross path with identical tokenizers gives today's losses, a character-level
student trains on a word-level teacher's store end to end, and the refusals before any step."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from alignment import create_aligner, create_structural_loss
from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.models.geometry import teacher_config_from_attrs
from pipeline.store.reader import KVStore
from tests.conftest import tiny_student_config
from tests.helpers_train import (
    char_tokenizer,
    make_tiny_store,
    teacher_dir,
    tiny_tokenizer,
    tiny_train_config,
)
from trainer.data.cross_tokens import CrossTokenDataset, collate_cross
from trainer.data.loader import StoreDataset, collate_right_pad
from trainer.objective.step import DistillModel, forward_step
from trainer.train import run_training

torch.set_num_threads(1)
COMPS = ("q", "k", "v", "logits")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    path = make_tiny_store(root / "x.zarr", num_train=8, num_eval=4, top_k=8, with_text=True)
    char_tokenizer().save_pretrained(root / "char_tok")
    return path


def _model(store, attn_target):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_config(tiny_student_config(), attn_implementation="sdpa")
    t_cfg = teacher_config_from_attrs(KVStore(store).attrs, store)
    aligner = create_aligner("structured", t_cfg, student.config)
    loss = create_structural_loss(alpha_attn=0.5, attn_target=attn_target, sink="drop")
    return DistillModel(student, aligner), loss


@pytest.mark.parametrize("attn_target", ["projected", "teacher"])
def test_identical_tokenizers_through_the_cross_path_give_todays_losses(store, attn_target):
    idx, layers = [0, 3, 5], _model(store, attn_target)[0].aligner.teacher_layers
    plain = collate_right_pad(StoreDataset(store, layers=layers, components=COMPS).__getitems__(idx), 0)
    cross_ds = CrossTokenDataset(store, tokenizer=tiny_tokenizer(), layers=layers, components=COMPS)
    cross = collate_cross(cross_ds.__getitems__(idx), 0)
    assert torch.equal(plain["input_ids"], cross["input_ids"]) and cross["map_rows"].equal(
        plain["attention_mask"] > 0
    )
    results = []
    for batch in (plain, cross):
        model, loss_fn = _model(store, attn_target)
        res = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[0, 1, 2], lambda_kv=1.0, loss_fn=loss_fn)
        res.loss.backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append(({k: float(v.detach()) for k, v in res.terms.items()}, res.logs["attn_kl"], grads))
    (terms_a, kl_a, g_a), (terms_b, kl_b, g_b) = results
    for key in terms_a:
        assert terms_b[key] == pytest.approx(terms_a[key], rel=1e-6, abs=1e-7), key
    assert kl_b == pytest.approx(kl_a, abs=1e-6)  # float32 rounding: terms ~1 that cancel to ~1e-4
    torch.testing.assert_close(g_b, g_a, rtol=1e-5, atol=1e-6)


def test_a_character_level_student_trains_on_a_word_level_store(store, tmp_path):
    cfg = tiny_train_config(
        tmp_path,
        store,
        **{
            "student.tokenizer": str(store.parent / "char_tok"),
            "train.steps": 3,
            "train.ckpt_every": 0,
            "loss_config.alpha_logit": 1.0,
            "loss_config.kd_cross": "exact_uld",
            "loss_config.attn_target": "teacher",
            "eval.greedy_samples": 2,
        },
    )
    metrics = run_training(from_dict(KVMapConfig, cfg))
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss_kd" in r]
    assert len(logged) == 3 and all(
        r["loss_kd"] > 0 and r["loss_struct"] > 0 and r["kd_rows"] > 0 for r in logged
    )
    assert metrics["eval/samples"] == 4 and metrics["eval/ce"] == metrics["eval/ce"]  # not NaN
    # the student's items: characters; every row of W sums to 1, spaces (between teacher words) have none
    item = CrossTokenDataset(store, tokenizer=char_tokenizer(), components=("logits",))[1]
    assert len(item["input_ids"]) > 2 * len(KVStore(store).read_sample(1, components=())["input_ids"])
    w = item["map_weight"].sum(1)
    assert torch.allclose(w[item["map_rows"]], torch.ones(int(item["map_rows"].sum())))
    text, _ = KVStore(store).read_texts([1])[0]
    assert [text[i] == " " for i in range(len(text))] == (~item["map_rows"]).tolist()


def test_refusals_before_any_step(store, tmp_path):
    old = make_tiny_store(tmp_path / "old.zarr", num_train=4, num_eval=0, top_k=4)
    char_tok = str(store.parent / "char_tok")
    bad = [
        (old, {"student.tokenizer": char_tok}, "keeps no texts / char_spans for split 'train'"),
        (store, {"student.tokenizer": char_tok, "loss_config.alpha_logit": 1.0}, "loss_config.kd_cross=None"),
        (store, {"loss_config.kd_cross": "uld"}, "loss_config.kd_cross='uld': the student's tokenizer"),
    ]
    for path, overrides, match in bad:
        overrides = {"student.tokenizer": str(teacher_dir(path)), **overrides}
        cfg = tiny_train_config(tmp_path / match[:8].replace(" ", "_"), path, **overrides)
        with pytest.raises(ConfigError, match=match):
            run_training(from_dict(KVMapConfig, cfg))


GEMMA_LIKE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def test_each_side_renders_the_content_with_its_own_chat_template(tmp_path):
    """Teacher: SmolLM2's ChatML; student: the same BPE under a Gemma-like template. W must pair every content
    token with the teacher token of the same id, one to one, and give neither side's template tokens a row."""
    import copy

    from pipeline.config.kvmap import DataConfig
    from pipeline.data.formats import render_row
    from pipeline.data.samples import token_segments, tokenize_sample
    from pipeline.models.load import load_tokenizer
    from trainer.data.cross_tokens import StudentTokens, student_item

    t_tok = load_tokenizer("builtin:smollm2-135m-instruct")
    s_tok = copy.deepcopy(t_tok)
    s_tok.chat_template = GEMMA_LIKE
    # atomic turn markers, as Gemma's are: otherwise BPE merges "?" + "<" across the content's edge (a
    # boundary-straddling token: it keeps a row, onto "?", but its id differs)
    s_tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    cfg = DataConfig(chat_template=True, answer_prefix="\nSo the answer is ")
    row = {"prompt": "Which code opens box 7?", "reasoning": "Box 7 opens with 4821.", "answer": "4821"}
    t = tokenize_sample(row, t_tok, cfg)
    r = render_row(row, s_tok, cfg, "prr")
    ids, seg, ans, spans = token_segments(r, s_tok)
    assert "<start_of_turn>model\n" in r.text and "<|im_start|>" in t["text"]
    s = StudentTokens(ids, spans.numpy().astype("int64"), r.text, r.content, seg, ans)
    sample = {k: t[k] for k in ("input_ids", "segment_ids", "answer_mask")} | {"index": torch.tensor(0)}
    item = student_item(sample, t["text"], t["char_spans"].numpy(), s)
    rows = item["map_rows"]
    content = (spans != -1).all(1)
    assert rows.equal(content) and 0 < int(rows.sum()) < len(ids)
    for i in torch.nonzero(rows).flatten().tolist():
        j = item["map_index"][i][item["map_weight"][i] > 0]
        assert len(j) == 1 and int(t["input_ids"][j]) == int(ids[i])  # one to one, same token
        assert int(t["segment_ids"][j]) == int(seg[i])
    assert item["kd_rows"].equal(rows)  # identical content tokens end together
    # stage 2 renders the student's side from the source rows the store records (store sample 0 = row 1)
    from trainer.data.cross_tokens import RowRenderer

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({**row, "answer": "1"}) + "\n" + json.dumps(row) + "\n")
    got = RowRenderer(dataclasses.replace(cfg, train_path=str(path)), "train", [1, 0], s_tok)(0)
    assert got.input_ids.equal(ids) and got.content == r.content and got.segment_ids.equal(seg)
