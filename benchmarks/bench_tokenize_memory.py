"""Stage 1's tokenisation: peak RSS per process at 1x and 4x the rows, 1 process and 2 (each its share).

    python benchmarks/bench_tokenize_memory.py [--config configs/default.yaml] [--rows 20000] [--processes 2]
        [--no-texts]

Shape glossary: N tokens of the split, S samples.

The rows are the embedded default task (pipeline/data/default_data.py, ~65 tokens each) generated at
`--rows` and 4x `--rows` into a temporary folder. Each measurement is one fresh process (or one
`accelerate launch` of `--processes` processes, gloo) running exactly what stage 1 runs before its first
forward, `pipeline.extraction.inputs.load_split` (tokenise, count, pack into the store layout), with the config's
teacher tokenizer. Per process it reports the RSS after the tokenizer is loaded (`start`), the peak of the
whole process (ru_maxrss) and the rise between them, per 1,000 rows. The packed layout itself, which every
process keeps (the extraction loop reads any chunk's tokens from it), is 6 bytes per token + 20 per sample for the token arrays, plus 8 bytes per token of
character spans and the rendered texts (kept for cross-tokenizer arms).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/bench_tokenize_memory.py")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument(
        "--no-texts", action="store_true", help="extract.texts: false (no rendered texts or char spans kept)"
    )
    ap.add_argument("--worker", default=None, help="internal: the train.jsonl one process tokenises")
    return ap.parse_args(argv)


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise KeyError("VmRSS")


def worker(a) -> None:
    """One process: load the tokenizer, run `load_split` on the train file, print its JSON row."""
    import dataclasses

    from accelerate import PartialState

    from pipeline.config.configlib import load_config
    from pipeline.config.kvmap import KVMapConfig
    from pipeline.extraction.inputs import load_split
    from pipeline.models.load import load_tokenizer

    state = PartialState(cpu=True)
    cfg = load_config(KVMapConfig, a.config)
    data = dataclasses.replace(cfg.data, train_path=a.worker, eval_path=None)
    store = str(Path(a.worker).parent / "store.zarr")  # the tokens are staged beside it, in the temp folder
    extract = dataclasses.replace(cfg.extract, texts=not a.no_texts, store=store)
    cfg = dataclasses.replace(cfg, data=data, extract=extract)
    tokenizer = load_tokenizer(cfg.teacher.tokenizer or cfg.teacher.path)
    start = _rss_kib()
    t0 = time.perf_counter()
    packed, counts = load_split(cfg, "train", tokenizer, state)
    row = {
        "rank": state.process_index,
        "processes": state.num_processes,
        "rows": counts["rows"],
        "tokens": packed.num_tokens,
        "seconds": time.perf_counter() - t0,
        "start_mib": start / 1024,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("ROW " + json.dumps(row), flush=True)


def measure(a, train: Path, processes: int) -> list[dict]:
    """Fresh process(es) tokenising `train`; their rows by rank."""
    me = [__file__, "--worker", str(train), "--config", a.config] + (["--no-texts"] if a.no_texts else [])
    cmd = [sys.executable, *me]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes"]
        cmd += [
            str(processes),
            "--main_process_port",
            "0",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
        ]
        cmd += me
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"worker failed:\n{proc.stderr[-3000:]}")
    return sorted(
        (json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ROW ")), key=lambda r: r["rank"]
    )


def main(argv=None) -> int:
    a = _args(argv)
    if a.worker:
        worker(a)
        return 0
    from pipeline.data.default_data import generate

    print(
        f"{'rows':>7} {'tokens':>10} {'procs':>5} {'rank':>4} {'s':>6} {'start MiB':>10} {'peak MiB':>9} {'rise MiB':>9} {'MiB/1k rows':>12}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for mult in (1, 4):
            out = Path(tmp) / f"x{mult}"
            generate(out, n_train=a.rows * mult, n_eval=1)
            for procs in sorted({1, a.processes}):
                for r in measure(a, out / "train.jsonl", procs):
                    rise = r["peak_mib"] - r["start_mib"]
                    print(
                        f"{r['rows']:>7} {r['tokens']:>10} {procs:>5} {r['rank']:>4} {r['seconds']:>6.1f} "
                        f"{r['start_mib']:>10.1f} {r['peak_mib']:>9.1f} {rise:>9.1f} {rise / r['rows'] * 1000:>12.2f}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
