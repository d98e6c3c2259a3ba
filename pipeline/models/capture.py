"""Capture post-RoPE Q and pre-repeat K/V from any HF model that uses transformers' AttentionInterface.

Shape glossary: B batch, L layers, H query heads, G KV heads, T tokens, D head dim.

How it works (no patching of modeling code): entering `capture_qkv` registers a fresh attention
function under a unique name with `transformers.AttentionInterface` AND the matching mask function with
`transformers.masking_utils.AttentionMaskInterface`, then switches the model to that name with
`model.set_attn_implementation`. Why both: transformers only builds a padding/causal mask for
implementations it finds in the mask registry; with the attention alone it passes `attention_mask=None`
and a left-padded batch silently attends to padding (measured: logits off by up to 43.7).

The registered function records `query` (B, H, T, D) after RoPE and `key`, `value` (B, G, T, D) before
the GQA repeat, then calls the implementation the model was using (sdpa, or the model's own eager
function when the model asked for eager), so logits are unchanged. On exit the previous implementation
is restored and the registry entries are removed.

Assumptions: each attention module has `layer_idx` (true for every decoder in transformers that
supports `set_attn_implementation`); call the model with `use_cache=False` when capturing, otherwise K/V
also hold the cached past tokens. A layer run twice inside one context (two forwards, or gradient
checkpointing recomputing in backward) keeps the latest call; `cap.clear()` empties the record.
"""

from __future__ import annotations

import itertools
import sys
import threading
from collections.abc import Iterable, Sequence
from contextlib import contextmanager

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

COMPONENTS = ("q", "k", "v")
_PREFIX = "kvmap_capture_"
_counter = itertools.count()
_lock = threading.Lock()
_active: set[int] = set()  # id(model) of models currently inside a capture context


def num_layers(model) -> int:
    """Number of decoder layers of an HF causal LM (from its config)."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(cfg.num_hidden_layers)


class QKVCapture:
    """Per-layer records of one capture context.

    Attributes:
        q, k, v: dict layer -> tensor; q (B, H, T, D) post-RoPE, k/v (B, G, T, D) before the KV repeat.
        scaling: dict layer -> the softmax scale the layer used (the `scaling` it passed, else `module.scaling`).
        softcap: dict layer -> the attention-logit softcap it passed (`softcap`, Gemma 2), or None.
        sliding_window: dict layer -> the sliding window it passed (`sliding_window`), or None (full causal).
        layers: the captured layer indices (ascending); components: the captured components.
    """

    def __init__(self, layers: list[int], components: tuple[str, ...], detach: bool):
        self.layers = layers
        self.components = components
        self.detach = detach
        self.q: dict[int, torch.Tensor] = {}
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}
        self.scaling: dict[int, float] = {}
        self.softcap: dict[int, float | None] = {}
        self.sliding_window: dict[int, int | None] = {}
        self._wanted = set(layers)

    def clear(self) -> None:
        """Forget every record (e.g. between forwards that reuse one context)."""
        self.q.clear()
        self.k.clear()
        self.v.clear()
        self.scaling.clear()
        self.softcap.clear()
        self.sliding_window.clear()

    def record(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scaling: float,
        softcap: float | None = None,
        sliding_window: int | None = None,
    ) -> None:
        if layer not in self._wanted:
            return
        for name, t in (("q", q), ("k", k), ("v", v)):
            if name in self.components:
                getattr(self, name)[layer] = t.detach() if self.detach else t
        self.scaling[layer] = float(scaling)
        self.softcap[layer] = None if softcap is None else float(softcap)
        self.sliding_window[layer] = None if sliding_window is None else int(sliding_window)

    def stack(self, component: str, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Stack one component over layers: (B, L, H|G, T, D), layers in the given order.

        Example: `cap.stack("k", [3, 7])` -> (B, 2, G, T, D).
        """
        if component not in self.components:
            raise ValueError(f"component={component!r}: expected one of the captured {self.components}")
        store = getattr(self, component)
        layers = self.layers if layers is None else list(layers)
        missing = [i for i in layers if i not in store]
        if missing:
            raise KeyError(f"layers={missing}: not captured (captured {sorted(store)}); run a forward first")
        return torch.stack([store[i] for i in layers], dim=1)  # (B, L, H|G, T, D)


def _validate(model, layers: Iterable[int] | None, components: Sequence[str]) -> tuple[list[int], tuple]:
    n = num_layers(model)
    comps = tuple(components)
    bad = [c for c in comps if c not in COMPONENTS]
    if bad or not comps:
        raise ValueError(f"components={list(comps)!r}: expected a non-empty subset of {list(COMPONENTS)}")
    if layers is None:
        return list(range(n)), comps
    sel = sorted({int(i) for i in layers})
    if not sel or sel[0] < 0 or sel[-1] >= n:
        raise ValueError(f"layers={list(layers)!r}: expected a non-empty list of indices in [0, {n - 1}]")
    return sel, comps


def _base_attention(model, impl: str):
    """The attention function (and its mask builder) the model was running before capture."""
    if impl == "sdpa":
        return None, sdpa_mask
    if impl == "eager":
        return "eager", eager_mask
    raise ValueError(
        f"attn_implementation={impl!r}: capture supports models running 'sdpa' or 'eager'; "
        "load the model with attn_implementation='sdpa'"
    )


def _eager_fn_for(module):
    """The model's own eager attention (modeling_<arch>.eager_attention_forward) for this module."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__}: its modeling file has no eager_attention_forward")
    return fn


@contextmanager
def capture_qkv(model, layers: Iterable[int] | None = None, components=COMPONENTS, detach: bool = True):
    """Record per-layer Q (post-RoPE) and K/V (pre-repeat) during forwards inside the context.

    Args:
        model: an HF model (e.g. `LlamaForCausalLM`) running `sdpa` or `eager` attention.
        layers: layer indices to record (None = all).
        components: subset of ("q", "k", "v").
        detach: True records detached tensors (teacher); False keeps the autograd graph (student).

    Shapes:
        cap.q[layer] (B, H, T, D); cap.k[layer], cap.v[layer] (B, G, T, D); cap.stack("k") (B, L, G, T, D).

    Example:
        >>> with capture_qkv(model, layers=[0, 5], components=("k", "v")) as cap:
        ...     logits = model(input_ids, attention_mask=mask, use_cache=False).logits
        >>> cap.stack("k").shape  # (B, 2, G, T, D)
    """
    if id(model) in _active:
        raise RuntimeError(
            "capture_qkv: this model is already inside a capture context (nesting unsupported)"
        )
    sel, comps = _validate(model, layers, components)
    prev = model.config._attn_implementation
    base, mask_fn = _base_attention(model, prev)
    cap = QKVCapture(sel, comps, detach)

    def attention(module, query, key, value, attention_mask, **kwargs):
        # query (B, H, T, D) post-RoPE; key/value (B, G, T, D) before the GQA repeat
        scaling = kwargs.get("scaling") or module.scaling
        softcap = kwargs.get("softcap", getattr(module, "attn_logit_softcapping", None))
        window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
        cap.record(module.layer_idx, query, key, value, scaling, softcap, window)
        if base == "eager":
            return _eager_fn_for(module)(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with _lock:
        if id(model) in _active:
            raise RuntimeError(
                "capture_qkv: this model is already inside a capture context (nesting unsupported)"
            )
        name = f"{_PREFIX}{next(_counter)}"
        AttentionInterface.register(name, attention)
        AttentionMaskInterface.register(name, mask_fn)
        _active.add(id(model))
    try:
        model.set_attn_implementation(name)
        if model.config._attn_implementation != name:
            raise RuntimeError(f"{type(model).__name__} refused attn_implementation={name!r}")
        yield cap
    finally:
        model.set_attn_implementation(prev)
        with _lock:
            AttentionInterface._global_mapping.pop(name, None)
            AttentionMaskInterface._global_mapping.pop(name, None)
            _active.discard(id(model))
