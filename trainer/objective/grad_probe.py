"""Per-term gradient probe (`train.grad_probe_every`): how each term of the objective pulls on the student.

Shapes: P = number of student parameters (all trainable student tensors, flattened and concatenated).

Why: a structural term can lose to logit KD for two different reasons that the loss curves cannot tell
apart: its gradient on the student is too small to matter, or it is large but points elsewhere (cosine with
the CE / KD gradient near 0 or below), so it spends the student's updates on matching the teacher's states
instead of its outputs. Every `grad_probe_every` steps the probe takes each *weighted* term of that step's
loss (ce_weight * CE, alpha_logit * KD, lambda_kv * struct: what the optimizer actually receives) and
differentiates it alone with respect to the student's parameters (the aligner is left out: the question is
what the student is pushed towards), then logs
    gprobe/norm_{ce,kd,struct}     L2 norm of that term's gradient
    gprobe/cos_{a}_{b}             cosine between two terms' gradients (ce_kd, ce_struct, kd_struct)
The probe uses `torch.autograd.grad` with the graph retained, so the step's own backward and update are
unchanged (tests/test_grad_probe.py checks a probed run equals an unprobed one bit for bit). It costs one
extra backward per term on probe steps only. Under several processes each rank probes its own micro-batches
(local gradients, before the all-reduce; measured single-process so far); the logged values are the mean over
micro-batches and ranks.
"""

from __future__ import annotations

import itertools

import torch

TERMS = {"loss_ce": "ce", "loss_kd": "kd", "loss_struct": "struct"}


def term_weights(ce_weight: float, kd_alpha: float | None, lambda_kv: float) -> dict[str, float]:
    """The weight each term enters the loss with (`forward_step`'s loss = Σ weight x term)."""
    return {"loss_ce": ce_weight, "loss_kd": kd_alpha or 0.0, "loss_struct": lambda_kv}


def term_gradients(
    terms: dict[str, torch.Tensor], weights: dict[str, float], params: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """{short name: flattened gradient (P,)} of weights[k] * terms[k] for every present term with weight != 0.

    Args:
        terms: scalar loss terms of one forward (`StepResult.terms`), graphs attached.
        weights: their weights in the loss (`term_weights`).
        params: the student's trainable parameters.
    Example:
        >>> g = term_gradients(res.terms, term_weights(1.0, 1.0, 0.5), list(student.parameters()))
    """
    out = {}
    for key, name in TERMS.items():
        w = weights.get(key, 0.0)
        if key not in terms or w == 0 or not terms[key].requires_grad:
            continue
        grads = torch.autograd.grad(w * terms[key], params, retain_graph=True, allow_unused=True)
        flat = [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
        out[name] = torch.cat([f.to(torch.promote_types(f.dtype, torch.float32)) for f in flat])  # (P,)
    return out


def probe_logs(grads: dict[str, torch.Tensor]) -> dict[str, float]:
    """Norms of each term's gradient and the cosine of every pair (0 when a gradient is exactly zero)."""
    logs = {f"gprobe/norm_{n}": float(g.norm()) for n, g in grads.items()}
    for (a, ga), (b, gb) in itertools.combinations(grads.items(), 2):
        denom = float(ga.norm() * gb.norm())
        logs[f"gprobe/cos_{a}_{b}"] = float(ga @ gb) / denom if denom > 0 else 0.0
    return logs


def grad_probe(terms, weights, params) -> dict[str, float]:
    """`probe_logs(term_gradients(...))`: the probe's log entries for one micro-batch."""
    return probe_logs(term_gradients(terms, weights, params))
