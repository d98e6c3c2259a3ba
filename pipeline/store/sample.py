"""The one sample decoder: stored words of one sample -> the tensors every reader returns.

Owns: `decode_sample`. Used by `KVStore.read_samples` (pipeline/store/reader.py) and the trainer's in-RAM
preload (trainer/data/preload.py), so every reader returns the same keys, dtypes and shapes. Imports only
the store's schema and encoding.

Shape glossary: T tokens of the sample, L layers read, X heads (H query heads for q, G KV heads for k/v),
D head dim, K stored top-k log-probs.

Example:
    s = decode_sample({"input_ids": ids, "segment_ids": seg, "answer_mask": ans}, "bfloat16", {"k": words})
    s["k"]  # (L, G, T, D) float32
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.store.encoding import decode_logprobs, decode_states
from pipeline.store.schema import LOGIT_ARRAYS, TOKEN_ARRAYS


def decode_sample(
    tokens: dict[str, np.ndarray],
    dtype: str,
    states: dict[str, np.ndarray] | None = None,
    scales: dict[str, np.ndarray] | None = None,
    logits: dict[str, np.ndarray] | None = None,
) -> dict[str, torch.Tensor]:
    """Decode one sample.

    Args:
        tokens: every array of `TOKEN_ARRAYS` as stored, each (T,).
        dtype: the store's state dtype ("bfloat16" | "float16" | "int8").
        states: {component: (L, T, X, D) words in the storage dtype}.
        scales: int8 stores only: {component: scales broadcastable to (L, T, X, D)}.
        logits: {"values": (T, K) float16 words as uint16, "indices": (T, K) token ids}.
    Returns:
        input_ids / segment_ids (T,) int64, answer_mask (T,) bool, each component (L, X, T, D) float32,
        and with logits topk_logprobs (T, K) float32 and topk_indices (T, K) int64.
    """
    assert set(tokens) == set(TOKEN_ARRAYS), (
        f"decode_sample: tokens {sorted(tokens)}, expected {TOKEN_ARRAYS}"
    )
    out = {
        "input_ids": torch.from_numpy(tokens["input_ids"].astype(np.int64)),
        "segment_ids": torch.from_numpy(tokens["segment_ids"].astype(np.int64)),
        "answer_mask": torch.from_numpy(tokens["answer_mask"].astype(bool)),
    }
    for c, words in (states or {}).items():
        assert words.ndim == 4, f"decode_sample: {c} words {words.shape}, expected (L, T, X, D)"
        scale = scales[c] if scales is not None else None
        out[c] = decode_states(words, dtype, scale).permute(0, 2, 1, 3).contiguous()  # (L, X, T, D)
    if logits is not None:
        assert set(logits) == set(LOGIT_ARRAYS), (
            f"decode_sample: logits {sorted(logits)}, expected {LOGIT_ARRAYS}"
        )
        out["topk_logprobs"] = decode_logprobs(logits["values"])  # (T, K)
        out["topk_indices"] = torch.from_numpy(logits["indices"].astype(np.int64))  # (T, K)
    return out
