"""Activation importance of a teacher's blocks, heads, MLP channels and hidden channels (for pruning).

Shape glossary: B batch, T tokens, L teacher layers, H query heads, D head dim, I MLP channels,
E hidden (embedding) channels.

Scores are averages over the real (non-padding) calibration tokens, accumulated in float64 so that the
result does not depend on the batch size beyond float rounding:
- depth (L,): 1 - cos(block input, block output) (ShortGPT's block influence; Minitron's depth metric): a
  block that barely turns the residual stream is the cheapest to drop;
- heads (L, H): mean L2 norm of each query head's attention output (the input of `o_proj`, per head);
- mlp (L, I): mean |act_fn(gate) * up| (the input of `down_proj`) per channel;
- hidden (E,): the sum over every RMSNorm in the model (two per block + the final one) of the mean
  |norm input| per channel: how much each residual-stream channel carries (Minitron's embedding score).
Forward hooks only (no modeling code is patched); the forward is deterministic for a given input.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def _first_tensor(args: tuple, kwargs: dict, name: str) -> torch.Tensor:
    return args[0] if args else kwargs[name]


def _out_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class ImportanceAccumulator:
    """Forward hooks on a Llama/Qwen2-style decoder that sum per-token statistics over real tokens.

    Use as a context manager around forwards; call `set_mask(attention_mask)` before each forward.
    """

    def __init__(self, model: nn.Module):
        self.layers = model.model.layers
        self.norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
        L = len(self.layers)
        attn = self.layers[0].self_attn
        self.H, self.D = model.config.num_attention_heads, attn.head_dim
        n_mlp, n_hidden = self.layers[0].mlp.down_proj.in_features, model.config.hidden_size
        f64 = dict(dtype=torch.float64)
        self.depth = torch.zeros(L, **f64)
        self.heads = torch.zeros(L, self.H, **f64)
        self.mlp = torch.zeros(L, n_mlp, **f64)
        self.hidden = torch.zeros(len(self.norms), n_hidden, **f64)
        self.tokens = 0
        self._mask: torch.Tensor | None = None  # (B, T, 1) float64, 1 on real tokens
        self._handles: list = []

    def set_mask(self, attention_mask: torch.Tensor) -> None:
        """The (B, T) attention mask of the next forward: only its real tokens count."""
        self._mask = attention_mask[..., None].to(torch.float64)
        self.tokens += int(attention_mask.sum())

    def _sum(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (...) sum over real tokens."""
        m = self._mask.to(x.device).view(*self._mask.shape[:2], *([1] * (x.dim() - 2)))
        return (x.to(torch.float64) * m).sum(dim=(0, 1)).cpu()

    def _hooks(self, i: int, layer: nn.Module) -> Iterable:
        def block(_mod, args, kwargs, out):
            x_in = _first_tensor(args, kwargs, "hidden_states")
            cos = nn.functional.cosine_similarity(x_in.double(), _out_tensor(out).double(), dim=-1)  # (B, T)
            self.depth[i] += self._sum(1 - cos)

        def heads(_mod, args):
            x = args[0]  # (B, T, H*D)
            self.heads[i] += self._sum(x.unflatten(-1, (self.H, self.D)).double().norm(dim=-1))  # (H,)

        def mlp(_mod, args):
            self.mlp[i] += self._sum(args[0].abs())  # (I,)

        yield layer.register_forward_hook(block, with_kwargs=True)
        yield layer.self_attn.o_proj.register_forward_pre_hook(heads)
        yield layer.mlp.down_proj.register_forward_pre_hook(mlp)

    def __enter__(self) -> ImportanceAccumulator:
        for i, layer in enumerate(self.layers):
            self._handles.extend(self._hooks(i, layer))
        for n, norm in enumerate(self.norms):

            def hidden(_mod, args, n=n):
                self.hidden[n] += self._sum(args[0].abs())  # (E,)

            self._handles.append(norm.register_forward_pre_hook(hidden))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def scores(self) -> dict[str, torch.Tensor]:
        """Per-token means: depth (L,), heads (L, H), mlp (L, I), hidden (E,) (float64)."""
        n = max(self.tokens, 1)
        return {
            "depth": self.depth / n,
            "heads": self.heads / n,
            "mlp": self.mlp / n,
            "hidden": (self.hidden / n).sum(0),
        }


@torch.inference_mode()
def compute_importance(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], progress=None):
    """Importance scores of `model` over calibration batches.

    Args:
        model: a Llama/Qwen2-style HF causal LM (eval mode).
        batches: (input_ids, attention_mask) pairs, each (B, T), right-padded.
        progress: optional tqdm bar advanced by one per batch.
    Returns:
        {"depth": (L,), "heads": (L, H), "mlp": (L, I), "hidden": (E,)} float64 tensors, and "tokens".
    Example:
        >>> s = compute_importance(teacher, [(ids, mask)]); s["depth"].argsort()  # least important first
    """
    device = next(model.parameters()).device
    acc = ImportanceAccumulator(model)
    with acc:
        for ids, mask in batches:
            acc.set_mask(mask)
            # the decoder only (model.model): the LM head's logits are not needed for any score
            model.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            if progress is not None:
                progress.update(1)
    return {**acc.scores(), "tokens": acc.tokens}
