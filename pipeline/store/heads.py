"""Head-subset stores: which teacher heads a state array holds, and reading chosen heads out of it.

Owns: the mapping from teacher head numbers to positions in a stored array, and the gather that turns a
sample's stored heads into the heads a reader asked for. Imports only the schema.

Shape glossary: T tokens of one sample, X heads held by one array (H_l query heads for q, G_l KV heads for
k/v of layer l), P heads asked for, D head dim.

Why positions: a store written with `extract.heads: selected` (pipeline/extract.py) holds, per layer and
component, only some heads (the schema's `heads` record), in ascending teacher order. A reader that wants
teacher head h of layer l must read position `held.index(h)` of layers/{l}/{c}, never position h. A store
without the record holds every head at its own number (every store made before the record existed).
"""

from __future__ import annotations

import numpy as np

from pipeline.store.schema import held_heads

# A wanted slot that is no head: the reader fills it with zeros (a layer padded to the widest layer's count).
NO_HEAD = -1


def component_total(attrs: dict, comp: str) -> int:
    """The teacher's head count of a component: query heads for q, KV heads for k and v."""
    teacher = attrs.get("teacher") or {}
    return int(teacher.get("num_heads" if comp == "q" else "num_kv_heads") or 0)


def head_positions(attrs: dict, layer: int, comp: str, wanted, where: str = "store") -> np.ndarray:
    """Positions in array layers/{layer}/{comp} of the teacher heads `wanted` (NO_HEAD stays NO_HEAD).

    Raises a one-line KeyError naming the first wanted head the store does not hold.
    Example:
        >>> head_positions({"heads": {"q": [[17, 2], [17, 5]]}}, 17, "q", [5, -1])
        array([ 1, -1])
    """
    held = held_heads(attrs, layer, comp, component_total(attrs, comp))
    index = {h: i for i, h in enumerate(held)}
    out = []
    for h in wanted:
        if h == NO_HEAD:
            out.append(NO_HEAD)
        elif int(h) in index:
            out.append(index[int(h)])
        else:
            kind = "query" if comp == "q" else "KV"
            raise KeyError(
                f"{where} lacks teacher layer {layer} {kind} head {h} (component {comp}; held in that layer: "
                f"{held or 'none'}): re-extract with extract.heads covering it"
            )
    return np.asarray(out, dtype=np.int64)


def take_heads(a: np.ndarray, positions: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """`a` with its head axis gathered at `positions` (zeros at NO_HEAD); None returns `a` unchanged.

    Shapes: a (T, X, D) (or any array whose `axis` is the head axis) -> (T, P, D).
    """
    if positions is None:
        return a
    shape = list(a.shape)
    shape[axis] = len(positions)
    out = np.zeros(shape, dtype=a.dtype)
    ok = positions >= 0
    src = np.take(a, positions[ok], axis=axis)
    idx = [slice(None)] * a.ndim
    idx[axis] = np.nonzero(ok)[0]
    out[tuple(idx)] = src
    return out
