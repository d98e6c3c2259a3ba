"""Logit distillation from the teacher's stored top-k log-probs: forward KL, reverse KL, generalised JSD.

Shape glossary: N counted rows (the positions CE counts), V the student's head rows, K stored top-k,
S the support size (K, or K + 1 with the tail bucket).

The teacher's distribution is stored offline as its top-K log-probs at temperature 1 (sorted, with their
token ids). Two ways to compare it with the student's full distribution (`tail`):
- `renormalize`: softmax over the teacher's top-K tokens only, on both sides (what most tools do:
  DistillKit's `zero` tail, TRL's top-k mode). Mass outside those K tokens is ignored on both sides.
- `bucket`: the exact divergence over the K + 1 partition {each top-K token, everything else}: the
  teacher's missing mass 1 - sum(p_topk) against the student's total mass outside those K tokens. When
  K = V there is nothing outside and both modes are the full-vocabulary divergence.

Divergences (`loss`), p = teacher, q = student, both over the support:
- `forward_kl`: KL(p || q) = sum p (log p - log q) (mode-covering; Minitron's best, Table 16);
- `reverse_kl`: KL(q || p) (mode-seeking);
- `jsd`: TRL's generalised JSD with `beta`: m = beta p + (1 - beta) q,
  JSD = beta KL(p || m) + (1 - beta) KL(q || m); beta = 0 is forward KL, beta = 1 reverse KL.

Temperature tau: the teacher's stored log-probs and the student's logits are divided by tau before
normalising over the support (with `bucket` the teacher's tail is tempered as one bucket: exact at
tau = 1, the default). The loss is multiplied by tau^2 (Hinton et al. 2015): the gradient of a
tau-softened divergence scales as 1 / tau^2, so tau^2 keeps the term's gradient comparable to CE's.

Memory: nothing of shape (B, T, V) is built; the student's logits arrive as (N, V) at the counted rows
only, and rows are processed in chunks of `chunk_rows` under activation checkpointing when N is larger.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

KD_LOSSES = ("forward_kl", "reverse_kl", "jsd")
KD_TAILS = ("bucket", "renormalize")


def _kl_rows(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """sum_j a_j (log a_j - log b_j) per row, with 0 where a_j = 0 (log a_j = -inf), without NaN gradients.

    Shapes: la, lb (N, S) log-probs -> (N,).
    """
    zero = torch.isneginf(la)
    la0, lb0 = la.masked_fill(zero, 0.0), lb.masked_fill(zero, 0.0)
    return (la0.exp() * (la0 - lb0)).masked_fill(zero, 0.0).sum(dim=-1)


def divergence_rows(lp: torch.Tensor, lq: torch.Tensor, loss: str, beta: float = 0.5) -> torch.Tensor:
    """Per-row divergence between teacher log-probs `lp` and student log-probs `lq` over one support.

    Shapes: lp, lq (N, S) -> (N,).
    """
    if loss == "forward_kl" or (loss == "jsd" and beta == 0):
        return _kl_rows(lp, lq)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1):
        return _kl_rows(lq, lp)
    if loss == "jsd":
        lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))  # (N, S) log of the mixture
        return beta * _kl_rows(lp, lm) + (1 - beta) * _kl_rows(lq, lm)
    raise ValueError(f"loss_config.kd_loss={loss!r}: expected one of {KD_LOSSES}")


def _compute_dtype(z: torch.Tensor) -> torch.dtype:
    """float32 for 16-bit logits (as CE), float64 kept (reference tests)."""
    return torch.promote_types(z.dtype, torch.float32)


def teacher_support(
    t_logp: torch.Tensor, tail: str, temperature: float, has_tail: bool, dtype=torch.float32
) -> torch.Tensor:
    """The teacher's log-probs over the support (detached).

    Stored values are float16-rounded, so sum(p_topk) can exceed 1 by rounding: it is then scaled to 1
    (tail mass 0). Shapes: t_logp (N, K) -> (N, K + 1) with the bucket, else (N, K).
    """
    t = t_logp.detach().to(dtype)
    if tail == "renormalize" or not has_tail:
        return torch.log_softmax(t / temperature, dim=-1)
    lse = torch.logsumexp(t, dim=-1, keepdim=True)  # (N, 1) log sum(p_topk)
    t = t - lse.clamp_min(0.0)  # rescale rows whose mass rounds above 1
    mass = torch.logsumexp(t, dim=-1, keepdim=True).exp().clamp(max=1.0)  # (N, 1)
    rest = torch.log1p(-mass)  # (N, 1); -inf when the top-k holds all the mass
    full = torch.cat([t, rest], dim=-1)  # (N, K + 1)
    return full if temperature == 1.0 else torch.log_softmax(full / temperature, dim=-1)


class _LseGather(torch.autograd.Function):
    """log-sum-exp over the vocabulary and the logits at chosen ids, whose backward writes ONE (N, V) buffer
    (autograd would allocate one for the log-sum-exp and one per gather, then add them)."""

    @staticmethod
    def forward(ctx, z, idx):
        lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (N, 1)
        ctx.save_for_backward(z, idx, lse)
        return lse, z.gather(1, idx)  # (N, 1), (N, J)

    @staticmethod
    def backward(ctx, g_lse, g_sel):
        z, idx, lse = ctx.saved_tensors
        grad = (z - lse).exp_()  # (N, V) softmax
        grad.mul_(g_lse if g_lse is not None else 0.0)
        if g_sel is not None:
            grad.scatter_add_(1, idx, g_sel)
        return grad, None


def lse_gather(z: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-sum-exp of each row, the row's logits at `idx`), differentiable, one (N, V) gradient buffer.

    Shapes: z (N, V), idx (N, J) int64 -> (N, 1), (N, J). The step uses it to share one pass over the
    vocabulary between CE (J column 0: the target) and KD (columns 1..K: the teacher's top-k).
    """
    return _LseGather.apply(z, idx)


# Student rows whose mass outside the teacher's top-k is below this get it from an exact log-sum-exp over the
# other tokens; above it, log(1 - sum q_topk) is accurate to float32 and costs no second (N, V) pass.
EXACT_REST_BELOW = 1e-4


def student_support(
    z: torch.Tensor, idx: torch.Tensor, tail: str, temperature: float, has_tail: bool, lse=None, z_top=None
) -> torch.Tensor:
    """The student's log-probs over the support, exact over its full head.

    Why two ways to the "rest" mass: log(1 - sum q_topk) needs one log-sum-exp over the vocabulary (as CE),
    but loses precision when the student puts nearly all its mass on the top k (1 - s cancels); those rows
    (rest < EXACT_REST_BELOW) take log-sum-exp over the other tokens instead (tested against both).
    `lse` / `z_top`: the student's log-sum-exp over its head and its logits at `idx`, at temperature 1,
    when the caller already has them (the step computes both with CE's in one `lse_gather`); used only at
    temperature 1.
    Shapes: z (N, V) logits, idx (N, K) teacher token ids, lse (N, 1), z_top (N, K) -> (N, K + 1) with the
    bucket, else (N, K).
    """
    shared = temperature == 1.0 and lse is not None and z_top is not None
    if shared and (tail == "renormalize" or not has_tail):
        return torch.log_softmax(z_top.to(_compute_dtype(z)), dim=-1)
    zt = z.to(_compute_dtype(z))  # no copy for float32 logits
    if temperature != 1.0:
        zt = zt / temperature  # (N, V)
    if tail == "renormalize" or not has_tail:
        return torch.log_softmax(zt.gather(1, idx), dim=-1)
    if not shared:
        lse, z_top = lse_gather(zt, idx)  # (N, 1), (N, K)
    top = z_top.to(zt.dtype) - lse  # (N, K) log q of the teacher's top-k tokens
    log_s = torch.logsumexp(top, dim=-1, keepdim=True)  # (N, 1) log sum q_topk <= 0
    near = log_s.squeeze(-1) > math.log1p(-EXACT_REST_BELOW)  # (N,) rows with little mass outside
    # clamped so that the rows replaced below never see log(0) (no NaN gradient through the unused branch)
    rest = torch.log(-torch.expm1(log_s.clamp(max=math.log1p(-EXACT_REST_BELOW))))  # (N, 1)
    if bool(near.any()):
        rows = near.nonzero().squeeze(-1)  # (N_near,)
        exact = torch.logsumexp(zt[rows].scatter(1, idx[rows], float("-inf")), dim=-1, keepdim=True)
        rest = rest.index_put((rows,), exact - lse[rows])  # (N, 1)
    return torch.cat([top, rest], dim=-1)  # (N, K + 1)


def kd_rows(
    z, t_logp, t_idx, loss="forward_kl", tail="bucket", temperature=1.0, beta=0.5, lse=None, z_top=None
) -> torch.Tensor:
    """Per-row KD divergence (times tau^2).

    Shapes: z (N, V), t_logp / t_idx (N, K), optional lse (N, 1) and z_top (N, K) -> (N,)."""
    has_tail = t_idx.shape[1] < z.shape[1]
    lp = teacher_support(t_logp, tail, temperature, has_tail, _compute_dtype(z))
    lq = student_support(z, t_idx, tail, temperature, has_tail, lse, z_top)
    return divergence_rows(lp, lq, loss, beta) * temperature**2


class LogitKDLoss(nn.Module):
    """Mean KD divergence over the counted rows between the student's logits and the stored teacher top-k.

    Args:
        loss: "forward_kl" | "reverse_kl" | "jsd".
        tail: "bucket" | "renormalize" (module docstring).
        temperature: tau > 0; the loss is scaled by tau^2.
        beta: JSD interpolation (TRL's convention), in [0, 1].
        chunk_rows: rows per checkpointed chunk when N is larger (bounds the (rows, V) temporaries).
    Shapes:
        forward(z (N, V), t_logp (N, K), t_idx (N, K) int64, optional lse (N, 1) and z_top (N, K): the
        student's log-sum-exp and its logits at t_idx when the caller has them) -> scalar; 0 when N = 0.
    Example:
        kd = LogitKDLoss("forward_kl", "renormalize")
        loss = kd(student_logits[keep], batch["topk_logprobs"][keep], batch["topk_indices"][keep])
    """

    def __init__(self, loss="forward_kl", tail="renormalize", temperature=1.0, beta=0.5, chunk_rows=4096):
        super().__init__()
        if loss not in KD_LOSSES:
            raise ValueError(f"loss_config.kd_loss={loss!r}: expected one of {KD_LOSSES}")
        if tail not in KD_TAILS:
            raise ValueError(f"loss_config.kd_tail={tail!r}: expected one of {KD_TAILS}")
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"loss_config.kd_temperature={temperature!r}: expected a finite value > 0")
        if not 0 <= beta <= 1:
            raise ValueError(f"loss_config.kd_beta={beta!r}: expected a value in [0, 1]")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows={chunk_rows!r}: expected an int >= 1")
        self.loss, self.tail, self.temperature, self.beta = loss, tail, float(temperature), float(beta)
        self.chunk_rows = int(chunk_rows)

    def _rows(self, z, t_logp, t_idx, lse=None, z_top=None):
        return kd_rows(z, t_logp, t_idx, self.loss, self.tail, self.temperature, self.beta, lse, z_top)

    def forward(self, z, t_logp, t_idx, lse=None, z_top=None) -> torch.Tensor:
        n, k = t_logp.shape  # (N, K)
        assert z.dim() == 2 and z.shape[0] == n and t_idx.shape == (n, k), (
            z.shape,
            t_logp.shape,
            t_idx.shape,
        )
        if z.shape[1] < k:
            raise ValueError(f"teacher top-k K={k} > student vocabulary {z.shape[1]}: expected K <= V")
        if n == 0:
            return z.sum() * 0.0
        if self.chunk_rows >= n:
            return self._rows(z, t_logp, t_idx, lse, z_top).sum() / n
        total = z.new_zeros((), dtype=torch.float32)
        for a in range(0, n, self.chunk_rows):
            sl = slice(a, a + self.chunk_rows)
            extra = [None if x is None else x[sl] for x in (lse, z_top)]
            part = checkpoint(self._rows, z[sl], t_logp[sl], t_idx[sl], *extra, use_reentrant=False)
            total = total + part.sum()
        return total / n


def create_logit_kd_loss(kd_loss="forward_kl", kd_tail="renormalize", kd_temperature=1.0, kd_beta=0.5, **_):
    """A `LogitKDLoss` from the `loss_config` keys (other keys are ignored). Example:
    `create_logit_kd_loss(**dataclasses.asdict(cfg.loss_config))`."""
    return LogitKDLoss(kd_loss, kd_tail, kd_temperature, kd_beta)


@torch.no_grad()
def teacher_fidelity_sums(z: torch.Tensor, t_logp: torch.Tensor, t_idx: torch.Tensor) -> torch.Tensor:
    """Held-out teacher fidelity, summable over batches: [top-1 agreements, sum KL(teacher || student), rows].

    KL is the exact forward KL over the K + 1 partition at tau = 1 (a lower bound of the full-vocabulary
    KL, equal to it when K = V). Agreement: the student's argmax equals the teacher's top-1 token.
    Shapes: z (N, V), t_logp / t_idx (N, K) -> (3,) float64.
    """
    agree = (z.argmax(dim=-1) == t_idx[:, 0]).sum()
    kl = kd_rows(z, t_logp, t_idx, "forward_kl", "bucket", 1.0).double().sum()
    return torch.stack([agree.double(), kl, torch.tensor(float(z.shape[0]), dtype=torch.float64)])
