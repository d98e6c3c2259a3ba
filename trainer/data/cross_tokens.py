"""Stage-2 data for a student whose tokenizer differs from the store's teacher: the stored text re-tokenised.

Shape glossary: B batch, T_s student tokens, T_t teacher tokens (of a sample or the batch's longest), K taps of
W per student token, K_top stored top-k entries, L_sel teacher layers, X heads, D_t teacher head dim.

Each item reads a store sample (teacher tokens, states, top-k log-probs), its rendered text and the teacher's
char spans (stage 1 keeps them: `KVStore.read_texts`), tokenises the text with the student's tokenizer
(offsets) and builds W (alignment/mapping/char_alignment.py). Two ways to the student's tokens:
- the stored text itself (a store rendered without a chat template: the text is the row's content, and only
  special tokens differ); segment = that of the teacher token it shares most characters with (a student token
  without a row takes its left neighbour's, P at the start); answer_mask = it overlaps a teacher answer token;
- with `data_cfg` (stores rendered with the teacher's chat template): the source row (`KVStore.rows`, the
  config's `data`) rendered with the student's own template by stage 1's renderer, which gives its segments
  and answer mask; W then works on the content (the teacher's content ranges are the student's pieces found
  in order in the stored text), so neither side's template tokens get a counterpart.

kd row = the teacher position whose token ends at the same content character (that teacher position predicts
the token starting where the student's next token starts), whose top-k is copied to the student position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from alignment.mapping.char_alignment import content_coordinates, token_alignment
from alignment.mapping.time_warping import PAD_ID
from pipeline.config.kvmap import DataConfig
from pipeline.data.formats import detect_format, render_row
from pipeline.data.samples import load_samples, token_segments
from trainer.data.loader import StoreDataset, collate_right_pad

STUDENT_KEYS = ("map_index", "map_weight", "map_rows", "kd_rows")


@dataclass
class StudentTokens:
    """One sample on the student's tokenizer: ids (T_s,), spans (T_s, 2) in `text` ((-1, -1) = template),
    content ranges of `text` (None: all of it); segment_ids / answer_mask (T_s,) when its own rendering gave
    them (else they come through W)."""

    input_ids: torch.Tensor
    spans: np.ndarray
    text: str
    content: list[tuple[int, int]] | None = None
    segment_ids: torch.Tensor | None = None
    answer_mask: torch.Tensor | None = None


def stored_text_tokens(text: str, tokenizer) -> StudentTokens:
    """The student's tokens of the teacher's rendered text as stored (a store rendered without a template)."""
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    spans = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return StudentTokens(torch.tensor(enc["input_ids"], dtype=torch.long), spans, text)


class RowRenderer:
    """The source rows of a split rendered with the student's own chat template (stage 1's renderer and
    tokenisation, `pipeline.data.samples.token_segments`), for stores whose text holds the teacher's template.

    Args: data_cfg (the config's `data`, as stage 1 read it), split, the store's row index of each sample
    (`KVStore.rows`), the student's tokenizer. The student keeps its first `data.max_length` tokens.
    """

    def __init__(self, data_cfg: DataConfig, split: str, rows: np.ndarray, tokenizer):
        self.data_cfg = dataclasses.replace(data_cfg, streaming=False)  # random access to rows
        self.split, self.rows, self.tokenizer = split, np.asarray(rows), tokenizer
        self._ds, self._fmt = None, None

    def __getstate__(self):
        return {**self.__dict__, "_ds": None}  # reloaded in a loader worker

    def __call__(self, store_index: int) -> StudentTokens:
        if self._ds is None:
            self._ds = load_samples(self.data_cfg, self.split)
        row = dict(self._ds[int(self.rows[store_index])])
        self._fmt = self._fmt or detect_format(row, self.data_cfg)
        r = render_row(row, self.tokenizer, self.data_cfg, self._fmt)
        ids, seg, ans, spans = token_segments(r, self.tokenizer)
        n = self.data_cfg.max_length
        content = r.content if r.content is not None else [(0, len(r.text))]
        return StudentTokens(ids[:n], spans[:n].numpy().astype(np.int64), r.text, content, seg[:n], ans[:n])


def locate_content(t_text: str, s: StudentTokens) -> list[tuple[int, int]] | None:
    """The teacher text's ranges holding the student's content pieces, found in order (None: both read the
    whole text). A piece not found in order is a template that reorders or rewrites content: one-line error."""
    if s.content is None:
        return None
    out, cursor = [], 0
    for k, (a, b) in enumerate(s.content):
        at = t_text.find(s.text[a:b], cursor)
        if at < 0:
            raise ValueError(
                f"the teacher's stored text does not hold the student's content piece {k} ({s.text[a:b][:40]!r}) "
                "after the previous one: expected both chat templates to render the same content in the same order"
            )
        out.append((at, at + b - a))
        cursor = at + b - a
    return out


def end_aligned_positions(s: StudentTokens, t_spans, t_content, index, weight) -> torch.Tensor:
    """(T_s,) long: per student token, the overlapping teacher token ending at the same content character,
    else -1."""
    s_iv, t_iv = content_coordinates(s.spans, s.content), content_coordinates(t_spans, t_content)
    t_end = [ivs[-1][1] if ivs else -1 for ivs in t_iv]
    out = torch.full((len(s_iv),), -1, dtype=torch.long)
    for i, ivs in enumerate(s_iv):
        cols = [int(j) for j, w in zip(index[i].tolist(), weight[i].tolist()) if w > 0]
        if ivs and cols and t_end[max(cols)] == ivs[-1][1]:
            out[i] = max(cols)
    return out


def _segments_through_w(t_seg, t_ans, index, weight, has_row) -> tuple[torch.Tensor, torch.Tensor]:
    """Student segments (the teacher token of the largest share; a row without a counterpart takes its left
    neighbour's, P at the start) and answer mask (overlaps a teacher answer token), each (T_s,)."""
    best = index.gather(1, weight.argmax(1, keepdim=True))[:, 0]  # (T_s,)
    seg = torch.where(has_row, t_seg[best], PAD_ID)
    for i in range(len(seg)):
        if seg[i] == PAD_ID:
            seg[i] = seg[i - 1] if i else 0
    return seg, (t_ans[index] & (weight > 0)).any(1) & has_row


def student_item(sample: dict, t_text: str, t_spans: np.ndarray, s: StudentTokens) -> dict:
    """One store sample on the student's tokens (module docstring); teacher states and ids kept as read."""
    t_content = locate_content(t_text, s)
    index, weight, has_row = token_alignment(s.spans, t_spans, s.content, t_content, s.text, t_text)
    t_seg, t_ans = sample["segment_ids"], sample["answer_mask"]
    seg, ans = _segments_through_w(t_seg, t_ans, index, weight, has_row)
    if s.segment_ids is not None:  # the student's own rendering knows its segments
        seg, ans = s.segment_ids, s.answer_mask
    kd_pos = end_aligned_positions(s, t_spans, t_content, index, weight)
    item = {
        "input_ids": s.input_ids,
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

    Args: as `StoreDataset`, plus `tokenizer` (the student's fast tokenizer) and `data_cfg` (set: render the
    source rows with the student's own template, `RowRenderer`; None: read the stored text). The store must hold texts
    (`KVStore.has_text`); items: input_ids / segment_ids / answer_mask (T_s,), t_segment_ids (T_t,), map_index /
    map_weight (T_s, K), map_rows / kd_rows (T_s,) bool, q / k / v (L_sel, X, T_t, D_t), topk_* (T_s, K_top).
    """

    def __init__(
        self, store_path, split: str = "train", *, tokenizer, data_cfg: DataConfig | None = None, **kw
    ):
        super().__init__(store_path, split, **kw)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError(
                f"student tokenizer {type(tokenizer).__name__}: expected a fast tokenizer (offsets)"
            )
        self.tokenizer = tokenizer
        self.store.read_texts([], split)  # a store without texts is refused here, in one line
        self.renderer = RowRenderer(data_cfg, split, self.store.rows(split), tokenizer) if data_cfg else None

    def student_tokens(self, store_index: int, text: str) -> StudentTokens:
        """The student's tokens of one sample: its own rendering of the source row, or the stored text."""
        if self.renderer is not None:
            return self.renderer(store_index)
        return stored_text_tokens(text, self.tokenizer)

    def __getitems__(self, idx: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        samples = super().__getitems__(idx)
        texts = self.store.read_texts([int(s["index"]) for s in samples], self.split)
        return [
            student_item(s, text, spans, self.student_tokens(int(s["index"]), text))
            for s, (text, spans) in zip(samples, texts)
        ]


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
