"""MiniLMv2 self-relation distillation: KL between teacher and student Q-Q / K-K / V-V relations.

Shapes: B batch, L (student) layers, H query or KV heads of one side, T tokens, D head dim, R relation heads,
d = H * D / R the relation-head size of one side (`_t` teacher, `_s` student).

For one component X (q: query heads; k, v: KV heads) of each side (Wang et al., MiniLMv2, arXiv 2012.15828):

    X (B, L, H, T, D) --concat heads--> (B, L, T, H*D) --re-split--> (B, L, R, T, d)
    relation_r = softmax(X_r X_r^T / sqrt(d)) under the causal mask and the real-token key mask
    loss = mean over counted query rows, layers and relation heads of KL(relation_t || relation_s)

Both sides are re-split into the same R heads, so any head counts and head dims compare, with no learned
parameters. With `heads: "selected"` (`selected_relation_kl`) nothing is re-split: each teacher head that
`align.head_select` chose gives its own relation map, the target of the student head it maps to (the head
mixer, one-hot for one-to-one), averaged over the selected (layer, student head) pairs only: relation KD on
the retrieval heads, as the attention KL does for attention maps. KV components (G heads) are first expanded
to the query heads that read them, so a head's K relation is its KV group's.

The relation map is an attention map whose queries and keys are the same tensor, so the streaming attention
KL (`alignment.losses.attention_kl`, O(T) memory, analytic gradients) computes it: the gradient with respect
to X is the sum of its query and key parts. `naive_relation_kl` is the plain T x T reference.
"""

from __future__ import annotations

import torch

from alignment.geometry.attention_probs import LogitSpec, attention_logits
from alignment.losses.attention_kl import attention_kl

COMPONENTS = ("q", "k", "v")
SELECTED = "selected"  # `loss_config.relation.heads`: one relation map per selected head, no re-split


def check_relation_heads(width: int, heads: int, name: str) -> None:
    """One-line error when R does not divide a concatenated width H*D."""
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(
            f"loss_config.relation.heads={heads!r}: expected a positive int dividing the {name} width {width}"
        )


def split_relation_heads(x: torch.Tensor, heads: int, name: str = "x") -> torch.Tensor:
    """(B, L, H, T, D) -> (B, L, R, T, H*D/R): concatenate the heads of each token, re-split into R heads."""
    if x.dim() != 5:
        raise ValueError(f"relation input {name}: got shape {tuple(x.shape)}, expected (B, L, H, T, D)")
    B, L, H, T, D = x.shape
    check_relation_heads(H * D, heads, name)
    return x.transpose(2, 3).reshape(B, L, T, heads, H * D // heads).transpose(2, 3)  # (B, L, R, T, d)


def relation_kl(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    *,
    query_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
    name: str = "x",
) -> torch.Tensor:
    """Mean row KL(teacher relation || student relation) of one component (module docstring), streamed.

    Args:
        x_s: student (B, L, H_s, T, D_s); x_t: teacher (B, L, H_t, T, D_t) (layer-mapped, not projected).
        heads: R relation heads (must divide H_s*D_s and H_t*D_t).
        mask: (B, T) bool real tokens (keys); query_mask: (B, T) bool rows that count (default: mask).
        chunk_size: query rows per streamed chunk.
        name: component name for error messages.
    Returns: a 0-dim tensor (float32, or float64 for float64 inputs).
    Example:
        >>> relation_kl(q_s, q_t_raw, heads=8, mask=mask)
    """
    if x_s.shape[:2] != x_t.shape[:2] or x_s.shape[3] != x_t.shape[3]:
        raise ValueError(
            f"relation {name}: student {tuple(x_s.shape)} vs teacher {tuple(x_t.shape)}: expected equal B, L, T"
        )
    r_s = split_relation_heads(x_s, heads, f"student {name}")  # (B, L, R, T, d_s)
    r_t = split_relation_heads(x_t, heads, f"teacher {name}")  # (B, L, R, T, d_t)
    return _self_relation_kl(r_s, r_t, mask, query_mask=query_mask, chunk_size=chunk_size)


def _self_relation_kl(x_s: torch.Tensor, x_t: torch.Tensor, mask, **kw) -> torch.Tensor:
    """The streaming attention KL with queries = keys = X on each side, scaled by 1/sqrt(its head dim)."""
    scales = {"scale_s": x_s.shape[-1] ** -0.5, "scale_t": x_t.shape[-1] ** -0.5}
    return attention_kl(x_s, x_s, x_t, x_t, mask, **scales, **kw)


def naive_relation_kl(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    heads: int,
    mask: torch.Tensor | None = None,
    *,
    query_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for `relation_kl`: explicit (B, L, R, T, T) relation maps, autograd (tests only)."""
    B, L, _, T, _ = x_s.shape
    mask = torch.ones(B, T, dtype=torch.bool) if mask is None else mask
    wd = torch.float64 if torch.float64 in (x_s.dtype, x_t.dtype) else torch.float32
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (causal[None] & mask[:, None, :]) | torch.eye(T, dtype=torch.bool)[None]  # (B, T, T)
    allowed = allowed[:, None, None]  # (B, 1, 1, T, T)

    def logrel(x):
        r = split_relation_heads(x.to(wd), heads)
        z, _ = attention_logits(r, r, LogitSpec(r.shape[-1] ** -0.5))  # (B, L, R, T, T)
        logp = torch.log_softmax(z.masked_fill(~allowed, float("-inf")), dim=-1)
        return logp.masked_fill(~allowed, 0.0)  # no -inf reaches the product below (0 * inf = NaN grads)

    ls, lt = logrel(x_s), logrel(x_t)
    kl = torch.where(allowed, lt.exp() * (lt - ls), 0.0).sum(-1)  # (B, L, R, T)
    rows = mask if query_mask is None else mask & query_mask
    w = rows[:, None, None, :].to(wd)
    return (kl * w).sum() / (rows.sum() * L * heads).clamp_min(1)


def to_query_heads(x: torch.Tensor, heads: int, name: str = "x") -> torch.Tensor:
    """(B, L, H or G, T, D) -> (B, L, H, T, D): KV heads repeated for the query heads that read them (GQA:
    query head h reads KV head h // (H / G)); query-head tensors are returned as they are."""
    if x.dim() != 5 or heads % x.shape[2]:
        raise ValueError(
            f"selected relation input {name}: got shape {tuple(x.shape)}, expected (B, L, H, T, D) with H "
            f"dividing the {heads} query heads"
        )
    return x if x.shape[2] == heads else x.repeat_interleave(heads // x.shape[2], dim=2)


def selected_relation_kl(
    x_s: torch.Tensor,
    x_t: torch.Tensor,
    head_mix: torch.Tensor,
    head_mask: torch.Tensor | None,
    mask: torch.Tensor | None = None,
    *,
    query_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
    name: str = "x",
) -> torch.Tensor:
    """Mean row KL(teacher head relation || student head relation) over the selected heads (module docstring).

    Args:
        x_s: student (B, L, H_s or G_s, T, D_s); x_t: teacher (B, L, H_t or G_t, T, D_t), raw, layer-mapped.
        head_mix: (H_s, H_t) or (L, H_s, H_t) convex weights over query heads (the aligner's; detached here,
            so the target is fixed); head_mask: (L, H_s) bool, the pairs that count (None: all).
        mask, query_mask, chunk_size: as `relation_kl`.
    Returns: a 0-dim tensor (float32, or float64 for float64 inputs).
    Example:
        >>> selected_relation_kl(q_s, q_t_raw, out.head_mix, head_mask, mask)
    """
    if head_mix is None:
        raise ValueError(
            f"relation {name} on selected heads: head_mix is None, expected the aligner's head mixer "
            "(set align.head_select)"
        )
    H_s, H_t = head_mix.shape[-2:]
    x_s = to_query_heads(x_s, H_s, f"student {name}")  # (B, L, H_s, T, D_s)
    x_t = to_query_heads(x_t, H_t, f"teacher {name}")  # (B, L, H_t, T, D_t)
    kw = dict(head_mix=head_mix.detach(), head_mask=head_mask, query_mask=query_mask, chunk_size=chunk_size)
    return _self_relation_kl(x_s, x_t, mask, **kw)
