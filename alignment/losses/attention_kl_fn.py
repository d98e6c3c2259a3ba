"""Fused streaming attention KL: a custom autograd Function with analytic gradients, recomputing each
query-row chunk in backward (used by `alignment.losses.attention_kl.attention_kl`).

Shapes: B batch, L layers, H_s/H_t query heads, G_s/G_t KV heads, T tokens, c rows per chunk, e = keys a
chunk can see (causal: rows [s, e) read keys [0, e)), D_s/D_t head dims, M head mix (L|1, H_s, H_t).

Per real query row r (weight w_r), with z = q k^T * scale (then softcap * tanh(z / softcap) when a side has a
softcap; `alignment.geometry.attention_probs.LogitSpec`) masked to the allowed keys (causal, real, inside the side's
sliding window):
  no mix:  KL_r = sum_j p_t (log p_t - log p_s);  dKL/dz_s = p_s - p_t;  dKL/dz_t = p_t (log p_t - log p_s - KL_r)
  mix:     m = M p_t;  KL_r = sum_j m (log m - log p_s);  dKL/dz_s = p_s sum_j m - m;
           g = log m + 1 - log p_s;  dKL/dp_t = M^T g;  dKL/dz_t = p_t (dKL/dp_t - sum_j p_t dKL/dp_t);
           dKL/dM = sum_rows,j g p_t^T
Each row's KL is weighted by w_r and, when a head mask is given, by head_w[l, s] (0/1 per student layer and
query head: `align.head_select` distils only chosen heads). Then dq = dz k * scale and dk = dz^T q * scale
summed over the query heads sharing the KV head (with a softcap, dz is first multiplied by 1 - tanh^2). Only the
inputs are saved; backward recomputes one (B, L, H, c, e) block at a time, so memory is O(c * T), and it does
the work of autograd-through-checkpoint without re-running autograd's graph construction per chunk.
"""

from __future__ import annotations

import torch

from alignment.geometry.attention_probs import FILL, LogitSpec, attention_logits, visible_keys

_FILL = FILL  # finite "minus infinity" for masked logits (exp underflows to exactly 0)


def _grads(dz: torch.Tensor, q: torch.Tensor, k: torch.Tensor, mult) -> tuple[torch.Tensor, torch.Tensor]:
    """dz (B, L, H, c, e) -> dq (B, L, H, c, D), dk (B, L, G, e, D) for z = (q k^T) * mult under GQA
    (mult: a float, or a per-layer (L, 1, 1, 1) tensor)."""
    B, L, H, c, e = dz.shape
    G = k.shape[2]
    dzg = dz.view(B, L, G, H // G, c, e)
    dq = (dzg @ k.unsqueeze(3)).view(B, L, H, c, -1) * mult  # (B, L, H, c, D)
    dk = (dzg.transpose(-1, -2) @ q.view(B, L, G, H // G, c, -1)).sum(3) * mult  # (B, L, G, e, D)
    return dq, dk


def _raw_grads(dz, deriv, q, k, spec: LogitSpec):
    """Chain dz (w.r.t. the final logits) back to q and k: through the softcap when there is one."""
    if deriv is not None:
        return _grads(dz * deriv, q, k, 1.0)
    scale = spec.scale
    if torch.is_tensor(scale):
        scale = scale.to(dz.dtype).view(-1, 1, 1, 1)
    return _grads(dz, q, k, scale)


def _mix(M: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """M (L|1, H_s, H_t), p (B, L, H_t, c, e) -> (B, L, H_s, c, e)."""
    B, L, H_t, c, e = p.shape
    return (M[None] @ p.reshape(B, L, H_t, c * e)).view(B, L, M.shape[-2], c, e)


def _side(q, k, spec: LogitSpec, allowed, start):
    """One side's log-probabilities over its visible keys (`allowed` & its own window), its softcap derivative
    (None without softcap) and its visible keys."""
    z, deriv = attention_logits(q, k, spec)  # (B, L, H, c, e)
    if spec.window is not None:
        rows = torch.arange(start, start + q.shape[3], device=q.device)
        allowed = allowed & visible_keys(rows, k.shape[3], spec.window, 5)  # (B, L, 1, c, e)
    return torch.log_softmax(z.masked_fill(~allowed, _FILL), dim=-1), deriv, allowed


def _chunk(q_s, k_s, q_t, k_t, key_ok, M, start, spec_s, spec_t):
    """Recompute one chunk: allowed (B, 1, 1, c, e) causal real keys, the student's visible keys (B, 1|L, 1,
    c, e), log p_s, p_t (per teacher head), target m, log m, and the softcap derivatives d_s, d_t (None
    without softcap).

    Each side's sliding window narrows only its own distribution: a teacher window zeroes p_t outside it. A
    student window narrower than the teacher's target is not supported (the KL would be ~1e30).
    """
    c, e = q_s.shape[3], k_s.shape[3]
    rows = torch.arange(start, start + c, device=q_s.device)[:, None]
    allowed = ((torch.arange(e, device=q_s.device)[None, :] <= rows) & key_ok[:, None, :e])[:, None, None]
    logp_s, d_s, vis_s = _side(q_s, k_s, spec_s, allowed, start)
    logp_t, d_t, _ = _side(q_t, k_t, spec_t, allowed, start)
    p_t = logp_t.exp()  # (B, L, H_t, c, e)
    if M is None:
        return allowed, vis_s, logp_s, p_t, p_t, logp_t, d_s, d_t
    m = _mix(M, p_t)  # (B, L, H_s, c, e)
    return allowed, vis_s, logp_s, p_t, m, torch.log(m.clamp_min(torch.finfo(m.dtype).tiny)), d_s, d_t


class StreamingAttentionKL(torch.autograd.Function):
    """sum_r w_r KL_r over all (B, L, H_s) query rows; see module docstring. Inputs in the work dtype."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, key_ok, row_w, M, chunk, spec_s, spec_t, head_w=None):
        T = q_s.shape[3]
        total = q_s.new_zeros(())
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            qs, ks, qt, kt = q_s[..., s:e, :], k_s[..., :e, :], q_t[..., s:e, :], k_t[..., :e, :]
            allowed, _, logp_s, _, m, logm, _, _ = _chunk(qs, ks, qt, kt, key_ok, M, s, spec_s, spec_t)
            kl = torch.where(allowed, m * (logm - logp_s), 0.0).sum(-1)  # (B, L, H_s, c)
            if head_w is not None:
                kl = kl * head_w[None, :, :, None]
            total = total + (kl * row_w[:, None, None, s:e]).sum()
        ctx.save_for_backward(q_s, k_s, q_t, k_t, key_ok, row_w, M, head_w)
        ctx.chunk, ctx.spec_s, ctx.spec_t, ctx.has_mix = chunk, spec_s, spec_t, M is not None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        q_s, k_s, q_t, k_t, key_ok, row_w, M, head_w = ctx.saved_tensors
        M = M if ctx.has_mix else None
        chunk, spec_s, spec_t = ctx.chunk, ctx.spec_s, ctx.spec_t
        T = q_s.shape[3]
        dq_s, dk_s = torch.zeros_like(q_s), torch.zeros_like(k_s)
        dM = torch.zeros_like(M) if M is not None and ctx.needs_input_grad[6] else None
        teacher_grads = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        dq_t, dk_t = (torch.zeros_like(q_t), torch.zeros_like(k_t)) if teacher_grads else (None, None)
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            qs, ks, qt, kt = q_s[..., s:e, :], k_s[..., :e, :], q_t[..., s:e, :], k_t[..., :e, :]
            allowed, vis_s, logp_s, p_t, m, logm, d_s, d_t = _chunk(
                qs, ks, qt, kt, key_ok, M, s, spec_s, spec_t
            )
            w = (grad_out * row_w[:, None, None, s:e, None]).to(logp_s.dtype)  # (B, 1, 1, c, 1)
            if head_w is not None:
                w = w * head_w[None, :, :, None, None]  # (B, L, H_s, c, 1)
            p_s = logp_s.exp()
            dz_s = torch.where(vis_s, p_s * m.sum(-1, keepdim=True) - m, 0.0) * w  # (B, L, H_s, c, e)
            dq, dk = _raw_grads(dz_s, d_s, qs, ks, spec_s)
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
                    per_layer = M.shape[0] == L
                    dM += contrib.sum(0) if per_layer else contrib.sum((0, 1))[None]
            if not teacher_grads:
                continue
            dq, dk = _raw_grads(dz_t, d_t, qt, kt, spec_t)
            dq_t[..., s:e, :] = dq
            dk_t[..., :e, :] += dk
        return dq_s, dk_s, dq_t, dk_t, None, None, dM, None, None, None, None
