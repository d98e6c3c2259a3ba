"""Which teacher layer each student layer learns from (the layer map L_t -> L_s).

Shapes: none (pure index bookkeeping). L_t teacher layers, L_s student layers.

The map also tells stage 1 which teacher layers to store (`teacher_layers_needed`), and the aligner which
slot of the stored layer axis feeds each student layer.
"""

from __future__ import annotations

from collections.abc import Sequence

LAYER_MAP_SPECS = ("uniform", "last")


def build_layer_map(spec: str | Sequence[int], num_teacher_layers: int, num_student_layers: int) -> list[int]:
    """Teacher layer index (0-based) for each student layer.

    Args:
        spec: "uniform" (TinyBERT-style: student layer i <- teacher layer ceil((i+1)*L_t/L_s)-1, so the
            last student layer always learns from the last teacher layer and the map is spread evenly),
            "last" (the top L_s teacher layers in order: student i <- L_t-L_s+i; needs L_s <= L_t),
            or an explicit list of L_s teacher indices in [0, L_t) (repeats allowed).
        num_teacher_layers: L_t >= 1.
        num_student_layers: L_s >= 1.

    Example:
        >>> build_layer_map("uniform", 30, 4)
        [7, 14, 22, 29]
    """
    if not isinstance(num_teacher_layers, int) or num_teacher_layers < 1:
        raise ValueError(f"num_teacher_layers={num_teacher_layers!r}: expected an int >= 1")
    if not isinstance(num_student_layers, int) or num_student_layers < 1:
        raise ValueError(f"num_student_layers={num_student_layers!r}: expected an int >= 1")
    L_t, L_s = num_teacher_layers, num_student_layers
    if isinstance(spec, str):
        if spec == "uniform":
            # Integer ceil avoids float rounding surprises ((i+1)*L_t/L_s may be x.5).
            return [max(0, -(-(i + 1) * L_t // L_s) - 1) for i in range(L_s)]
        if spec == "last":
            if L_s > L_t:
                raise ValueError(
                    f"layer_map='last' needs num_student_layers <= num_teacher_layers (got {L_s} > {L_t})"
                )
            return [L_t - L_s + i for i in range(L_s)]
        raise ValueError(
            f"layer_map={spec!r}: expected 'uniform', 'last' or a list of {L_s} teacher layer indices"
        )
    if not isinstance(spec, Sequence):
        raise ValueError(
            f"layer_map={spec!r}: expected 'uniform', 'last' or a list of {L_s} teacher layer indices"
        )
    layers = list(spec)
    if len(layers) != L_s:
        raise ValueError(
            f"layer_map={layers!r}: expected {L_s} entries (one per student layer), got {len(layers)}"
        )
    for i, t in enumerate(layers):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < L_t:
            raise ValueError(f"layer_map[{i}]={t!r}: expected an int teacher layer index in [0, {L_t})")
    return layers


def teacher_layers_needed(layer_map: Sequence[int]) -> list[int]:
    """Sorted unique teacher layers a layer map reads (what stage 1 must store)."""
    return sorted(set(int(t) for t in layer_map))


def layer_slots(layer_map: Sequence[int], stored_layers: Sequence[int]) -> list[int]:
    """Position in `stored_layers` of each student layer's teacher layer (for gathering the L_sel axis).

    Raises a one-line ValueError naming the first teacher layer the store/selection lacks.
    """
    pos = {int(t): i for i, t in enumerate(stored_layers)}
    for t in layer_map:
        if int(t) not in pos:
            raise ValueError(
                f"teacher layer {t} (from the layer map) is not among the selected layers {list(stored_layers)}"
            )
    return [pos[int(t)] for t in layer_map]
