"""MapProjectionAligner and its factories on tiny HF configs (teacher 4L/6H/2G/16, student 3L/4H/2G/8)."""

from dataclasses import replace

import pytest
import torch

from alignment import (
    AlignerSpec,
    MapProjectionAligner,
    attention_dims,
    create_aligner,
    create_flat_aligner,
    create_reasoning_focused_warper,
    create_structured_aligner,
)
from alignment.config import AlignConfig
from tests.conftest import tiny_llama_config, tiny_qwen2_config, tiny_student_config
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)

B, T = 2, 11


def _teacher_states(aligner, T=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    L = len(aligner.teacher_layers)
    k = torch.randn(B, L, 2, T, 16, generator=g)
    v = torch.randn(B, L, 2, T, 16, generator=g)
    q = torch.randn(B, L, 6, T, 16, generator=g)
    seg = torch.tensor([[0] * 3 + [1] * 5 + [2] * 3, [0] * 2 + [1] * 6 + [2] * 1 + [-1] * 2])
    return k, v, q, seg


@pytest.mark.parametrize("mode", ["structured", "flat"])
def test_shapes_mask_and_layers(mode, teacher_config, student_config):
    aligner = create_aligner(mode, teacher_config, student_config, AlignConfig())
    assert aligner.teacher_layers == [1, 2, 3] and aligner.layer_map == [1, 2, 3]
    k, v, q, seg = _teacher_states(aligner)
    k_s, v_s, q_s = aligner(k, v, q, seg)
    assert k_s.shape == v_s.shape == (B, 3, 2, T, 8) and q_s.shape == (B, 3, 4, T, 8)
    out = aligner.align(k, v, q, seg)
    assert torch.equal(out.mask, seg >= 0) and torch.equal(out.segment_ids, seg)
    assert out.q_t_raw.shape == (B, 3, 6, T, 16) and out.k_t_raw.shape == (B, 3, 2, T, 16)
    torch.testing.assert_close(out.head_mix.sum(-1), torch.ones(4))  # convex rows (flat: fixed GQA mix)
    assert out.head_mix.shape == (4, 6)
    kw = out.loss_kwargs()
    assert (
        kw["attention_mask"] is out.mask and kw["t_q_raw"] is out.q_t_raw and kw["teacher_scale"] == 16**-0.5
    )
    assert kw["student_scale"] == 8**-0.5


def test_layer_map_gathers_the_right_stored_layers(teacher_config, student_config):
    aligner = create_structured_aligner(
        teacher_config, student_config, layer_map=[3, 0, 3], constraint="frozen"
    )
    assert aligner.teacher_layers == [0, 3]
    k, v, q, seg = _teacher_states(aligner)
    out = aligner.align(k, v, q, seg)
    torch.testing.assert_close(out.k_t_raw[:, 0], k[:, 1])
    torch.testing.assert_close(out.k_t_raw[:, 1], k[:, 0])
    torch.testing.assert_close(out.k[:, 0], out.k[:, 2])


def test_warp_is_shared_by_k_v_q_and_the_student(teacher_config, student_config):
    aligner = create_structured_aligner(
        teacher_config, student_config, warper=create_reasoning_focused_warper()
    )
    k, v, q, seg = _teacher_states(aligner)
    out = aligner.align(k, v, q, seg)
    assert out.mask.sum(1).tolist() == [3 + 3 + 3, 2 + 3 + 1]
    assert out.k.shape[3] == out.q.shape[3] == out.mask.shape[1] == 9
    student_k = torch.randn(B, 3, 2, T, 8)
    assert aligner.warp_student(student_k, out.plan).shape == out.k.shape
    # from the config: ratio_map / alpha_map build the same warper
    a2 = create_aligner("structured", teacher_config, student_config, AlignConfig(ratio_map={"R": 0.5}))
    assert a2.align(k, v, q, seg).mask.sum(1).tolist() == [9, 6]


def test_q_may_be_absent(teacher_config, student_config):
    aligner = create_flat_aligner(teacher_config, student_config)
    k, v, _, seg = _teacher_states(aligner)
    k_s, v_s, q_s = aligner(k, v, None, seg)
    assert q_s is None and k_s.shape == (B, 3, 2, T, 8)


def test_hf_config_fallbacks_and_dict_configs():
    qwen = tiny_qwen2_config()  # head_dim from hidden_size / heads = 8
    a = create_structured_aligner(qwen, tiny_student_config(num_hidden_layers=2))
    assert a.D_t == 8 and a.H_t == 6 and a.G_t == 2 and a.layer_map == [1, 3]
    d = dict(num_hidden_layers=4, num_attention_heads=6, hidden_size=48)  # no KV heads, no head_dim
    a = create_flat_aligner(d, tiny_student_config())
    assert (a.H_t, a.G_t, a.D_t) == (6, 6, 8)


def test_gradients_reach_all_aligner_parameters(teacher_config, student_config):
    for mode in ("structured", "flat"):
        aligner = create_aligner(mode, teacher_config, student_config, AlignConfig(per_layer=True))
        k, v, q, seg = _teacher_states(aligner)
        k_s, v_s, q_s = aligner(k, v, q, seg)
        (k_s.sum() + v_s.pow(2).sum() + q_s.pow(3).sum()).backward()
        for name, p in aligner.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (mode, name)


def test_structured_has_far_fewer_parameters_than_flat():
    t = tiny_llama_config()
    s = tiny_student_config()
    st, fl = create_structured_aligner(t, s), create_flat_aligner(t, s)
    # K, V: G_s*G_t + D_t*D_s each; Q: H_s*H_t + D_t*D_s.  Flat: G_t*D_t*G_s*D_s (x2) + H_t*D_t*H_s*D_s.
    assert st.num_parameters() == 2 * (2 * 2 + 16 * 8) + (4 * 6 + 16 * 8)
    assert fl.num_parameters() == 2 * (2 * 16 * 2 * 8) + 6 * 16 * 4 * 8


# What `aligner.safetensors` of a run holds (trainer/run/checkpoint.py saves the state_dict): a rebuilt
# aligner must keep every name and shape, or checkpoints of existing runs stop loading.
_MIX, _DIM = "mixer.parametrizations.weight.original", "dim_map.parametrizations.weight.original"
_BASE = "dim_map.parametrizations.weight.0.base"  # the orthogonal parametrisation's buffer
CHECKPOINT_SHAPES = {
    "structured": [
        (f"k_proj.{_MIX}", (2, 2)),
        (f"k_proj.{_DIM}", (16, 8)),
        (f"k_proj.{_BASE}", (16, 16)),
        (f"v_proj.{_MIX}", (2, 2)),
        (f"v_proj.{_DIM}", (16, 8)),
        (f"v_proj.{_BASE}", (16, 16)),
        (f"q_proj.{_MIX}", (4, 6)),
        (f"q_proj.{_DIM}", (16, 8)),
        (f"q_proj.{_BASE}", (16, 16)),
    ],
    "flat": [
        (f"k_proj.{_DIM}", (32, 16)),
        (f"k_proj.{_BASE}", (32, 32)),
        (f"v_proj.{_DIM}", (32, 16)),
        (f"v_proj.{_BASE}", (32, 32)),
        (f"q_proj.{_DIM}", (96, 32)),
        (f"q_proj.{_BASE}", (96, 96)),
    ],
}


@pytest.mark.parametrize("mode", ["structured", "flat"])
def test_registered_names_and_shapes_match_saved_checkpoints(mode, teacher_config, student_config):
    aligner = create_aligner(mode, teacher_config, student_config, AlignConfig())
    expected = CHECKPOINT_SHAPES[mode]
    assert [(n, tuple(t.shape)) for n, t in aligner.state_dict().items()] == expected
    assert [n for n, _ in aligner.named_parameters()] == [n for n, _ in expected if _BASE not in n]
    buffers = [n for n, _ in expected if _BASE in n]
    non_persistent = ["_flat_q_mix"] if mode == "flat" else []  # rebuilt from the head counts, never saved
    assert [n for n, _ in aligner.named_buffers()] == non_persistent + buffers


def test_bad_inputs_raise_one_line_errors(teacher_config, student_config):
    with pytest.raises(ValueError, match="kv_projection_mode='deep'"):
        create_aligner("deep", teacher_config, student_config, AlignConfig())
    aligner = create_structured_aligner(teacher_config, student_config)
    k, v, q, seg = _teacher_states(aligner)
    cases = [
        ((k[:, :2], v, q, seg), "k_t: got 2 layers, expected L_sel=3"),
        ((k[0], v, q, seg), r"k_t: got shape \(3, 2, 11, 16\), expected a 5-D"),
        ((k, v, q[:, :, :4], seg), r"q_t: got shape .*expected \(B, L, H=6"),
        ((k, v[..., :8], q, seg), "v_t: got shape"),
        ((k, v, q, seg[:, :5]), r"segment_ids shape \(2, 5\)"),
        ((k, v, q, seg + 3), "segment_ids contains 3"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match) as e:
            aligner(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="rope_consistent=True: expected kv_projection_mode='structured'"):
        create_aligner("flat", teacher_config, student_config, AlignConfig(rope_consistent=True))


def test_constructor_rejects_non_gqa_head_counts():
    teacher = attention_dims(tiny_llama_config())
    student = replace(attention_dims(tiny_student_config()), num_heads=5)  # 5 query heads over 2 KV heads
    with pytest.raises(ValueError, match="student heads=5, kv_heads=2"):
        MapProjectionAligner(AlignerSpec("structured", teacher, student))


@pytest.mark.parametrize("attn_target", ["projected", "teacher"])
def test_aligner_to_loss_end_to_end(attn_target, teacher_config, student_config):
    from alignment import create_structural_loss

    aligner = create_aligner("structured", teacher_config, student_config, AlignConfig(ratio_map={"R": 0.5}))
    k, v, q, seg = _teacher_states(aligner)
    out = aligner.align(k, v, q, seg)
    s_k, s_v, s_q = (
        aligner.warp_student(torch.randn(B, 3, h, T, 8, requires_grad=True), out.plan) for h in (2, 2, 4)
    )
    loss_fn = create_structural_loss(attn_target=attn_target)
    loss, m = loss_fn(s_k, s_v, s_q, out.k, out.v, out.q, **out.loss_kwargs())
    loss.backward()
    q_mixer = aligner.q_proj.mixer.parametrizations.weight.original
    # the projected target trains the Q projector; the teacher target never touches it (nothing to game)
    assert (q_mixer.grad is not None) == (attn_target == "projected")
    assert m["attn_kl"] > 0 and 0 < m["loss_struct"] < 10
