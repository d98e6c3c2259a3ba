"""What a pruned student keeps: teacher layers, query/KV heads, MLP and hidden channels (index bookkeeping).

Shape glossary: L_t teacher layers, L_s kept layers, H query heads, G KV heads, n = H / G query heads per
KV group, I MLP channels, E hidden channels.

GQA stays consistent: a layer keeps `kv_heads` whole KV groups and `heads_per_kv_group` query heads inside
each kept group, listed group by group, so student query head s (which reads student KV head s // n_s)
comes from a teacher query head of the very KV head student KV head s // n_s was cut from.
Every kept index list is ascending (the student keeps the teacher's order); ties in a score go to the
lower index, so a selection is a pure function of the scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alignment.mapping.layer_map import build_layer_map
from pipeline.config.configlib import ConfigError
from pipeline.config.prune import PruneConfig


@dataclass
class TeacherShape:
    """The teacher dimensions pruning chooses from (`slicing.teacher_shape` reads them off a model)."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int


@dataclass
class PrunePlan:
    """Kept teacher indices. Per student layer i (teacher layer `layers[i]`): q_heads[i] (H_s,), kv_heads[i]
    (G_s,), mlp[i] (I_s,); hidden (E_s,) is shared by every layer (the residual stream)."""

    layers: list[int]
    q_heads: list[list[int]]
    kv_heads: list[list[int]]
    mlp: list[list[int]]
    hidden: list[int]


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    """The k indices of the largest scores, ascending; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:k])


def _count(key: str, value: int, full: int, what: str) -> int:
    if value > full:
        raise ConfigError(f"prune.{key}={value}: expected at most the teacher's {full} {what} (0 = keep all)")
    return value or full


def check_counts(p: PruneConfig, t: TeacherShape) -> dict[str, int]:
    """Validated kept counts (0 -> all) for every axis; one-line ConfigError on a bad value."""
    n_t = t.heads // t.kv_heads
    if p.heads_per_kv_group > n_t:
        raise ConfigError(
            f"prune.heads_per_kv_group={p.heads_per_kv_group}: expected at most {n_t} (the teacher's "
            f"{t.heads} query heads over {t.kv_heads} KV heads: GQA groups of {n_t})"
        )
    keep = _count("num_layers", p.num_layers, t.layers, "layers")
    if p.layers == "contiguous" and p.drop_block > t.layers - keep:
        raise ConfigError(
            f"prune.drop_block={p.drop_block}: expected at most {t.layers - keep} (the teacher's {t.layers} "
            f"layers minus the {keep} kept; 0 = all at once)"
        )
    return {
        "layers": keep,
        "group": p.heads_per_kv_group or n_t,
        "kv_heads": _count("kv_heads", p.kv_heads, t.kv_heads, "KV heads"),
        "intermediate": _count("intermediate_size", p.intermediate_size, t.intermediate, "MLP channels"),
        "hidden": _count("hidden_size", p.hidden_size, t.hidden, "hidden channels"),
    }


def explicit_layers(layers: list[int], num_teacher_layers: int) -> list[int]:
    """Validate an explicit `prune.layers` list: strictly increasing teacher indices in [0, L_t)."""
    for i, x in enumerate(layers):
        if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < num_teacher_layers:
            raise ConfigError(
                f"prune.layers[{i}]={x!r}: expected a teacher layer index in [0, {num_teacher_layers})"
            )
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise ConfigError(f"prune.layers={layers}: expected strictly increasing teacher layer indices")
    return list(layers)


def choose_layers(
    p: PruneConfig,
    layer_map_spec,
    t: TeacherShape,
    depth: torch.Tensor | None,
    searched: list[int] | None = None,
) -> list[int]:
    """Kept teacher layers for `prune.layers` = list | "map" | "importance" (depth scores needed then) |
    "contiguous" (`searched`: the result of `block_removal.drop_contiguous_blocks`)."""
    if isinstance(p.layers, list):
        return explicit_layers(p.layers, t.layers)
    n = _count("num_layers", p.num_layers, t.layers, "layers")
    if p.layers == "importance":
        return top_k(depth, n)
    if p.layers == "contiguous":
        return explicit_layers(searched, t.layers)
    try:
        kept = build_layer_map(layer_map_spec, t.layers, n)
    except ValueError as e:
        raise ConfigError(f"prune.layers='map' with align.layer_map: {e}") from None
    return explicit_layers(kept, t.layers)


def choose_heads(head_scores: torch.Tensor, kv_keep: int, group_keep: int, G: int) -> tuple[list, list]:
    """(H,) query-head scores of one layer -> (kept query heads, kept KV heads).

    A KV head scores the sum of its group's query heads; the best `kv_keep` groups are kept, and the best
    `group_keep` query heads inside each, listed group by group.
    """
    n = len(head_scores) // G
    groups = head_scores.view(G, n)  # (G, n)
    kv = top_k(groups.sum(1), kv_keep)
    q = [g * n + j for g in kv for j in top_k(groups[g], group_keep)]
    return q, kv


def make_plan(layers: list[int], counts: dict[str, int], scores: dict, t: TeacherShape) -> PrunePlan:
    """The full plan from the kept layers, the validated counts and the importance scores."""
    q, kv, mlp = [], [], []
    for layer in layers:
        qi, kvi = choose_heads(scores["heads"][layer], counts["kv_heads"], counts["group"], t.kv_heads)
        q.append(qi)
        kv.append(kvi)
        mlp.append(top_k(scores["mlp"][layer], counts["intermediate"]))
    return PrunePlan(layers, q, kv, mlp, top_k(scores["hidden"], counts["hidden"]))
