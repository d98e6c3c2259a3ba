"""Stage-2 data for a student whose tokenizer differs from the store's teacher: the stored text re-tokenised.

Shape glossary: B batch, T_s student tokens, T_t teacher tokens (of a sample or the batch's longest), K taps of
W per student token, K_top stored top-k entries, L_sel teacher layers, X heads, D_t teacher head dim.

Each item reads a store sample (teacher tokens, states, top-k log-probs), its rendered text and the teacher's
char spans (stage 1 keeps them: `KVStore.read_texts`), tokenises the text with the student's tokenizer
(offsets) and builds W (alignment/mapping/char_alignment.py). The student reads the teacher's rendered text:
with a chat template that is the teacher's markup (its tokens have no row in W: see docs/guides/cross-tokenizer.md).

Per student token: segment = the segment of the teacher token it shares most characters with (a student token
without a row takes its left neighbour's, P at the start); answer_mask = it overlaps a teacher answer token;
kd row = the teacher position whose token ends at the same content character (that teacher position predicts
the token starting where the student's next token starts), whose top-k is copied to the student position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from alignment.mapping.char_alignment import content_coordinates, token_alignment
from alignment.mapping.time_warping import PAD_ID
from trainer.data.loader import StoreDataset, collate_right_pad

STUDENT_KEYS = ("map_index", "map_weight", "map_rows", "kd_rows")


def end_aligned_positions(s_spans: np.ndarray, t_spans: np.ndarray, index, weight) -> torch.Tensor:
    """(T_s,) long: per student token, the overlapping teacher token ending at the same character, else -1."""
    s_iv, t_iv = content_coordinates(s_spans, None), content_coordinates(t_spans, None)
    t_end = [ivs[-1][1] if ivs else -1 for ivs in t_iv]
    out = torch.full((len(s_iv),), -1, dtype=torch.long)
    for i, ivs in enumerate(s_iv):
        cols = [int(j) for j, w in zip(index[i].tolist(), weight[i].tolist()) if w > 0]
        if ivs and cols and t_end[max(cols)] == ivs[-1][1]:
            out[i] = max(cols)
    return out


def student_item(sample: dict, text: str, t_spans: np.ndarray, tokenizer) -> dict:
    """One store sample on the student's tokens (module docstring); teacher states and ids kept as read."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    s_spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    index, weight, has_row = token_alignment(s_spans, t_spans)
    t_seg, t_ans = sample["segment_ids"], sample["answer_mask"]
    best = index.gather(1, weight.argmax(1, keepdim=True))[:, 0]  # (T_s,) teacher token of the largest share
    seg = torch.where(has_row, t_seg[best], PAD_ID)
    for i in range(len(seg)):  # rows without a counterpart join their left neighbour (P at the start)
        if seg[i] == PAD_ID:
            seg[i] = seg[i - 1] if i else 0
    ans = ((t_ans[index] & (weight > 0)).any(1)) & has_row
    kd_pos = end_aligned_positions(s_spans, t_spans, index, weight)
    item = {
        "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
        "segment_ids": seg,
        "answer_mask": ans,
        "t_segment_ids": t_seg,
        "map_index": index,
        "map_weight": weight,
        "map_rows": has_row,
        "kd_rows": kd_pos >= 0,
        "index": sample["index"],
    }
    for c in ("q", "k", "v"):
        if c in sample:
            item[c] = sample[c]  # (L_sel, X, T_t, D_t): stays on the teacher's axis
    if "topk_logprobs" in sample:
        at = kd_pos.clamp_min(0)
        item["topk_logprobs"] = sample["topk_logprobs"][at] * (kd_pos >= 0)[:, None]  # (T_s, K_top)
        item["topk_indices"] = sample["topk_indices"][at]
    return item


class CrossTokenDataset(StoreDataset):
    """`StoreDataset` whose items are on the student's tokens (module docstring).

    Args: as `StoreDataset`, plus `tokenizer` (the student's fast tokenizer). The store must hold texts
    (`KVStore.has_text`); items: input_ids / segment_ids / answer_mask (T_s,), t_segment_ids (T_t,), map_index /
    map_weight (T_s, K), map_rows / kd_rows (T_s,) bool, q / k / v (L_sel, X, T_t, D_t), topk_* (T_s, K_top).
    """

    def __init__(self, store_path, split: str = "train", *, tokenizer, **kw):
        super().__init__(store_path, split, **kw)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"student tokenizer {type(tokenizer).__name__}: expected a fast tokenizer (offsets)"
            )
        self.tokenizer = tokenizer
        self.store.read_texts([], split)  # a store without texts is refused here, in one line

    def __getitems__(self, idx: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        samples = super().__getitems__(idx)
        texts = self.store.read_texts([int(s["index"]) for s in samples], self.split)
        return [student_item(s, text, spans, self.tokenizer) for s, (text, spans) in zip(samples, texts)]


def _pad(xs: list[torch.Tensor], fill, dims: int = 1) -> torch.Tensor:
    """Right-pad the first `dims` axes of each tensor to the batch's longest."""
    shape = [max(int(x.shape[d]) for x in xs) for d in range(dims)]
    out = torch.full((len(xs), *shape, *xs[0].shape[dims:]), fill, dtype=xs[0].dtype)
    for b, x in enumerate(xs):
        out[(b, *[slice(0, n) for n in x.shape[:dims]])] = x
    return out


def collate_cross(samples: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Student-axis keys as `collate_right_pad` pads them (T_s); teacher states (B, L_sel, X, T_t, D_t) and
    t_segment_ids (B, T_t) padded on the teacher's axis; map_index / map_weight (B, T_s, K)."""
    plain = [
        {k: v for k, v in s.items() if k not in ("q", "k", "v", "t_segment_ids", *STUDENT_KEYS)}
        for s in samples
    ]
    out = collate_right_pad(plain, pad_id)
    T_s = out["input_ids"].shape[1]
    out["t_segment_ids"] = _pad([s["t_segment_ids"] for s in samples], PAD_ID)
    for key, fill in (("map_index", 0), ("map_weight", 0.0)):
        x = _pad([s[key] for s in samples], fill, dims=2)  # (B, T_s, K)
        out[key] = x
    for key in ("map_rows", "kd_rows"):
        out[key] = _pad([s[key] for s in samples], False)
    assert out["map_index"].shape[1] == T_s, "collate_cross: W rows must follow the student tokens"
    for c in ("q", "k", "v"):
        if c in samples[0]:
            x = [s[c].movedim(2, 0) for s in samples]  # (T_t, L_sel, X, D_t)
            out[f"{c}_t"] = _pad(x, 0.0).movedim(1, 3)  # (B, L_sel, X, T_t, D_t)
    return out
