"""Fused attention KL on the GPU: Triton kernels that stream over key blocks like flash attention, never
materialising a T x T map, forward and backward (used by `alignment.losses.attention_kl.attention_kl`).

Shapes: B batch, L layers, H_s/H_t query heads, G_s/G_t KV heads, T tokens, D_s/D_t head dims, P the
(layer, student head) pairs that count, BM/BN query/key rows per block.

    q_s (B, L, H_s, T, D_s), k_s (B, L, G_s, T, D_s), q_t (B, L, H_t, T, D_t), k_t (B, L, G_t, T, D_t)
    pairs (P, 5) int32: layer, student head, its KV head, teacher head, its KV head (one-to-one target)
    scale_s, scale_t (P,) float32: logit scalings (temperature folded in)
    key_ok (B, T) int8: the keys attention may use (real tokens, minus dropped sink keys); causal on top
    -> kl (B, P, T) float32, the KL of every query row (0 for a row without any key)

Per row r with z = q k^T * scale over its allowed keys j <= r (online softmax, one pass over key blocks):
    KL_r = sum_j p_t (z_t - z_s) - lse_t + lse_s
    dKL/dz_s = p_s - p_t,   dKL/dz_t = p_t (z_t - z_s - lse_t + lse_s - KL_r)
Backward recomputes the logits block by block in two kernels: one per query block (dq, plain stores: every
pair owns its (layer, head) rows) and one per key block (dk, atomically added: query heads share a KV head).
Dots run in the inputs' precision (bf16 / fp16 on tensor cores; fp32 as IEEE fp32, or TF32 when
`torch.backends.cuda.matmul.allow_tf32` is set), accumulation and softmax in fp32.

Only imported where Triton is installed; `available()` says whether this path can run at all.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

_NEG = tl.constexpr(
    -1.0e30
)  # finite running-max start: exp(m_old - m_new) stays finite while a row has no key yet


def _configs():
    if os.environ.get("TRITON_INTERPRET") == "1":  # the CPU interpreter (tests) cannot benchmark: one config
        return [triton.Config({"BM": 16, "BN": 16})]
    return [
        triton.Config({"BM": bm, "BN": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3), (128, 32, 4, 2))
    ]


@triton.jit
def _load_rows(ptr, b, layer, head, sb, sl, sh, st, rows, T, d, D):
    """(rows, d) tile of x[b, layer, head, rows, :D] (0 outside)."""
    base = ptr + b * sb + layer * sl + head * sh
    return tl.load(
        base + rows[:, None] * st + d[None, :], mask=(rows[:, None] < T) & (d[None, :] < D), other=0.0
    )


@triton.jit
def _pair(Pairs, p):
    return (
        tl.load(Pairs + p * 5),
        tl.load(Pairs + p * 5 + 1),
        tl.load(Pairs + p * 5 + 2),
        tl.load(Pairs + p * 5 + 3),
        tl.load(Pairs + p * 5 + 4),
    )


@triton.autotune(configs=_configs(), key=["T_BUCKET", "BDS", "BDT"])
@triton.jit
def _kl_fwd(
    Qs,
    Ks,
    Qt,
    Kt,
    KeyOk,
    Pairs,
    ScS,
    ScT,
    KL,
    LseS,
    LseT,
    sqs_b,
    sqs_l,
    sqs_h,
    sqs_t,
    sks_b,
    sks_l,
    sks_h,
    sks_t,
    sqt_b,
    sqt_l,
    sqt_h,
    sqt_t,
    skt_b,
    skt_l,
    skt_h,
    skt_t,
    T,
    T_BUCKET,
    P,
    Ds,
    Dt,
    BDS: tl.constexpr,
    BDT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    pid_m, pid_bp = tl.program_id(0), tl.program_id(1)
    b, p = pid_bp // P, pid_bp % P
    layer, hs, gs, ht, gt = _pair(Pairs, p)
    sc_s, sc_t = tl.load(ScS + p), tl.load(ScT + p)
    rows = pid_m * BM + tl.arange(0, BM)
    ds, dt = tl.arange(0, BDS), tl.arange(0, BDT)
    q_s = _load_rows(Qs, b, layer, hs, sqs_b, sqs_l, sqs_h, sqs_t, rows, T, ds, Ds)
    q_t = _load_rows(Qt, b, layer, ht, sqt_b, sqt_l, sqt_h, sqt_t, rows, T, dt, Dt)
    m_s = tl.full([BM], _NEG, tl.float32)
    m_t = tl.full([BM], _NEG, tl.float32)
    l_s = tl.zeros([BM], tl.float32)
    l_t = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM], tl.float32)
    hi = tl.minimum((pid_m + 1) * BM, T)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        ok = tl.load(KeyOk + b * T + cols, mask=cols < T, other=0) != 0
        valid = (cols[None, :] <= rows[:, None]) & ok[None, :]
        k_s = _load_rows(Ks, b, layer, gs, sks_b, sks_l, sks_h, sks_t, cols, T, ds, Ds)
        k_t = _load_rows(Kt, b, layer, gt, skt_b, skt_l, skt_h, skt_t, cols, T, dt, Dt)
        z_s = tl.dot(q_s, tl.trans(k_s), input_precision=PREC) * sc_s
        z_t = tl.dot(q_t, tl.trans(k_t), input_precision=PREC) * sc_t
        z_s = tl.where(valid, z_s, float("-inf"))
        z_t = tl.where(valid, z_t, float("-inf"))
        n_s = tl.maximum(m_s, tl.max(z_s, 1))
        n_t = tl.maximum(m_t, tl.max(z_t, 1))
        e_s = tl.exp(z_s - n_s[:, None])
        e_t = tl.exp(z_t - n_t[:, None])
        a_t = tl.exp(m_t - n_t)
        diff = tl.where(valid, z_t - z_s, 0.0)
        l_s = l_s * tl.exp(m_s - n_s) + tl.sum(e_s, 1)
        l_t = l_t * a_t + tl.sum(e_t, 1)
        acc = acc * a_t + tl.sum(e_t * diff, 1)
        m_s, m_t = n_s, n_t
    has = l_t > 0
    lse_s = tl.where(has, m_s + tl.log(tl.where(has, l_s, 1.0)), 0.0)
    lse_t = tl.where(has, m_t + tl.log(tl.where(has, l_t, 1.0)), 0.0)
    kl = tl.where(has, acc / tl.where(has, l_t, 1.0) - lse_t + lse_s, 0.0)
    out = pid_bp * T + rows
    tl.store(KL + out, kl, mask=rows < T)
    tl.store(LseS + out, lse_s, mask=rows < T)
    tl.store(LseT + out, lse_t, mask=rows < T)


@triton.jit
def _dz(q_s, q_t, k_s, k_t, sc_s, sc_t, valid, lse_s, lse_t, kl, g, PREC: tl.constexpr):
    """(BM, BN) gradients of the row KLs (weighted by g) w.r.t. the scaled logits of both sides."""
    z_s = tl.dot(q_s, tl.trans(k_s), input_precision=PREC) * sc_s
    z_t = tl.dot(q_t, tl.trans(k_t), input_precision=PREC) * sc_t
    p_s = tl.where(valid, tl.exp(z_s - lse_s[:, None]), 0.0)
    p_t = tl.where(valid, tl.exp(z_t - lse_t[:, None]), 0.0)
    dz_s = g[:, None] * (p_s - p_t)
    lr = tl.where(valid, z_t - z_s, 0.0) - (lse_t - lse_s + kl)[:, None]
    dz_t = g[:, None] * p_t * lr
    return dz_s, dz_t


@triton.jit
def _row_stats(LseS, LseT, KL, G, pid_bp, rows, T):
    out = pid_bp * T + rows
    m = rows < T
    return (
        tl.load(LseS + out, mask=m, other=0.0),
        tl.load(LseT + out, mask=m, other=0.0),
        tl.load(KL + out, mask=m, other=0.0),
        tl.load(G + out, mask=m, other=0.0),
    )


@triton.autotune(configs=_configs(), key=["T_BUCKET", "BDS", "BDT"])
@triton.jit
def _kl_bwd_dq(
    Qs,
    Ks,
    Qt,
    Kt,
    KeyOk,
    Pairs,
    ScS,
    ScT,
    LseS,
    LseT,
    KL,
    G,
    DQs,
    DQt,
    sqs_b,
    sqs_l,
    sqs_h,
    sqs_t,
    sks_b,
    sks_l,
    sks_h,
    sks_t,
    sqt_b,
    sqt_l,
    sqt_h,
    sqt_t,
    skt_b,
    skt_l,
    skt_h,
    skt_t,
    T,
    T_BUCKET,
    P,
    Ds,
    Dt,
    BDS: tl.constexpr,
    BDT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    pid_m, pid_bp = tl.program_id(0), tl.program_id(1)
    b, p = pid_bp // P, pid_bp % P
    layer, hs, gs, ht, gt = _pair(Pairs, p)
    sc_s, sc_t = tl.load(ScS + p), tl.load(ScT + p)
    rows = pid_m * BM + tl.arange(0, BM)
    ds, dt = tl.arange(0, BDS), tl.arange(0, BDT)
    q_s = _load_rows(Qs, b, layer, hs, sqs_b, sqs_l, sqs_h, sqs_t, rows, T, ds, Ds)
    q_t = _load_rows(Qt, b, layer, ht, sqt_b, sqt_l, sqt_h, sqt_t, rows, T, dt, Dt)
    lse_s, lse_t, kl, g = _row_stats(LseS, LseT, KL, G, pid_bp, rows, T)
    dq_s = tl.zeros([BM, BDS], tl.float32)
    dq_t = tl.zeros([BM, BDT], tl.float32)
    hi = tl.minimum((pid_m + 1) * BM, T)
    for n0 in range(0, hi, BN):
        cols = n0 + tl.arange(0, BN)
        ok = tl.load(KeyOk + b * T + cols, mask=cols < T, other=0) != 0
        valid = (cols[None, :] <= rows[:, None]) & ok[None, :] & (rows[:, None] < T)
        k_s = _load_rows(Ks, b, layer, gs, sks_b, sks_l, sks_h, sks_t, cols, T, ds, Ds)
        k_t = _load_rows(Kt, b, layer, gt, skt_b, skt_l, skt_h, skt_t, cols, T, dt, Dt)
        dz_s, dz_t = _dz(q_s, q_t, k_s, k_t, sc_s, sc_t, valid, lse_s, lse_t, kl, g, PREC)
        dq_s += tl.dot(dz_s.to(k_s.dtype), k_s, input_precision=PREC)
        dq_t += tl.dot(dz_t.to(k_t.dtype), k_t, input_precision=PREC)
    m = rows[:, None] < T
    ps = DQs + b * sqs_b + layer * sqs_l + hs * sqs_h + rows[:, None] * sqs_t + ds[None, :]
    tl.store(ps, (dq_s * sc_s).to(DQs.dtype.element_ty), mask=m & (ds[None, :] < Ds))
    pt = DQt + b * sqt_b + layer * sqt_l + ht * sqt_h + rows[:, None] * sqt_t + dt[None, :]
    tl.store(pt, (dq_t * sc_t).to(DQt.dtype.element_ty), mask=m & (dt[None, :] < Dt))


@triton.autotune(configs=_configs(), key=["T_BUCKET", "BDS", "BDT"], reset_to_zero=["DKs", "DKt"])
@triton.jit
def _kl_bwd_dk(
    Qs,
    Ks,
    Qt,
    Kt,
    KeyOk,
    Pairs,
    ScS,
    ScT,
    LseS,
    LseT,
    KL,
    G,
    DKs,
    DKt,
    sqs_b,
    sqs_l,
    sqs_h,
    sqs_t,
    sks_b,
    sks_l,
    sks_h,
    sks_t,
    sqt_b,
    sqt_l,
    sqt_h,
    sqt_t,
    skt_b,
    skt_l,
    skt_h,
    skt_t,
    T,
    T_BUCKET,
    P,
    Ds,
    Dt,
    BDS: tl.constexpr,
    BDT: tl.constexpr,
    PREC: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    pid_n, pid_bp = tl.program_id(0), tl.program_id(1)
    b, p = pid_bp // P, pid_bp % P
    layer, hs, gs, ht, gt = _pair(Pairs, p)
    sc_s, sc_t = tl.load(ScS + p), tl.load(ScT + p)
    cols = pid_n * BN + tl.arange(0, BN)
    ds, dt = tl.arange(0, BDS), tl.arange(0, BDT)
    k_s = _load_rows(Ks, b, layer, gs, sks_b, sks_l, sks_h, sks_t, cols, T, ds, Ds)
    k_t = _load_rows(Kt, b, layer, gt, skt_b, skt_l, skt_h, skt_t, cols, T, dt, Dt)
    ok = tl.load(KeyOk + b * T + cols, mask=cols < T, other=0) != 0
    dk_s = tl.zeros([BN, BDS], tl.float32)
    dk_t = tl.zeros([BN, BDT], tl.float32)
    for m0 in range((pid_n * BN) // BM * BM, T, BM):  # causal: only rows >= this block's first key
        rows = m0 + tl.arange(0, BM)
        valid = (cols[None, :] <= rows[:, None]) & ok[None, :] & (rows[:, None] < T)
        q_s = _load_rows(Qs, b, layer, hs, sqs_b, sqs_l, sqs_h, sqs_t, rows, T, ds, Ds)
        q_t = _load_rows(Qt, b, layer, ht, sqt_b, sqt_l, sqt_h, sqt_t, rows, T, dt, Dt)
        lse_s, lse_t, kl, g = _row_stats(LseS, LseT, KL, G, pid_bp, rows, T)
        dz_s, dz_t = _dz(q_s, q_t, k_s, k_t, sc_s, sc_t, valid, lse_s, lse_t, kl, g, PREC)
        dk_s += tl.dot(tl.trans(dz_s.to(q_s.dtype)), q_s, input_precision=PREC)
        dk_t += tl.dot(tl.trans(dz_t.to(q_t.dtype)), q_t, input_precision=PREC)
    m = cols[:, None] < T
    ps = DKs + b * sks_b + layer * sks_l + gs * sks_h + cols[:, None] * sks_t + ds[None, :]
    tl.atomic_add(ps, dk_s * sc_s, mask=m & (ds[None, :] < Ds))
    pt = DKt + b * skt_b + layer * skt_l + gt * skt_h + cols[:, None] * skt_t + dt[None, :]
    tl.atomic_add(pt, dk_t * sc_t, mask=m & (dt[None, :] < Dt))


def _bucket(T: int) -> int:
    """Autotuning key for T: its power-of-two bucket, so variable-length batches do not re-tune every step."""
    return triton.next_power_of_2(T)


def _strides(x: torch.Tensor) -> tuple[int, int, int, int]:
    assert x.stride(-1) == 1, "the head dim must be contiguous"
    return x.stride(0), x.stride(1), x.stride(2), x.stride(3)


def _dims(q_s: torch.Tensor, q_t: torch.Tensor) -> dict:
    Ds, Dt = q_s.shape[-1], q_t.shape[-1]
    bd = lambda d: max(16, triton.next_power_of_2(d))  # noqa: E731  (tl.dot needs >= 16)
    return dict(Ds=Ds, Dt=Dt, BDS=bd(Ds), BDT=bd(Dt))


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored by tl.dot for bf16 / fp16 operands


class FusedAttentionKL(torch.autograd.Function):
    """kl (B, P, T) = per-row KL(teacher || student) of the pairs; see the module docstring."""

    @staticmethod
    def forward(ctx, q_s, k_s, q_t, k_t, key_ok, pairs, scale_s, scale_t):
        B, T, P = q_s.shape[0], q_s.shape[3], pairs.shape[0]
        kl, lse_s, lse_t = (torch.empty(B, P, T, device=q_s.device, dtype=torch.float32) for _ in range(3))
        strides = (*_strides(q_s), *_strides(k_s), *_strides(q_t), *_strides(k_t))
        dims = _dims(q_s, q_t)
        prec = _precision(q_s.dtype)

        def grid(meta):
            return (triton.cdiv(T, meta["BM"]), B * P)

        _kl_fwd[grid](
            q_s,
            k_s,
            q_t,
            k_t,
            key_ok,
            pairs,
            scale_s,
            scale_t,
            kl,
            lse_s,
            lse_t,
            *strides,
            T,
            _bucket(T),
            P,
            dims["Ds"],
            dims["Dt"],
            dims["BDS"],
            dims["BDT"],
            prec,
        )
        ctx.save_for_backward(q_s, k_s, q_t, k_t, key_ok, pairs, scale_s, scale_t, kl, lse_s, lse_t)
        return kl

    @staticmethod
    def backward(ctx, g):
        q_s, k_s, q_t, k_t, key_ok, pairs, scale_s, scale_t, kl, lse_s, lse_t = ctx.saved_tensors
        B, T, P = q_s.shape[0], q_s.shape[3], pairs.shape[0]
        g = g.float().contiguous()  # (B, P, T)
        strides = (*_strides(q_s), *_strides(k_s), *_strides(q_t), *_strides(k_t))
        dims = _dims(q_s, q_t)
        prec = _precision(q_s.dtype)
        # heads outside the pairs get no gradient; dq rows are owned by one pair, dk is summed atomically in fp32
        dq_s, dq_t = torch.zeros_like(q_s), torch.zeros_like(q_t)
        dk_s = torch.zeros(k_s.shape, device=k_s.device, dtype=torch.float32)
        dk_t = torch.zeros(k_t.shape, device=k_t.device, dtype=torch.float32)
        args = (q_s, k_s, q_t, k_t, key_ok, pairs, scale_s, scale_t, lse_s, lse_t, kl, g)
        tail = (*strides, T, _bucket(T), P, dims["Ds"], dims["Dt"], dims["BDS"], dims["BDT"], prec)
        _kl_bwd_dq[lambda meta: (triton.cdiv(T, meta["BM"]), B * P)](*args, dq_s, dq_t, *tail)
        _kl_bwd_dk[lambda meta: (triton.cdiv(T, meta["BN"]), B * P)](*args, dk_s, dk_t, *tail)
        return dq_s, dk_s.to(k_s.dtype), dq_t, dk_t.to(k_t.dtype), None, None, None, None


def fused_row_kl(q_s, k_s, q_t, k_t, key_ok, pairs, scale_s, scale_t) -> torch.Tensor:
    """Per-row KL (B, P, T) float32 of the `pairs` (module docstring); inputs are made contiguous in one
    common dtype, gradients come back in each input's own dtype."""
    assert q_s.dim() == k_s.dim() == q_t.dim() == k_t.dim() == 5, "expected (B, L, H, T, D) inputs"
    assert pairs.dim() == 2 and pairs.shape[1] == 5, "pairs: expected (P, 5) int32"
    dt = _common_dtype(q_s, k_s, q_t, k_t)
    xs = [x.to(dt).contiguous() for x in (q_s, k_s, q_t, k_t)]
    return FusedAttentionKL.apply(
        *xs,
        key_ok.to(torch.int8).contiguous(),
        pairs.to(torch.int32).contiguous(),
        scale_s.float().contiguous(),
        scale_t.float().contiguous(),
    )


def _common_dtype(*xs: torch.Tensor) -> torch.dtype:
    """The lowest precision among the inputs (a bf16 student under autocast sets the dot precision)."""
    for dt in (torch.bfloat16, torch.float16):
        if any(x.dtype == dt for x in xs):
            return dt
    return torch.float32
