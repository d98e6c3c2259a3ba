"""The model card (`README.md`) of a trained student: how it was made, read from its run folder.

Owns: `model_card(run_dir) -> str`, written into the student folder by the end of a run and by
`kvmap-export`. Pure reading of config.yaml, meta.json and metrics.json (+ the store's attributes when the
store is reachable); imports pipeline.store for those attributes.

Shapes: none.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from pipeline.store.reader import KVStore

# Held-out metrics shown in the card, in this order (metric key, label).
CARD_METRICS = (
    ("eval/ce_trained", "held-out CE on the trained segments"),
    ("eval/ce_R", "held-out CE, reasoning (R)"),
    ("eval/ce_A", "held-out CE, answer (A)"),
    ("eval/acc_R", "answer-token accuracy in R"),
    ("eval/acc_A", "answer-token accuracy in A"),
    ("eval/exact_match", "greedy exact match"),
    ("eval/agree_top1", "top-1 agreement with the teacher"),
    ("eval/kl_teacher", "KL(teacher || student)"),
)


def _read(path: Path, loader) -> dict:
    return (loader(path.read_text()) or {}) if path.is_file() else {}


def _store_attrs(store_path: str | None, storage_options: dict | None) -> dict:
    """The store's attributes when it can still be opened (a card is written even when it cannot)."""
    if not store_path:
        return {}
    try:
        return dict(KVStore(store_path, storage_options=storage_options).attrs)
    except (FileNotFoundError, ValueError, OSError):
        return {}


def _losses(cfg: dict) -> list[str]:
    """The loss terms the run trained with, as `name x weight` strings."""
    loss, train = cfg.get("loss_config", {}), cfg.get("train", {})
    terms = []
    if loss.get("ce_weight", 1.0):
        terms.append(f"CE x {loss.get('ce_weight', 1.0)} on segments {train.get('ce_segments')}")
    if loss.get("alpha_logit"):
        terms.append(
            f"logit KD ({loss.get('kd_loss')}) x {loss['alpha_logit']}, temperature {loss.get('kd_temperature')}"
            f", on segments {train.get('kd_segments') or train.get('ce_segments')}"
        )
    if cfg.get("lambda_kv") not in (None, 0, 0.0):
        parts = [f"{k}={loss[k]}" for k in ("alpha_k", "alpha_v", "alpha_attn") if loss.get(k)]
        terms.append(f"structural x lambda_kv={cfg.get('lambda_kv')} ({', '.join(parts) or 'no terms'})")
    return terms


def model_card(run_dir: str | Path) -> str:
    """A Hugging Face model card for `run_dir/student`: YAML metadata, the teacher (id, revision), the store
    (fingerprint), the arm's losses, steps and tokens, and the held-out metrics."""
    run_dir = Path(run_dir)
    cfg = _read(run_dir / "config.yaml", yaml.safe_load)
    meta = _read(run_dir / "meta.json", json.loads)
    metrics = _read(run_dir / "metrics.json", json.loads)
    store = _store_attrs(meta.get("store"), cfg.get("train", {}).get("storage_options"))
    teacher = store.get("teacher", {}) or cfg.get("teacher", {})
    teacher_id = teacher.get("repo_id") or teacher.get("path") or "unknown"
    train = cfg.get("train", {})
    tokens = metrics.get("train/tokens")
    rows = [
        ("teacher", f"`{teacher_id}`" + (f" @ `{teacher['revision']}`" if teacher.get("revision") else "")),
        ("teacher config hash", f"`{teacher.get('config_hash', 'unknown')}`"),
        (
            "store",
            f"`{meta.get('store', 'unknown')}` (fingerprint `{meta.get('store_fingerprint', 'unknown')}`)",
        ),
        ("arm", f"`{run_dir.parent.name}/{run_dir.name}`" if run_dir.parent.name else f"`{run_dir.name}`"),
        ("losses", "; ".join(_losses(cfg))),
        ("steps", f"{metrics.get('steps', train.get('steps'))} x batch {train.get('batch_size')}"),
        ("tokens seen", f"{int(tokens):,}" if isinstance(tokens, (int, float)) else "not recorded"),
        ("seed", str(meta.get("seed", cfg.get("seed")))),
        ("kvmap commit", f"`{meta.get('git_sha', 'unknown')}`"),
    ]
    evals = [(label, metrics[k]) for k, label in CARD_METRICS if isinstance(metrics.get(k), (int, float))]
    return _render(teacher_id, rows, evals)


def _render(teacher_id: str, rows: list[tuple[str, str]], evals: list[tuple[str, float]]) -> str:
    front = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["kvmap", "distillation"],
    }
    if "/" in teacher_id and not teacher_id.startswith(("/", ".", "builtin:")):
        front["base_model"] = teacher_id  # a Hub id: the card links the teacher
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", "# Distilled student", ""]
    lines += [
        f"A student distilled from `{teacher_id}` with kvmap offline attention-state "
        "distillation: the teacher ran once into a Zarr store of its Q/K/V and top-k log-probs; the student "
        "trained from that store.",
        "",
        "## How it was made",
        "",
        "| | |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Held-out metrics", ""]
    if evals:
        lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in evals]
    else:
        lines.append("No held-out evaluation was recorded.")
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import pipeline",
        "",
        'generate = pipeline("text-generation", model="PATH_OR_REPO")',
        'print(generate([{"role": "user", "content": "Hello"}], max_new_tokens=32))',
        "```",
        "",
    ]
    return "\n".join(lines)
