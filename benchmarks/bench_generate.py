"""Teacher-written completions on the default teacher: batched generation vs one prompt at a time, and which
reasoning prefix makes the teacher write answers that pass `answer_match`.

    python benchmarks/bench_generate.py --samples 32 --threads 2
    python benchmarks/bench_generate.py --samples 30 --prefixes "\\nThe text says" "\\nAccording to the text," --no-single

Throughput = generated tokens (R + A, up to the stop) / wall seconds of `complete_rows` (both generate
calls). "batched" uses `data.generation.batch_size` prompts per call (left padding, KV cache); "single" is
batch size 1, still with the KV cache (what a per-sample loop would do).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import torch  # noqa: E402

from pipeline.config.kvmap import DataConfig, GenerationConfig, ModelConfig  # noqa: E402
from pipeline.data.default_data import make_rows  # noqa: E402
from pipeline.data.generate import complete_rows  # noqa: E402
from pipeline.models.load import load_model  # noqa: E402


def run(model, tok, rows, data_cfg) -> tuple[list[dict], float]:
    t0 = time.perf_counter()
    recs = complete_rows(model, tok, [r["prompt"] for r in rows], [r["answer"] for r in rows], data_cfg)
    return recs, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=32, help="default-task train prompts (the first N)")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--prefixes", nargs="*", default=["\nThe text says"])
    ap.add_argument("--max_new_tokens", type=int, default=32)
    ap.add_argument("--answer_max_new_tokens", type=int, default=8)
    ap.add_argument("--no-single", action="store_true", help="skip the one-prompt-at-a-time run")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--show", type=int, default=3, help="completions printed per prefix")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, tok = load_model(ModelConfig(path="builtin:smollm2-135m-instruct", device="cpu"))
    rows = make_rows(a.samples, 0)[0]
    gen = GenerationConfig(batch_size=a.batch_size, answer_max_new_tokens=a.answer_max_new_tokens)
    for prefix in (p.encode().decode("unicode_escape") for p in a.prefixes):
        cfg = DataConfig(reasoning_prefix=prefix, max_new_tokens=a.max_new_tokens, generation=gen)
        recs, wall = run(model, tok, rows, cfg)
        toks = sum(r["new_tokens"] for r in recs)
        kept = sum(r["kept"] for r in recs)
        cut = sum(r["stop_reasoning"] == "max_new_tokens" for r in recs)
        print(f"prefix {prefix!r}: answer_match {kept}/{len(recs)} = {kept / len(recs):.2f}, R cut {cut}, "
              f"batched {toks} tokens in {wall:.1f} s = {toks / wall:.1f} tok/s", flush=True)  # fmt: skip
        for r in recs[: a.show]:
            print("   ", json.dumps({k: r[k] for k in ("reasoning", "answer", "gold")}))
        if not a.no_single:
            one = dataclasses.replace(cfg, generation=dataclasses.replace(gen, batch_size=1))
            recs1, wall1 = run(model, tok, rows, one)
            toks1 = sum(r["new_tokens"] for r in recs1)
            same = sum(
                r["reasoning"] == q["reasoning"] and r["answer"] == q["answer"] for r, q in zip(recs, recs1)
            )
            print(f"    one at a time: {toks1} tokens in {wall1:.1f} s = {toks1 / wall1:.1f} tok/s; "
                  f"batched / single throughput {toks / wall / (toks1 / wall1):.2f}x; "
                  f"identical completions {same}/{len(recs)}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
