"""Initial head mixers: teacher heads spread over student heads, GQA-consistent for queries.

Shapes: H query heads, G KV heads (`_t` teacher, `_s` student). A mixer is (n_out, n_in): row i holds the
convex weights student head i gives to each teacher head (rows sum to 1).
"""

from __future__ import annotations

import torch


def uniform_mixer(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) fractional-overlap mixer spreading n_in teacher heads evenly over n_out student heads.

    Student head i covers the interval [i*n_in/n_out, (i+1)*n_in/n_out) of the teacher head axis; its
    weight on teacher head j is the overlap with [j, j+1) divided by the interval's length. So every row
    sums to 1, every teacher head gets weight (the intervals tile the axis), divisible counts give plain
    block averages (6->2: [1/3]*3 per row), and expanding counts (12->14) give each student head one or two
    teacher heads.

    Example:
        >>> uniform_mixer(3, 2)
        tensor([[0.6667, 0.3333, 0.0000],
                [0.0000, 0.3333, 0.6667]])
    """
    for name, v in (("n_in", n_in), ("n_out", n_out)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}={v!r}: expected a positive int head count")
    # Work in units of 1/n_out teacher heads so every boundary is an integer: exact rational weights.
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * n_in  # (n_out, 1) in 1/n_out units
    hi = lo + n_in
    j = torch.arange(n_in, dtype=torch.float64)[None, :] * n_out  # (1, n_in)
    overlap = (torch.minimum(hi, j + n_out) - torch.maximum(lo, j)).clamp_min(0)  # (n_out, n_in)
    return (overlap / n_in).float()


def random_mixer(n_in: int, n_out: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n_out, n_in) random convex mixer: softmax of standard-normal logits per row."""
    return torch.softmax(torch.randn(n_out, n_in, generator=generator), dim=-1)


def gqa_query_mixer(kv_mixer: torch.Tensor, H_t: int, G_t: int, H_s: int, G_s: int) -> torch.Tensor:
    """(H_s, H_t) query mixer consistent with a (G_s, G_t) KV mixer under GQA grouping.

    Student query head s reads student KV head s // (H_s/G_s); teacher query head h reads teacher KV head
    h // (H_t/G_t). Student head s draws on teacher query heads only inside teacher KV groups its own KV
    head draws on, with weight kv_mixer[g_s, g_t] * U[s mod n_s, h mod n_t], U the uniform within-group
    mixer. So when the KV mixer is a one-to-one group map, each projected query head attends with the keys
    of the very group its teacher heads used: the projected teacher attention at init is a (convex mix of)
    real teacher pattern(s), not a cross-group hybrid.
    """
    if kv_mixer.shape != (G_s, G_t):
        raise ValueError(f"kv_mixer shape {tuple(kv_mixer.shape)}: expected (G_s={G_s}, G_t={G_t})")
    if H_t % G_t or H_s % G_s:
        raise ValueError(f"head counts H_t={H_t}, G_t={G_t}, H_s={H_s}, G_s={G_s}: expected H divisible by G")
    n_t, n_s = H_t // G_t, H_s // G_s
    within = uniform_mixer(n_t, n_s)  # (n_s, n_t)
    s = torch.arange(H_s)
    h = torch.arange(H_t)
    group = kv_mixer.float()[(s // n_s)[:, None], (h // n_t)[None, :]]  # (H_s, H_t)
    return group * within[(s % n_s)[:, None], (h % n_t)[None, :]]


def pair_selection(D_t: int, D_s: int) -> torch.Tensor:
    """(D_t, D_s) semi-orthogonal 0/1 map that keeps HF rotary pairs intact.

    Keys and queries arrive post-RoPE; HF's rotate_half layout pairs dim i with i + D/2 at frequency
    theta^(-2i/D). A random D_t -> D_s projection would mix pairs rotating at different speeds, destroying
    the relative-position structure of q.k. So student pair i takes teacher pair round-down(i * P_t / P_s)
    (P = D/2), both halves moved together: with equal thetas that is the nearest teacher frequency, exactly
    the even-indexed pairs when D_s = D_t / 2. When D_s > D_t each teacher pair lands on one student pair
    and the rest stay zero. Odd dims have no pair layout: fall back to a truncated identity.
    """
    S = torch.zeros(D_t, D_s)
    if D_t % 2 or D_s % 2:
        n = min(D_t, D_s)
        S[torch.arange(n), torch.arange(n)] = 1.0
        return S
    P_t, P_s = D_t // 2, D_s // 2
    if P_s <= P_t:
        i = torch.arange(P_s)
        j = (i * P_t) // P_s
    else:
        j = torch.arange(P_t)
        i = (j * P_s) // P_t
    S[j, i] = 1.0
    S[j + P_t, i + P_s] = 1.0
    return S
