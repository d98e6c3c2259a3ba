"""One forward of the stage-2 objective (no optimizer logic):

    loss = ce_weight * loss_ce + alpha_logit * loss_kd + lambda_kv * loss_struct

Shape glossary: B batch, T tokens, V vocab, L_s student layers, L_sel teacher layers read from the store,
H query heads, G KV heads, D head dim, T' aligned time (T unless the warper drops positions); `_t` teacher,
`_s` student.

`DistillModel` holds the student and the aligner in ONE nn.Module so that accelerate/DDP wraps a single
forward that uses every trainable parameter (calling `aligner.align` beside a DDP-wrapped student would
bypass DDP's gradient synchronisation for the aligner). Inside its forward the student's own Q/K/V are
captured with gradients by `pipeline.models.capture.capture_qkv(detach=False)`; the teacher's come from the batch
(read from the store) and go through the aligner (layer map + time warp + head-wise projection). When the
warper keeps a subset of positions, the same plan is applied to the student's states (both sides are
compared on the same T' positions). The structural loss sees only positions whose segment is in
`struct_ids`. The logit-KD term (alignment/losses/logit_kd.py) compares the student's logits at the rows CE counts
with the teacher's stored top-k log-probs at the same rows (position t predicts token t + 1 on both sides).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from alignment.losses.logit_kd import lse_gather
from alignment.mapping.time_warping import WarpPlan
from pipeline.models.capture import capture_qkv
from trainer.objective.losses import ce_targets, per_layer_cosine, segment_mask, shifted_targets
from trainer.objective.schedules import auto_lambda

# Config attributes of HF models whose causal-LM head does more than `lm_head(hidden)` (softcapping, a
# logit scale): for these the student's own forward computes the logits (every position), because running
# decoder + output embedding by hand would skip that step and give different logits.
_LOGIT_POSTPROCESSING = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier_scale",
)


def student_layers(model) -> list[int]:
    """Every decoder layer index of an HF causal LM (its text config's num_hidden_layers)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return list(range(int(cfg.num_hidden_layers)))


def selectable_head(model):
    """(decoder, output_embedding) when logits can be computed at chosen rows only, else None.

    Assumption: an HF causal LM computes `logits = get_output_embeddings()(get_decoder()(...).last_hidden_state)`
    unless its config names a post-processing step (`_LOGIT_POSTPROCESSING`); this holds for Llama, Qwen2,
    Mistral, SmolLM, Phi3, GPT-NeoX-style models.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if any(getattr(cfg, a, None) not in (None, 1.0) for a in _LOGIT_POSTPROCESSING):
        return None
    try:
        decoder, head = model.get_decoder(), model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return (decoder, head) if isinstance(head, nn.Linear) and decoder is not None else None


@dataclass
class StudentStates:
    """Student Q/K/V of every layer on the aligned time axis: q (B, L_s, H_s, T', D_s), k/v (B, L_s, G_s, T', D_s)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


class DistillModel(nn.Module):
    """Student + aligner; `forward(batch)` -> (logits, StudentStates | None, AlignedKV | None).

    Why `logit_mask`: the LM head over a large vocabulary is most of a small student's step (49,152 tokens
    for SmolLM2's tokenizer: ~60% of a default CPU step), yet CE only needs the rows whose target counts.
    With a mask the decoder runs as usual and the output embedding is applied to those rows alone, giving
    logits (N, V); without one (or for a model whose head post-processes logits, see `selectable_head`)
    the student's own forward gives (B, T, V).

    Args:
        student: an HF causal LM.
        aligner: a `MapProjectionAligner`, or None for CE-only training (no capture, no teacher states).
    """

    def __init__(self, student: nn.Module, aligner: nn.Module | None):
        super().__init__()
        self.student = student
        self.aligner = aligner
        self.layers = student_layers(student)
        self._head = selectable_head(student)

    @property
    def selects_logits(self) -> bool:
        return self._head is not None

    def _logits(self, input_ids, attention_mask, logit_mask):
        if logit_mask is None or self._head is None:
            return self.student(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        decoder, head = self._head
        h = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return head(h[logit_mask])  # (N, V)

    def forward(
        self,
        input_ids,
        attention_mask,
        segment_ids=None,
        q_t=None,
        k_t=None,
        v_t=None,
        logit_mask=None,
        structural=True,
        token_map=None,
        t_segment_ids=None,
    ):
        # structural=False: a step whose lambda_kv is 0 (e.g. after train.lambda_until) runs the CE path only.
        # token_map (a cross-tokenizer W): the teacher states are on their own axis (t_segment_ids (B, T_t)).
        if self.aligner is None or not structural:
            return self._logits(input_ids, attention_mask, logit_mask), None, None
        with capture_qkv(self.student, layers=self.layers, detach=False) as cap:
            logits = self._logits(input_ids, attention_mask, logit_mask)
        # k/v (B, L_s, G_s, T', D_s), q (B, L_s, H_s, T', D_s)
        if token_map is not None:
            out = self.aligner.align(k_t, v_t, q_t, t_segment_ids, token_map=token_map)
        else:
            out = self.aligner.align(k_t, v_t, q_t, segment_ids)
        q_s = cap.stack("q", self.layers)  # (B, L_s, H_s, T, D_s)
        k_s = cap.stack("k", self.layers)  # (B, L_s, G_s, T, D_s)
        v_s = cap.stack("v", self.layers)  # (B, L_s, G_s, T, D_s)
        if not out.plan.is_identity and token_map is None:
            # Same tokens on both sides: warp the student with the teacher's plan (use (a) of the warper).
            q_s, k_s, v_s = (self.aligner.warp_student(x, out.plan) for x in (q_s, k_s, v_s))  # (., T', .)
        for name, s, t in (("k", k_s, out.k), ("v", v_s, out.v), ("q", q_s, out.q)):
            if t is not None and s.shape != t.shape:  # None: not projected (a term of weight 0)
                raise ValueError(
                    f"aligned teacher {name} {tuple(t.shape)} vs student {name} {tuple(s.shape)}: expected equal shapes"
                )
        return logits, StudentStates(q_s, k_s, v_s), out


@dataclass
class StepResult:
    """The differentiable total loss, its terms (for the NaN check) and detached logs."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    logs: dict[str, float | list[float]] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    student: StudentStates | None = None
    aligned: object | None = None


def structural_loss(loss_fn, student: StudentStates, out, struct_ids: list[int]):
    """loss_struct and its metrics (plus per-layer cosines of the projected components) counted on positions
    of the `struct_ids` segments.

    The segment restriction is a *query* mask: cosines and attention-KL rows are counted only at those
    positions, while attention still spans every real key (a reasoning token attends to the prompt).
    Shapes: student / out k, v (B, L_s, G_s, T', D_s), q (B, L_s, H_s, T', D_s); out.mask (B, T').
    """
    keep = out.mask & torch.isin(
        out.segment_ids, torch.as_tensor(struct_ids, device=out.mask.device)
    )  # (B, T')
    kw = out.loss_kwargs()  # attention_mask = every real token, raw teacher Q/K, head mix, scalings
    loss, metrics = loss_fn(student.k, student.v, student.q, out.k, out.v, out.q, query_mask=keep, **kw)
    logs = {k: float(v) for k, v in metrics.items() if not isinstance(v, (list, tuple))}
    for c in ("k", "v", "q"):  # a component without a projector (weight 0) has no cosine to log
        if getattr(out, c) is not None:
            logs[f"cos_{c}_layer"] = per_layer_cosine(getattr(student, c), getattr(out, c), keep).tolist()
    for c in ("k", "v", "q"):
        if f"cos_{c}_layer" in logs:
            vals = logs[f"cos_{c}_layer"]
            logs.setdefault(f"cos_{c}", sum(vals) / len(vals))
    return loss, logs


@dataclass
class KDTerm:
    """The logit-KD term of the objective: `loss_fn` (a `LogitKDLoss`) weighted by `alpha`."""

    loss_fn: nn.Module
    alpha: float


def token_terms(
    logits, targets, batch: dict, keep, kd: KDTerm | None, ce_rows=None, kd_rows=None
) -> dict[str, torch.Tensor]:
    """loss_ce, and loss_kd with a KD term, over the N rows the token losses count.

    Each is a sum / max(rows, 1) rather than a mean, so a batch without counted targets gives 0, not NaN.
    `ce_rows` / `kd_rows` (N,) bool narrow CE / KD to their own segments when `train.kd_segments` differs
    from `train.ce_segments` (None: all N rows, the default).
    Shapes: logits (N, V), targets (N,), keep (B, T); batch topk_logprobs / topk_indices (B, T, K).
    """
    if kd is None:
        return {"loss_ce": _rows_ce(logits, targets, ce_rows)}
    if "kd_rows" in batch:  # cross-tokenizer: KD on the rows whose teacher position ends where they do
        rows = batch["kd_rows"][keep]  # (N,)
        rows = rows if kd_rows is None else rows & kd_rows
        t_logp, t_idx = batch["topk_logprobs"][keep][rows], batch["topk_indices"][keep][rows]
        loss_ce = _rows_ce(logits, targets, ce_rows)
        return {"loss_ce": loss_ce, "loss_kd": kd.loss_fn(logits[rows], t_logp, t_idx)}
    t_logp, t_idx = batch["topk_logprobs"][keep], batch["topk_indices"][keep]  # (N, K)
    lse = z_top = None
    if kd.loss_fn.temperature == 1.0:
        # CE and KD share one log-sum-exp over the vocabulary and one (N, V) gradient buffer (the LM head's
        # rows dominate a small student's step; separate passes made KD steps ~1.7x CE-only): CE = lse - z_t.
        lse, sel = lse_gather(logits.float(), torch.cat([targets[:, None], t_idx], dim=1))  # (N,1), (N,1+K)
        z_top = sel[:, 1:]  # (N, K)
        ce = lse.squeeze(-1) - sel[:, 0]  # (N,)
        ce = ce if ce_rows is None else ce[ce_rows]
        loss_ce = ce.sum() / max(int(ce.numel()), 1)
    else:
        loss_ce = _rows_ce(logits, targets, ce_rows)
    if kd_rows is not None:
        logits, t_logp, t_idx = logits[kd_rows], t_logp[kd_rows], t_idx[kd_rows]
        lse = None if lse is None else lse[kd_rows]
        z_top = None if z_top is None else z_top[kd_rows]
    return {"loss_ce": loss_ce, "loss_kd": kd.loss_fn(logits, t_logp, t_idx, lse=lse, z_top=z_top)}


def _rows_ce(logits, targets, rows=None) -> torch.Tensor:
    """Summed CE over `rows` of (N, V) logits (all N when None) / max(count, 1)."""
    if rows is not None:
        logits, targets = logits[rows], targets[rows]
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(int(targets.numel()), 1)


def loss_rows(input_ids, segment_ids, ce_ids: list[int], kd_ids: list[int] | None):
    """(keep (B, T), targets (N,), ce_rows, kd_rows) for CE on `ce_ids` and KD on `kd_ids`: keep holds the
    union, and ce_rows / kd_rows (N,) bool mark each term's own rows (both None when kd_ids is None)."""
    if kd_ids is None:
        keep, targets = ce_targets(input_ids, segment_ids, ce_ids)
        return keep, targets, None, None
    target, target_seg = shifted_targets(input_ids, segment_ids)  # once: ce_targets' rule on the union
    keep = segment_mask(target_seg, sorted(set(ce_ids) | set(kd_ids)))  # (B, T)
    rows_seg = target_seg[keep]  # (N,)
    return keep, target[keep], segment_mask(rows_seg, ce_ids), segment_mask(rows_seg, kd_ids)


def token_map_of(batch: dict) -> dict:
    """{token_map: W as a WarpPlan, t_segment_ids} of a cross-tokenizer batch (trainer/data/cross_tokens.py),
    {} for a same-tokenizer one. Shapes: map_index / map_weight (B, T_s, K), map_rows (B, T_s), t_segment_ids
    (B, T_t)."""
    if "map_index" not in batch:
        return {}
    seg, t_seg = batch["segment_ids"], batch["t_segment_ids"]
    plan = WarpPlan(
        batch["map_index"], batch["map_weight"], batch["map_rows"] & (seg >= 0), seg, t_seg.shape[1]
    )
    return {"token_map": plan, "t_segment_ids": t_seg}


def forward_step(
    model,
    batch: dict,
    *,
    ce_ids: list[int],
    struct_ids: list[int],
    lambda_kv: float | str,
    kd_ids: list[int] | None = None,
    loss_fn=None,
    kd: KDTerm | None = None,
    ce_weight: float = 1.0,
    lambda_auto_range: tuple[float, float] | list[float] = (0.01, 100.0),
) -> StepResult:
    """Compute loss = ce_weight * loss_ce + kd.alpha * loss_kd + lambda_kv * loss_struct for one batch.

    Args:
        model: a `DistillModel` (possibly wrapped by accelerate/DDP).
        batch: collated batch (trainer.data.loader.collate_right_pad) on the model's device; q_t/k_t/v_t only
            when the model has an aligner; topk_logprobs/topk_indices only with `kd`.
        ce_ids / struct_ids: segment ids counted by CE and KD (by target token) / by the structural loss.
        kd_ids: segment ids KD counts when they differ from CE's (`train.kd_segments`; None = ce_ids).
        lambda_kv: weight of the structural term at this step; 0 skips the structural forward (no capture,
            no aligner: the same update as CE alone); "auto" = L_ref / L_struct of this batch, detached and
            clipped to `lambda_auto_range` (`trainer.objective.schedules.auto_lambda`; L_ref = terms["loss_kd"] when a
            logit-KD term is present, else loss_ce), logged as lambda_kv.
        loss_fn: the StructuralKVLoss (None for CE-only).
        kd: the logit-KD term (None = off).
        ce_weight: weight of CE (0 = logit-only; CE is still computed and logged).
    Shapes:
        batch input_ids (B, T) -> logits (N, V) at the N counted positions (selected after the student's
        own full forward when its head cannot be split off); loss scalar, equal to `masked_ce` on full
        logits in value and gradient (tests/test_step_logits.py). topk_* (B, T, K) -> (N, K) rows.
    """
    ids, attn, seg = batch["input_ids"], batch["attention_mask"], batch["segment_ids"]
    keep, targets, ce_rows, kd_rows = loss_rows(ids, seg, ce_ids, kd_ids)  # (B, T), (N,), (N,) | None
    structural = not (isinstance(lambda_kv, (int, float)) and lambda_kv == 0)
    q_t, k_t, v_t = batch.get("q_t"), batch.get("k_t"), batch.get("v_t")
    cross = token_map_of(batch) if structural and k_t is not None else {}
    logits, student, out = model(
        ids, attn, seg, q_t, k_t, v_t, logit_mask=keep, structural=structural, **cross
    )
    if logits.dim() == 3:  # the student's own forward ran: every position
        logits = logits[keep]  # (N, V)
    terms = token_terms(logits, targets, batch, keep, kd, ce_rows, kd_rows)
    loss = terms["loss_ce"] if ce_weight == 1.0 else ce_weight * terms["loss_ce"]
    if kd is not None:
        loss = loss + kd.alpha * terms["loss_kd"]
    logs = {name: float(term.detach()) for name, term in terms.items()}
    if kd is not None and "kd_rows" in batch:  # cross-tokenizer: the rows KD could compare (end-aligned)
        logs["kd_rows"] = float(batch["kd_rows"][keep].sum())
    if out is None:
        logs["loss"] = float(loss.detach())
        return StepResult(loss, terms, logs, logits)
    loss_struct, struct_logs = structural_loss(loss_fn, student, out, struct_ids)
    if lambda_kv == "auto":
        ref = terms.get("loss_kd", terms["loss_ce"])  # the KD term when logit distillation is on, else CE
        lambda_kv = auto_lambda(float(ref.detach()), float(loss_struct.detach()), *lambda_auto_range)
    loss = loss + lambda_kv * loss_struct
    terms["loss_struct"] = loss_struct
    logs.update(struct_logs)
    logs.update(
        loss=float(loss.detach()), loss_struct=float(loss_struct.detach()), lambda_kv=float(lambda_kv)
    )
    return StepResult(loss, terms, logs, logits, student, out)
