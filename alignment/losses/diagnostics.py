"""Diagnostics shared by the trainer and the profiler (effective rank, scale).

Shapes: x (..., N, D) -> treated as one (N', D) matrix of N' = prod(leading dims) row vectors.
"""

from __future__ import annotations

import torch


def effective_rank(x: torch.Tensor, eps: float = 1e-12) -> float:
    """Effective rank exp(H(p)) with p the normalised singular values of x viewed as (-1, D) rows.

    Roy & Vetterli (2007): 1 for a rank-1 set of vectors, D for an isotropic one. Used by the anti-cheat
    test and the `align/eff_rank_*` metrics: a projector that collapses the teacher toward rank 1 shows
    up here even when cosine losses look fine.

    Args:
        x: tensor of shape (..., D) (at least 2-D); computed in float64 on a detached copy.
    Example:
        >>> effective_rank(torch.randn(1000, 8)) > 7
        True
    """
    if x.dim() < 2:
        raise ValueError(f"effective_rank: x.dim()={x.dim()}: expected a tensor of at least 2 dims (..., D)")
    m = x.detach().reshape(-1, x.shape[-1]).double()
    s = torch.linalg.svdvals(m)
    total = s.sum()
    if total <= eps:
        return 0.0
    p = s / total
    h = -(torch.special.xlogy(p, p)).sum()
    return float(torch.exp(h))


def rms(x: torch.Tensor) -> float:
    """Root-mean-square of x's entries (the 'scale' the anti-cheat test watches)."""
    return float(x.detach().double().pow(2).mean().sqrt())
