"""One-to-one head selection for the attention KL (`align.head_select`): which teacher head each student head copies.

Shapes: L_s student layers, H_s / H_t student / teacher query heads.

Why: a convex mix of all teacher heads into every student head averages the few sharp retrieval heads away
and leaves no student head free to copy (docs/results: structure vs CE on the default task). Here
only chosen teacher heads are distilled, each into its own student head; every other student head (and every
layer without a chosen head) gets no KL term.

Assignment rule (deterministic, printed at the start of training by `describe`):
  1. candidates are the heads of the teacher layers the layer map uses (student layer l reads teacher
     layer layer_map[l]: a head can only be distilled where its layer's states arrive);
  2. "top_retrieval" / "top_answer_mass" rank the candidates by that train-split score (pipeline/analysis/head_scores.py;
     ties: lower layer, then lower head) and keep `top`; "list" keeps `heads` in the order given;
  3. in that order, each chosen teacher head (t, h) goes to the first student layer l with layer_map[l] == t
     that still has a free head, and there to the lowest free student head index (0, 1, ...); for a student
     cut from the teacher (`cut_from`, align.init: from_prune) it goes to the student head cut from (t, h)
     when that layer kept it (distilling teacher head 6 into the student's head 0, itself teacher head 0,
     would overwrite a working head and leave the copy of head 6 untouched).
The selection is a (L_s, H_s, H_t) one-hot head mix (the target row of student head s is teacher head h's own
attention, not a learned mix: nothing trains it) and a (L_s, H_s) bool mask of the distilled student heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("all", "top_retrieval", "top_answer_mass", "list")
_SCORE_OF = {"top_retrieval": "retrieval", "top_answer_mass": "answer_mass"}


@dataclass
class HeadSelection:
    """pairs: [(student layer, student head, teacher layer, teacher head, score | None)] in rank order;
    head_mix (L_s, H_s, H_t) one-hot rows for the chosen student heads (uniform rows elsewhere, unused);
    head_mask (L_s, H_s) bool."""

    pairs: list[tuple[int, int, int, int, float | None]]
    head_mix: torch.Tensor
    head_mask: torch.Tensor

    def describe(self) -> str:
        cells = [
            f"student L{ls}.h{hs} <- teacher L{lt}.h{ht}" + (f" ({v:.3f})" if v is not None else "")
            for ls, hs, lt, ht, v in self.pairs
        ]
        return f"head_select: {len(self.pairs)} heads one-to-one: " + "; ".join(cells)


def _candidates(method, top, heads, scores, mapped, H_t):
    if method == "list":
        if not heads:
            raise ValueError(
                "align.head_select.heads: expected [[teacher layer, head], ...] for method 'list'"
            )
        for pair in heads:
            ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, int) for x in pair)
            if not ok or pair[0] not in mapped or not 0 <= pair[1] < H_t:
                raise ValueError(
                    f"align.head_select.heads: {pair!r}: expected [teacher layer in the layer map {sorted(mapped)}, "
                    f"head in [0, {H_t})]"
                )
        if len({tuple(p) for p in heads}) != len(heads):
            raise ValueError(f"align.head_select.heads={heads!r}: expected no repeated head")
        return [(int(t), int(h), None) for t, h in heads]
    n = len(mapped) * H_t
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= n:
        raise ValueError(
            f"align.head_select.top={top!r}: expected an int in [1, {n}] (heads of the mapped teacher layers)"
        )
    if scores is None:
        raise ValueError(f"align.head_select.method={method!r}: expected teacher head scores")
    li = {layer: i for i, layer in enumerate(scores["layers"])}
    missing = [t for t in sorted(mapped) if t not in li]
    if missing:
        raise ValueError(
            f"head scores lack teacher layers {missing}: expected a store holding the mapped layers"
        )
    vals = scores[_SCORE_OF[method]]
    cells = [(t, h, float(vals[li[t]][h])) for t in sorted(mapped) for h in range(H_t)]
    return sorted(cells, key=lambda c: (-c[2], c[0], c[1]))[:top]


def _slot(t, h, layer_map, used, H_s, cut_from) -> tuple[int, int]:
    """(student layer, student head) for teacher head (t, h): rule 3 of the module docstring."""
    layers = [ls for ls, lt in enumerate(layer_map) if lt == t]
    if cut_from is not None:  # the student head cut from (t, h), where that student layer kept it
        for ls in layers:
            if h in cut_from[ls] and cut_from[ls].index(h) not in used[ls]:
                return ls, cut_from[ls].index(h)
    for ls in layers:
        free = [s for s in range(H_s) if s not in used[ls]]
        if free:
            return ls, free[0]
    raise ValueError(
        f"align.head_select: teacher layer {t} gets more chosen heads than its student layer(s) have "
        f"({H_s} each): expected at most {H_s * len(layers)} heads from layer {t}"
    )


def select_heads(
    method: str,
    layer_map: list[int],
    H_t: int,
    H_s: int,
    *,
    top: int | None = None,
    heads: list[list[int]] | None = None,
    scores: dict | None = None,
    cut_from: list[list[int]] | None = None,
) -> HeadSelection | None:
    """The selection for `align.head_select` (module docstring); None for method "all".

    Args:
        method: "all" | "top_retrieval" | "top_answer_mass" | "list".
        layer_map: teacher layer per student layer (the aligner's `layer_map`).
        H_t, H_s: teacher / student query heads.
        top: top_*: how many heads; heads: list: [[teacher layer, head], ...];
        scores: `pipeline.analysis.head_scores.head_scores` output (top_* only).
        cut_from: a student cut from the teacher (`align.init: from_prune`): per student layer, the teacher
            head each student head was cut from (prune_meta's kept_query_heads, (L_s, H_s)); a chosen
            teacher head then goes to the student head that *is* it, not to the lowest free one.
    Example:
        >>> sel = select_heads("list", [7, 14, 22, 29], 9, 4, heads=[[14, 3], [7, 7]])
        >>> sel.head_mask.nonzero().tolist()
        [[0, 0], [1, 0]]
    """
    if method not in METHODS:
        raise ValueError(f"align.head_select.method={method!r}: expected one of {list(METHODS)}")
    if method == "all":
        return None
    chosen = _candidates(method, top, heads, scores, set(layer_map), H_t)
    L_s = len(layer_map)
    mix = torch.full((L_s, H_s, H_t), 1.0 / H_t)
    mask = torch.zeros(L_s, H_s, dtype=torch.bool)
    used: list[set[int]] = [set() for _ in range(L_s)]  # student heads already given a teacher head
    pairs = []
    for t, h, v in chosen:
        ls, hs = _slot(t, h, layer_map, used, H_s, cut_from)
        used[ls].add(hs)
        mix[ls, hs] = 0.0
        mix[ls, hs, h] = 1.0
        mask[ls, hs] = True
        pairs.append((ls, hs, t, h, v))
    return HeadSelection(pairs, mix, mask)


def layers_of_ranked_heads(ranked: list[tuple[int, int, float]], num_student_layers: int) -> list[int]:
    """A layer map for selected-head arms at any student depth (`align.layer_map: heads`): the distinct
    teacher layers of the best-ranked heads, in ranking order, until every student layer has one, then
    sorted so student depth follows teacher depth.

    Args:
        ranked: [(teacher layer, head, score)] best first, over the stored layers (`ranked_heads`).
        num_student_layers: L_s.
    Returns:
        L_s teacher layers, ascending. With fewer distinct stored layers than L_s, the best layers repeat
        (in rank order) so that every student layer still reads a layer with a strong head.
    Example:
        >>> layers_of_ranked_heads([(17, 2, 0.9), (6, 0, 0.8), (17, 5, 0.7), (23, 1, 0.6)], 2)
        [6, 17]
    """
    if num_student_layers < 1:
        raise ValueError(f"num_student_layers={num_student_layers!r}: expected an int >= 1")
    distinct = list(dict.fromkeys(layer for layer, _, _ in ranked))
    if not distinct:
        raise ValueError("layer_map 'heads': no ranked teacher head (no head scores)")
    chosen = [distinct[i % len(distinct)] for i in range(num_student_layers)]
    return sorted(chosen)


def head_view(
    selection: HeadSelection, teacher_layers: list[int], H_t: int, G_t: int
) -> tuple[dict[str, list[list[int]]], torch.Tensor]:
    """What a selected-head arm reads of the teacher, and its head mix over it (`aligner.use_head_view`).

    Per teacher layer of `teacher_layers`, the chosen query heads of that layer (in selection order), padded
    with -1 (no head) to P = the most chosen in one layer (at least 1); K lists, slot for slot, the KV head
    each query head reads (h // (H_t / G_t)), so the two line up one to one.
    Returns ({"q": [[h, ...] per layer], "k": [[g, ...] per layer]}, mix (L_s, H_s, P)): the selection's
    one-hot rows moved from teacher head h to its slot (uniform rows elsewhere, masked out as before).
    Example:
        >>> sel = select_heads("list", [7, 14], 9, 4, heads=[[14, 3], [7, 7], [14, 5]])
        >>> head_view(sel, [7, 14], 9, 3)[0]
        {'q': [[7, -1], [3, 5]], 'k': [[2, -1], [1, 1]]}
    """
    per_layer: dict[int, list[int]] = {t: [] for t in teacher_layers}
    for _, _, lt, ht, _ in selection.pairs:
        per_layer[lt].append(ht)
    P = max([1] + [len(hs) for hs in per_layer.values()])
    q = [hs + [-1] * (P - len(hs)) for hs in (per_layer[t] for t in teacher_layers)]
    group = H_t // G_t
    k = [[h // group if h >= 0 else -1 for h in row] for row in q]
    L_s, H_s = selection.head_mask.shape
    mix = torch.full((L_s, H_s, P), 1.0 / P)
    for ls, hs, lt, ht, _ in selection.pairs:
        mix[ls, hs] = 0.0
        mix[ls, hs, per_layer[lt].index(ht)] = 1.0
    return {"q": q, "k": k}, mix
