"""Fused streaming attention KL: a custom autograd Function with analytic gradients, recomputing each
query-row chunk in backward (used by `alignment.attention_kl.attention_kl`).

Shapes: B batch, L layers, H_s/H_t query heads, G_s/G_t KV heads, T tokens, c rows per chunk, e = keys a
chunk can see (causal: rows [s, e) read keys [0, e)), D_s/D_t head dims, M head mix (L|1, H_s, H_t).

Per real query row r (weight w_r), with z = q k^T * scale masked to the allowed keys:
  no mix:  KL_r = sum_j p_t (log p_t - log p_s);  dKL/dz_s = p_s - p_t;  dKL/dz_t = p_t (log p_t - log p_s - KL_r)
  mix:     m = M p_t;  KL_r = sum_j m (log m - log p_s);  dKL/dz_s = p_s sum_j m - m;
           g = log m + 1 - log p_s;  dKL/dp_t = M^T g;  dKL/dz_t = p_t (dKL/dp_t - sum_j p_t dKL/dp_t);
           dKL/dM = sum_rows,j g p_t^T
Each row's KL is weighted by w_r and, when a head mask is given, by head_w[l, s] (0/1 per student layer and
query head: `align.head_select` distils only chosen heads). Then dq = dz k * scale and dk = dz^T q * scale summed over the query heads sharing the KV head. Only the
inputs are saved; backward recomputes one (B, L, H, c, e) block at a time, so memory is O(c * T), and it does
the work of autograd-through-checkpoint without re-running autograd's graph construction per chunk.
"""

from __future__ import annotations

import torch

_FILL = -1e30  # finite "minus infinity" for masked logits (exp underflows to exactly 0)


def _logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, L, H, c, D), k (B, L, G, e, D) -> (B, L, H, c, e); query head h reads KV head h // (H/G)."""
    B, L, H, c, D = q.shape
    G = k.shape[2]
    s = q.view(B, L, G, H // G, c, D) @ k.unsqueeze(3).transpose(-1, -2)  # (B, L, G, H/G, c, e)
    return s.view(B, L, H, c, k.shape[3]) * scale


def _grads(
    dz: torch.Tensor, q: torch.Tensor, k: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """dz (B, L, H, c, e) -> dq (B, L, H, c, D), dk (B, L, G, e, D) for z = q k^T * scale under GQA."""
    B, L, H, c, e = dz.shape
    G = k.shape[2]
    dzg = dz.view(B, L, G, H // G, c, e)
    dq = (dzg @ k.unsqueeze(3)).view(B, L, H, c, -1) * scale  # (B, L, H, c, D)
    dk = (dzg.transpose(-1, -2) @ q.view(B, L, G, H // G, c, -1)).sum(3) * scale  # (B, L, G, e, D)
    return dq, dk


def _mix(M: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """M (L|1, H_s, H_t), p (B, L, H_t, c, e) -> (B, L, H_s, c, e)."""
    B, L, H_t, c, e = p.shape
    return (M[None] @ p.reshape(B, L, H_t, c * e)).view(B, L, M.shape[-2], c, e)


def _chunk(q_s, k_s, q_t, k_t, key_ok, M, start, scale_s, scale_t):
    """Recompute one chunk: allowed (B, 1, 1, c, e), log p_s, p_t (per teacher head), target m, log m."""
    c, e = q_s.shape[3], k_s.shape[3]
    rows = torch.arange(start, start + c, device=q_s.device)[:, None]
    allowed = ((torch.arange(e, device=q_s.device)[None, :] <= rows) & key_ok[:, None, :e])[:, None, None]
    logp_s = torch.log_softmax(_logits(q_s, k_s, scale_s).masked_fill(~allowed, _FILL), dim=-1)
    logp_t = torch.log_softmax(_logits(q_t, k_t, scale_t).masked_fill(~allowed, _FILL), dim=-1)
    p_t = logp_t.exp()  # (B, L, H_t, c, e)
    if M is None:
        return allowed, logp_s, p_t, p_t, logp_t
    m = _mix(M, p_t)  # (B, L, H_s, c, e)
    return allowed, logp_s, p_t, m, torch.log(m.clamp_min(torch.finfo(m.dtype).tiny))


class StreamingAttentionKL(torch.autograd.Function):
    """sum_r w_r KL_r over all (B, L, H_s) query rows; see module docstring. Inputs in the work dtype."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, key_ok, row_w, M, chunk, scale_s, scale_t, head_w=None):
        T = q_s.shape[3]
        total = q_s.new_zeros(())
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            allowed, logp_s, _, m, logm = _chunk(q_s[..., s:e, :], k_s[..., :e, :], q_t[..., s:e, :],
                                                 k_t[..., :e, :], key_ok, M, s, scale_s, scale_t)  # fmt: skip
            kl = torch.where(allowed, m * (logm - logp_s), 0.0).sum(-1)  # (B, L, H_s, c)
            if head_w is not None:
                kl = kl * head_w[None, :, :, None]
            total = total + (kl * row_w[:, None, None, s:e]).sum()
        ctx.save_for_backward(q_s, k_s, q_t, k_t, key_ok, row_w, M, head_w)
        ctx.chunk, ctx.scale_s, ctx.scale_t, ctx.has_mix = chunk, scale_s, scale_t, M is not None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        q_s, k_s, q_t, k_t, key_ok, row_w, M, head_w = ctx.saved_tensors
        M = M if ctx.has_mix else None
        chunk, scale_s, scale_t = ctx.chunk, ctx.scale_s, ctx.scale_t
        T = q_s.shape[3]
        dq_s, dk_s = torch.zeros_like(q_s), torch.zeros_like(k_s)
        dM = torch.zeros_like(M) if M is not None and ctx.needs_input_grad[6] else None
        teacher_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dq_t, dk_t = (torch.zeros_like(q_t), torch.zeros_like(k_t)) if teacher_grads else (None, None)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            qs, ks, qt, kt = q_s[..., s:e, :], k_s[..., :e, :], q_t[..., s:e, :], k_t[..., :e, :]
            allowed, logp_s, p_t, m, logm = _chunk(qs, ks, qt, kt, key_ok, M, s, scale_s, scale_t)
            w = (grad_out * row_w[:, None, None, s:e, None]).to(logp_s.dtype)  # (B, 1, 1, c, 1)
            if head_w is not None:
                w = w * head_w[None, :, :, None, None]  # (B, L, H_s, c, 1)
            p_s = logp_s.exp()
            dz_s = torch.where(allowed, p_s * m.sum(-1, keepdim=True) - m, 0.0) * w  # (B, L, H_s, c, e)
            dq, dk = _grads(dz_s, qs, ks, scale_s)
            dq_s[..., s:e, :] = dq
            dk_s[..., :e, :] += dk
            if not (teacher_grads or dM is not None):
                continue  # e.g. attn_target="teacher": the stored teacher states need no gradient
            if M is None:
                kl = torch.where(allowed, m * (logm - logp_s), 0.0).sum(-1, keepdim=True)
                dz_t = torch.where(allowed, p_t * (logm - logp_s - kl), 0.0) * w
            else:
                g = torch.where(allowed, logm + 1.0 - logp_s, 0.0) * w  # dKL/dm, (B, L, H_s, c, e)
                B, L, H_s, c, _ = g.shape
                gp = (M[None].transpose(-1, -2) @ g.reshape(B, L, H_s, c * e)).view_as(p_t)  # dKL/dp_t
                dz_t = p_t * (gp - (p_t * gp).sum(-1, keepdim=True))
                if dM is not None:
                    H_t = p_t.shape[2]
                    contrib = g.reshape(B, L, H_s, -1) @ p_t.reshape(B, L, H_t, -1).transpose(-1, -2)
                    dM += (
                        contrib.sum(0) if M.shape[0] == L else contrib.sum((0, 1))[None]
                    )  # per-layer | shared
            if not teacher_grads:
                continue
            dq, dk = _grads(dz_t, qt, kt, scale_t)
            dq_t[..., s:e, :] = dq
            dk_t[..., :e, :] += dk
        return dq_s, dk_s, dq_t, dk_t, None, None, dM, None, None, None, None
