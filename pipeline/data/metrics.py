"""Teacher-forced accuracy on answer-bearing tokens (used by extract's summary and the trainer's eval).

Shape glossary: B batch, T tokens, V vocab.

Teacher-forced: the logits at position t-1 predict token t, so the first token of a sample is never
scored. A token counts when `answer_mask` is set, its segment is R or A (`segment_ids` -1 = padding is
never counted) and it has a predecessor.
"""

from __future__ import annotations

import torch

from pipeline.config.kvmap import SEGMENTS


def answer_token_accuracy(
    logits: torch.Tensor, input_ids: torch.Tensor, answer_mask: torch.Tensor, segment_ids: torch.Tensor
) -> dict[str, float]:
    """Greedy next-token accuracy on the answer-bearing tokens of R and A.

    Args:
        logits: (B, T, V) or (T, V) model outputs.
        input_ids, answer_mask, segment_ids: (B, T) or (T,); answer_mask bool/0-1; segment_ids in {-1, 0, 1, 2}.
    Returns:
        dict with acc, acc_R, acc_A (NaN where nothing was scored), the counts n, n_R, n_A and
        correct, correct_R, correct_A (floats, so results of several batches can be summed and divided),
        and n_all / correct_all (aliases of n / correct, for code keyed by segment name).
    Example:
        >>> answer_token_accuracy(model(ids).logits, ids, batch["answer_mask"], batch["segment_ids"])["acc_R"]
    """
    if logits.dim() == 2:
        logits, input_ids, answer_mask, segment_ids = (
            logits[None],
            input_ids[None],
            answer_mask[None],
            segment_ids[None],
        )
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"logits {tuple(logits.shape)} / input_ids {tuple(input_ids.shape)}: expected (B, T, V) / (B, T)"
        )
    for name, t in (("answer_mask", answer_mask), ("segment_ids", segment_ids)):
        if t.shape != input_ids.shape:
            raise ValueError(
                f"{name} {tuple(t.shape)}: expected the shape of input_ids {tuple(input_ids.shape)}"
            )
    device = logits.device
    pred = logits[:, :-1].argmax(-1)  # (B, T-1): prediction for token t from position t-1
    target = input_ids[:, 1:].to(device)  # (B, T-1)
    seg = segment_ids[:, 1:].to(device)  # (B, T-1)
    scored = answer_mask[:, 1:].to(device).bool()  # (B, T-1)
    hit = pred == target
    out: dict[str, float] = {}
    total_n = total_c = 0
    for name in ("R", "A"):
        m = scored & (seg == SEGMENTS[name])
        n, c = int(m.sum()), int((hit & m).sum())
        out[f"n_{name}"], out[f"correct_{name}"] = float(n), float(c)
        out[f"acc_{name}"] = c / n if n else float("nan")
        total_n, total_c = total_n + n, total_c + c
    out["n"] = out["n_all"] = float(total_n)
    out["correct"] = out["correct_all"] = float(total_c)
    out["acc"] = total_c / total_n if total_n else float("nan")
    return out
