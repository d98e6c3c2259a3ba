"""KL(teacher attention || student attention), streamed over query-row chunks, plus the naive reference.

Shapes: B batch, L layers, H_s/H_t query heads, G_s/G_t KV heads, T tokens, c query rows per chunk,
D_s/D_t head dims. Query heads read KV head h // (H/G) (GQA), on each side with its own H/G.

    teacher side: q_t (B, L, H_t, T, D_t), k_t (B, L, G_t, T, D_t), scale_t
    student side: q_s (B, L, H_s, T, D_s), k_s (B, L, G_s, T, D_s), scale_s
    head_mix: None (then H_t must equal H_s: the teacher was projected into student head space) or
              (H_s, H_t) / (L, H_s, H_t) convex weights: target row = sum_h head_mix[s, h] * p_t[h].

Attention: causal, keys restricted to real tokens (`mask` (B, T), True = real), softmax(q k^T * scale / temperature).
Result: mean over real query rows, layers and student heads of sum_j p_target[j] * (log p_target[j] - log p_s[j]).

Options (both default off, and then the result is bit-identical to the plain path):
  head_mask (L, H_s) bool: only these (student layer, student head) pairs count (`align.head_select`); the mean
      runs over them; layers with no selected head are sliced away before any work.
  drop_keys: key positions (e.g. [0], the attention sink) removed from BOTH distributions, which are
      renormalised over the remaining keys before the KL (`loss_config.sink: drop`). Streaming does it by
      masking those keys before the softmax (same memory); the naive reference renormalises explicitly.
      Rows left without any key (row 0 when key 0 is dropped) do not count.

Memory: `attention_kl` runs `StreamingAttentionKL` (alignment/losses/attention_kl_fn.py), a custom autograd Function
with analytic gradients: forward and backward each walk query-row chunks, backward recomputes one
(B, L, H, c, t_end) block at a time, so no T x T map is kept for backward and peak memory grows linearly in T for
a fixed chunk. Causality lets chunk rows [s, e) read only keys [0, e). Masked logits get a finite fill (-1e30),
never -inf: with -inf, p * (log p - log q) is NaN at masked entries (0 * (-inf - -inf)). Work is done in float32
at least (bf16/fp16 inputs are upcast; gradients come back in the input dtype). `naive_attention_kl` is the
plain reference (whole T x T maps, autograd) the tests compare values and gradients against.
"""

from __future__ import annotations

import torch

from alignment.geometry.attention_probs import LogitSpec, attention_logits, visible_keys
from alignment.losses import attention_kl_fused as fused
from alignment.losses.attention_kl_fn import StreamingAttentionKL


def _mix(head_mix: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """head_mix (H_s, H_t) | (L, H_s, H_t), p (B, L, H_t, c, t) -> (B, L, H_s, c, t)."""
    B, L, H_t, c, t = p.shape
    M = head_mix.to(p.dtype)
    M = M[None] if M.dim() == 3 else M[None, None]  # (1, L|1, H_s, H_t)
    return (M @ p.reshape(B, L, H_t, c * t)).view(B, L, M.shape[-2], c, t)


def _work_dtype(*xs: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def _check(q_s, k_s, q_t, k_t, mask, head_mix) -> tuple[int, int, torch.Tensor]:
    for name, x in (("s_q", q_s), ("s_k", k_s), ("t_q", q_t), ("t_k", k_t)):
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"attention KL input {name}: got shape {shape}, expected a 5-D (B, L, H, T, D) tensor"
            )
    B, L, H_s, T, D_s = q_s.shape
    if k_s.shape[:2] != (B, L) or k_s.shape[3:] != (T, D_s) or H_s % k_s.shape[2]:
        raise ValueError(
            f"s_k shape {tuple(k_s.shape)}: expected (B={B}, L={L}, G_s | {H_s}, T={T}, D={D_s})"
        )
    H_t, D_t = q_t.shape[2], q_t.shape[4]
    if q_t.shape[:2] != (B, L) or q_t.shape[3] != T:
        raise ValueError(f"t_q shape {tuple(q_t.shape)}: expected (B={B}, L={L}, H_t, T={T}, D_t)")
    if k_t.shape[:2] != (B, L) or k_t.shape[3:] != (T, D_t) or H_t % k_t.shape[2]:
        raise ValueError(
            f"t_k shape {tuple(k_t.shape)}: expected (B={B}, L={L}, G_t | {H_t}, T={T}, D={D_t})"
        )
    if head_mix is None and H_t != H_s:
        raise ValueError(
            f"teacher query heads {H_t} != student query heads {H_s}: expected equal, or pass head_mix"
        )
    if (
        head_mix is not None
        and tuple(head_mix.shape[-2:]) != (H_s, H_t)
        or (head_mix is not None and head_mix.dim() == 3 and head_mix.shape[0] != L)
    ):
        raise ValueError(
            f"head_mix shape {tuple(head_mix.shape)}: expected (H_s={H_s}, H_t={H_t}) or (L={L}, ...)"
        )
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=q_s.device)
    if mask.shape != (B, T) or mask.dtype != torch.bool:
        raise ValueError(
            f"attention_mask shape {tuple(mask.shape)} dtype {mask.dtype}: expected a (B, T)={(B, T)} bool"
        )
    return L, H_s, mask


def _key_mask(mask: torch.Tensor, drop_keys) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys attention may use (B, T), rows that keep at least one key (B, T)) after dropping `drop_keys`."""
    if not drop_keys:
        return mask, mask
    T = mask.shape[1]
    bad = [j for j in drop_keys if isinstance(j, bool) or not isinstance(j, int) or not j >= 0]
    if bad:
        raise ValueError(f"drop_keys={list(drop_keys)!r}: expected key positions (ints >= 0)")
    keys = mask.clone()
    keys[:, [j for j in drop_keys if j < T]] = False
    return keys, keys.cumsum(1) > 0  # causal: row r keeps a key iff some key <= r is left


def _check_head_mask(head_mask: torch.Tensor | None, L: int, H_s: int) -> None:
    if head_mask is not None and (head_mask.shape != (L, H_s) or head_mask.dtype != torch.bool):
        raise ValueError(
            f"head_mask shape {tuple(head_mask.shape)} dtype {head_mask.dtype}: expected a (L, H_s)={(L, H_s)} bool"
        )


def _select_layers(head_mask, xs, M, specs):
    """Slice layers without a selected head away: xs (B, L, ., T, .), M (L|1, H_s, H_t) and per-layer specs."""
    keep = head_mask.any(-1)  # (L,)
    if bool(keep.all()):
        return head_mask, xs, M, specs
    idx = torch.nonzero(keep).flatten()
    xs = [x.index_select(1, idx) for x in xs]  # (B, L_sel, ., T, .)
    if M is not None and M.shape[0] == head_mask.shape[0]:
        M = M.index_select(0, idx)
    return head_mask[idx], xs, M, [sp.select(idx) for sp in specs]


def _spec(q: torch.Tensor, scale, softcap, window, temperature: float, name: str) -> LogitSpec:
    """One side's LogitSpec: scale (default D**-0.5; float or (L,)), softcap, window (L,) ints, / temperature."""
    L = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if torch.is_tensor(scale) and scale.shape != (L,):
        raise ValueError(f"{name} scale shape {tuple(scale.shape)}: expected a float or a per-layer (L={L},)")
    if window is not None:
        window = torch.as_tensor(window, dtype=torch.long, device=q.device)
        if window.shape != (L,) or bool((window < 1).any()):
            raise ValueError(f"{name} window {window.tolist()}: expected (L={L},) per-layer windows >= 1")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name} softcap={softcap!r}: expected None or a value > 0")
    if torch.is_tensor(scale):
        scale = scale.to(q.device)
    return LogitSpec(scale, softcap, window).divided_by(temperature)


def _rows(mask: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool query rows that count: real tokens, optionally restricted by query_mask."""
    if query_mask is None:
        return mask
    if query_mask.shape != mask.shape or query_mask.dtype != torch.bool:
        raise ValueError(
            f"query_mask shape {tuple(query_mask.shape)} dtype {query_mask.dtype}: expected a {tuple(mask.shape)} bool"
        )
    return mask & query_mask


def attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    temperature: float = 1.0,
    head_mix: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    chunk_size: int = 128,
    head_mask: torch.Tensor | None = None,
    drop_keys: list[int] | tuple[int, ...] | None = None,
    softcap_s: float | None = None,
    softcap_t: float | None = None,
    window_s: torch.Tensor | None = None,
    window_t: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Mean row KL(teacher || student) of causal attention, streamed by query-row chunks (see module doc).

    Args:
        q_s, k_s: student (B, L, H_s, T, D_s), (B, L, G_s, T, D_s).
        q_t, k_t: teacher (B, L, H_t, T, D_t), (B, L, G_t, T, D_t) (projected or the teacher's own).
        mask: (B, T) bool, True = real token (None: all real): the keys attention may use.
        query_mask: (B, T) bool, the query rows the KL is averaged over (default: `mask`); e.g. only the
            reasoning segment's rows while their attention still spans every real key.
        scale_s, scale_t: logit scalings (default D_s**-0.5, D_t**-0.5); a float or a per-layer (L,) tensor.
        temperature: both sides' logits are divided by it.
        head_mix: None or (H_s, H_t) / (L, H_s, H_t) convex weights mixing teacher distributions.
        chunk_size: query rows per chunk (forward and recomputed backward).
        head_mask: (L, H_s) bool, the (layer, student head) pairs that count (None: all).
        drop_keys: key positions removed from both distributions before the KL (None / []: keep all).
        softcap_s, softcap_t: None or the tanh attention-logit cap of that side (Gemma 2).
        window_s, window_t: None or (L,) long sliding windows per layer (row r sees keys r - window < j <= r;
            `alignment.geometry.attention_probs.NO_WINDOW` on full layers).
        impl: "auto" runs the fused Triton kernels (alignment/losses/attention_kl_fused.py) on CUDA tensors
            they support and the PyTorch streaming path otherwise; "torch" always streams in PyTorch;
            "triton" insists on the kernels (one-line error where they cannot run).
    Returns: a 0-dim tensor (float32, or float64 for float64 inputs).
    Example:
        >>> kl = attention_kl(q_s, k_s, q_t, k_t, mask, chunk_size=128)
        >>> kl_sel = attention_kl(q_s, k_s, q_t, k_t, mask, head_mask=sel, drop_keys=[0])
    """
    L, H_s, mask = _check(q_s, k_s, q_t, k_t, mask, head_mix)
    _check_head_mask(head_mask, L, H_s)
    _check_stream_options(chunk_size, temperature)
    specs = [
        _spec(q_s, scale_s, softcap_s, window_s, temperature, "student"),
        _spec(q_t, scale_t, softcap_t, window_t, temperature, "teacher"),
    ]
    wd = _work_dtype(q_s, q_t)
    keys, has_key = _key_mask(mask, drop_keys)
    row_w = (_rows(mask, query_mask) & has_key).to(wd)
    fp = fused.plan(impl, q_s, k_s, q_t, k_t, head_mix, head_mask, *specs)
    if fp is not None:
        return fused.fused_attention_kl(q_s, k_s, q_t, k_t, keys, row_w, fp)
    xs, M, specs, head_w = _stream_inputs([q_s, k_s, q_t, k_t], head_mix, head_mask, specs, wd)
    total = StreamingAttentionKL.apply(*xs, keys, row_w, M, chunk_size, *specs, head_w)
    pairs = L * H_s if head_w is None else head_w.sum()
    return total / (row_w.sum() * pairs).clamp_min(1)


def _check_stream_options(chunk_size: int, temperature: float) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r}: expected a positive int")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a value > 0")


def _stream_inputs(xs, head_mix, head_mask, specs, wd: torch.dtype):
    """What `StreamingAttentionKL` reads: q_s, k_s, q_t, k_t in the work dtype, the head mix M (L|1, H_s, H_t)
    or None, the specs and head weights (L_sel, H_s) or None; with a head mask, layers without a selected
    head are sliced away first."""
    M = None
    if head_mix is not None:
        M = (head_mix if head_mix.dim() == 3 else head_mix[None]).to(wd)  # (L|1, H_s, H_t)
    head_w = None
    if head_mask is not None:
        head_mask, xs, M, specs = _select_layers(head_mask, xs, M, specs)
        head_w = head_mask.to(wd)  # (L_sel, H_s)
    return [x.to(wd) for x in xs], M, specs, head_w


def naive_attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    scale_s: float | None = None,
    scale_t: float | None = None,
    temperature: float = 1.0,
    head_mix: torch.Tensor | None = None,
    query_mask: torch.Tensor | None = None,
    head_mask: torch.Tensor | None = None,
    drop_keys: list[int] | tuple[int, ...] | None = None,
    softcap_s: float | None = None,
    softcap_t: float | None = None,
    window_s: torch.Tensor | None = None,
    window_t: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference for `attention_kl`: full T x T maps with explicit GQA repeats, masking by selection.

    Same arguments and result; keeps every (B, L, H, T, T) map alive for backward (test/benchmark use only).
    drop_keys is done the textbook way here (softmax over all allowed keys, zero the dropped columns, divide
    by the row sum), head_mask by weighting every (layer, head) and dividing by the selected count; the KL
    sums over the target's support (a teacher sliding window leaves p_t = 0 outside it).
    """
    L, H_s, mask = _check(q_s, k_s, q_t, k_t, mask, head_mix)
    _check_head_mask(head_mask, L, H_s)
    spec_s = _spec(q_s, scale_s, softcap_s, window_s, temperature, "student")
    spec_t = _spec(q_t, scale_t, softcap_t, window_t, temperature, "teacher")
    T = q_s.shape[3]
    wd = _work_dtype(q_s, q_t)
    causal = torch.ones(T, T, dtype=torch.bool, device=q_s.device).tril()
    # Padding query rows may have no allowed key; give them their diagonal so no row is empty (weight 0 anyway).
    base = (causal[None] & mask[:, None, :]) | torch.eye(T, dtype=torch.bool, device=q_s.device)[None]
    logp_s, allowed_s = _naive_log_probs(q_s, k_s, spec_s, base, wd)
    logp_t, allowed_t = _naive_log_probs(q_t, k_t, spec_t, base, wd)
    rows = _rows(mask, query_mask)
    if drop_keys:
        keep = torch.ones(T, dtype=torch.bool, device=q_s.device)
        keep[[j for j in drop_keys if j < T]] = False
        allowed_s, allowed_t = allowed_s & keep, allowed_t & keep
        logp_s, logp_t = _renormalise(logp_s, allowed_s), _renormalise(logp_t, allowed_t)
        rows = rows & (base & keep).any(-1)  # rows left with a key
    sel = allowed_t.expand_as(logp_s)  # the target's support
    if head_mix is None:
        p_target, logp_target = logp_t.exp()[sel], logp_t[sel]
    else:
        p_target = _mix(head_mix, logp_t.exp())[sel]
        logp_target = torch.log(p_target)
    rows = rows.to(wd)
    hw = torch.ones(L, H_s, dtype=wd, device=q_s.device) if head_mask is None else head_mask.to(wd)
    w = (rows[:, None, None, :, None] * hw[None, :, :, None, None]).expand_as(logp_s)[sel]
    total = (w * p_target * (logp_target - logp_s[sel])).sum()
    return total / (rows.sum() * hw.sum()).clamp_min(1)


def _naive_log_probs(q, k, spec: LogitSpec, base: torch.Tensor, wd: torch.dtype):
    """One side's full (B, L, H, T, T) log-softmax in dtype wd over its allowed keys (`base` (B, T, T) and
    its own window), the GQA repeat of k done explicitly; and those allowed keys."""
    T = q.shape[3]
    allowed = base[:, None, None] & visible_keys(torch.arange(T, device=q.device), T, spec.window, 5)
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)  # (B, L, H, T, D)
    z, _ = attention_logits(q.to(wd), k.to(wd), spec)  # (B, L, H, T, T)
    return torch.log_softmax(z.masked_fill(~allowed, float("-inf")), dim=-1), allowed


def _renormalise(logp: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log of p zeroed outside `keep` (broadcast to logp) and divided by its row sum; 0 (log 1) outside `keep`
    so that no -inf or 0/0 reaches autograd (callers only read the kept entries)."""
    p = logp.exp() * keep  # (..., T)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)  # 1e-300 is 0 in float32
    return torch.log(torch.where(keep, p, 1.0))
