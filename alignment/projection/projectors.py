"""Teacher -> student head-space projectors: the structured head-wise map and the flat baseline.

Shapes: B batch, L aligned layers, H_t/H_s heads (query heads or KV heads, whichever is projected),
T tokens, D_t/D_s head dims. Input (B, L, H_t, T, D_t) -> output (B, L, H_s, T, D_s).

Why constrained by default (the anti-cheat rule): the projector maps the *teacher* into student space
and trains jointly with the student, so its target moves with its parameters. Cosine is blind to scale,
so a free linear map can shrink projected Q/K toward zero (uniform attention, an easy KL target) or toward
rank 1 and drive the structural loss down while carrying no teacher knowledge. By construction:
- head mixer rows live on the simplex (softmax parametrisation): each student head is a convex mix of
  teacher heads, so it cannot scale heads down (only average them) nor flip signs;
- the dim map is (semi-)orthogonal (`torch.nn.utils.parametrizations.orthogonal`): it rotates/selects,
  never rescales (D_s >= D_t: norm-preserving; D_s < D_t: an orthogonal projection onto a D_s subspace);
- a convex mix can still shrink vectors by averaging dissimilar heads (n independent heads: 1/sqrt(n)), and
  a D_s < D_t subspace can hold little of the teacher's energy, so each projected vector is rescaled to the
  convex mix of its teacher heads' norms: |y_s| = sum_h w_sh |x_h| per token (`norm_preserving`). The
  projector can choose directions (which heads, which subspace, which rotation) but not the scale: a
  one-hot row and a square orthogonal map are untouched by it, identical teacher heads come out unchanged,
  and a per-token scalar commutes with RoPE. The flat baseline keeps each token's mean squared head norm the same way.
`constraint="unconstrained"` keeps the same init with free parameters (for the ablation that shows the
drift); `constraint="frozen"` keeps the init fixed (no trainable parameters).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from alignment.mapping.head_maps import pair_selection, random_mixer, uniform_mixer

Constraint = Literal["constrained", "unconstrained", "frozen"]
CONSTRAINTS = ("constrained", "unconstrained", "frozen")
_SIMPLEX_FLOOR = 1e-6  # zero init weights start at ~1e-6 (the optimiser may still grow them)
_TINY = 1e-24  # inside sqrt: keeps the norm's gradient finite at zero vectors


def _norm(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., 1) Euclidean norm with a finite gradient at 0."""
    return (x.pow(2).sum(-1, keepdim=True) + _TINY).sqrt()


def rescale_to(y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """y (..., D) rescaled per vector to norm `target` (..., 1); tiny y (< 1e-6 of target) is not blown up."""
    return y * (target / torch.maximum(_norm(y), 1e-6 * target))


class Simplex(nn.Module):
    """Parametrisation: rows = softmax(logits) (each row a convex combination)."""

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=-1)

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return torch.log(w.clamp_min(_SIMPLEX_FLOOR))


def check_5d(x: torch.Tensor, name: str, heads: int, dim: int) -> None:
    """One-line ValueError unless x is (B, L, heads, T, dim)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: got shape {shape}, expected a 5-D (B, L, H={heads}, T, D={dim}) tensor")
    if x.shape[2] != heads or x.shape[4] != dim:
        raise ValueError(f"{name}: got shape {tuple(x.shape)}, expected (B, L, H={heads}, T, D={dim})")


def _check_constraint(constraint: str) -> None:
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint={constraint!r}: expected one of {CONSTRAINTS}")


def _layer_prefix(per_layer: bool, num_layers: int | None) -> tuple[int, ...]:
    if not per_layer:
        return ()
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers={num_layers!r}: expected a positive int when per_layer=True")
    return (num_layers,)


class HeadMixer(nn.Module):
    """(L?, H_s, H_t) convex head mixer; forward (B, L, H_t, T, D) -> (B, L, H_s, T, D)."""

    def __init__(self, init: torch.Tensor, per_layer: bool, num_layers: int | None, constraint: Constraint):
        super().__init__()
        _check_constraint(constraint)
        self.per_layer = per_layer
        prefix = _layer_prefix(per_layer, num_layers)
        w = init.float().expand(*prefix, *init.shape).clone()  # (L?, H_s, H_t)
        self.weight = nn.Parameter(w, requires_grad=constraint != "frozen")
        if constraint != "unconstrained":
            parametrize.register_parametrization(self, "weight", Simplex())
            if constraint == "frozen":
                self.parametrizations.weight.original.requires_grad_(False)
        self.H_s, self.H_t = init.shape

    def matrix(self) -> torch.Tensor:
        """The effective (L?, H_s, H_t) mixing weights (rows on the simplex unless unconstrained)."""
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, H_t, T, D = x.shape
        M = self.weight.to(x.dtype)
        M = M[None] if self.per_layer else M[None, None]  # (1, L|1, H_s, H_t)
        y = M @ x.reshape(B, L, H_t, T * D)  # (B, L, H_s, T*D)
        return y.view(B, L, self.H_s, T, D)


class OrthogonalDimMap(nn.Module):
    """(L?, H_s?, D_t, D_s) (semi-)orthogonal dim map; forward (B, L, H, T, D_t) -> (B, L, H, T, D_s)."""

    def __init__(
        self,
        init: torch.Tensor,
        heads: int | None,
        per_layer: bool,
        num_layers: int | None,
        constraint: Constraint,
    ):
        super().__init__()
        _check_constraint(constraint)
        self.per_layer, self.per_head = per_layer, heads is not None
        prefix = _layer_prefix(per_layer, num_layers) + ((heads,) if heads is not None else ())
        w = init.float().expand(*prefix, *init.shape).clone()  # (L?, H_s?, D_t, D_s)
        self.weight = nn.Parameter(w, requires_grad=constraint != "frozen")
        if constraint != "unconstrained":
            orthogonal(self, "weight")
            self.weight = w  # the parametrisation's right_inverse keeps an orthogonal init exactly
            if constraint == "frozen":
                self.parametrizations.weight.original.requires_grad_(False)
        self.D_t, self.D_s = init.shape

    def matrix(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = self.weight.to(x.dtype)
        if not self.per_head:
            W = W.unsqueeze(-3)  # (L?, 1, D_t, D_s)
        if not self.per_layer:
            W = W.unsqueeze(0)  # (1, H|1, D_t, D_s)
        return x @ W[None]  # (B, L, H, T, D_s)


class HeadwiseMapProjector(nn.Module):
    """Structured projector: convex head mixer (H_s, H_t) then dim map (D_t, D_s) per aligned layer.

    Args:
        H_t, H_s: teacher / student head counts (query heads for Q, KV heads for K and V).
        D_t, D_s: teacher / student head dims.
        share_dim_proj: one (D_t, D_s) dim map for all student heads; False gives (H_s, D_t, D_s).
        init_uniform: mixer starts from `uniform_mixer(H_t, H_s)` (fractional overlaps); False: random.
        per_layer: separate parameters per aligned layer (needs num_layers); default shared across L.
        num_layers: L, the aligned (student) layer count, when per_layer.
        constraint: "constrained" (simplex + orthogonal, default), "unconstrained", or "frozen".
        mixer_init: explicit (H_s, H_t) initial mixer (e.g. the GQA-consistent query mixer); overrides
            init_uniform.
        dim_map: a module replacing the orthogonal dim map (e.g. `RopePairDimMap` for RoPE-consistent Q/K);
            it must map (B, L, H_s, T, D_t) -> (B, L, H_s, T, D_s).
    Shapes:
        x (B, L, H_t, T, D_t) -> (B, L, H_s, T, D_s).
    Init of the dim map: identity when D_t == D_s; otherwise `pair_selection(D_t, D_s)`, which keeps HF
    rotary pairs together (inputs are post-RoPE, and a random map would scramble the rotation pairs).
    Scale: under "constrained"/"frozen" each output vector is rescaled to sum_h w_sh |x_h| (module doc).
    Parameters: H_s*H_t + D_t*D_s shared (times H_s for the dim map if not shared, times L if per_layer).
    Example:
        >>> proj = HeadwiseMapProjector(6, 4, 16, 8)
        >>> proj(torch.randn(2, 3, 6, 10, 16)).shape
        torch.Size([2, 3, 4, 10, 8])
    """

    def __init__(
        self,
        H_t: int,
        H_s: int,
        D_t: int,
        D_s: int,
        share_dim_proj: bool = True,
        init_uniform: bool = True,
        *,
        per_layer: bool = False,
        num_layers: int | None = None,
        constraint: Constraint = "constrained",
        mixer_init: torch.Tensor | None = None,
        dim_map: nn.Module | None = None,
    ):
        super().__init__()
        for name, v in (("H_t", H_t), ("H_s", H_s), ("D_t", D_t), ("D_s", D_s)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        _check_constraint(constraint)
        self.H_t, self.H_s, self.D_t, self.D_s = H_t, H_s, D_t, D_s
        self.per_layer, self.num_layers = per_layer, num_layers
        if mixer_init is None:
            mixer_init = uniform_mixer(H_t, H_s) if init_uniform else random_mixer(H_t, H_s)
        if tuple(mixer_init.shape) != (H_s, H_t):
            raise ValueError(f"mixer_init shape {tuple(mixer_init.shape)}: expected (H_s={H_s}, H_t={H_t})")
        self.mixer = HeadMixer(mixer_init, per_layer, num_layers, constraint)
        if dim_map is None:
            init = torch.eye(D_t) if D_t == D_s else pair_selection(D_t, D_s)
            dim_map = OrthogonalDimMap(
                init, None if share_dim_proj else H_s, per_layer, num_layers, constraint
            )
        self.dim_map = dim_map
        self.norm_preserving = constraint != "unconstrained"

    def head_mix(self) -> torch.Tensor:
        """Effective (L?, H_s, H_t) head mixing weights (convex unless unconstrained)."""
        return self.mixer.matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_5d(x, "projector input", self.H_t, self.D_t)
        if self.per_layer and x.shape[1] != self.num_layers:
            raise ValueError(
                f"projector input layers {x.shape[1]}: expected L={self.num_layers} (per_layer=True)"
            )
        y = self.dim_map(self.mixer(x))  # (B, L, H_s, T, D_s)
        if not self.norm_preserving:
            return y
        return rescale_to(y, self.mixer(_norm(x)))  # target (B, L, H_s, T, 1): convex mix of head norms


class KVDimensionProjector(nn.Module):
    """Flat baseline: flatten H_t*D_t per token, one linear map to H_s*D_s.

    Same args as `HeadwiseMapProjector` where they apply. The (H_t*D_t, H_s*D_s) weight is (semi-)
    orthogonal under the default constraint, initialised randomly (no head or rotary-pair structure: this
    is the baseline the structured map is compared with). Parameters: H_t*D_t*H_s*D_s (times L if
    per_layer).
    Shapes: x (B, L, H_t, T, D_t) -> (B, L, H_s, T, D_s).
    """

    def __init__(
        self,
        H_t: int,
        H_s: int,
        D_t: int,
        D_s: int,
        *,
        per_layer: bool = False,
        num_layers: int | None = None,
        constraint: Constraint = "constrained",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        for name, v in (("H_t", H_t), ("H_s", H_s), ("D_t", D_t), ("D_s", D_s)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: expected a positive int")
        self.H_t, self.H_s, self.D_t, self.D_s = H_t, H_s, D_t, D_s
        self.per_layer, self.num_layers = per_layer, num_layers
        init = torch.empty(H_t * D_t, H_s * D_s)
        nn.init.orthogonal_(init, generator=generator)
        self.dim_map = OrthogonalDimMap(init, None, per_layer, num_layers, constraint)
        self.norm_preserving = constraint != "unconstrained"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_5d(x, "projector input", self.H_t, self.D_t)
        B, L, H_t, T, D_t = x.shape
        if self.per_layer and x.shape[1] != self.num_layers:
            raise ValueError(f"projector input layers {L}: expected L={self.num_layers} (per_layer=True)")
        flat = x.transpose(2, 3).reshape(B, L, 1, T, H_t * D_t)  # (B, L, 1, T, H_t*D_t)
        y = self.dim_map(flat)  # (B, L, 1, T, H_s*D_s)
        if self.norm_preserving:  # mean squared head norm per token kept: |y|^2 / H_s = |x|^2 / H_t
            y = rescale_to(y, _norm(flat) * (self.H_s / self.H_t) ** 0.5)
        return y.view(B, L, T, self.H_s, self.D_s).transpose(2, 3)  # (B, L, H_s, T, D_s)
