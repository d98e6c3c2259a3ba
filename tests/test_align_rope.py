"""RoPE-consistent Q/K projection: projecting a post-RoPE teacher vector == rotating the projected pre-RoPE
vector with the student's RoPE, at every position (HF rotate_half layout, via transformers' own RoPE code)."""

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from alignment import RopePairDimMap, create_aligner, create_structured_aligner, rope_inv_freq
from alignment.config import AlignConfig
from alignment.projection.projectors import OrthogonalDimMap
from tests.conftest import tiny_llama_config, tiny_student_config
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)

B, T = 2, 40


def _rope(cfg, x, positions):
    """Apply cfg's HF RoPE to x (B, L, H, T, D) at positions (B, T)."""
    Bx, L, H, Tx, D = x.shape
    cos, sin = LlamaRotaryEmbedding(cfg)(x, positions)
    flat = x.reshape(Bx, L * H, Tx, D)
    out, _ = apply_rotary_pos_emb(flat, flat, cos, sin)
    return out.view(Bx, L, H, Tx, D)


def _commute_error(teacher_cfg, student_cfg, constraint="constrained"):
    torch.manual_seed(0)
    aligner = create_structured_aligner(teacher_cfg, student_cfg, rope_consistent=True, init_uniform=False,
                                        share_dim_proj=False, constraint=constraint)  # fmt: skip
    with torch.no_grad():  # a trained-looking state: random phases / gains, random convex mixers
        for p in aligner.parameters():
            p.add_(torch.randn_like(p))
    positions = torch.stack([torch.arange(T) * 53, torch.arange(T) * 7 + 11])  # many positions, up to ~2000
    L = len(aligner.teacher_layers)
    errs = []
    for proj, heads in ((aligner.q_proj, 6), (aligner.k_proj, 2)):
        x = torch.randn(B, L, heads, T, 16)  # pre-RoPE teacher vectors
        lhs = proj(_rope(teacher_cfg, x, positions))  # project the post-RoPE teacher
        rhs = _rope(student_cfg, proj(x), positions)  # rotate the projected pre-RoPE vector, student RoPE
        errs.append((lhs - rhs).abs().max().item() / rhs.abs().max().item())
    return max(errs), aligner


@pytest.mark.parametrize("constraint", ["constrained", "unconstrained"])
def test_projection_commutes_with_rope_when_frequencies_match(constraint):
    # teacher head_dim 16, student 8, same theta: student pairs are exactly the teacher's even pairs
    err, aligner = _commute_error(tiny_llama_config(), tiny_student_config(), constraint)
    assert aligner.q_proj.dim_map.max_log_freq_gap == 0.0
    assert aligner.k_proj.dim_map.pair_index.tolist() == [0, 2, 4, 6]
    assert err < 1e-5


def test_mismatched_theta_is_only_approximate_and_reported():
    err, aligner = _commute_error(tiny_llama_config(), tiny_student_config(rope_theta=3000.0))
    assert aligner.k_proj.dim_map.max_log_freq_gap > 0.05
    assert err > 1e-3  # the check above can fail: nearest pairs are not exact when frequencies differ


def test_generic_orthogonal_map_does_not_commute():
    torch.manual_seed(0)
    W = torch.linalg.qr(torch.randn(16, 8))[0]
    m = OrthogonalDimMap(W, None, False, None, "constrained")
    x = torch.randn(1, 1, 2, T, 16)
    pos = torch.arange(T)[None] * 53
    err = (m(_rope(tiny_llama_config(), x, pos)) - _rope(tiny_student_config(), m(x), pos)).abs().max()
    assert err > 1e-2


def test_unit_modulus_gain_by_default_and_v_keeps_orthogonal_map():
    aligner = create_aligner(
        "structured", tiny_llama_config(), tiny_student_config(), AlignConfig(rope_consistent=True)
    )
    assert isinstance(aligner.k_proj.dim_map, RopePairDimMap) and isinstance(
        aligner.q_proj.dim_map, RopePairDimMap
    )
    assert isinstance(aligner.v_proj.dim_map, OrthogonalDimMap)
    with torch.no_grad():
        aligner.k_proj.dim_map.phase.add_(torch.randn(4))
    a, b = aligner.k_proj.dim_map.gains()
    torch.testing.assert_close(a**2 + b**2, torch.ones(4))


def test_rope_inv_freq_matches_transformers():
    cfg = tiny_llama_config(rope_theta=12345.0)
    torch.testing.assert_close(rope_inv_freq(cfg).float(), LlamaRotaryEmbedding(cfg).inv_freq)
    scaled = tiny_llama_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    torch.testing.assert_close(rope_inv_freq(scaled).float(), LlamaRotaryEmbedding(scaled).inv_freq)


def test_rope_consistent_needs_rope_and_full_rotary():
    with pytest.raises(ValueError, match="partial rotary is not supported"):
        create_structured_aligner(tiny_llama_config(partial_rotary_factor=0.5), tiny_student_config(),
                                  rope_consistent=True)  # fmt: skip
