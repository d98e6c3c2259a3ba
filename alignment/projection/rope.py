"""RoPE-consistent dim map for post-RoPE queries and keys.

Shapes: B batch, L layers, H heads, T tokens, D_t/D_s head dims, P_t/P_s rotary pairs (P = D/2).

HF's rotate_half layout rotates the pair (x_i, x_{i+D/2}) by angle pos * inv_freq[i]; as a complex number
z_i = x_i + 1j * x_{i+D/2} it is multiplied by exp(1j * pos * w_i). Student pair i reads teacher pair
j(i) = the teacher pair of the nearest frequency (log scale) and multiplies it by a gain g_i = a_i + 1j*b_i,
i.e. [[a, -b], [b, a]] on the pair. Complex multiplication commutes, so when w_s[i] == w_t[j(i)]:

    project(rope_t(x, pos)) == rope_s(project(x), pos)   for every position,

which a generic D_t -> D_s linear map cannot give (it mixes pairs that rotate at different speeds, so the
projected teacher key would not move with position like a student key). The match is exact when the
student's frequencies are a subset of the teacher's (same theta and D_s = D_t / 2k gives every 2k-th pair);
otherwise `max_log_freq_gap` says how far off the nearest pair is.

By default the gain is unit-modulus (a = cos(phi), b = sin(phi)): a pure per-pair rotation, so the map
cannot shrink Q/K (the anti-cheat rule of the projectors). "unconstrained" frees a and b; "frozen" keeps
phi = 0 (pure pair selection).
"""

from __future__ import annotations

import torch
from torch import nn

from alignment.projection.projectors import CONSTRAINTS, Constraint


def nearest_pairs(t_inv_freq: torch.Tensor, s_inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Teacher pair index (P_s,) nearest in log-frequency to each student pair, and the largest log gap."""
    gap = (s_inv_freq.double().log()[:, None] - t_inv_freq.double().log()[None, :]).abs()  # (P_s, P_t)
    best, j = gap.min(dim=1)
    return j, float(best.max()) if best.numel() else 0.0


class RopePairDimMap(nn.Module):
    """(B, L, H, T, D_t) -> (B, L, H, T, D_s): nearest-frequency pair selection times a per-pair gain.

    Args:
        t_inv_freq: (P_t,) teacher rotary inverse frequencies; D_t must be 2 * P_t (full rotary).
        s_inv_freq: (P_s,) student rotary inverse frequencies; D_s = 2 * P_s.
        heads: per-student-head gains (H_s) when not None, else one gain per pair shared by all heads.
        per_layer / num_layers: separate gains per aligned layer.
        constraint: "constrained" (unit modulus, default), "unconstrained" (free a, b), "frozen" (identity gain).
    Example:
        >>> m = RopePairDimMap(rope_inv_freq(teacher_cfg), rope_inv_freq(student_cfg))
        >>> k_s = m(k_t_mixed)   # (B, L, G_s, T, D_t) -> (B, L, G_s, T, D_s)
    """

    def __init__(
        self,
        t_inv_freq: torch.Tensor,
        s_inv_freq: torch.Tensor,
        heads: int | None = None,
        per_layer: bool = False,
        num_layers: int | None = None,
        constraint: Constraint = "constrained",
    ):
        super().__init__()
        if constraint not in CONSTRAINTS:
            raise ValueError(f"constraint={constraint!r}: expected one of {CONSTRAINTS}")
        if t_inv_freq.dim() != 1 or s_inv_freq.dim() != 1 or len(t_inv_freq) == 0 or len(s_inv_freq) == 0:
            raise ValueError(
                "t_inv_freq / s_inv_freq: expected non-empty 1-D tensors of rotary inverse frequencies"
            )
        self.P_t, self.P_s = len(t_inv_freq), len(s_inv_freq)
        self.D_t, self.D_s = 2 * self.P_t, 2 * self.P_s
        j, self.max_log_freq_gap = nearest_pairs(t_inv_freq, s_inv_freq)
        self.register_buffer("pair_index", j, persistent=False)  # (P_s,)
        self.per_layer, self.per_head, self.constraint = per_layer, heads is not None, constraint
        shape = ((num_layers,) if per_layer else ()) + ((heads,) if heads is not None else ()) + (self.P_s,)
        if per_layer and (not isinstance(num_layers, int) or num_layers < 1):
            raise ValueError(f"num_layers={num_layers!r}: expected a positive int when per_layer=True")
        if constraint == "unconstrained":
            self.gain_re = nn.Parameter(torch.ones(shape))
            self.gain_im = nn.Parameter(torch.zeros(shape))
        else:
            self.phase = nn.Parameter(torch.zeros(shape), requires_grad=constraint == "constrained")

    def gains(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) of the per-pair gain [[a, -b], [b, a]], each (L?, H?, P_s)."""
        if self.constraint == "unconstrained":
            return self.gain_re, self.gain_im
        return torch.cos(self.phase), torch.sin(self.phase)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.D_t:
            raise ValueError(
                f"rope dim map input last dim {x.shape[-1]}: expected D_t={self.D_t} (full rotary)"
            )
        a, b = (g.to(x.dtype) for g in self.gains())
        if not self.per_head:
            a, b = a.unsqueeze(-2), b.unsqueeze(-2)  # (L?, 1, P_s)
        if not self.per_layer:
            a, b = a.unsqueeze(0), b.unsqueeze(0)  # (1, H|1, P_s)
        a, b = a[None, :, :, None], b[None, :, :, None]  # (1, L|1, H|1, 1, P_s)
        x1 = x[..., self.pair_index]  # (B, L, H, T, P_s)
        x2 = x[..., self.pair_index + self.P_t]  # (B, L, H, T, P_s)
        return torch.cat([a * x1 - b * x2, b * x1 + a * x2], dim=-1)  # (B, L, H, T, D_s)
