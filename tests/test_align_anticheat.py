"""The projector must not be able to cheat: shrink or collapse the projected teacher to please the loss.

Pressure: the student is fixed and cannot follow the teacher (near-uniform attention: ~zero queries;
rank-1 keys and values), the aligner trains alone on the structural loss for a few hundred steps. The easy
way down for a free projector is to shrink projected Q/K (uniform teacher attention) and collapse K toward
the student's single direction. By default (simplex mixers, orthogonal dim maps, norm-preserving) the
projected teacher keeps at least half its initial Q/K scale and effective rank; unconstrained, it drifts.
"""

import pytest
import torch

from alignment import create_structural_loss, create_structured_aligner, effective_rank, rms
from tests.conftest import tiny_llama_config, tiny_student_config
from tests.helpers_align import single_thread  # noqa: F401 (autouse fixture)

B, T, STEPS = 2, 24, 200


def _pressure_run(constraint, rope_consistent=False):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    aligner = create_structured_aligner(
        tiny_llama_config(), tiny_student_config(), constraint=constraint, rope_consistent=rope_consistent
    )
    L = len(aligner.teacher_layers)
    k_t = 2 * torch.randn(B, L, 2, T, 16, generator=g)
    v_t = torch.randn(B, L, 2, T, 16, generator=g)
    q_t = 2 * torch.randn(B, L, 6, T, 16, generator=g)
    seg = torch.zeros(B, T, dtype=torch.long)
    s_k = (torch.rand(B, 3, 2, T, 1, generator=g) + 0.5) * torch.randn(8, generator=g)  # rank 1
    s_v = (torch.rand(B, 3, 2, T, 1, generator=g) + 0.5) * torch.randn(8, generator=g)  # rank 1
    s_q = 1e-3 * torch.randn(B, 3, 4, T, 8, generator=g)  # ~uniform student attention
    loss_fn = create_structural_loss(alpha_k=1.0, alpha_v=1.0, alpha_attn=1.0)

    def stats():
        with torch.no_grad():
            out = aligner.align(k_t, v_t, q_t, seg)
        return {n: (rms(x), effective_rank(x)) for n, x in (("q", out.q), ("k", out.k))}

    before = stats()
    opt = torch.optim.Adam(aligner.parameters(), lr=0.05)
    first = None
    for _ in range(STEPS):
        out = aligner.align(k_t, v_t, q_t, seg)
        loss, _ = loss_fn(s_k, s_v, s_q, out.k, out.v, out.q)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = stats()
    ratios = {
        f"{n}_{what}": after[n][i] / before[n][i] for n in after for i, what in enumerate(("scale", "rank"))
    }
    return ratios, first, loss.item()


@pytest.mark.parametrize("rope_consistent", [False, True])
def test_constrained_projector_keeps_scale_and_rank(rope_consistent):
    ratios, first, last = _pressure_run("constrained", rope_consistent)
    assert last < first, "the projector did train"
    assert all(r >= 0.5 for r in ratios.values()), ratios


def test_unconstrained_projector_drifts_under_the_same_pressure():
    ratios, first, last = _pressure_run("unconstrained")
    assert last < 0.6 * first
    assert min(ratios.values()) < 0.5, ratios  # shrinks Q and/or collapses K: the cheat the default prevents
