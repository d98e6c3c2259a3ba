"""Store only what the recipe reads: `extract.heads`, the stage-2 head view, weight-0 terms, `--plan-store`.

One tiny extraction pair is shared (module fixture): an all-heads store of teacher layers 1-3 with logits, and
the minimal store of a selected-head arm (the 2 best retrieval heads' Q and K, and the logits).
"""

from __future__ import annotations

import json

import pytest
import torch

from alignment import create_aligner, create_structural_loss
from alignment.config import AlignConfig, LossConfig, used_projections
from alignment.mapping.head_select import head_view, select_heads
from pipeline.config.configlib import from_dict, load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import plan_extraction, run_extraction
from pipeline.store.heads import head_positions, take_heads
from pipeline.store.reader import KVStore
from tests.conftest import tiny_llama_config, tiny_student_config
from tests.helpers_store import save_tiny_teacher, write_extract_config
from tests.helpers_train import losses, tiny_train_config
from trainer.objective import step as step_mod
from trainer.objective.step import DistillModel, forward_step
from trainer.run.setup import needed_components
from trainer.train import run_training

torch.set_num_threads(1)
SELECTED = ["extract.heads=selected", "extract.head_select.top=2", "extract.head_select.samples=8"]
ARM = {  # a kd_heads_top-like arm on the tiny models: logit KD + attention KL on the 2 best heads
    "align.layer_map": [1, 2, 3],
    "align.head_select": {"method": "top_retrieval", "top": 2, "samples": 8},
    "loss_config": {
        "alpha_logit": 1.0,
        "attn_target": "teacher",
        "alpha_k": 0.0,
        "alpha_v": 0.0,
        "alpha_attn": 1.0,
        "sink": "drop",
    },
}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("heads")
    teacher = save_tiny_teacher(tmp / "teacher")
    comps = ["q", "k", "v", "logits"]
    path = write_extract_config(tmp, teacher, layers=[1, 2, 3], components=comps, logits_top_k=8)
    run_extraction(load_config(KVMapConfig, path, []))
    minimal = [f"extract.store={tmp / 'min.zarr'}", "extract.components=[q,k,logits]"]
    run_extraction(load_config(KVMapConfig, path, [*minimal, *SELECTED]))
    return {
        "tmp": tmp,
        "teacher": teacher,
        "config": path,
        "full": tmp / "store.zarr",
        "min": tmp / "min.zarr",
    }


def _train(stores, store, name, **extra):
    tmp, teacher = stores["tmp"], stores["teacher"]
    over = {**ARM, "train.steps": 3, "train.ckpt_every": 0, "run_dir": str(tmp / name), **extra}
    over.update({"teacher.path": str(teacher), "student.tokenizer": str(teacher), "data.eval_path": None})
    return from_dict(KVMapConfig, tiny_train_config(tmp, store, **over))


def test_the_minimal_store_holds_the_best_heads_bit_for_bit(stores):
    full, small = KVStore(stores["full"]), KVStore(stores["min"])
    q, k = small.attrs["heads"]["q"], small.attrs["heads"]["k"]
    assert len(q) == 2 and small.components == ["q", "k"] and small.has_logits("eval")
    assert k == [[t, g] for t, g in sorted({(t, h // 3) for t, h in q})]  # their KV groups (H / G = 3)
    assert small.layers == sorted({t for t, _ in q})
    scores = small.attrs["head_select"]["scores"]
    from pipeline.analysis.head_scores import head_scores, ranked_heads

    ref = head_scores(stores["full"], "train", 8, progress=False)  # the scorer on the all-heads store
    assert scores["retrieval"] == ref["retrieval"] and scores["answer_mass"] == ref["answer_mass"]
    assert sorted([t, h] for t, h, _ in ranked_heads(ref)[:2]) == q
    for t, h in q:
        a = full.read_sample(5, layers=[t], components=("q", "k"))
        b = small.read_sample(5, layers=[t], components=("q", "k"), heads={"q": [[h]], "k": [[h // 3]]})
        assert torch.equal(a["q"][0, h], b["q"][0, 0]) and torch.equal(a["k"][0, h // 3], b["k"][0, 0])
    assert small.stored_bytes() < full.stored_bytes() / 3


def test_the_arm_trains_from_the_minimal_store_as_from_the_full_store(stores):
    run_training(_train(stores, stores["full"], "full"))
    run_training(_train(stores, stores["min"], "min", **{"train.preload": True}))
    a, b = losses(stores["tmp"] / "full"), losses(stores["tmp"] / "min")
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)


def test_a_relation_on_the_selected_heads_trains_from_the_minimal_store(stores):
    """`loss_config.relation.heads: selected` reads the chosen heads alone, so the minimal store serves it
    with the losses of the all-heads store; a re-split relation reads every head and is refused there."""
    rel = {**ARM["loss_config"], "relation": {"components": ["q", "k"], "heads": "selected", "weight": 1.0}}
    run_training(_train(stores, stores["full"], "rel_full", loss_config=rel))
    run_training(_train(stores, stores["min"], "rel_min", loss_config=rel))
    a, b = losses(stores["tmp"] / "rel_full"), losses(stores["tmp"] / "rel_min")
    assert len(a) == 3 and max(abs(x - y) for x, y in zip(a, b)) <= 1e-5, (a, b)
    rows = [json.loads(x) for x in (stores["tmp"] / "rel_min" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rel_q"] > 0 and r["rel_k"] > 0 and r["attn_kl"] > 0 for r in rows if "loss" in r)
    run_training(_train(stores, stores["min"], "rel_only", loss_config={**rel, "alpha_attn": 0.0}))
    rows = [json.loads(x) for x in (stores["tmp"] / "rel_only" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["rel_q"] > 0 and "attn_kl" not in r for r in rows if "loss" in r)  # the relation alone
    resplit = {**rel, "relation": {"components": ["q"], "heads": 2, "weight": 1.0}}
    with pytest.raises(ValueError, match=r"lacks teacher layer \d+ (query|KV) head \d+"):
        run_training(_train(stores, stores["min"], "rel_resplit", loss_config=resplit))


def test_a_head_the_store_lacks_is_refused_in_one_line(stores):
    cfg = _train(
        stores, stores["min"], "lacks", **{"align.head_select": {"method": "list", "heads": [[3, 4]]}}
    )
    with pytest.raises(ValueError) as e:
        run_training(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "teacher layer 3 query head 4" in msg and "extract.heads" in msg
    cfg = _train(
        stores, stores["min"], "all_heads", **{"loss_config": {"alpha_k": 1.0}, "align.head_select": {}}
    )
    with pytest.raises(ValueError, match=r"lacks teacher layer \d+ (query|KV) head \d+"):
        run_training(cfg)  # an arm that projects every head cannot train from a head subset


def test_the_plan_counts_held_heads(stores):
    cfg = load_config(KVMapConfig, stores["config"], [f"extract.store={stores['tmp'] / 'p.zarr'}", *SELECTED])
    plan = plan_extraction(cfg)
    held = plan["heads"]
    assert held["q"] == 2 and 1 <= held["k"] <= 2 and held["v"] == held["k"]
    assert plan["components"]["q"]["raw_bytes_per_token"] == 2 * 16 * 2  # 2 heads x head_dim 16 x bf16


def test_head_positions_and_take_heads():
    attrs = {"teacher": {"num_heads": 6, "num_kv_heads": 2}, "heads": {"q": [[1, 4], [1, 0], [2, 3]]}}
    assert head_positions(attrs, 1, "q", [4, -1, 0]).tolist() == [1, -1, 0]
    assert head_positions({"teacher": {"num_heads": 6}}, 1, "q", [5]).tolist() == [5]  # no record: all
    with pytest.raises(KeyError, match="lacks teacher layer 2 query head 0"):
        head_positions(attrs, 2, "q", [0])
    a = torch.randn(5, 3, 4).numpy()
    got = take_heads(a, head_positions(attrs, 1, "q", [4, -1]))
    assert (got[:, 0] == a[:, 1]).all() and (got[:, 1] == 0).all()


def _slots(x, heads):
    """x (B, L, X, T, D) -> (B, L, P, T, D): per layer the listed heads, zeros for -1 (the reader's gather)."""
    zero = torch.zeros_like(x[:, 0, 0])
    return torch.stack(
        [torch.stack([x[:, i, h] if h >= 0 else zero for h in hs], 1) for i, hs in enumerate(heads)], 1
    )


def _random_teacher(B, L, H, G, T, D, gen):
    return torch.randn(B, L, H, T, D, generator=gen), torch.randn(B, L, G, T, D, generator=gen)


def test_the_head_view_equals_the_all_heads_loss_in_value_and_gradient():
    t_cfg, s_cfg = tiny_llama_config(), tiny_student_config()
    lc = LossConfig(alpha_k=0.0, alpha_v=0.0, alpha_attn=1.0, attn_target="teacher", sink="drop")
    loss_fn = create_structural_loss(alpha_k=0, alpha_v=0, alpha_attn=1, attn_target="teacher", sink="drop")
    gen = torch.Generator().manual_seed(7)
    B, T = 2, 9
    q_t, k_t = _random_teacher(B, 3, 6, 2, T, 16, gen)  # teacher layers [1, 2, 3]
    sel = select_heads("list", [1, 3, 3], 6, 4, heads=[[3, 5], [1, 2], [3, 0]])
    seg = torch.tensor([[0] * 4 + [1] * 3 + [2] * 2] * B)
    results = []
    for view in (False, True):
        align = AlignConfig(layer_map=[1, 3, 3])  # teacher layers [1, 3]
        aligner = create_aligner("structured", t_cfg, s_cfg, align, used_projections(lc, "list"))
        aligner.set_head_selection(sel)
        q_in, k_in = q_t[:, [0, 2]], k_t[:, [0, 2]]  # (B, 2, ., T, D) the teacher layers 1 and 3
        if view:  # what the reader returns for the view: the heads' slots, zeros where a layer has fewer
            heads, mix = head_view(sel, [1, 3], 6, 2)
            aligner.use_head_view(heads, mix)
            q_in, k_in = _slots(q_in, heads["q"]), _slots(k_in, heads["k"])
        s_gen = torch.Generator().manual_seed(11)
        s_q = torch.randn(B, 3, 4, T, 8, generator=s_gen, requires_grad=True)
        s_k = torch.randn(B, 3, 2, T, 8, generator=s_gen, requires_grad=True)
        out = aligner.align(k_in, None, q_in, seg)
        assert out.k is None and out.v is None and out.q is None and aligner.num_parameters() == 0
        loss, _ = loss_fn(s_k, None, s_q, out.k, out.v, out.q, **out.loss_kwargs())
        loss.backward()
        results.append((loss.detach(), s_q.grad, s_k.grad))
    (la, qa, ka), (lb, qb, kb) = results
    assert la > 0 and torch.allclose(la, lb, rtol=0, atol=1e-6)
    assert torch.allclose(qa, qb, atol=1e-7) and torch.allclose(ka, kb, atol=1e-7) and qa.abs().sum() > 0


def test_terms_of_weight_zero_build_no_projector_and_compute_no_cosine(monkeypatch):
    from transformers import AutoModelForCausalLM

    t_cfg, s_cfg = tiny_llama_config(), tiny_student_config()
    full = create_aligner("structured", t_cfg, s_cfg).num_parameters()
    lc = LossConfig(alpha_k=1.0, alpha_v=0.0)  # K cosine + projected attention KL, no V term
    aligner = create_aligner("structured", t_cfg, s_cfg, None, used_projections(lc))
    assert aligner.v_proj is None and aligner.k_proj is not None and aligner.q_proj is not None
    assert 0 < aligner.num_parameters() < full
    calls = []
    monkeypatch.setattr(step_mod, "per_layer_cosine", lambda s, t, m: calls.append(t.shape) or torch.zeros(3))
    cos_terms = []
    orig = type(create_structural_loss())._cosine_term
    monkeypatch.setattr(
        type(create_structural_loss()),
        "_cosine_term",
        staticmethod(lambda *a: cos_terms.append(1) or orig(*a)),
    )
    torch.manual_seed(0)
    model = DistillModel(AutoModelForCausalLM.from_config(s_cfg), aligner)
    gen = torch.Generator().manual_seed(3)
    B, T = 2, 7
    q_t, k_t = _random_teacher(B, 3, 6, 2, T, 16, gen)
    batch = {
        "input_ids": torch.randint(3, 100, (B, T), generator=gen),
        "attention_mask": torch.ones(B, T, dtype=torch.long),
        "segment_ids": torch.tensor([[0, 0, 0, 1, 1, 2, 2]] * B),
        "q_t": q_t,
        "k_t": k_t,  # no v_t: nothing reads it
    }
    loss_fn = create_structural_loss(alpha_k=1.0, alpha_v=0.0)
    res = forward_step(model, batch, ce_ids=[1, 2], struct_ids=[1, 2], lambda_kv=1.0, loss_fn=loss_fn)
    assert len(calls) == 2 and len(cos_terms) == 1  # K and Q cosines logged, one cosine term (K), no V
    assert "cos_v" not in res.logs and "loss_v" not in res.logs and "loss_k" in res.logs
    cfg = KVMapConfig()
    cfg.loss_config = LossConfig(alpha_k=0.0, alpha_v=0.0, alpha_attn=1.0, attn_target="teacher")
    assert needed_components(cfg) == ("q", "k") and used_projections(cfg.loss_config, "top_retrieval") == ()


def test_plan_store_prints_each_arms_needs_and_the_union(tmp_path, capsys):
    import yaml

    from trainer.ablate import main

    models = {
        "teacher": {
            "config": {"model_type": "llama", **tiny_llama_config().to_diff_dict()},
            "tokenizer": "x",
        },
        "student": {
            "config": {"model_type": "llama", **tiny_student_config().to_diff_dict()},
            "tokenizer": "x",
        },
    }
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump(models))
    arms = [
        {"name": "kd_only", "overrides": ["lambda_kv=0", "loss_config.alpha_logit=1"]},
        {"name": "kd_v40", "overrides": ["loss_config.alpha_logit=1"]},
        {"name": "kd_heads_top", "overrides": ARM},
        {
            "name": "kd_cross",
            "overrides": ["lambda_kv=0", "loss_config.alpha_logit=1", "loss_config.kd_cross=uld"],
        },
    ]
    abl = {"base_config": str(base), "seeds": [0], "out_dir": str(tmp_path / "out"), "arms": arms}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(abl))
    assert main(["--config", str(path), "--plan-store"]) == 0
    out = capsys.readouterr().out
    assert (
        "kd_heads_top        q,k,logits            [1, 2, 3]" in out and "kd_only             logits" in out
    )
    assert "kd_v40              q,k,v,logits          [1, 2, 3]               all" in out
    assert "components: [q, k, v, logits]" in out and "heads:" not in out  # the union: every head
    assert "texts: false" not in out  # a cross-tokenizer arm reads the texts
    assert main(["--config", str(path), "--plan-store", "only_arms=[kd_only,kd_heads_top]"]) == 0
    out = capsys.readouterr().out  # the minimal store of these two arms
    assert "components: [q, k, logits]" in out and "layers: [1, 2, 3]" in out and "heads: selected" in out
    assert "top: 2, samples: 8" in out
    assert "texts: false" in out  # no cross-tokenizer arm among them


def test_int8_listed_heads_read_as_in_the_all_heads_store(stores, tmp_path):
    from trainer.data.preload import PreloadedSplit

    base = ["extract.dtype=int8", "extract.components=[q,k]", "extract.layers=[1,3]"]
    run_extraction(
        load_config(KVMapConfig, stores["config"], [*base, f"extract.store={tmp_path / 'a.zarr'}"])
    )
    listed = [*base, f"extract.store={tmp_path / 'b.zarr'}", "extract.heads=[[3,4],[1,1]]"]
    run_extraction(load_config(KVMapConfig, stores["config"], listed))
    a, b = KVStore(tmp_path / "a.zarr"), KVStore(tmp_path / "b.zarr")
    assert b.attrs["heads"] == {"q": [[1, 1], [3, 4]], "k": [[1, 0], [3, 1]]} and b.layers == [1, 3]
    assert b.array(3, "q").shape[1:] == (1, 16) and b.scale_array(3, "q").shape[1] == 1
    want = {"q": [[1, -1], [4, -1]], "k": [[0, -1], [1, -1]]}  # one head per layer, then an empty slot
    for i in (0, 9):
        x = a.read_sample(i, layers=[1, 3], components=("q", "k"), heads=want)
        y = b.read_sample(i, layers=[1, 3], components=("q", "k"), heads=want)
        assert torch.equal(x["q"], y["q"]) and torch.equal(x["k"], y["k"]) and x["q"][:, 0].abs().sum() > 0
        assert (y["q"][:, 1] == 0).all()
        z = PreloadedSplit(b, "train", [1, 3], ("q", "k"), want).read_samples([i])[0]
        assert torch.equal(z["q"], y["q"]) and torch.equal(z["k"], y["k"])
    only3 = b.read_sample(0, layers=[0, 3], components=("q",), heads={"q": [[-1], [4]]})[
        "q"
    ]  # layer 0: not read
    assert only3.shape[:2] == (2, 1) and (only3[0] == 0).all()
