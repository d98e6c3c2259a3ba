"""Logit KD across vocabularies: exact-match mass sharing + ULD on the rest, on the teacher's stored top-k.

Shape glossary: N aligned rows (student positions whose next-token prediction is compared), V_s student
vocabulary, V_t teacher vocabulary, K teacher top-k entries stored per position.

The store keeps only the teacher's top-K log-probs per position (p_t, K entries, sorted descending) and so
a residual mass r_t = 1 - sum(p_t) spread over tokens it does not name. Per aligned row:

  exact part ("exact_uld"): teacher tokens whose decoded string equals a student token's (`vocab_map`, V_t ->
      student id or -1) share their mass with that student token (several teacher tokens mapping to one
      student token add up: q_t(v)); term = sum_v q_t(v) (log q_t(v) - log p_s(v)) over the mapped ids v
      (forward KL restricted to them).
  ULD part (Boizard et al. 2024, the closed-form Wasserstein-1 between sorted probability vectors): the
      teacher's unmapped top-k probabilities sorted descending vs the student's K largest probabilities
      outside the mapped ids, the shorter padded with zeros, L1 between them; plus |r_t - r_s|, r_s = the
      student's remaining mass beyond those K (the residual buckets compared explicitly, since the
      teacher's tail beyond its top-K is unknown).
  "uld": no mapping; the ULD part over all of it.

loss = mean over rows of (exact part + ULD part). Temperature 1 only (the store's log-probs are at T = 1).
`naive_cross_vocab_kd` is the per-row Python reference the tests compare values and gradients against.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

KD_CROSS_MODES = ("exact_uld", "uld")


def exact_match_map(
    teacher_strings: Sequence[str | None], student_strings: Sequence[str | None]
) -> torch.Tensor:
    """(V_t,) long: the student id whose decoded string equals teacher token j's, else -1.

    None / "" entries (special tokens, byte pieces that do not decode on their own) never match; among
    student tokens with the same string the lowest id wins.
    """
    lookup: dict[str, int] = {}
    for i, s in enumerate(student_strings):
        if s and s not in lookup:
            lookup[s] = i
    return torch.tensor([lookup.get(s, -1) if s else -1 for s in teacher_strings], dtype=torch.long)


def _check(s_logits, t_logp, t_idx, vocab_map) -> None:
    if (
        s_logits.dim() != 2
        or t_logp.dim() != 2
        or t_logp.shape != t_idx.shape
        or t_logp.shape[0] != s_logits.shape[0]
    ):
        raise ValueError(
            f"cross-vocab KD: s_logits {tuple(s_logits.shape)}, t_logp {tuple(t_logp.shape)}, t_idx "
            f"{tuple(t_idx.shape)}: expected (N, V_s), (N, K), (N, K)"
        )
    if vocab_map is not None and t_idx.numel() and int(t_idx.max()) >= vocab_map.shape[0]:
        raise ValueError(
            f"cross-vocab KD: teacher token id {int(t_idx.max())} >= vocab_map size {vocab_map.shape[0]}: "
            "expected the map of the store's teacher vocabulary"
        )


def cross_vocab_kd(
    s_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, vocab_map: torch.Tensor | None
) -> torch.Tensor:
    """Mean over the N rows of the exact-match + ULD loss (module docstring); vocab_map None = plain ULD.

    Args:
        s_logits: (N, V_s) student logits at the aligned rows.
        t_logp: (N, K) teacher top-k log-probs (descending); t_idx: (N, K) their teacher token ids.
        vocab_map: (V_t,) long teacher id -> student id or -1 (`exact_match_map`), or None.
    Returns: a 0-dim float32 tensor (float64 for float64 logits; 0 for N = 0).
    """
    _check(s_logits, t_logp, t_idx, vocab_map)
    N, K = t_logp.shape
    if N == 0:
        return s_logits.sum() * 0.0
    wd = torch.float64 if s_logits.dtype == torch.float64 else torch.float32
    logp_s = torch.log_softmax(s_logits.to(wd), dim=-1)  # (N, V_s)
    p_s = logp_s.exp()
    p_t = t_logp.to(wd).exp()  # (N, K)
    r_t = (1.0 - p_t.sum(-1)).clamp_min(0.0)  # (N,) the teacher's unnamed mass
    if vocab_map is None:
        mapped = torch.zeros_like(t_idx, dtype=torch.bool)
        m = torch.zeros_like(t_idx)
    else:
        m = vocab_map.to(t_idx.device)[t_idx]  # (N, K) student ids or -1
        mapped = m >= 0
        m = m.clamp_min(0)
    exact = _exact_term(p_t, m, mapped, logp_s)  # (N,)
    V_s = p_s.shape[1]
    # (N, V_s) the mapped student ids (unmapped entries write into a spare column, dropped after)
    spare = torch.zeros(N, V_s + 1, dtype=torch.bool, device=p_s.device)
    taken = spare.scatter_(1, torch.where(mapped, m, V_s), True)[:, :V_s]
    rest_s = p_s.masked_fill(taken, 0.0)
    top_s = rest_s.topk(min(K, rest_s.shape[1]), dim=-1).values  # (N, K') descending
    r_s = rest_s.sum(-1) - top_s.sum(-1)  # (N,)
    rest_t = p_t.masked_fill(mapped, 0.0).sort(dim=-1, descending=True).values  # (N, K)
    width = max(K, top_s.shape[1])
    uld = (F.pad(rest_t, (0, width - K)) - F.pad(top_s, (0, width - top_s.shape[1]))).abs().sum(-1)
    return (exact + uld + (r_t - r_s).abs()).mean()


def _exact_term(p_t, m, mapped, logp_s) -> torch.Tensor:
    """(N,) sum over distinct mapped student ids v of q_t(v) (log q_t(v) - log p_s(v))."""
    K = p_t.shape[1]
    same = (m[:, :, None] == m[:, None, :]) & mapped[:, :, None] & mapped[:, None, :]  # (N, K, K)
    q = (same * p_t[:, None, :]).sum(-1)  # (N, K) each entry's group mass
    earlier = torch.ones(K, K, dtype=torch.bool, device=p_t.device).tril(-1)
    first = mapped & ~(same & earlier).any(-1)  # (N, K) first entry of each group
    lp = logp_s.gather(1, m)  # (N, K)
    term = torch.where(first, q * (torch.log(q.clamp_min(1e-30)) - lp), 0.0)
    return term.sum(-1)


def naive_cross_vocab_kd(
    s_logits: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor, vocab_map: torch.Tensor | None
) -> torch.Tensor:
    """Per-row Python reference for `cross_vocab_kd` (dicts and lists; tests only)."""
    rows = []
    for n in range(s_logits.shape[0]):
        logp_s = torch.log_softmax(s_logits[n].double(), dim=-1)
        p_t = t_logp[n].double().exp()
        groups: dict[int, torch.Tensor] = {}
        rest_t = []
        for k in range(t_logp.shape[1]):
            v = -1 if vocab_map is None else int(vocab_map[int(t_idx[n, k])])
            if v >= 0:
                groups[v] = groups.get(v, 0.0) + p_t[k]
            else:
                rest_t.append(p_t[k])
        exact = sum(
            (q * (torch.log(q) - logp_s[v]) for v, q in groups.items()), torch.zeros((), dtype=torch.float64)
        )
        keep = [v for v in range(logp_s.shape[0]) if v not in groups]
        rest_s = sorted((logp_s[v].exp() for v in keep), key=lambda x: -float(x.detach()))
        top_s = rest_s[: t_logp.shape[1]]
        rest_t = sorted(rest_t, key=lambda x: -float(x.detach()))
        width = max(len(top_s), len(rest_t))
        zero = torch.zeros((), dtype=torch.float64)
        uld = sum(
            ((rest_t[i] if i < len(rest_t) else zero) - (top_s[i] if i < len(top_s) else zero)).abs()
            for i in range(width)
        )
        r_t = (1.0 - p_t.sum()).clamp_min(0.0)
        r_s = sum(rest_s[t_logp.shape[1] :], zero)
        rows.append(exact + uld + (r_t - r_s).abs())
    return torch.stack(rows).mean().to(s_logits.dtype) if rows else s_logits.sum() * 0.0


class CrossVocabKD(nn.Module):
    """`loss_config.kd_cross`: "exact_uld" (exact-match mass sharing + ULD on the rest) or "uld".

    Args:
        mode: one of KD_CROSS_MODES.
        vocab_map: (V_t,) long teacher id -> student id or -1 (`exact_match_map`); required for "exact_uld".
    Call: loss = kd(s_logits (N, V_s), t_logp (N, K), t_idx (N, K)).
    """

    temperature = 1.0  # the store's log-probs are at temperature 1

    def __init__(self, mode: str, vocab_map: torch.Tensor | None = None):
        super().__init__()
        if mode not in KD_CROSS_MODES:
            raise ValueError(f"loss_config.kd_cross={mode!r}: expected one of {KD_CROSS_MODES}")
        if mode == "exact_uld" and vocab_map is None:
            raise ValueError(
                "loss_config.kd_cross='exact_uld': expected a vocab_map (teacher id -> student id)"
            )
        self.mode = mode
        self.register_buffer("vocab_map", vocab_map if mode == "exact_uld" else None, persistent=False)

    def extra_repr(self) -> str:
        mapped = int((self.vocab_map >= 0).sum()) if self.vocab_map is not None else 0
        return f"mode={self.mode!r}, mapped_teacher_tokens={mapped}"

    def forward(self, s_logits, t_logp, t_idx, **_unused) -> torch.Tensor:
        return cross_vocab_kd(s_logits, t_logp, t_idx, self.vocab_map)
