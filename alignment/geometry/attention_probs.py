"""The one place that turns Q/K into attention logits and probabilities: scaling, softcap, sliding window, causal.

Shape glossary: B batch, L layers, H query heads, G KV heads, T tokens, c query rows, e keys, D head dim.
Leading dims (`*`) are free (e.g. (B, L), (L,), (B,)); a per-layer value (L,) lines up with the dim just
before the heads (dim -4 of q), the layer axis of both the stage-1 (L, H, T, D) and stage-2 (B, L, H, T, D)
layouts. Query head h reads KV head h // (H/G) (GQA).

What a transformers decoder computes for one layer (e.g. `modeling_gemma2.eager_attention_forward`):

    z = q k^T * scale                         scale = query_pre_attn_scalar**-0.5 (Gemma) or D**-0.5 (Llama)
    z = softcap * tanh(z / softcap)           only when attn_logit_softcapping is set (Gemma 2)
    key j is visible to row r iff j <= r and r - j < window   (window only on sliding layers)
    p = softmax(z over visible keys)

`LogitSpec` holds one side's (scale, softcap, window); `attention_logits` is the math; `visible_keys` is the
mask; `attention_probs` is the full (T x T) naive builder that every stage-1 tool and every test reference
uses. The streaming KL (`alignment/losses/attention_kl_fn.py`) reuses `attention_logits` and `visible_keys` chunk by
chunk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

FILL = -1e30  # finite "minus infinity" for masked logits where a 0 * (-inf) could follow
NO_WINDOW = 2**62  # window value of a full-attention layer inside a per-layer window tensor


@dataclass(frozen=True)
class LogitSpec:
    """How one side turns q k^T into attention logits (module docstring).

    Attributes:
        scale: float, or (L,) per-layer tensor.
        softcap: None, or the tanh cap (one value for every layer).
        window: None (full causal attention), or (L,) long per-layer windows (NO_WINDOW = full layer).
    Example:
        >>> spec = LogitSpec(24**-0.5, softcap=50.0, window=torch.tensor([4, NO_WINDOW]))
    """

    scale: float | torch.Tensor
    softcap: float | None = None
    window: torch.Tensor | None = None

    @classmethod
    def per_layer(
        cls, scales: Sequence[float], softcaps: Sequence[float | None], windows: Sequence[int | None]
    ) -> LogitSpec:
        """From per-layer lists; a scale equal on every layer stays a float (bit-identical to a plain scale)."""
        caps = set(softcaps)
        if len(caps) > 1:
            raise ValueError(
                f"attention softcap per layer {list(softcaps)}: expected one value for all layers"
            )
        scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales, dtype=torch.float64)
        win = None
        if any(w is not None for w in windows):
            win = torch.tensor([NO_WINDOW if w is None else int(w) for w in windows], dtype=torch.long)
        return cls(scale, caps.pop() if caps else None, win)

    def select(self, idx: torch.Tensor) -> LogitSpec:
        """The spec of layers `idx` (long (L_sel,)) only."""
        scale = (
            self.scale.index_select(0, idx.to(self.scale.device))
            if torch.is_tensor(self.scale)
            else self.scale
        )
        win = self.window.index_select(0, idx.to(self.window.device)) if self.window is not None else None
        return LogitSpec(scale, self.softcap, win)

    def divided_by(self, temperature: float) -> LogitSpec:
        """Logits / temperature: softcap(z)/t = (softcap/t) tanh(z (scale/t) / (softcap/t))."""
        if temperature == 1.0:
            return self
        cap = None if self.softcap is None else self.softcap / temperature
        return LogitSpec(self.scale / temperature, cap, self.window)


def _per_layer(x: torch.Tensor, ndim: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(L,) -> (L, 1, 1, 1) so it lines up with dim -4 of an (*, H, c, e) block of `ndim` dims."""
    return x.to(device=device, dtype=dtype).view(-1, *([1] * 3))[(None,) * (ndim - 4)]


def attention_logits(
    q: torch.Tensor, k: torch.Tensor, spec: LogitSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled (and softcapped) logits, unmasked.

    Shapes: q (*, H, c, D), k (*, G, e, D) -> z (*, H, c, e).
    Returns (z, dz_dqk): dz_dqk is None without softcap, else d z / d (q k^T) = scale * (1 - tanh^2) (for
    analytic backward passes); with no softcap that derivative is `spec.scale`.
    """
    *lead, H, c, D = q.shape
    G, e = k.shape[-3], k.shape[-2]
    s = q.reshape(*lead, G, H // G, c, D) @ k.unsqueeze(-3).transpose(-1, -2)  # (*, G, H/G, c, e)
    s = s.reshape(*lead, H, c, e)
    scale = spec.scale
    if torch.is_tensor(scale):
        scale = _per_layer(scale, s.dim(), s.dtype, s.device)
    z = s * scale
    if spec.softcap is None:
        return z, None
    t = torch.tanh(z / spec.softcap)
    return spec.softcap * t, scale * (1.0 - t * t)


def visible_keys(rows: torch.Tensor, num_keys: int, window: torch.Tensor | None, ndim: int) -> torch.Tensor:
    """Causal (and sliding-window) visibility of keys 0..e-1 for query rows `rows` (c,) long.

    Returns bool (c, e) without a window, else (L, 1, c, e) lined up with dim -4, left-padded with unit
    dims to `ndim` dims.
    """
    keys = torch.arange(num_keys, device=rows.device)[None, :]  # (1, e)
    ok = keys <= rows[:, None]  # (c, e)
    if window is None:
        return ok[(None,) * (ndim - 2)]
    dist = rows[:, None] - keys  # (c, e)
    ok = ok & (dist[None] < window.to(rows.device)[:, None, None])  # (L, c, e)
    return ok[:, None][(None,) * (ndim - 4)]


def attention_log_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    spec: LogitSpec,
    key_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive full-map attention log-probabilities and the visibility mask (reference and stage-1 tools).

    Args:
        q: (*, H, T, D) post-RoPE queries; k: (*, G, T, D) keys (before the GQA repeat).
        spec: scale / softcap / window of this side.
        key_mask: None, or (B, T) bool real keys when dim 0 of q is the batch.
        rows: None (every row) or (n,) long query positions (row r sees keys 0..r).
    Returns:
        (log p (*, H, n, T) with -inf on invisible keys, visible (broadcastable to it) bool). A row without any
        visible key is all -inf (callers that need a finite value use `attention_probs`).
    """
    T = k.shape[-2]
    rows = torch.arange(T, device=q.device) if rows is None else rows.to(q.device)
    z, _ = attention_logits(q[..., rows, :], k, spec)  # (*, H, n, T)
    vis = visible_keys(rows, T, spec.window, z.dim())
    if key_mask is not None:
        if key_mask.shape != (q.shape[0], T) or key_mask.dtype != torch.bool:
            raise ValueError(
                f"key_mask shape {tuple(key_mask.shape)} dtype {key_mask.dtype}: expected a (B, T)="
                f"{(q.shape[0], T)} bool"
            )
        vis = vis & key_mask.view(q.shape[0], *([1] * (z.dim() - 2)), T)
    return torch.log_softmax(z.masked_fill(~vis, float("-inf")), dim=-1), vis


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    spec: LogitSpec | float,
    key_mask: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention probabilities of the teacher's (or student's) own attention, rebuilt from Q/K.

    Args: as `attention_log_probs`; `spec` may be a plain float scale.
    Shapes: q (*, H, T, D), k (*, G, T, D) -> (*, H, n, T); a row with no visible key is all zeros.
    Example:
        >>> p = attention_probs(q, k, LogitSpec(24**-0.5, softcap=50.0))   # (L, H, T, T)
    """
    spec = spec if isinstance(spec, LogitSpec) else LogitSpec(float(spec))
    logp, _ = attention_log_probs(q, k, spec, key_mask, rows)
    return logp.exp().nan_to_num(0.0)
