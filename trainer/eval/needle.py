"""Where a model's heads look when it is about to write the answer: attention mass on the needle.

Shape glossary: T tokens of one sample, L layers, H query heads per layer, N = L * H heads in all.

The needle is the answer's occurrence in the prompt: the token run that A's answer-bearing tokens spell,
found in P (the retrieval task's codes occur once in a context; a sample whose run is absent from P, or
occurs there twice, has no needle and is not counted). The query row is the position whose next-token
logits write the answer's first token where it is first written: in R when R quotes it (the lookup; by A
the model can copy it from R instead of the context), else in A. For every head: the attention mass of that row on the needle tokens,
and whether the row's largest attention weight falls on one of them (the head "points at" the needle).
A model's best head for a sample is the one with the most needle mass. Wu et al. (2024) call heads that
copy from the needle retrieval heads; `needle_agreement` asks whether the student's best head points at
the needle on the samples where the teacher's does.
"""

from __future__ import annotations

import torch

from pipeline.config.kvmap import SEGMENTS


def needle_positions(
    input_ids: torch.Tensor, segment_ids: torch.Tensor, answer_mask: torch.Tensor
) -> tuple[int, list[int]] | None:
    """(query row, needle token positions) of one sample, or None when it has no single needle in P.

    Shapes: input_ids / segment_ids / answer_mask (T,).
    """
    a_ans = ((segment_ids == SEGMENTS["A"]) & answer_mask.bool()).nonzero().flatten()
    if len(a_ans) == 0:
        return None
    run = input_ids[a_ans].tolist()
    r_ans = ((segment_ids == SEGMENTS["R"]) & answer_mask.bool()).nonzero().flatten()
    first = int(r_ans[0]) if len(r_ans) else int(a_ans[0])
    p_end = int((segment_ids == SEGMENTS["P"]).nonzero().flatten().max()) + 1
    p = input_ids[:p_end].tolist()
    hits = [i for i in range(p_end - len(run) + 1) if p[i : i + len(run)] == run]
    if len(hits) != 1:
        return None
    return first - 1, list(range(hits[0], hits[0] + len(run)))


@torch.no_grad()
def head_needle_stats(model, input_ids: torch.Tensor, query: int, needle: list[int]):
    """(mass (N,), points (N,) bool) of every head of `model` for one sample (see the module docstring).

    Runs one forward with eager attention (the attention weights are returned), on input_ids (T,).
    """
    out = model(input_ids=input_ids[None], output_attentions=True, use_cache=False)
    rows = torch.cat([a[0, :, query, :] for a in out.attentions])  # (N, T): every head's query row
    assert rows.shape[-1] == input_ids.shape[0], "attention rows must span the sample"
    idx = torch.tensor(needle)
    mass = rows[:, idx].sum(-1).float()  # (N,)
    points = torch.isin(rows.argmax(-1), idx)  # (N,)
    return mass, points


def best_head(mass: torch.Tensor, points: torch.Tensor) -> tuple[float, bool]:
    """(needle mass of the best head, whether it points at the needle) from `head_needle_stats`."""
    h = int(mass.argmax())
    return float(mass[h]), bool(points[h])


def needle_agreement(student_points: list[bool], teacher_points: list[bool]) -> float:
    """P(the student's best head points at the needle | the teacher's does); nan when the teacher never does."""
    both = [s for s, t in zip(student_points, teacher_points) if t]
    return sum(both) / len(both) if both else float("nan")


def use_eager_attention(model):
    """Switch a Hugging Face model to eager attention (SDPA returns no attention weights)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # older transformers
        model.config._attn_implementation = "eager"
    return model
