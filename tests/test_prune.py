"""pipeline/prune.py: students cut from the teacher, and `align.init: from_prune`.

Tiny random Llama (tied embeddings, head_dim 16 != hidden / heads) and Qwen2 (q/k/v biases, untied)
teachers with GQA (6 query heads over 2 KV heads) and odd sizes (hidden 48, MLP 64).
"""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from alignment.config import AlignConfig
from pipeline.config.configlib import ConfigError, from_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.config.prune import PruneConfig
from pipeline.models.capture import capture_qkv
from pipeline.prune import calibration_batches, run_prune
from pipeline.pruning.importance import compute_importance
from pipeline.pruning.select import check_counts, make_plan
from pipeline.pruning.slicing import build_pruned_model, teacher_shape
from tests.conftest import tiny_llama_config, tiny_qwen2_config
from tests.helpers_store import save_tiny_teacher, write_jsonl

ARCHS = {"llama": tiny_llama_config, "qwen2": tiny_qwen2_config}


def _teacher(arch: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(ARCHS[arch](), attn_implementation="sdpa").eval()


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 101, (3, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding: must not count in the scores
    return ids, mask


def _prune(teacher, layers, **counts):
    ids, mask = _batch()
    scores = compute_importance(teacher, [(ids, mask)])
    shape = teacher_shape(teacher)
    plan = make_plan(layers, check_counts(PruneConfig(**counts), shape), scores, shape)
    return build_pruned_model(teacher, plan), plan


@torch.no_grad()
def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "counts", [{}, dict(heads_per_kv_group=3, kv_heads=2, intermediate_size=64, hidden_size=48)]
)
def test_keeping_everything_gives_the_teacher_exactly(arch, counts):
    teacher = _teacher(arch)
    student, plan = _prune(teacher, [0, 1, 2, 3], **counts)
    ids, mask = _batch()
    assert torch.equal(_logits(student, ids, mask), _logits(teacher, ids, mask))
    assert plan.q_heads == [list(range(6))] * 4 and plan.hidden == list(range(48))


@pytest.mark.parametrize("arch", ARCHS)
def test_depth_prune_equals_the_teacher_with_those_layers_skipped(arch):
    teacher = _teacher(arch)
    student, _ = _prune(teacher, [0, 2])
    ids, mask = _batch()
    skip = [
        teacher.model.layers[i].register_forward_hook(
            lambda m, args, kwargs, out: kwargs.get("hidden_states", args[0] if args else None),
            with_kwargs=True,
        )
        for i in (1, 3)
    ]
    try:
        ref = _logits(teacher, ids, mask)
    finally:
        for h in skip:
            h.remove()
    torch.testing.assert_close(_logits(student, ids, mask), ref, rtol=0, atol=1e-6)
    assert student.config.num_hidden_layers == 2
    assert not torch.allclose(ref, _logits(teacher, ids, mask))  # the reference really skipped layers


def _attention(q, k, scale):
    """(B, T, D) query / key of one head -> (B, T, T) causal attention probabilities."""
    s = (q @ k.transpose(-1, -2)) * scale
    causal = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    return s.masked_fill(~causal, float("-inf")).softmax(-1)


@pytest.mark.parametrize("arch", ARCHS)
def test_width_prune_keeps_each_heads_attention_at_layer_0(arch):
    teacher = _teacher(arch)
    student, plan = _prune(teacher, [0, 3], heads_per_kv_group=2, kv_heads=1, intermediate_size=37)
    assert student.config.num_attention_heads == 2 and student.config.num_key_value_heads == 1
    ids = _batch()[0]
    with torch.no_grad(), capture_qkv(teacher, [0]) as ct, capture_qkv(student, [0]) as cs:
        teacher(input_ids=ids, use_cache=False)
        student(input_ids=ids, use_cache=False)
    scale = ct.scaling[0]
    assert (plan.kv_heads[0][0] * 3) <= min(plan.q_heads[0]) and max(plan.q_heads[0]) < (
        plan.kv_heads[0][0] + 1
    ) * 3
    for s, h in enumerate(plan.q_heads[0]):
        a_t = _attention(ct.q[0][:, h], ct.k[0][:, h // 3], scale)
        a_s = _attention(cs.q[0][:, s], cs.k[0][:, s // 2], cs.scaling[0])
        torch.testing.assert_close(a_s, a_t, rtol=0, atol=1e-6)


def test_importance_is_deterministic_and_ignores_padding():
    teacher = _teacher("llama")
    ids, mask = _batch()
    a, b = (
        compute_importance(teacher, [(ids, mask)]),
        compute_importance(teacher, [(ids[:2], mask[:2]), (ids[2:], mask[2:])]),
    )
    for key in ("depth", "heads", "mlp", "hidden"):
        torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=0)  # batching changes nothing
    padded = ids.clone()
    padded[1, 9:] = 0
    c = compute_importance(teacher, [(padded, mask)])
    torch.testing.assert_close(a["heads"], c["heads"], rtol=1e-12, atol=0)  # pad ids do not count
    assert a["tokens"] == int(mask.sum()) and (a["depth"] > 0).all()


# --- the CLI path: folders, prune_meta.json, bad input ---


def _cfg(tmp_path, **prune) -> KVMapConfig:
    teacher = tmp_path / "teacher"
    if not teacher.exists():
        save_tiny_teacher(teacher)
        write_jsonl(tmp_path / "train.jsonl", 20, seed=0)
    data = {"train_path": str(tmp_path / "train.jsonl"), "eval_path": None, "reasoning_prefix": " "}
    data["answer_prefix"] = " w99 "
    return from_dict(
        KVMapConfig,
        {
            "data": data,
            "teacher": {"path": str(teacher)},
            "student": {"path": str(tmp_path / "students" / "p")},
            "prune": {"calibration_samples": 6, "batch_size": 4, **prune},
        },
    )


def test_pruned_folder_loads_generates_and_records_what_it_kept(tmp_path):
    cfg = _cfg(tmp_path, layers="importance", num_layers=2, heads_per_kv_group=2, intermediate_size=40)
    meta = run_prune(cfg)
    out = tmp_path / "students" / "p"
    assert sorted(p.name for p in out.parent.iterdir()) == ["p"]  # no temp folder left
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.head_dim) == (
        2,
        4,
        16,
    )
    gen = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)
    saved = json.loads((out / "prune_meta.json").read_text())
    assert saved["kept_layers"] == meta["kept_layers"] and len(saved["kept_layers"]) == 2
    depth = torch.tensor(saved["importance"]["depth"])
    assert set(saved["kept_layers"]) == set(depth.argsort(descending=True)[:2].tolist())
    assert all(len(q) == 4 for q in saved["kept_query_heads"]) and saved["calibration"]["samples"] == 6
    assert saved["git_sha"] and (out / "tokenizer.json").is_file()
    _, again = calibration_batches(cfg, _tok(out), seed=0)
    _, other = calibration_batches(cfg, _tok(out), seed=1)
    assert again["rows"] == saved["calibration"]["rows"] != other["rows"]  # the seed picks the rows


def test_extract_map_stores_the_kept_layers_of_a_pruned_student(tmp_path):
    from pipeline.extract import resolve_layers

    cfg = _cfg(tmp_path, layers=[1, 3])
    run_prune(cfg)
    cfg = dataclasses.replace(cfg, align=AlignConfig(init="from_prune"))
    assert resolve_layers(cfg, 4) == [1, 3]


def _tok(folder):
    from pipeline.models.load import load_tokenizer

    return load_tokenizer(str(folder))


@pytest.mark.parametrize(
    "prune, message",
    [
        (dict(layers=[0, 4]), "prune.layers[1]=4: expected a teacher layer index in [0, 4)"),
        (dict(layers="map", num_layers=5), "prune.num_layers=5: expected at most the teacher's 4 layers"),
        (dict(kv_heads=3), "prune.kv_heads=3: expected at most the teacher's 2 KV heads"),
        (dict(heads_per_kv_group=4), "prune.heads_per_kv_group=4: expected at most 3 (the teacher's 6 query"),
        (dict(hidden_size=49), "prune.hidden_size=49: expected at most the teacher's 48 hidden channels"),
    ],
)
def test_bad_prune_input_is_one_line_and_writes_nothing(tmp_path, prune, message):
    cfg = _cfg(tmp_path, **prune)
    with pytest.raises(ConfigError) as e:
        run_prune(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "students").exists()


def test_bad_prune_config_values_are_rejected():
    with pytest.raises(ConfigError, match="prune.layers='every'"):
        from_dict(KVMapConfig, {"prune": {"layers": "every"}})
    with pytest.raises(ConfigError, match=r"prune.intermediate_size=-1: expected an int >= 0"):
        from_dict(KVMapConfig, {"prune": {"intermediate_size": -1}})


# --- align.init: from_prune ---


def _store_for(teacher):
    c = teacher.config
    rope = {"rope_parameters": dict(c.rope_parameters)}
    geo = teacher_shape(teacher)
    from pipeline.models.geometry import teacher_geometry_attrs

    return SimpleNamespace(
        path="from-prune-store",
        attrs={"teacher": {"model_type": c.model_type, "num_layers": geo.layers, "num_heads": geo.heads,
                           "num_kv_heads": geo.kv_heads, "head_dim": geo.head_dim, "hidden_size": geo.hidden,
                           "rope": rope, **teacher_geometry_attrs(teacher)}},
    )  # fmt: skip


def _write_pruned(tmp_path, teacher, layers, **counts):
    student, plan = _prune(teacher, layers, **counts)
    folder = tmp_path / "student"
    student.save_pretrained(folder)
    meta = {"format": 1, "kept_layers": plan.layers, "kept_query_heads": plan.q_heads}
    meta.update(kept_kv_heads=plan.kv_heads, kept_mlp_channels=plan.mlp, kept_hidden_channels=plan.hidden)
    (folder / "prune_meta.json").write_text(json.dumps(meta))
    return student, plan, folder


@pytest.mark.parametrize(
    "arch, constraint, rope, counts",
    [
        ("llama", "constrained", False, {}),
        ("llama", "frozen", True, {}),
        ("qwen2", "unconstrained", False, {}),
        ("qwen2", "constrained", True, dict(heads_per_kv_group=2, kv_heads=1)),
        ("llama", "unconstrained", True, dict(heads_per_kv_group=1)),
    ],
)
def test_from_prune_aligns_the_first_kept_layer_exactly_at_step_0(tmp_path, arch, constraint, rope, counts):
    from alignment import create_structural_loss
    from trainer.run.setup import build_aligner

    teacher = _teacher(arch)
    student, plan, folder = _write_pruned(tmp_path, teacher, [0, 2], **counts)
    align = AlignConfig(
        init="from_prune", constraint=constraint, rope_consistent=rope, per_layer=bool(counts)
    )
    cfg = dataclasses.replace(
        KVMapConfig(), align=align, student=KVMapConfig().student.__class__(path=str(folder))
    )
    aligner = build_aligner(cfg, _store_for(teacher), student)
    assert aligner.layer_map == [0, 2] and aligner.teacher_layers == [0, 2]
    ids = _batch()[0]
    seg = torch.ones_like(ids)
    with torch.no_grad(), capture_qkv(teacher, [0, 2]) as ct, capture_qkv(student, [0, 1]) as cs:
        teacher(input_ids=ids, use_cache=False)
        student(input_ids=ids, use_cache=False)
        out = aligner.align(ct.stack("k"), ct.stack("v"), ct.stack("q"), seg)
    for name, aligned in (("k", out.k), ("v", out.v), ("q", out.q)):
        torch.testing.assert_close(aligned[:, 0], getattr(cs, name)[0], rtol=1e-5, atol=1e-5, msg=name)
    loss, metrics = create_structural_loss()(
        cs.k[0][:, None], cs.v[0][:, None], cs.q[0][:, None], out.k[:, :1], out.v[:, :1], out.q[:, :1],
        attention_mask=out.mask, teacher_scale=out.teacher_scale, student_scale=out.student_scale,
    )  # fmt: skip
    assert float(loss) < 1e-5


def test_from_prune_errors(tmp_path):
    from trainer.run.setup import build_aligner

    teacher = _teacher("llama")
    student, _, folder = _write_pruned(tmp_path, teacher, [0, 2], heads_per_kv_group=2)
    base = KVMapConfig()
    student_cfg = base.student.__class__(path=str(folder))
    shared = dataclasses.replace(base, align=AlignConfig(init="from_prune"), student=student_cfg)
    meta = json.loads((folder / "prune_meta.json").read_text())
    meta["kept_query_heads"] = [[0, 1, 3, 4], [1, 2, 4, 5]]  # different heads per layer
    (folder / "prune_meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="expected align.per_layer: true"):
        build_aligner(shared, _store_for(teacher), student)
    (folder / "prune_meta.json").unlink()
    with pytest.raises(
        ConfigError, match=r"has no prune_meta.json: expected a folder written by pipeline/prune.py"
    ):
        build_aligner(shared, _store_for(teacher), student)
