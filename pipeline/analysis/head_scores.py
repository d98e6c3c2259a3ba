"""Teacher head scores: which stored teacher query heads copy the answer from the prompt (retrieval heads).

    python -m pipeline.analysis.attention_profile STORE --head-scores [--samples N] [--top 10]

Shape glossary: L stored layers, H query heads, G KV heads, T tokens of one sample, D head dim, n answer rows.

Why: matching a uniform head-mix of the teacher's attention with every student head was found to block
the copy circuit; retrieval heads are < 5% of heads (Wu et al., arXiv 2404.15574). These scores pick the few
teacher heads worth distilling one-to-one (`align.head_select`, alignment/mapping/head_select.py).

Definitions, per sample of the split and per stored teacher query head (layer l, head h). An *answer row* is
the query row r = t - 1 that predicts an answer-bearing token t (answer_mask[t] = 1, t in R or A, t >= 1):
the CE convention t -> t + 1 of `trainer.objective.losses.shifted_targets`, and the row a copy head must copy *from*.
Attention is the teacher's own causal attention rebuilt from the stored post-RoPE Q/K with the store's
geometry (`attention_maps`: per-layer scaling, softcap, sliding window), keys 0..r (a row may attend to itself).
  retrieval   fraction of answer rows whose argmax key j is a prompt (P) position holding the token to be
              predicted: ids[j] == ids[t] (a copy; Wu et al.'s retrieval score with the argmax as the
              copy test).
  answer_mass mean over answer rows of the attention on the prompt's *answer span*: every P position inside
              an occurrence in P of a maximal run of answer-bearing tokens (e.g. "5242" in "Oscar's locker
              code is 5242"); a sample whose answer never occurs in P contributes 0.
  sink        mean over answer rows of the attention on key 0 (the first token: an attention sink).
All three are averaged over every answer row of every sample (rows pooled, not per-sample means).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm import tqdm

from alignment.geometry.attention_probs import LogitSpec, attention_probs
from pipeline.models.geometry import store_logit_spec
from pipeline.store.location import StoreLocation
from pipeline.store.reader import KVStore

PROMPT = 0  # segment id of P (pipeline.config.kvmap.SEGMENTS)
SCORES = ("retrieval", "answer_mass", "sink")
SIDECAR_SUFFIX = ".head_scores.json"


def attention_maps(
    q: torch.Tensor, k: torch.Tensor, spec: LogitSpec | float, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The teacher's own attention of one sample (`alignment.geometry.attention_probs.attention_probs`).

    Shapes: q (L, H, T, D), k (L, G, T, D) -> (L, H, T, T); with `rows` (n,) long query positions only those
    rows: (L, H, n, T) (row r sees keys 0..r, inside the layer's window). `spec`: the stored layers' LogitSpec
    (`pipeline.geometry.store_logit_spec`) or a plain float scale.
    """
    L, H, T, D = q.shape
    assert k.shape[0] == L and k.shape[2:] == (T, D) and H % k.shape[1] == 0, (q.shape, k.shape)
    return attention_probs(q, k, spec, rows=rows)


def answer_rows(answer_mask: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows r, predicted positions t = r + 1), both (n,) long, for answer-bearing t in R/A with t >= 1."""
    t = torch.nonzero(answer_mask.bool() & (segment_ids > PROMPT)).flatten()
    t = t[t >= 1]
    return t - 1, t


def prompt_answer_span(input_ids: torch.Tensor, segment_ids: torch.Tensor, answer_mask: torch.Tensor):
    """(T,) bool: P positions inside an occurrence in P of a maximal run of answer-bearing tokens."""
    T = input_ids.shape[0]
    span = torch.zeros(T, dtype=torch.bool)
    am = answer_mask.bool().tolist()
    ids, in_p = input_ids.tolist(), (segment_ids == PROMPT).tolist()
    runs, start = [], None
    for i in range(T + 1):  # maximal runs of answer-bearing tokens
        on = i < T and am[i]
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(ids[start:i])
            start = None
    for run in {tuple(r) for r in runs}:
        n = len(run)
        for j in range(T - n + 1):
            if all(in_p[j : j + n]) and tuple(ids[j : j + n]) == run:
                span[j : j + n] = True
    return span


def sample_head_sums(
    q: torch.Tensor,
    k: torch.Tensor,
    input_ids: torch.Tensor,
    segment_ids: torch.Tensor,
    answer_mask: torch.Tensor,
    scale: LogitSpec | float,
) -> tuple[torch.Tensor, int]:
    """Per-head sums of the three scores over one sample's answer rows (module docstring) and the row count.

    Shapes: q (L, H, T, D), k (L, G, T, D), input_ids / segment_ids / answer_mask (T,) -> sums (3, L, H)
    float64 (retrieval hits, answer-span mass, sink mass), n answer rows.
    """
    L, H, T, _ = q.shape
    rows, tgt = answer_rows(answer_mask, segment_ids)
    sums = torch.zeros(3, L, H, dtype=torch.float64)
    if rows.numel() == 0:
        return sums, 0
    p = attention_maps(q, k, scale, rows=rows).double()  # (L, H, n, T)
    j = p.argmax(-1)  # (L, H, n)
    copy_ok = (segment_ids[j] == PROMPT) & (input_ids[j] == input_ids[tgt])  # (L, H, n)
    span = prompt_answer_span(input_ids, segment_ids, answer_mask)  # (T,)
    sums[0] = copy_ok.double().sum(-1)
    sums[1] = p[..., span].sum((-1, -2))
    sums[2] = p[..., 0].sum(-1)
    return sums, int(rows.numel())


def head_scores(
    path: str | Path, split: str = "train", num_samples: int | None = None, progress=True
) -> dict:
    """Retrieval / answer-mass / sink score of every stored teacher query head over the first N samples.

    Args:
        path: a complete store holding q and k.
        split: "train" (the default: never score heads on held-out data).
        num_samples: first N samples of the split (None = all).
    Returns: {"store", "fingerprint", "split", "samples", "answer_rows", "layers": [stored layers],
        "heads": H, "retrieval" / "answer_mass" / "sink": [[per head] per stored layer]}.
    Example:
        >>> s = head_scores("stores/default.zarr", num_samples=64)
        >>> s["retrieval"][0][3]   # stored layer index 0, head 3
    """
    store = KVStore(path, require_complete=True)
    total = store.num_samples(split)
    n = total if num_samples is None else min(num_samples, total)
    if store.attrs.get("heads"):  # a head-subset store: the scores stage 1 chose its heads by
        return recorded_scores(store, split, n)
    if "q" not in store.components or "k" not in store.components:
        raise ValueError(f"store '{path}' holds {store.components}: head scores need q and k")
    if n < 1:
        raise ValueError(f"--samples={num_samples}: expected >= 1 (split {split!r} has {total} samples)")
    scale = store_logit_spec(store)  # the stored layers' scaling / softcap / windows
    acc, rows = None, 0
    for i in tqdm(range(n), desc="head scores", disable=not progress):
        x = store.read_sample(i, split, components=("q", "k"))
        s, r = sample_head_sums(x["q"], x["k"], x["input_ids"], x["segment_ids"], x["answer_mask"], scale)
        acc, rows = (s if acc is None else acc + s), rows + r
    mean = acc / max(rows, 1)  # (3, L, H)
    out = {"store": str(path), "fingerprint": store.fingerprint, "split": split, "samples": n}
    out.update(answer_rows=rows, layers=list(store.layers), heads=int(mean.shape[2]))
    out.update({name: mean[i].tolist() for i, name in enumerate(SCORES)})
    return out


def recorded_scores(store: KVStore, split: str, n: int) -> dict:
    """The head scores a head-subset store recorded when stage 1 chose its heads (`extract.heads: selected`),
    computed exactly as `head_scores` on an all-heads store of the same extraction. Scores of other sample
    counts cannot be computed from the held heads alone: a one-line ValueError."""
    rec = store.attrs.get("head_select") or {}
    if split != "train" or rec.get("samples") != n:
        raise ValueError(
            f"store '{store.path}' holds only selected heads, scored on {rec.get('samples', 'no')} train samples "
            f"by stage 1: head scores of {n} {split} samples need every head (expected "
            f"align.head_select.samples={rec.get('samples')}, or an all-heads store)"
        )
    return {"store": str(store.path), "fingerprint": store.fingerprint, **rec["scores"]}


def sidecar_path(store_path) -> Path | str:
    """Where head scores are written: next to the store, `<store>.head_scores.json` (the store stays untouched).

    A local store gives a Path; a URL store (`s3://b/x.zarr`, `memory://x.zarr`) the sibling URL
    `<url>.head_scores.json`, written through the store's fsspec filesystem and `storage_options`.
    """
    loc = StoreLocation(store_path)
    if loc.remote:
        return loc.url.rstrip("/") + SIDECAR_SUFFIX
    p = Path(loc.url)
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _sidecar_fs(store_path):
    """(fsspec filesystem, path inside it) of a URL store's sidecar."""
    import fsspec  # lazy: URL stores only, and fsspec is no declared dependency (zarr imports it the same way)

    loc = StoreLocation(store_path)
    return fsspec.core.url_to_fs(sidecar_path(loc), **loc.storage_options)


def ranked_heads(scores: dict, by: str = "retrieval") -> list[tuple[int, int, float]]:
    """[(teacher layer, head, score)] over every stored head, best first (ties: lower layer, then head)."""
    if by not in SCORES:
        raise ValueError(f"by={by!r}: expected one of {SCORES}")
    cells = [(layer, h, v) for layer, row in zip(scores["layers"], scores[by]) for h, v in enumerate(row)]
    return sorted(cells, key=lambda c: (-c[2], c[0], c[1]))


def format_head_scores(scores: dict, top: int = 10) -> str:
    """Markdown table of the `top` heads by retrieval score (ties broken by answer mass)."""
    li = {layer: i for i, layer in enumerate(scores["layers"])}
    cells = [(layer, h) for layer in scores["layers"] for h in range(scores["heads"])]

    def key(c):
        i = li[c[0]]
        return (-scores["retrieval"][i][c[1]], -scores["answer_mass"][i][c[1]], c)

    lines = [
        f"teacher head scores: split {scores['split']}, {scores['samples']} samples, "
        f"{scores['answer_rows']} answer rows",
        "",
        "| rank | layer | head | retrieval | answer mass | sink mass |",
        "|---|---|---|---|---|---|",
    ]
    for rank, (layer, h) in enumerate(sorted(cells, key=key)[:top], 1):
        i = li[layer]
        r, m, s = (scores[n][i][h] for n in SCORES)
        lines.append(f"| {rank} | {layer} | {h} | {r:.3f} | {m:.3f} | {s:.3f} |")
    return "\n".join(lines)


def write_sidecar(scores: dict, store_path) -> Path | str:
    """Write the scores beside the store (atomically: a local rename, or one object PUT for a URL)."""
    out = sidecar_path(store_path)
    text = json.dumps(scores, indent=1)
    if isinstance(out, str):
        fs, path = _sidecar_fs(store_path)
        fs.pipe_file(path, text.encode())
        return out
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)  # atomic: nothing half-written
    return out


def read_sidecar(store_path) -> dict | None:
    """The sidecar's scores, or None when there is none."""
    out = sidecar_path(store_path)
    if isinstance(out, str):
        fs, path = _sidecar_fs(store_path)
        return json.loads(fs.cat_file(path)) if fs.exists(path) else None
    return json.loads(out.read_text()) if out.exists() else None


def load_or_compute(store_path: str | Path, split: str = "train", num_samples: int | None = None) -> dict:
    """The sidecar's scores when it matches the store's fingerprint, split and sample count, else computed
    (and not written: only the CLI writes the sidecar)."""
    s = read_sidecar(store_path)
    if s is not None:
        store = KVStore(store_path)
        total = store.num_samples(split) if split in store.splits else 0
        want_n = total if num_samples is None else min(num_samples, total)
        if (
            s.get("fingerprint") == store.fingerprint
            and s.get("split") == split
            and s.get("samples") == want_n
        ):
            return s
    return head_scores(store_path, split, num_samples)
