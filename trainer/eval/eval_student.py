"""Held-out evaluation of a student as it is, before any training step (e.g. a student pruned from the teacher).

    python -m trainer.eval.eval_student --config configs/pruned.yaml [key=value ...]

Shapes: none (wraps `trainer.eval.evaluate.evaluate`, the same metrics training logs as `eval/*`).
Reads only the store's held-out tokens (`train.store` or `extract.store`, split "eval"); no teacher states.
"""

from __future__ import annotations

import json
import sys
import time

from accelerate import Accelerator

from pipeline.cli import command_parser, config_from_args, parse_args, run_command
from pipeline.config.kvmap import KVMapConfig
from pipeline.models.load import load_model, pad_token_id
from trainer.eval.evaluate import evaluate
from trainer.run.setup import kd_segment_ids, segment_ids, store_path_of, token_loss_ids
from trainer.run.store_checks import check_tokenizer, open_store


def evaluate_student(cfg: KVMapConfig) -> dict:
    """The `eval/*` metrics of `cfg.student` on the store's eval split (CE over the trained segments too)."""
    ce_ids = token_loss_ids(segment_ids(cfg)[0], kd_segment_ids(cfg))
    store = open_store(store_path_of(cfg))
    if "eval" not in store.splits:
        raise ValueError(
            f"train.store='{store.path}' has no eval split: expected data.eval_path at extraction"
        )
    accelerator = Accelerator(cpu=True)
    student, tokenizer = load_model(cfg.student)
    check_tokenizer(store, tokenizer, int(student.get_input_embeddings().weight.shape[0]))
    pad_id = pad_token_id(tokenizer)
    t0 = time.perf_counter()
    out = evaluate(accelerator, student, tokenizer, store.path, "eval", cfg.eval, pad_id, ce_ids)
    return {**out, "eval_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.eval.eval_student`: print the held-out metrics of `student` as JSON."""
    p = command_parser(
        "python -m trainer.eval.eval_student",
        __doc__,
        sections=["student", "train.store", "extract.store", "eval"],
        examples=[
            "python -m trainer.eval.eval_student --config configs/pruned.yaml",
            "python -m trainer.eval.eval_student --config configs/pruned_narrow.yaml eval.greedy_samples=0",
        ],
    )
    args = parse_args(p, argv)
    return run_command(
        "eval_student",
        lambda: print(json.dumps(evaluate_student(config_from_args(KVMapConfig, args)), indent=1)),
    )


if __name__ == "__main__":
    sys.exit(main())
