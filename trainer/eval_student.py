"""Held-out evaluation of a student as it is, before any training step (e.g. a student pruned from the teacher).

    python -m trainer.eval_student --config configs/pruned.yaml [key=value ...]

Shapes: none (wraps `trainer.evaluate.evaluate`, the same metrics training logs as `eval/*`).
Reads only the store's held-out tokens (`train.store` or `extract.store`, split "eval"); no teacher states.
"""

from __future__ import annotations

import json
import sys
import time

from pipeline.config import KVMapConfig
from pipeline.configlib import ConfigError, parse_cli


def evaluate_student(cfg: KVMapConfig) -> dict:
    """The `eval/*` metrics of `cfg.student` on the store's eval split (CE over `train.ce_segments` too)."""
    from accelerate import Accelerator

    from pipeline.models import load_model
    from trainer.evaluate import evaluate
    from trainer.setup import store_path_of, validate_config
    from trainer.store_checks import check_tokenizer, open_store

    ce_ids, _ = validate_config(cfg)
    store = open_store(store_path_of(cfg))
    if "eval" not in store.splits:
        raise ValueError(
            f"train.store='{store.path}' has no eval split: expected data.eval_path at extraction"
        )
    accelerator = Accelerator(cpu=True)
    student, tokenizer = load_model(cfg.student)
    check_tokenizer(store, tokenizer, int(student.get_input_embeddings().weight.shape[0]))
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    t0 = time.perf_counter()
    out = evaluate(accelerator, student, tokenizer, store.path, "eval", cfg.eval, pad_id, ce_ids)
    return {**out, "eval_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, _ = parse_cli(KVMapConfig, sys.argv[1:] if argv is None else argv)
        print(json.dumps(evaluate_student(cfg), indent=1))
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"eval_student: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
