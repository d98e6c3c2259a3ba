"""Attention KL across tokenizers: the teacher's attention re-expressed on the student's tokens.

Shape glossary: B batch, L layers, H_t / H_s query heads, G_t / G_s KV heads, T_t teacher tokens, T_s student
tokens, D_t / D_s head dims; W (B, T_s, T_t) the character-overlap alignment
(alignment/mapping/char_alignment.py, a `WarpPlan` on the student axis).

    A_t  = softmax(q_t k_t^T * scale_t) over causal, real (and windowed) teacher keys   (B, L, H_t, T_t, T_t)
    A_m  = head_mix @ A_t  (teacher heads mixed into student heads; identity when H_t = H_s)  (B, L, H_s, ...)
    P    = W A_m W^T, zeroed above the diagonal (causal on the student axis: two student tokens can share a
           teacher token), rows renormalised                                               (B, L, H_s, T_s, T_s)
    KL   = mean over counted rows (real student tokens with a W row, narrowed by query_mask), layers and
           student heads (head_mask: the selected ones) of sum_j P (log P - log p_s) on P's support.

With identical tokenisations W = I and P = A_m: the value equals `attention_kl` (to float rounding).
Memory: whole (B, L, H, T, T) maps, no streaming (the target is not a softmax of one Q/K pair any more); it
is meant for the short sequences of cross-tokenizer runs. drop_keys removes student key positions from
both distributions (renormalised), as `attention_kl` does.
`naive_warped_attention_kl` builds P entry by entry from the dense W (the tests' reference).
"""

from __future__ import annotations

import torch

from alignment.geometry.attention_probs import LogitSpec, attention_log_probs
from alignment.mapping.char_alignment import dense_alignment
from alignment.mapping.time_warping import WarpPlan


def _spec(q: torch.Tensor, scale, softcap, window, temperature: float) -> LogitSpec:
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.is_tensor(scale):
        scale = scale.to(q.device)
    win = None if window is None else torch.as_tensor(window, dtype=torch.long, device=q.device)
    return LogitSpec(scale, softcap, win).divided_by(temperature)


def teacher_attention(q_t, k_t, t_mask, spec: LogitSpec, head_mix) -> torch.Tensor:
    """A_m (B, L, H_s, T_t, T_t) float64/32: the teacher's attention, mixed into student heads."""
    logp, _ = attention_log_probs(q_t, k_t, spec, key_mask=t_mask)  # (B, L, H_t, T_t, T_t)
    A = logp.exp().nan_to_num(0.0)
    if head_mix is None:
        return A
    B, L, H_t, T, _ = A.shape
    M = head_mix.to(A.dtype)
    M = M[None] if M.dim() == 3 else M[None, None]  # (1, L|1, H_s, H_t)
    return (M @ A.reshape(B, L, H_t, T * T)).view(B, L, M.shape[-2], T, T)


def warped_target(
    A: torch.Tensor, W: torch.Tensor, keep_keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """P (B, L, H, T_s, T_s): W A W^T, causal on the student axis, restricted to `keep_keys` (B, T_s) and row-
    renormalised; and the rows that hold any mass (B, L, H, T_s)."""
    W = W.to(A.dtype)[:, None, None]  # (B, 1, 1, T_s, T_t)
    P = W @ A @ W.transpose(-1, -2)  # (B, L, H, T_s, T_s)
    T_s = P.shape[-1]
    allowed = (
        torch.ones(T_s, T_s, dtype=torch.bool, device=P.device).tril() & keep_keys[:, None, None, None, :]
    )
    P = torch.where(allowed, P, 0.0)
    total = P.sum(-1, keepdim=True)
    return P / total.clamp_min(torch.finfo(P.dtype).tiny), total[..., 0] > 0


def _student_log_probs(q_s, k_s, spec, s_keys):
    """log p_s (B, L, H_s, T_s, T_s) over the student's keys (renormalised over `s_keys`), finite everywhere."""
    logp, vis = attention_log_probs(q_s, k_s, spec)
    vis = vis & s_keys[:, None, None, None, :]
    z = torch.where(vis, logp, torch.finfo(logp.dtype).min)
    return torch.log_softmax(z, dim=-1), vis


def warped_attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    plan: WarpPlan,
    s_mask: torch.Tensor,
    t_mask: torch.Tensor,
    *,
    scale_s=None,
    scale_t=None,
    temperature: float = 1.0,
    head_mix: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    drop_keys=None,
    softcap_s=None,
    softcap_t=None,
    window_s=None,
    window_t=None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """KL(W A_t W^T || student attention) on the student's tokens (module docstring).

    Args:
        q_s, k_s: student (B, L, H_s, T_s, D_s), (B, L, G_s, T_s, D_s).
        q_t, k_t: teacher on ITS axis (B, L, H_t, T_t, D_t), (B, L, G_t, T_t, D_t) (raw, or projected with H_s).
        plan: W as a WarpPlan (B, T_s, K) -> T_t (`char_alignment.alignment_plan`); plan.mask = rows W has.
        s_mask: (B, T_s) bool real student tokens (the keys the student may use); t_mask (B, T_t) real teacher tokens.
        head_mix: None (H_t = H_s) or (H_s, H_t) / (L, H_s, H_t) convex teacher-head weights (used as given).
        query_mask, head_mask, drop_keys, temperature, scales, softcaps, windows: as `attention_kl`.
        chunk_size: accepted so callers pass `attention_kl`'s options as they are; this KL is not streamed.
    Returns: a 0-dim tensor (float32, or float64 for float64 inputs).
    """
    B, L, H_s, T_s, _ = q_s.shape
    if plan.index.shape[:2] != (B, T_s) or plan.T_in != q_t.shape[3] or s_mask.shape != (B, T_s):
        raise ValueError(
            f"warped attention KL: plan {tuple(plan.index.shape)} -> T_t={plan.T_in}, s_mask {tuple(s_mask.shape)}, "
            f"q_s {tuple(q_s.shape)}, q_t {tuple(q_t.shape)}: expected plan (B, T_s, K) -> T_t of q_t, s_mask (B, T_s)"
        )
    wd = torch.float64 if torch.float64 in (q_s.dtype, q_t.dtype) else torch.float32
    spec_s = _spec(q_s, scale_s, softcap_s, window_s, temperature)
    spec_t = _spec(q_t, scale_t, softcap_t, window_t, temperature)
    keys = s_mask.clone()
    if drop_keys:
        keys[:, [j for j in drop_keys if j < T_s]] = False
    A = teacher_attention(q_t.to(wd), k_t.to(wd), t_mask, spec_t, head_mix)
    P, has_mass = warped_target(A, dense_alignment(plan), keys)
    logp_s, _ = _student_log_probs(q_s.to(wd), k_s.to(wd), spec_s, keys)
    rows = plan.mask & s_mask & (keys.cumsum(1) > 0)  # a row left without any key does not count
    rows = rows if query_mask is None else rows & query_mask
    hw = torch.ones(L, H_s, dtype=wd, device=q_s.device) if head_mask is None else head_mask.to(wd)
    w = rows[:, None, None, :].to(wd) * hw[None, :, :, None] * has_mass  # (B, L, H_s, T_s)
    kl = torch.where(P > 0, P * (torch.log(P.clamp_min(torch.finfo(wd).tiny)) - logp_s), 0.0).sum(-1)
    return (kl * w).sum() / (rows.sum() * hw.sum()).clamp_min(1)


def naive_warped_attention_kl(
    q_s, k_s, q_t, k_t, W, s_mask, t_mask, *, scale_s=None, scale_t=None, head_mix=None
):
    """Reference: loops over (b, l, h, i, j) with a dense W (B, T_s, T_t); float64; no options (tests only)."""
    B, L, H_s, T_s, D_s = q_s.shape
    H_t, T_t, D_t = q_t.shape[2], q_t.shape[3], q_t.shape[4]
    scale_s = D_s**-0.5 if scale_s is None else scale_s
    scale_t = D_t**-0.5 if scale_t is None else scale_t
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(B):
        for layer in range(L):
            A = torch.zeros(H_t, T_t, T_t, dtype=torch.float64)
            for h in range(H_t):
                kt = k_t[b, layer, h // (H_t // k_t.shape[2])].double()
                for j in range(T_t):
                    keys = [jj for jj in range(j + 1) if t_mask[b, jj]]
                    z = torch.stack([q_t[b, layer, h, j].double() @ kt[jj] * scale_t for jj in keys])
                    A[h, j, keys] = torch.softmax(z, 0)
            mix = (
                torch.eye(H_s, dtype=torch.float64)
                if head_mix is None
                else head_mix.double().reshape(-1, H_s, H_t)[-1 if head_mix.dim() == 2 else layer]
            )
            for s in range(H_s):
                Am = sum(mix[s, h] * A[h] for h in range(H_t))
                ks = k_s[b, layer, s // (H_s // k_s.shape[2])].double()
                for i in range(T_s):
                    if not (s_mask[b, i] and W[b, i].sum() > 0):
                        continue
                    keys = [ii for ii in range(i + 1) if s_mask[b, ii]]
                    target = torch.stack([W[b, i].double() @ Am @ W[b, ii].double() for ii in keys])
                    if target.sum() <= 0:
                        continue
                    target = target / target.sum()
                    z = torch.stack([q_s[b, layer, s, i].double() @ ks[ii] * scale_s for ii in keys])
                    logp = torch.log_softmax(z, 0)
                    nz = target > 0
                    total = total + (target[nz] * (target[nz].log() - logp[nz])).sum()
                    count += 1
    return total / max(count, 1)
