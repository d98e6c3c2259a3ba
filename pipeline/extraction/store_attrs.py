"""What a store records about its teacher and its extraction settings, and the fingerprint that decides
whether an existing store can be resumed (same bits) or must be refused.

Shapes: none (attributes). Written once by stage 1 (pipeline/extract.py) at store creation; read back by
stage 2 through `pipeline.models.geometry.teacher_config_from_attrs` and `KVStore.attrs`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.config.configlib import ConfigError, to_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.models.geometry import GEOMETRY_KEYS, model_geometry, teacher_geometry_attrs
from pipeline.models.load import HUB_ID, hub_source, resolve_path
from pipeline.store.encoding import index_dtype
from pipeline.store.int8 import INT8_SCHEMES
from pipeline.store.packed_split import PackedSplit
from pipeline.store.schema import SCHEMA_VERSION


def state_components(cfg: KVMapConfig) -> list[str]:
    """The per-layer state components of `extract.components` (everything but `logits`), in q, k, v order."""
    return [c for c in ("q", "k", "v") if c in cfg.extract.components]


def logits_attrs(cfg: KVMapConfig, vocab_size: int, has_eval: bool) -> dict | None:
    """The store's `logits` attribute (None when `logits` is not extracted); checks top_k against the vocab."""
    if "logits" not in cfg.extract.components:
        return None
    k = cfg.extract.logits_top_k
    if not 1 <= k <= vocab_size:
        raise ConfigError(
            f"extract.logits_top_k={k!r}: expected an int in [1, {vocab_size}] (the teacher's vocabulary)"
        )
    return {
        "top_k": k,
        "dtype": "float16",
        "index_dtype": index_dtype(vocab_size),
        "splits": ["train", "eval"] if has_eval else ["train"],
    }


# HF config keys that do not change the teacher's function (left out of its config hash)
VOLATILE_HF_KEYS = ("dtype", "torch_dtype", "transformers_version", "architectures", "attn_implementation")


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def teacher_hub_source(cfg: KVMapConfig) -> dict[str, str]:
    """{repo_id, revision} when the teacher is a Hub id (its cached snapshot is resolved again: no
    download), else {}."""
    path = cfg.teacher.path
    if path is None or Path(path).expanduser().exists() or not HUB_ID.match(path):
        return {}
    return hub_source(resolve_path(path, cfg.teacher.revision, "teacher.path"))


def teacher_attrs(cfg: KVMapConfig, model, tokenizer, layers: list[int]) -> dict:
    """Store attributes describing the teacher, tokenizer and extraction settings."""
    geo = model_geometry(model.config)
    hf = model.config.to_dict()
    rope = {k: hf[k] for k in ("rope_parameters", "rope_theta", "rope_scaling") if hf.get(k) is not None}
    vocab = tokenizer.get_vocab()
    tok_hash = hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest()[:16]
    return {
        "teacher": {
            "path": cfg.teacher.path,
            "model_type": hf.get("model_type"),
            "config_hash": _sha(
                {k: v for k, v in hf.items() if not k.startswith("_") and k not in VOLATILE_HF_KEYS}
            ),
            "num_layers": geo["layers"],
            "num_heads": geo["heads"],
            "num_kv_heads": geo["kv_heads"],
            "head_dim": geo["head_dim"],
            "hidden_size": geo["hidden"],
            "vocab_size": geo["vocab"],
            "rope": rope,
            "dtype": cfg.teacher.dtype,
            # scaling / softcap / windows as measured (pipeline/models/geometry.py)
            **teacher_geometry_attrs(model),
            # a Hub teacher: the repo id and the commit its snapshot holds (absent for local teachers, so
            # their fingerprints stay as they were)
            **teacher_hub_source(cfg),
        },
        # the config spec (e.g. builtin:...), not the resolved cache folder: stable across machines
        "tokenizer": {
            "name": cfg.teacher.tokenizer or cfg.teacher.path,
            "vocab_size": len(tokenizer),
            "hash": tok_hash,
        },
        "layers": layers,
        "components": state_components(cfg),
        "dtype": cfg.extract.dtype,
        **({"quantization": int8_schemes(cfg)} if cfg.extract.dtype == "int8" else {}),
        "codec": cfg.extract.codec,
        "compression_level": cfg.extract.compression_level,
        "segments": {"P": 0, "R": 1, "A": 2},
    }


def int8_schemes(cfg: KVMapConfig) -> dict[str, str]:
    """The int8 scale scheme of each stored state component (pipeline/store/int8.py)."""
    return {c: INT8_SCHEMES[c] for c in state_components(cfg)}


def config_fingerprint(cfg: KVMapConfig, attrs: dict, train: PackedSplit, eval: PackedSplit | None) -> str:
    """What makes two extractions produce the same bits: teacher, tokens, layers, dtype, codec, batching."""
    ex = to_dict(cfg.extract)
    for k in ("store", "storage_options", "writer_threads", "max_pending_chunks", "layers"):
        ex.pop(k)
    if ex.get("texts", True):  # the default: left out, so stores made before extract.texts resume
        ex.pop("texts", None)
    if ex["heads"] == "all":  # every head: left out, so stores made before extract.heads resume
        ex.pop("heads"), ex.pop("head_select")
    # device never changes the bits; an unset revision is left out so stores from before the key resume
    teacher = {
        k: v for k, v in to_dict(cfg.teacher).items() if k != "device" and not (k == "revision" and v is None)
    }
    # the geometry keys derive from the hashed teacher config: left out, so stores made before them resume
    t_attrs = {k: v for k, v in attrs["teacher"].items() if k not in GEOMETRY_KEYS}
    return _sha(
        {
            "schema_version": SCHEMA_VERSION,
            "teacher": teacher,
            "teacher_attrs": t_attrs,
            "tokenizer": attrs["tokenizer"],
            "layers": attrs["layers"],
            "extract": ex,
            "train_tokens": train.fingerprint(),
            "eval_tokens": eval.fingerprint() if eval is not None else None,
            # only with teacher-written completions, so dataset-mode fingerprints stay as they were
            **({"completions": attrs["completions"]} if "completions" in attrs else {}),
            **({"quantization": attrs["quantization"]} if "quantization" in attrs else {}),
            **({"heads": attrs["heads"]} if "heads" in attrs else {}),  # a head-subset store only
        }
    )
