"""GPU costs in one run: stage-1 capture overhead, stage-2 step cost, streaming attention KL vs naive.

Shape glossary: B batch, T tokens, V vocab, L_t/L_s teacher/student layers, L_sel teacher layers the layer
map reads, H query heads, G KV heads, D head dim; `_t` teacher, `_s` student.

    python benchmarks/bench_gpu.py --out gpu.json                          # GPU: Qwen2.5-7B -> 1.5B geometry
    python benchmarks/bench_gpu.py --smoke --device cpu --out /tmp/x.json  # tiny geometry, seconds on CPU
    python benchmarks/bench_gpu.py --sections 1,3 --repeats 5

Needs the repo root importable (this script puts it on sys.path; no pip install), torch, transformers,
accelerate; section 1's extract_chunk row also needs zarr (it imports pipeline.store.reader) and is skipped with its
error when zarr is missing. Each section is guarded: a failing one prints its traceback and the others still
run; the JSON at --out is rewritten after every section, so a crash keeps what was measured. Exit code 1 when
a section failed.

Sections:
  1 capture  random-weight teacher at Qwen2.5-7B geometry (bf16, sdpa, B x T tokens, inference_mode):
             plain forward vs forward under `pipeline.models.capture.capture_qkv` for the teacher layers the
             uniform layer map of the section-2 student needs, vs capture + Q/K/V copied token-major into
             pinned CPU bf16 buffers (async: the best case), vs `pipeline.extraction.chunk.extract_chunk` (what
             stage 1 runs per chunk: capture, finiteness check, pageable `.cpu()`, numpy packing, answer
             accuracy; the zarr write itself is CPU work, not timed), in bf16 and in int8 (quantised on the
             device before the copy; the int8 bar: extract_chunk_int8 <= 1.3x plain, i.e. <= +30%). Also
             checks that capture leaves the logits unchanged.
  2 step     student at Qwen2.5-1.5B geometry, fp32 master weights, accelerate mixed_precision="bf16"
             (autocast around `DistillModel.forward`, prepared as `trainer/train.py` does), random teacher
             states (B, L_sel, H_t|G_t, T, D_t) float32 as the store reader returns them. One step =
             `trainer.objective.step.forward_step` + `accelerator.backward` + clip_grad_norm(1.0) + AdamW (the
             trainer's param groups). Variants: CE-only, structured, flat, attention-only (alpha_k = alpha_v =
             0, attn_target "teacher"); default AlignConfig (uniform layer map). Also the host -> device copy
             of the batch (pageable, as the trainer's loader gives it, and pinned). A variant that runs out of
             memory is retried once at half the batch (its row shows B; the CE-only ratio is per token).
  3 attn_kl  `alignment.losses.attention_kl` (streamed, two chunk sizes) vs the dense per-row math of
             benchmarks/bench_attention_kl.py ("naive"), value + backward, B=1 L=1 H=9 G=3 D=64 float32;
             values and gradients compared with naive; naive out of memory is recorded and skipped.
Timing: warm-up, then the median of --repeats runs, each between torch.cuda.synchronize calls. Memory: CUDA
peak allocated (max_memory_allocated) after reset_peak_memory_stats; None on CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (
    REPO,
    HERE,
):  # kvmap packages without a pip install; the sibling gpu_sections.py and gpu_step_section.py by their own names
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import gpu_sections as gs  # noqa: E402  (found through HERE on sys.path)
import gpu_step_section as step_section  # noqa: E402

KL_SHAPE = dict(B=1, L=1, H=9, G=3, D=64)  # as benchmarks/bench_attention_kl.py (SmolLM2-like)


def dense_kl(q_s, k_s, q_t, k_t):
    """bench_attention_kl.py's "naive": the streamed per-row math on whole (B, L, H, T, T) maps, autograd."""
    from alignment.geometry.attention_probs import LogitSpec, attention_logits

    T, H, D = q_s.shape[3], q_s.shape[2], q_s.shape[4]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q_s.device).tril()  # (T, T)
    # (B, L, H, T, T) maps on both sides
    logp_s = torch.log_softmax(
        attention_logits(q_s, k_s, LogitSpec(D**-0.5))[0].masked_fill(~allowed, -1e30), dim=-1
    )
    logp_t = torch.log_softmax(
        attention_logits(q_t, k_t, LogitSpec(D**-0.5))[0].masked_fill(~allowed, -1e30), dim=-1
    )
    return torch.where(allowed, logp_t.exp() * (logp_t - logp_s), 0.0).sum() / (T * H)


def _kl_kind(f, xs: list, dev: torch.device, repeats: int) -> tuple[dict, list]:
    """Warm-up, memory pass, then timed value + backward passes of `f(*xs)` -> (row, grads)."""

    def run():
        for x in xs:
            x.grad = None
        kl = f(*xs)
        kl.backward()
        return kl

    run()  # warm-up: compilation and Triton's autotuning (its benchmark allocates a 256 MB cache-flush buffer)
    for x in xs:
        x.grad = None
    base = gs.reset_peak(dev)
    r = {"value": float(run().detach()), "peak_above_inputs_gib": gs.peak_gib(dev, base)}
    grads = [x.grad.detach().clone() for x in xs]
    r["median_s"], r["times_s"] = gs.timed(run, dev, repeats, warmup=0)
    return r, grads


def _kl_kinds(geo: dict, dev: torch.device) -> dict:
    """name -> (function, input dtype, the naive kind its time and memory are compared with)."""
    from alignment.losses.attention_kl import attention_kl

    kinds = {"naive": (dense_kl, torch.float32, None)}
    for c in geo["kl_chunks"]:
        kinds[f"stream_c{c}"] = (
            lambda *a, c=c: attention_kl(*a, chunk_size=c, impl="torch"),
            torch.float32,
            "naive",
        )
    if dev.type == "cuda":
        fused = lambda *a: attention_kl(*a, impl="triton")  # noqa: E731
        kinds["fused"] = (fused, torch.float32, "naive")
        kinds["naive_bf16"] = (dense_kl, torch.bfloat16, None)
        kinds["fused_bf16"] = (fused, torch.bfloat16, "naive_bf16")
    return kinds


def _kl_row(T: int, geo: dict, dev: torch.device, repeats: int) -> dict:
    """One T: naive fp32 first (the reference for values and gradients), then the other kinds."""
    B, L, H, G, D = (KL_SHAPE[k] for k in "BLHGD")
    g = torch.Generator(device=dev).manual_seed(T)
    # q_s (B, L, H, T, D), k_s (B, L, G, T, D), q_t, k_t likewise: both sides trainable (projected target)
    base = [torch.randn(B, L, X, T, D, generator=g, device=dev) for X in (H, G, H, G)]
    kinds = _kl_kinds(geo, dev)
    row: dict = {"T": T}
    ref = None
    for kind, (f, dtype, _) in kinds.items():
        xs = [x.detach().to(dtype).requires_grad_() for x in base]  # fresh leaves per kind
        try:
            r, grads = _kl_kind(f, xs, dev, repeats)
            if ref is None:
                ref = (r["value"], grads)
            else:
                r["value_rel_diff"] = abs(r["value"] - ref[0]) / max(abs(ref[0]), 1e-30)
                r["grad_max_rel_diff"] = max(
                    float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for a, b in zip(grads, ref[1])
                )
            grads = None
        except torch.OutOfMemoryError as e:  # naive at large T: record it, go on with the others
            r = {"error": f"OOM: {str(e).splitlines()[0][:120]}"}
        except Exception as e:
            traceback.print_exc()
            r = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
        xs = None
        gs.free(dev)
        row[kind] = r
        msg = r.get("error") or f"{r['median_s'] * 1e3:.1f} ms, +{gs.fmt(r['peak_above_inputs_gib'], 3)} GiB"
        gs.log(f"attn_kl T={T} {kind}: {msg}")
    for kind, (_, _, vs) in kinds.items():
        r, naive = row[kind], row.get(vs, {})
        if vs and "median_s" in r and "median_s" in naive:
            r["time_ratio_vs_naive"] = r["median_s"] / naive["median_s"]
            if naive["peak_above_inputs_gib"]:
                r["mem_ratio_vs_naive"] = r["peak_above_inputs_gib"] / naive["peak_above_inputs_gib"]
    return row


def section_kl(geo: dict, dev: torch.device, repeats: int) -> dict:
    res: dict = {"shape": KL_SHAPE, "dtype": "float32", "rows": []}
    for T in geo["kl_T"]:
        res["rows"].append(_kl_row(T, geo, dev, repeats))
        gs.free(dev)
    return res


def table_kl(res: dict) -> str:
    rows = []
    for row in res["rows"]:
        for kind, r in row.items():
            if kind == "T":
                continue
            if "error" in r:
                rows.append([row["T"], kind, "error: " + r["error"][:80], "-", "-", "-", "-", "-"])
                continue
            diffs = [f"{r[k]:.1e}" if k in r else "-" for k in ("value_rel_diff", "grad_max_rel_diff")]
            mib = None if r["peak_above_inputs_gib"] is None else r["peak_above_inputs_gib"] * 1024
            rows.append([row["T"], kind, r["median_s"] * 1e3, r.get("time_ratio_vs_naive"), mib,
                         r.get("mem_ratio_vs_naive"), *diffs])  # fmt: skip
    s = res["shape"]
    head = (f"Attention KL value + backward, B={s['B']} L={s['L']} H={s['H']} G={s['G']} D={s['D']} (float32 "
            "unless _bf16); peak = CUDA peak allocated above the inputs; x naive = vs the naive row of the same "
            "dtype; rel diffs vs fp32 naive")  # fmt: skip
    cols = ["T", "kind", "ms", "time x naive", "peak MiB", "mem x naive", "value rel diff", "grad rel diff"]
    return head + "\n\n" + gs.md_table(cols, rows)


SECTIONS = {
    "1": ("capture", gs.section_capture, gs.table_capture),
    "2": ("step", step_section.section_step, step_section.table_step),
    "3": ("attn_kl", section_kl, table_kl),
}


def environment(dev: torch.device) -> dict:
    import accelerate
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "accelerate": accelerate.__version__, "device": str(dev),
           "threads": torch.get_num_threads(),
           "tf32_matmul": getattr(torch.backends.cuda.matmul, "allow_tf32", None)}  # fmt: skip
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
        env["gpu_total_gib"] = torch.cuda.get_device_properties(dev).total_memory / 2**30
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        )
        env["git_sha"] = sha.stdout.strip() or None
        st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                            capture_output=True, text=True)  # fmt: skip
        env["git_dirty"] = bool(st.stdout.strip()) if st.returncode == 0 else None
    except OSError:
        env["git_sha"] = None
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny geometries (CPU is fine, seconds)")
    p.add_argument("--device", default=None, help="cuda | cpu | cuda:N (default: cuda when available)")
    p.add_argument("--out", default="bench_gpu.json", help="JSON results path (rewritten after each section)")
    p.add_argument("--sections", default="1,2,3", help="comma-separated subset of 1,2,3")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per measurement (default 5, smoke 2)"
    )
    args = p.parse_args(argv)
    dev = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            p.error(f"--device {dev}: CUDA is not available")
        if dev.index is None:  # torch.cuda.set_device refuses a device without an index
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        p.error(f"--sections {args.sections!r}: expected a comma-separated subset of {sorted(SECTIONS)}")
    repeats = args.repeats or (2 if args.smoke else 5)
    if repeats < 1:
        p.error(f"--repeats {repeats}: expected >= 1")
    if args.smoke and dev.type == "cpu":
        torch.set_num_threads(1)  # the development machine is shared
    torch.manual_seed(0)
    geo = gs.GEOMETRY["smoke" if args.smoke else "full"]
    out = {"env": environment(dev), "args": vars(args), "repeats": repeats, "geometry": geo, "sections": {}}
    gs.log(f"env {out['env']}")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tables, failed = [], []
    for s in sections:
        name, fn, table = SECTIONS[s]
        gs.log(f"section {s} ({name}) ...")
        t0 = time.perf_counter()
        try:
            res = fn(geo, dev, repeats)
            res["wall_s"] = time.perf_counter() - t0
        except Exception as e:
            tb = traceback.format_exc()
            print(tb, file=sys.stderr, flush=True)
            res = {"error": f"{type(e).__name__}: {e}".splitlines()[0], "traceback": tb,
                   "wall_s": time.perf_counter() - t0}  # fmt: skip
            text = f"## {s}. {name}: FAILED\n\n```\n{tb}```"
            failed.append(s)
            gs.free(dev)
        else:
            try:  # a formatting bug must not lose the numbers: they are in the JSON either way
                text = f"## {s}. {name} ({res['wall_s']:.1f} s)\n\n{table(res)}"
            except Exception:
                res["table_error"] = traceback.format_exc()
                text = f"## {s}. {name}: table failed (numbers in the JSON)\n\n```\n{res['table_error']}```"
        out["sections"][name] = res
        tables.append(text)
        print("\n" + text + "\n", flush=True)
        out_path.write_text(json.dumps(out, indent=1, default=str))
    print("\n# bench_gpu summary\n\n" + "\n\n".join(tables), flush=True)
    gs.log(f"wrote {out_path}; failed sections: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
