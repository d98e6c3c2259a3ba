"""The kvmap store schema: array names, dtypes, attributes and versions (the one definition).

Owns: the layout below and the names/constants that spell it. Imports nothing from kvmap: the reader
(pipeline/store/reader.py), the writer (pipeline/store/writer.py) and every other store module import it,
and neither of those imports the other. The docs reference page is generated from `ARRAYS` and `ATTRS`.

A kvmap store is a Zarr v3 group with a packed, token-major layout (schema v2).

Shape glossary: N tokens in a split (all samples packed end to end, no padding), S samples, L stored
teacher layers, H query heads, G KV heads, D head dim, T tokens of one sample, K stored top-k log-probs.

Schema (schema_version 2; version 1 = the same without `logits/`, read as "no logits")::

    STORE.zarr/                       Zarr v3 group; attributes below
      train/
        input_ids     (N,) int32      token ids of all kept samples, packed in sample order
        segment_ids   (N,) int8       P=0 prompt, R=1 reasoning, A=2 answer (padding is never stored)
        answer_mask   (N,) uint8      1 on answer-bearing tokens (the answer string inside R and A)
        offsets       (S,) int64      first token of sample i on the packed axis
        lengths       (S,) int32      tokens of sample i (sample i = [offsets[i], offsets[i] + lengths[i]))
        rows          (S,) int64      row index of sample i in the source dataset (skipped rows are absent)
        texts         (S,) string     the rendered text of sample i (stores written before it lack it)
        char_spans    (N, 2) int32    each token's [start, end) characters in its sample's text; (-1, -1) =
                                      a template token (chat markup, added special tokens: no character of
                                      the row's content); stored with `texts`, read by cross-tokenizer arms
        layers/{l}/q  (N, H, D)       teacher layer l (0-based), post-RoPE queries (with a `heads` record:
                                      only the held heads of layer l, ascending; k/v likewise hold G_l)
        layers/{l}/k  (N, G, D)       post-RoPE keys, KV heads before any GQA repeat
        layers/{l}/v  (N, G, D)       values, KV heads before any GQA repeat
        layers/{l}/{q,k,v}_scale      only with dtype "int8": float32 scales (pipeline/store/int8.py), per the
                                      `quantization` attribute: "channel" (C, X, D), one row per write
                                      chunk (C = ceil(N / chunk_tokens)); "token" (N, X)
        logits/values (N, K) uint16   only with `logits` in extract.components: the teacher's log-softmax
                                      (fp32, temperature 1) at position t (its prediction of token t + 1),
                                      reduced to its top K, sorted descending, as float16 words (see below)
        logits/indices (N, K)         the token ids of those K log-probs (uint16 when the vocabulary fits,
                                      else uint32)
      eval/                           the held-out split: input_ids, segment_ids, answer_mask, offsets,
                                      lengths, rows, and logits/ when stored (never layers: no states);
                                      absent when the config has no eval data
      _kvmap_progress/                only while incomplete: one JSON done-marker per finished write chunk

    STORE may be a folder or a URL (s3://bucket/prefix/name.zarr, memory://...; pipeline/store/location.py):
    the same objects under the same keys, through zarr's LocalStore or FsspecStore.
    dtype "bfloat16": states are stored as the raw 16-bit words (zarr dtype uint16; numpy and zarr have no
    bfloat16) and viewed back on read; dtype "float16": stored as float16 (overflow is an extraction error);
    dtype "int8": symmetric int8 words x float32 scales (`quantization` {q, k, v: "channel"}: per (write
    chunk, head, channel); "token" = per (token, head) also reads; a chunk's scales come from its own tokens,
    so it is self-contained), dequantised to float32 by every reader (`read_samples`, `read_states`,
    trainer/data/preload.py, `decode_states` with the scales).
    State arrays are sharded: one shard = `chunk_tokens` tokens (the unit of writing, resuming and rank
    ownership), holding inner chunks of `inner_chunk_tokens` tokens (the unit of random-access reads).
    Codec "blosc-zstd" (the default; Zarr v3 spec BloscCodec: zstd + byte shuffle, 1 MiB blocks)
    and "zstd-shuffle" (the default before: numcodecs' Shuffle + Zstd, outside the v3 spec) both give 1.36x
    on the default teacher's bf16 states (8 of SmolLM2's 30 layers); a store's arrays carry their own codec
    metadata, so stores written with either read alike. Zarr pads the array's last inner chunk to
    full size with zeros (at most inner_chunk_tokens - 1 tokens per array; compressed to almost nothing);
    nothing else beyond the real tokens is stored. Token arrays use plain chunks of 65536 entries.
    Reading sample i touches only the inner chunks overlapping [offsets[i], offsets[i] + lengths[i]).
    Top-k log-probs: float16 (not bf16: 8x finer steps where it matters, log-probs are bounded) viewed as
    uint16 words, a lossless Delta filter on the words (sorted descending negative halves have increasing
    bit patterns, so neighbours differ by small integers; numcodecs, outside the v3 spec: without it the
    ratio falls to 1.8-2.0x) + blosc-zstd (byte shuffle; before: Shuffle + Zstd): 79 B/token at K = 128 on
    the default teacher (3.2x); the indices are close to random (zstd: 1.14x). Sharded like the states.

Group attributes: schema_version, complete (true only once every chunk is written), teacher {path,
model_type, config_hash, num_layers, num_heads, num_kv_heads, head_dim, hidden_size, vocab_size, rope,
dtype}, layers (stored teacher layers, ascending), components, heads (only when a subset of heads is stored:
per component the held [layer, head] pairs, query heads for q and KV heads for k/v; absent = every head),
head_select (with extract.heads: selected: method, top, samples and the probe's head scores), tokenizer
{name, vocab_size, hash}, dtype,
quantization (int8 only: the scale scheme per component), storage_dtype, codec, compression_level, chunk_tokens, inner_chunk_tokens, segments {P, R, A}, logits
({top_k, dtype, index_dtype, splits}: only when stored), dataset
{train|eval: {source, rows, kept, skipped, bad_rows, dropped_too_long, truncated}}, config_fingerprint (of
teacher, tokens, layers and extraction settings; a re-run with another config is refused), and, once
complete, summary (samples, tokens, forward_tokens, stored/raw bytes, compression ratio, bytes per token,
wall/loop seconds, teacher_acc_R/A/all). `KVStore.fingerprint` hashes every attribute but `complete` and
`summary`: equal fingerprints = the same extraction (teacher, data, layers, settings).
"""

from __future__ import annotations

import hashlib
import json

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)  # v1 stores predate logits: they read as stores without logits
SPLITS = ("train", "eval")
COMPONENTS = ("q", "k", "v")
TOKEN_ARRAYS = {"input_ids": "int32", "segment_ids": "int8", "answer_mask": "uint8"}
SAMPLE_ARRAYS = {"offsets": "int64", "lengths": "int32", "rows": "int64"}
# Optional (stores written before them read without): the rendered text per sample, character spans per token.
TEXT_ARRAYS = {"texts": "str", "char_spans": "int32"}
TEMPLATE_SPAN = (-1, -1)  # the char span of a token outside the row's content
LOGIT_ARRAYS = ("values", "indices")
PROGRESS_DIR = "_kvmap_progress"
# Attributes that change between otherwise identical stores (timings) are left out of the fingerprint.
VOLATILE_ATTRS = ("complete", "summary")
STORAGE_DTYPES = {"bfloat16": "uint16", "float16": "float16", "int8": "int8"}
FP16_MAX = 65504.0

# The arrays of one split, for the generated reference: (key, shape, dtype, meaning).
ARRAYS = (
    ("input_ids", "(N,)", "int32", "token ids of all kept samples, packed in sample order"),
    ("segment_ids", "(N,)", "int8", "P=0 prompt, R=1 reasoning, A=2 answer (padding is never stored)"),
    ("answer_mask", "(N,)", "uint8", "1 on answer-bearing tokens (the answer string inside R and A)"),
    ("offsets", "(S,)", "int64", "first token of sample i on the packed axis"),
    ("lengths", "(S,)", "int32", "tokens of sample i"),
    ("rows", "(S,)", "int64", "row index of sample i in the source dataset (skipped rows are absent)"),
    ("texts", "(S,)", "string", "the rendered text of sample i (absent in stores written before it)"),
    ("char_spans", "(N, 2)", "int32", "each token's [start, end) in its text; (-1, -1) = template token"),
    ("layers/{l}/q", "(N, H, D)", "storage dtype", "teacher layer l, post-RoPE queries (train split only)"),
    ("layers/{l}/k", "(N, G, D)", "storage dtype", "post-RoPE keys, KV heads before any GQA repeat"),
    ("layers/{l}/v", "(N, G, D)", "storage dtype", "values, KV heads before any GQA repeat"),
    ("layers/{l}/{c}_scale", "(C, X, D) or (N, X)", "float32", "int8 stores only: the scales of component c"),
    ("logits/values", "(N, K)", "uint16", "top-K teacher log-probs at t (predicting t + 1), float16 words"),
    ("logits/indices", "(N, K)", "uint16 or uint32", "the token ids of those K log-probs"),
)

# The group attributes, for the generated reference: name -> meaning.
ATTRS = {
    "schema_version": f"layout version ({SCHEMA_VERSION}; readable: {READABLE_SCHEMA_VERSIONS})",
    "complete": "true only once every write chunk is written",
    "teacher": "path, model_type, config_hash and the attention geometry of the teacher",
    "layers": "stored teacher layers, ascending",
    "components": "stored state components (subset of q, k, v)",
    "heads": "only for a head subset: per component the held [layer, head] pairs (absent = every head)",
    "head_select": "extract.heads: selected only: method, top, samples and the probe's head scores",
    "tokenizer": "name, vocab_size and hash of the teacher's tokenizer",
    "dtype": "state dtype: bfloat16, float16 or int8",
    "quantization": "int8 only: the scale scheme per component (channel | token)",
    "storage_dtype": "the zarr dtype the states are stored as",
    "codec": "compressor name (pipeline/store/codecs.py)",
    "compression_level": "compressor level",
    "chunk_tokens": "tokens per shard: the unit of writing, resuming and rank ownership",
    "inner_chunk_tokens": "tokens per inner chunk: the unit of random-access reads",
    "segments": "segment name -> id ({P: 0, R: 1, A: 2})",
    "logits": "top_k, dtype, index_dtype, splits (only when stored)",
    "dataset": "per split: source, rows, kept, skipped, bad_rows, dropped_too_long, truncated",
    "config_fingerprint": "hash of teacher, tokens, layers and extraction settings (a re-run must match)",
    "summary": "once complete: samples, tokens, bytes, compression ratio, timings, teacher accuracy",
}


def state_key(layer: int, comp: str) -> str:
    """The array path (under a split) of one teacher layer's component."""
    return f"layers/{layer}/{comp}"


def scale_key(comp: str) -> str:
    """The array name (under layers/{l}/) holding the int8 scales of component `comp`."""
    return f"{comp}_scale"


def fingerprint_of(attrs: dict) -> str:
    """Stable short hash of store attributes (volatile keys such as `complete` and `summary` excluded)."""
    stable = {k: v for k, v in attrs.items() if k not in VOLATILE_ATTRS}
    return hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:16]


def held_heads(attrs: dict, layer: int, comp: str, total: int) -> list[int]:
    """The teacher heads (query heads for q, KV heads for k/v) array layers/{layer}/{comp} holds, in stored
    order: the `heads` record's, or every head 0..total-1 for a store without one (every store before it)."""
    rec = (attrs.get("heads") or {}).get(comp)
    if rec is None:
        return list(range(total))
    return sorted(h for lay, h in rec if lay == layer)
