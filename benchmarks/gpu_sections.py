"""Section 1 (stage-1 capture overhead) of benchmarks/bench_gpu.py + the helpers every section uses
(timing, peak memory, tables, models of the published geometries); section 2 is gpu_step_section.py.

Shape glossary: B batch, T tokens, V vocab, L_t/L_s teacher/student layers, L_sel teacher layers the layer
map reads, H query heads, G KV heads, D head dim, X heads of one component (H for q, G for k/v); `_t`
teacher, `_s` student. What each section measures and how: see benchmarks/bench_gpu.py.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_QWEN = dict(rope_theta=1e6, max_position_embeddings=32768, use_sliding_window=False)
GEOMETRY = {
    "full": {  # Qwen2.5-7B teacher, Qwen2.5-1.5B student (published configs)
        "teacher": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                        intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False, **_QWEN),
        "student": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                        intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True, **_QWEN),
        "capture_bt": (8, 1024), "step_bt": (4, 1024), "kl_T": [2048, 4096, 8192], "kl_chunks": [128, 512],
    },
    "smoke": {  # odd unequal sizes (BRIEF): teacher 4 layers / 6 heads / 2 KV / head_dim 16, student 3/4/2/8
        "teacher": dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                        intermediate_size=160, vocab_size=384, tie_word_embeddings=False, **_QWEN),
        "student": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=64, vocab_size=384, tie_word_embeddings=True, **_QWEN),
        "capture_bt": (2, 32), "step_bt": (2, 32), "kl_T": [64, 160], "kl_chunks": [16, 64],
    },
}  # fmt: skip
GIB = 2**30
CHUNK_BATCHES = 4  # teacher batches per stage-1 write chunk in section 1
CAPTURE_LAYERS = 8  # teacher layers stage 1 stores in the stage-1 rows (the speed bar: 8 layers + logits)
KD_TOP_K = 128  # stored teacher log-probs per token (extract.logits_top_k default)


def log(msg: str) -> None:
    print(f"[bench_gpu {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev: torch.device, repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, all seconds) of `fn()` after `warmup` untimed calls; synchronized around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def reset_peak(dev: torch.device) -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 on CPU)."""
    if dev.type != "cuda":
        return 0
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    return torch.cuda.memory_allocated(dev)


def peak_gib(dev: torch.device, base: int = 0) -> float | None:
    """Peak allocated GiB since `reset_peak` (minus `base`); None on CPU."""
    if dev.type != "cuda":
        return None
    sync(dev)
    return (torch.cuda.max_memory_allocated(dev) - base) / GIB


def free(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def fmt(x, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    return str(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def build_lm(geom: dict, dtype: torch.dtype, dev: torch.device):
    """Random-weight Qwen2 causal LM built directly on `dev` in `dtype` (no slow CPU init), sdpa attention."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**geom)
    with dev:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    p = next(model.parameters())
    if p.dtype != dtype or p.device.type != dev.type:  # an older transformers ignoring `dtype=`
        model.to(device=dev, dtype=dtype)
    if model.config._attn_implementation != "sdpa":
        raise RuntimeError(f"attn_implementation={model.config._attn_implementation!r}: expected 'sdpa'")
    return model


def mapped_teacher_layers(geo: dict) -> list[int]:
    """Teacher layers the default ("uniform") layer map needs for the section-2 student."""
    from alignment.mapping.layer_map import build_layer_map, teacher_layers_needed

    L_t, L_s = geo["teacher"]["num_hidden_layers"], geo["student"]["num_hidden_layers"]
    return teacher_layers_needed(build_layer_map("uniform", L_t, L_s))


def to_dev(batch: dict, dev: torch.device, non_blocking: bool) -> dict:
    return {k: v.to(dev, non_blocking=non_blocking) for k, v in batch.items()}


def segments(B: int, T: int) -> torch.Tensor:
    """(B, T) segment ids: P on the first quarter, R up to three quarters, A after (no padding)."""
    seg = torch.full((B, T), 1, dtype=torch.long)
    seg[:, : T // 4] = 0
    seg[:, (3 * T) // 4 :] = 2
    return seg


# ----------------------------------------------------------------------------------------------- section 1
def section_capture(geo: dict, dev: torch.device, repeats: int) -> dict:
    from pipeline.models.capture import capture_qkv

    tg = geo["teacher"]
    B, T = geo["capture_bt"]
    L_t = tg["num_hidden_layers"]
    n_cap = min(CAPTURE_LAYERS, L_t)
    layers = sorted({round(i * (L_t - 1) / max(n_cap - 1, 1)) for i in range(n_cap)})  # evenly spaced
    H, G = tg["num_attention_heads"], tg["num_key_value_heads"]
    D = tg["hidden_size"] // H
    model = build_lm(tg, torch.bfloat16, dev).eval()
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    g = torch.Generator().manual_seed(0)
    ids_cpu = torch.randint(0, tg["vocab_size"], (B, T), generator=g)  # (B, T)
    ids, mask = ids_cpu.to(dev), torch.ones(B, T, dtype=torch.long, device=dev)
    qkv_bytes = len(layers) * B * T * (H + 2 * G) * D * 2  # bf16 Q + K + V of the mapped layers per step
    log(f"capture: teacher {tg['num_hidden_layers']} layers on {dev}, {weights_gib:.1f} GiB; B={B} T={T}, "
        f"{len(layers)} layers captured, {qkv_bytes / GIB:.2f} GiB Q/K/V per forward")  # fmt: skip

    def fwd():
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # (B, T, V)

    res: dict = {
        "B": B,
        "T": T,
        "layers": layers,
        "weights_gib": weights_gib,
        "qkv_gib_per_step": qkv_bytes / GIB,
    }
    rows = {}

    def measure(name: str, fn, forwards: int = 1) -> None:
        """Time fn; per-forward time = its median / forwards (a chunk of several batches)."""
        base = reset_peak(dev)
        try:
            med, times = timed(fn, dev, repeats)
            med, times = med / forwards, [t / forwards for t in times]
        except Exception as e:  # one variant failing (e.g. zarr missing for extract_chunk) keeps the others
            traceback.print_exc()
            rows[name] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            return
        rows[name] = {"median_s": med, "times_s": times, "tokens_per_s": B * T / med,
                      "peak_gib": peak_gib(dev), "peak_above_start_gib": peak_gib(dev, base)}  # fmt: skip
        log(f"capture/{name}: {med * 1e3:.1f} ms, {B * T / med:,.0f} tok/s")

    with torch.inference_mode():
        measure("plain", fwd)
        ref = fwd()
        with capture_qkv(model, layers) as cap:
            out = (
                fwd()
            )  # sanity: capture must not change the logits (per sample: no fp32 copy of all of them)
            diff = max(float((out[b].float() - ref[b].float()).abs().max()) for b in range(B))
            res["logits_max_abs_diff_vs_plain"] = diff
            out = ref = None

            def fwd_capture():
                cap.clear()
                fwd()

            measure("capture", fwd_capture)
            pin = dev.type == "cuda"
            bufs = {(i, c): torch.empty(B, T, X, D, dtype=torch.bfloat16, pin_memory=pin)
                    for i in layers for c, X in (("q", H), ("k", G), ("v", G))}  # fmt: skip

            def fwd_capture_pinned():
                cap.clear()
                fwd()
                for (i, c), buf in bufs.items():  # (B, X, T, D) -> token-major (B, T, X, D) like the store
                    buf.copy_(getattr(cap, c)[i].permute(0, 2, 1, 3).contiguous(), non_blocking=pin)

            measure("capture+pinned_d2h", fwd_capture_pinned)
            bufs = None
            try:
                from pipeline.extraction.chunk import extract_chunk
                from pipeline.store.packed_split import PackedSplit

                ans = torch.zeros(T, dtype=torch.bool)
                ans[(3 * T) // 4 : (3 * T) // 4 + max(T // 32, 1)] = True
                seg = segments(1, T)[0]
                # a write chunk of CHUNK_BATCHES teacher batches, as stage 1 runs it (copies of one batch overlap
                # the next batch's forward)
                n = CHUNK_BATCHES * B
                ids_all = torch.randint(0, tg["vocab_size"], (n, T), generator=g)  # (n, T)
                samples = [dict(input_ids=ids_all[i], segment_ids=seg, answer_mask=ans) for i in range(n)]
                packed = PackedSplit.from_samples(samples, list(range(n)))
                comps = ["q", "k", "v"]

                def chunk(dt: str, k: int):
                    return extract_chunk(model, cap, packed, 0, n * T, layers, comps, dt, B, 0, top_k=k)

                for dtype, name, k in (("bfloat16", "extract_chunk", 0), ("bfloat16", "extract_chunk+logits", KD_TOP_K),
                                       ("int8", "extract_chunk_int8", 0)):  # fmt: skip
                    measure(name, lambda dt=dtype, k=k: chunk(dt, k), forwards=CHUNK_BATCHES)
                res["profile_extract_chunk+logits"] = _profile(dev, lambda: chunk("bfloat16", KD_TOP_K))
                res["topk"] = _topk_rows(dev, B * T, tg["vocab_size"], repeats)
            except Exception as e:
                traceback.print_exc()
                rows["extract_chunk"] = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
            cap.clear()
    plain = rows.get("plain", {}).get("median_s")
    for r in rows.values():
        if plain and "median_s" in r:
            r["overhead_vs_plain"] = r["median_s"] / plain - 1
    res["variants"] = rows
    model = None
    free(dev)
    return res


def _topk_rows(dev: torch.device, N: int, V: int, repeats: int) -> dict:
    """ms of the stored top-k log-probs of N rows of bf16 logits (N, V): the fp32 log-softmax then top-k
    (before) vs `pipeline.extraction.teacher_outputs.topk_logprobs` (top-k of the raw logits minus the log-sum-exp)."""
    from pipeline.extraction.teacher_outputs import topk_logprobs

    z = torch.randn(N, V, device=dev, dtype=torch.bfloat16) * 3  # (N, V)
    old = lambda: torch.log_softmax(z.float(), -1).topk(KD_TOP_K, -1)  # noqa: E731
    new = lambda: topk_logprobs(z, KD_TOP_K)  # noqa: E731
    out = {
        name: 1e3 * timed(f, dev, repeats)[0]
        for name, f in (("log_softmax_topk", old), ("raw_topk_lse", new))
    }
    (v0, i0), (v1, i1) = old(), new()
    out["same_ids"] = float((i0 == i1).float().mean())
    out["values_max_abs_diff"] = float((v0 - v1).abs().max())
    log(f"topk over ({N}, {V}): {out}")
    return out


def _profile(dev: torch.device, fn, rows: int = 18) -> str:
    """torch.profiler table of one call of `fn` (after the timed runs): where a stage-1 chunk spends its time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    key = "cuda_time_total" if dev.type == "cuda" else "cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=48)
    text += "\n" + prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=48
    )
    log("profile of extract_chunk+logits:\n" + text)
    return text


def table_capture(res: dict) -> str:
    rows = []
    for name, r in res["variants"].items():
        if "error" in r:
            rows.append([name, "error: " + r["error"][:80], "-", "-", "-"])
            continue
        ov = r.get("overhead_vs_plain")
        rows.append([name, r["median_s"] * 1e3, f"{r['tokens_per_s']:,.0f}",
                     "-" if ov is None else f"{100 * ov:+.1f}%", r["peak_gib"]])  # fmt: skip
    head = (f"Stage-1 capture, B={res['B']} T={res['T']}, {len(res['layers'])} layers captured, "
            f"{res['qkv_gib_per_step']:.2f} GiB Q/K/V per forward, weights {res['weights_gib']:.1f} GiB, "
            f"logits max|diff| capture vs plain {res.get('logits_max_abs_diff_vs_plain')}")  # fmt: skip
    return head + "\n\n" + md_table(["variant", "ms/forward", "tokens/s", "vs plain", "peak GiB"], rows)
