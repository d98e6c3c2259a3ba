"""Peak RSS per process of a student trained by 2 processes with DDP (a full copy each) vs FSDP (`train.fsdp`).

    python benchmarks/bench_fsdp_memory.py [--config configs/default.yaml] [--scale_hidden 2]
        [--scale_layers 5] [--processes 2] [--batch_size 2] [--seq 128] [--steps 3]

Shape glossary: B batch per process, T tokens.

The student is the config's `student.config` grown to about 4x its parameters (as in
benchmarks/bench_student_memory.py; random init). Each mode is one `accelerate launch` of this script with
`--worker MODE` (gloo on CPU, NCCL on GPUs): the trainer's own pieces build the run's model,
`trainer.objective.step.DistillModel` (CE only: the aligner is a few KB and replicated either way), wrapped
by accelerate's DDP (`accelerator.prepare`) or sharded by `trainer.run.sharding.shard_model`, AdamW over
`trainer.run.setup.param_groups`, and `--steps` steps of forward, CE, backward, clipping and AdamW on
random tokens.

Per process it reports:
- state MiB: parameters + gradients + AdamW moments this process holds (its local shards under FSDP),
  counted from the tensors: deterministic.
- RSS MiB: at the start (Python, torch and the libraries imported), before the first step (after the model is built, sharded and freed memory is
  handed back with malloc_trim), the peak during the steps (VmHWM, reset before them via
  /proc/self/clear_refs), and the peak of the whole process (ru_maxrss: includes loading the full student,
  which every process does before sharding, and the Python + torch baseline).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.bench_student_memory import make_student, scaled  # noqa: E402
from pipeline.config.configlib import load_config  # noqa: E402
from pipeline.config.kvmap import KVMapConfig  # noqa: E402


def _args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/bench_fsdp_memory.py")
    ap.add_argument("--config", default=str(REPO / "configs" / "default.yaml"))
    ap.add_argument("--scale_hidden", type=int, default=2)
    ap.add_argument("--scale_layers", type=int, default=5)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--worker", choices=["ddp", "fsdp"], default=None, help="internal: one launched process")
    return ap.parse_args(argv)


def _status_kib(field: str) -> int:
    """A `VmRSS` / `VmHWM` line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes of `t` on this process (its shard for a DTensor)."""
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_mib(model, optimizer) -> float:
    """Parameters + gradients (as many bytes as the trainable parameters) + AdamW moments on this process."""
    params = [p for p in model.parameters()]
    held = sum(_local_bytes(p) for p in params) + sum(_local_bytes(p) for p in params if p.requires_grad)
    for st in optimizer.state.values():
        held += sum(_local_bytes(v) for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
    return held / 2**20


def worker(a) -> None:
    """One process of one mode: build, shard or wrap, train `--steps` steps, print its JSON line."""
    from accelerate import Accelerator

    from trainer.objective.step import DistillModel
    from trainer.run.setup import param_groups
    from trainer.run.sharding import clip_grad_norm, shard_model

    torch.set_num_threads(1)
    rss_start = _status_kib("VmRSS")  # Python, torch, accelerate, transformers imported
    base = load_config(KVMapConfig, a.config)
    hf = scaled(base.student.config, a.scale_hidden, a.scale_layers)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model = DistillModel(make_student(hf), None)
    n_params = sum(p.numel() for p in model.parameters())
    if a.worker == "fsdp":
        model = shard_model(model, acc)
        optimizer = torch.optim.AdamW(param_groups(model.student, None, base), betas=(0.9, 0.95))
    else:
        model = acc.prepare(model)
        optimizer = torch.optim.AdamW(param_groups(model.module.student, None, base), betas=(0.9, 0.95))
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return what sharding freed, so RSS shows what is live
    rss_before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the next peak is the steps' own
    g = torch.Generator().manual_seed(acc.process_index)
    for _ in range(a.steps):
        ids = torch.randint(3, hf["vocab_size"], (a.batch_size, a.seq), generator=g).to(acc.device)
        logits, _, _ = model(input_ids=ids, attention_mask=torch.ones_like(ids))  # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        if a.worker == "fsdp":
            clip_grad_norm(model, 1.0)
        else:
            acc.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        held = state_mib(model, optimizer)  # with the gradients still in place
        optimizer.zero_grad(set_to_none=True)
    row = {
        "mode": a.worker,
        "rank": acc.process_index,
        "params": n_params,
        "state_mib": held,
        "rss_start_mib": rss_start / 1024,
        "rss_before_mib": rss_before / 1024,
        "rss_steps_peak_mib": _status_kib("VmHWM") / 1024,
        "rss_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    print("ROW " + json.dumps(row), flush=True)


def launch(a, mode: str) -> list[dict]:
    """One `accelerate launch` of `--worker mode`; its processes' rows, by rank."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(a.processes),
    ]
    cmd += ["--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", __file__]
    cmd += ["--worker", mode, "--config", a.config, "--scale_hidden", str(a.scale_hidden)]
    cmd += ["--scale_layers", str(a.scale_layers), "--batch_size", str(a.batch_size), "--seq", str(a.seq)]
    cmd += ["--steps", str(a.steps)]
    # every allocation over 64 KiB its own mapping, returned when freed: RSS follows live tensors instead of
    # what glibc's heap keeps after a peak
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{mode} launch failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x[4:]) for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    return sorted(rows, key=lambda r: r["rank"])


def main(argv=None) -> int:
    """Both modes, one after the other; one table."""
    a = _args(argv)
    if a.worker:
        worker(a)
        return 0
    rows = launch(a, "ddp") + launch(a, "fsdp")
    n = rows[0]["params"]
    print(
        f"student {n / 1e6:.1f}M params (the default's widths x{a.scale_hidden}, layers x{a.scale_layers}); "
        f"{a.processes} processes, B={a.batch_size} T={a.seq} per process, {a.steps} steps"
    )
    cols = {"state MiB": "state_mib", "RSS start": "rss_start_mib", "RSS before": "rss_before_mib"}
    cols |= {"RSS steps peak": "rss_steps_peak_mib", "RSS peak": "rss_peak_mib"}
    print(f"{'mode':<5} {'rank':>4} " + " ".join(f"{h:>{len(h) + 1}}" for h in cols))
    for r in rows:
        vals = " ".join(f"{r[k]:>{len(h) + 1}.1f}" for h, k in cols.items())
        print(f"{r['mode']:<5} {r['rank']:>4} {vals}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
