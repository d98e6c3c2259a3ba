"""The teacher's attention geometry survives the store: a Gemma-2-style teacher (query_pre_attn_scalar != head_dim,
logit softcapping, a sliding window shorter than the samples on every other layer) and a Llama teacher,
extracted to a tiny store; the attention rebuilt from the store equals the teacher's own eager attention.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, LlamaConfig

from alignment import attention_dims, create_aligner, create_structural_loss
from alignment.geometry.attention_probs import LogitSpec
from pipeline.analysis.head_scores import attention_maps
from pipeline.config.configlib import load_config
from pipeline.config.kvmap import KVMapConfig
from pipeline.extract import run_extraction
from pipeline.models.capture import capture_qkv
from pipeline.models.geometry import store_logit_spec, teacher_config_from_attrs, teacher_geometry_attrs
from pipeline.models.load import load_model
from pipeline.store.reader import KVStore
from tests.conftest import _TEACHER_KW
from tests.helpers_store import word_tokenizer, write_extract_config

torch.set_num_threads(1)
D, PRE, CAP, WIN = 16, 24, 3.0, 4


def _save_teacher(folder, arch: str):
    torch.manual_seed(0)
    if arch == "gemma2":  # layer_types default: sliding, full, sliding, full
        kw = {k: v for k, v in _TEACHER_KW.items() if k != "rope_theta"}
        cfg = Gemma2Config(
            **kw, head_dim=D, query_pre_attn_scalar=PRE, attn_logit_softcapping=CAP, sliding_window=WIN
        )
    else:
        cfg = LlamaConfig(**_TEACHER_KW, head_dim=D)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    with torch.no_grad():  # logits of a few units, so that scaling, softcap and window all matter
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
            layer.self_attn.k_proj.weight.mul_(20.0)
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["gemma2", "llama"])
def extracted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    teacher = _save_teacher(tmp / "teacher", request.param)
    path = write_extract_config(tmp, teacher, num_rows=6, layers="all", dtype="float16")
    cfg = load_config(KVMapConfig, path, ["teacher.attn_implementation=eager"])
    run_extraction(cfg)
    model, _ = load_model(cfg.teacher)
    return request.param, KVStore(cfg.extract.store, require_complete=True), model


def _eager(model, ids):
    """The teacher's own probabilities (L, H, T, T) and its captured float32 Q/K (L, H|G, T, D)."""
    with torch.no_grad(), capture_qkv(model, components=("q", "k")) as cap:
        out = model(input_ids=ids[None], output_attentions=True, use_cache=False)
    return torch.cat(out.attentions), cap.stack("q")[0], cap.stack("k")[0]


def test_store_geometry_rebuilds_the_teachers_eager_attention(extracted):
    arch, store, model = extracted
    t = store.attrs["teacher"]
    spec = store_logit_spec(store)
    if arch == "gemma2":
        assert t["query_pre_attn_scalar"] == PRE and t["attn_logit_softcapping"] == CAP
        assert t["attention"] == {"scaling": [PRE**-0.5] * 4, "softcap": [CAP] * 4,
                                  "sliding_window": [WIN, None, WIN, None]}  # fmt: skip
        assert spec.softcap == CAP and spec.window is not None
    else:  # Llama: the plain path, bit for bit the scale it always had
        assert t["attention"] == {
            "scaling": [D**-0.5] * 4,
            "softcap": [None] * 4,
            "sliding_window": [None] * 4,
        }
        assert spec == LogitSpec(D**-0.5)
    for i in range(store.num_samples()):
        x = store.read_sample(i, components=("q", "k"))
        assert x["input_ids"].numel() > 2 * WIN  # the window really cuts
        p_hf, q, k = _eager(model, x["input_ids"])
        # exact geometry on the captured float32 states: float tolerance, per layer and head
        torch.testing.assert_close(attention_maps(q, k, spec), p_hf, rtol=0, atol=2e-6)
        # from the stored (float16) states: their rounding only
        torch.testing.assert_close(attention_maps(x["q"], x["k"], spec), p_hf, rtol=0, atol=5e-3)
        if arch == "gemma2":  # the old rule (D**-0.5, no softcap, no window) is far off: the check has teeth
            assert (attention_maps(q, k, D**-0.5) - p_hf).abs().max() > 0.1


def test_teacher_target_of_the_structural_loss_uses_the_store_geometry(extracted):
    """KL(teacher target from the store || the teacher itself as student) ~ 0; without the geometry it is not."""
    arch, store, model = extracted
    x = store.read_sample(0)
    teacher_cfg = teacher_config_from_attrs(store.attrs, store.path)
    aligner = create_aligner("structured", teacher_cfg, model.config)  # 4 -> 4 layers: identity map
    q_t, k_t, v_t = (x[c][None] for c in "qkv")  # (1, L, H|G, T, D) stored
    out = aligner.align(k_t, v_t, q_t, x["segment_ids"][None])
    _, s_q, s_k = _eager(model, x["input_ids"])  # the teacher's own float32 states as the "student"
    s_q, s_k = s_q[None], s_k[None]
    loss_fn = create_structural_loss(alpha_k=0.0, alpha_v=0.0, alpha_attn=1.0, attn_target="teacher")
    kw = out.loss_kwargs()
    kw.update(head_mix=torch.eye(6), head_mask=None)  # one-to-one heads: the target is the teacher's own map
    kl, _ = loss_fn(s_k, None, s_q, out.k, None, out.q, **kw)
    assert kl.item() < 2e-4, kl.item()
    if arch == "gemma2":
        assert torch.is_tensor(kw["teacher_window"]) and kw["teacher_softcap"] == CAP
        plain = dict(kw, teacher_scale=D**-0.5, teacher_softcap=None, teacher_window=None)
        assert loss_fn(s_k, None, s_q, out.k, None, out.q, **plain)[0].item() > 100 * max(kl.item(), 1e-4)


def test_old_stores_read_by_the_documented_rule():
    base = {"num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "head_dim": D}
    with pytest.warns(
        UserWarning, match=r"store 'old-llama.zarr' has no teacher.attention.*head_dim\*\*-0.5"
    ):
        cfg = teacher_config_from_attrs({"teacher": {**base, "model_type": "llama"}}, "old-llama.zarr")
    assert attention_dims(cfg).logit_spec() == LogitSpec(D**-0.5)
    with pytest.raises(
        ValueError, match=r"store 'old-gemma.zarr' .* model_type='gemma2' needs it .* re-extract"
    ):
        teacher_config_from_attrs({"teacher": {**base, "model_type": "gemma2"}}, "old-gemma.zarr")


def test_gemma3_geometry_round_trips_through_the_attributes():
    """Gemma 3 (query_pre_attn_scalar, a window on every other layer, rotary per layer type): the attributes stage 1
    writes rebuild its eager attention (no extraction: the attrs round trip is what differs from Gemma 2)."""
    kw = {k: v for k, v in _TEACHER_KW.items() if k != "rope_theta"}
    cfg = Gemma3TextConfig(
        **kw, head_dim=D, query_pre_attn_scalar=PRE, sliding_window=WIN, sliding_window_pattern=2
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(20.0)
            layer.self_attn.k_proj.weight.mul_(20.0)
    t = {"model_type": "gemma3_text", "num_layers": 4, "num_heads": 6, "num_kv_heads": 2, "head_dim": D}
    t.update(json.loads(json.dumps(teacher_geometry_attrs(model))))  # as zarr attributes store it
    assert t["attention"]["sliding_window"] == [WIN, None, WIN, None]
    spec = attention_dims(teacher_config_from_attrs({"teacher": t})).logit_spec()
    p_hf, q, k = _eager(model, torch.randint(3, 100, (3 * WIN,), generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(attention_maps(q, k, spec), p_hf, rtol=0, atol=2e-6)
    assert (attention_maps(q, k, D**-0.5) - p_hf).abs().max() > 0.1
