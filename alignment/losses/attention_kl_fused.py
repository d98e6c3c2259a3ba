"""When and how `attention_kl` runs the fused Triton kernels (alignment/losses/attention_kl_triton.py).

Shapes: B batch, L layers, H_s/H_t query heads, G_s/G_t KV heads, T tokens, P counted (layer, student head)
pairs; M head mix (L|1, H_s, H_t).

The kernels compute one teacher head per student head (the identity when H_t == H_s and no mix, or a
one-hot mix: `align.head_select` maps selected teacher heads one-to-one), plain causal attention with a key
mask (padding and dropped sink keys) and per-layer scalings. Anything else (a soft head mix, a softcap, a
sliding window, float64, tensors off CUDA) runs the PyTorch streaming path, which stays the reference.
`plan` returns None in those cases (and says why when the kernels were asked for explicitly).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from alignment.geometry.attention_probs import LogitSpec

IMPLS = ("auto", "torch", "triton")
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid dimension (one program per batch row x counted head)


def triton_available() -> bool:
    """Whether Triton is installed (the kernels also need CUDA tensors, or TRITON_INTERPRET=1 for tests)."""
    return importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class FusedPlan:
    """What the kernels read: pairs (P, 5) int32 (layer, student head, its KV head, teacher head, its KV
    head) and per-pair scalings (P,) float32 of each side (temperature folded in)."""

    pairs: torch.Tensor
    scale_s: torch.Tensor
    scale_t: torch.Tensor


def _why_not(q_s, q_t, spec_s: LogitSpec, spec_t: LogitSpec) -> str | None:
    """The first reason the kernels cannot run these inputs, or None."""
    if not triton_available():
        return "Triton is not installed"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not (q_s.is_cuda and q_t.is_cuda):
        return "the tensors are not on a CUDA device"
    if torch.float64 in (q_s.dtype, q_t.dtype):
        return "float64 inputs (the kernels compute in fp32 at most)"
    for side, spec in (("student", spec_s), ("teacher", spec_t)):
        if spec.softcap is not None or spec.window is not None:
            return f"the {side} side has a softcap or a sliding window"
    return None


def _ieee_fp32(*xs: torch.Tensor) -> bool:
    """All inputs fp32 with TF32 off: the kernels would run IEEE fp32 dots (slower than the PyTorch stream)."""
    half = any(x.dtype in (torch.bfloat16, torch.float16) for x in xs)
    return not half and not torch.backends.cuda.matmul.allow_tf32


def _teacher_heads(head_mix, counted: torch.Tensor, H_s: int, H_t: int) -> torch.Tensor | str:
    """(L, H_s) long teacher head of each student head (one-hot mix or identity), or why not."""
    L = counted.shape[0]
    if head_mix is None:
        return torch.arange(H_s, device=counted.device).expand(L, H_s)
    M = head_mix if head_mix.dim() == 3 else head_mix[None].expand(L, H_s, H_t)  # (L, H_s, H_t)
    one_hot = ((M == 0) | (M == 1)).all(-1) & ((M == 1).sum(-1) == 1)  # (L, H_s)
    if not bool((one_hot | ~counted).all()):
        return "the head mix is not one-hot (a soft mix of teacher heads)"
    return M.argmax(-1)


def _pair_scales(scale, layers: torch.Tensor) -> torch.Tensor:
    if torch.is_tensor(scale):
        return scale.to(layers.device, torch.float32)[layers]
    return torch.full(layers.shape, float(scale), dtype=torch.float32, device=layers.device)


def plan(impl: str, q_s, k_s, q_t, k_t, head_mix, head_mask, spec_s, spec_t) -> FusedPlan | None:
    """The kernels' inputs when `impl` ("auto" | "torch" | "triton") selects them and they support the
    inputs; None for the PyTorch path. impl="triton" on inputs the kernels cannot run raises one line."""
    if impl not in IMPLS:
        raise ValueError(f"attention KL impl={impl!r}: expected one of {list(IMPLS)}")
    if impl == "torch":
        return None
    why = _why_not(q_s, q_t, spec_s, spec_t)
    if why is None and impl == "auto" and _ieee_fp32(q_s, k_s, q_t, k_t):
        return None  # IEEE fp32 dots run without tensor cores: 8.9x the dense map on an H200 (docs), stream
    L, H_s, H_t = q_s.shape[1], q_s.shape[2], q_t.shape[2]
    counted = (
        torch.ones(L, H_s, dtype=torch.bool, device=q_s.device)
        if head_mask is None
        else head_mask.to(q_s.device)
    )
    if why is None:
        ht = _teacher_heads(head_mix, counted, H_s, H_t)
        why = ht if isinstance(ht, str) else None
    if why is None:
        layer, hs = torch.nonzero(counted, as_tuple=True)  # (P,), (P,)
        ht = ht[layer, hs]
        if len(set(zip(layer.tolist(), ht.tolist()))) != len(ht):
            why = "two student heads of one layer distil the same teacher head"
        elif not 0 < q_s.shape[0] * len(ht) <= _MAX_GRID_Y:
            why = f"batch x counted heads = {q_s.shape[0] * len(ht)} (the kernels' grid takes 1 to {_MAX_GRID_Y})"
    if why is not None:
        if impl == "triton":
            raise ValueError(f"attention KL impl='triton': {why}; expected impl='auto' or 'torch'")
        return None
    gs, gt = hs // (H_s // k_s.shape[2]), ht // (H_t // k_t.shape[2])
    pairs = torch.stack([layer, hs, gs, ht, gt], dim=1).to(torch.int32)  # (P, 5)
    return FusedPlan(pairs, _pair_scales(spec_s.scale, layer), _pair_scales(spec_t.scale, layer))


def fused_attention_kl(q_s, k_s, q_t, k_t, keys: torch.Tensor, row_w: torch.Tensor, fp: FusedPlan):
    """Mean row KL over counted rows (row_w (B, T)) and the plan's pairs, through the kernels."""
    from alignment.losses.attention_kl_triton import fused_row_kl

    kl = fused_row_kl(q_s, k_s, q_t, k_t, keys, fp.pairs, fp.scale_s, fp.scale_t)  # (B, P, T)
    total = (kl * row_w.to(kl.dtype)[:, None, :]).sum()
    return total / (row_w.sum() * fp.pairs.shape[0]).clamp_min(1)
