"""Stage 1's end summary: sizes, throughput and the teacher's own fit to the data, from the chunk stats.

Every number is summed from the per-chunk stats recorded in the done-markers (`pipeline/extraction/chunk.py`),
so a resumed run reports the whole extraction, not only its last part; the last run's tokens and loop
seconds are added up over all ranks of a multi-process launch (`add_up_ranks`).
"""

from __future__ import annotations

import math

from accelerate.utils import gather_object

from pipeline.store.writer import StoreWriter

SEGS = ("P", "R", "A")


def _sum_stats(done: dict, writer: StoreWriter, split: str) -> dict:
    """Token, accuracy, CE and top-k mass sums over the finished chunks of one split."""
    out = {"tokens": 0, "forward_tokens": 0, "acc": {}, "ce": {}, "topk_mass": 0.0}
    for c, d in done.items():
        if writer.chunk_split(c) != split:
            continue
        for key in ("tokens", "forward_tokens", "topk_mass"):
            out[key] += d.get(key, 0)
        for group in ("acc", "ce"):
            for k, v in d.get(group, {}).items():
                out[group][k] = out[group].get(k, 0) + v
    return out


def _teacher_fit(s: dict, prefix: str) -> dict:
    """teacher_acc_{R,A,all} and teacher_ce_{P,R,A} (None where nothing was counted)."""
    out = {}
    for seg in ("R", "A", "all"):
        n, k = s["acc"].get(f"n_{seg}", 0), s["acc"].get(f"correct_{seg}", 0)
        out[f"{prefix}acc_{seg}"] = k / n if n else None
    for seg in SEGS:
        n = s["ce"].get(f"n_{seg}", 0)
        out[f"{prefix}ce_{seg}"] = s["ce"].get(f"sum_{seg}", 0.0) / n if n else None
    return out


def summarise(writer: StoreWriter, counts: dict, wall_s: float, computed_tokens: int) -> dict:
    """The end summary written into the store's attributes (docs/concepts/store.md)."""
    done = writer.done_chunks()
    train = _sum_stats(done, writer, "train")
    tokens = train["tokens"]
    stored = writer.location.size("train/layers")
    per_token_raw = per_token_words = 0
    for layer in writer.layers:
        for comp in writer.components:
            arr = writer._array((layer, comp))
            per_token_raw += arr.shape[1] * arr.shape[2] * 2  # the 16-bit reference (bf16 / fp16 words)
            per_token_words += arr.shape[1] * arr.shape[2] * arr.dtype.itemsize  # 1 for int8 words
    raw = tokens * per_token_raw
    summary = {
        "samples": counts,
        "tokens": tokens,
        # > tokens: samples straddling a chunk boundary are forwarded by both chunks
        "forward_tokens": train["forward_tokens"],
        "stored_state_bytes": stored,
        "raw_16bit_state_bytes": raw,
        "raw_word_state_bytes": tokens
        * per_token_words,  # the stored words uncompressed (int8: half of 16-bit)
        "compression_ratio": raw / max(stored, 1),
        "bytes_per_token": stored / max(tokens, 1),
        "wall_s_last_run": wall_s,
        "tokens_computed_last_run": computed_tokens,
        **_teacher_fit(train, "teacher_"),
    }
    if writer.logit_splits:
        lstored = writer.location.size("train/logits")
        summary["logits_stored_bytes"] = lstored
        summary["logits_bytes_per_token"] = lstored / max(tokens, 1)
        summary["topk_mass_mean"] = train["topk_mass"] / max(tokens, 1)
    if "eval" in writer.logit_splits:
        ev = _sum_stats(done, writer, "eval")
        summary["eval_tokens"] = ev["tokens"]
        summary["eval_topk_mass_mean"] = ev["topk_mass"] / max(ev["tokens"], 1)
        summary.update(_teacher_fit(ev, "teacher_eval_"))
    return summary


def combine_ranks(per_rank: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """(train tokens computed, loop wall s, loop CPU s) of every rank -> the whole run's: tokens and CPU
    seconds add up; wall seconds are the slowest rank's (the ranks run side by side).

    Example:
        combine_ranks([(320, 1.0, 0.5), (290, 1.2, 0.6)])  # -> (610, 1.2, 1.1)
    """
    return (
        sum(int(r[0]) for r in per_rank),
        max(float(r[1]) for r in per_rank),
        sum(float(r[2]) for r in per_rank),
    )


def add_up_ranks(state, computed: int, loop_s: float, cpu_s: float) -> tuple[int, float, float]:
    """`combine_ranks` over every process of `state` (accelerate's PartialState; every rank must call it)."""
    if state.num_processes == 1:
        return computed, loop_s, cpu_s
    return combine_ranks(gather_object([(computed, loop_s, cpu_s)]))


def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def skip_reasons(counts: dict) -> str:
    """' (too long 3, bad field "answer" 2; truncated 1)' for a split's counts, or '' when nothing was
    skipped or cut, so that a user sees WHY samples were left out, not only how many."""
    parts = [f"too long {counts['dropped_too_long']}"] if counts.get("dropped_too_long") else []
    parts += [f'bad field "{k}" {v}' for k, v in sorted(dict(counts.get("bad_rows") or {}).items()) if v]
    other = counts.get("skipped", 0) - sum(int(x.split()[-1]) for x in parts)
    if other > 0:
        parts.append(f"other {other}")
    cut = f"truncated {counts['truncated']}" if counts.get("truncated") else ""
    text = "; ".join(x for x in (", ".join(parts), cut) if x)
    return f" ({text})" if text else ""


def _word_note(s: dict) -> str:
    """int8 stores: the raw size of the int8 words themselves (the ratio above is against 16-bit words)."""
    words = s.get("raw_word_state_bytes")
    if not words or words == s["raw_16bit_state_bytes"]:
        return ""
    return f"; raw int8 words {words / 1e6:.1f} MB, compressed {words / max(s['stored_state_bytes'], 1):.3f}x"


def segment_line(split: str, counts: dict) -> str:
    """'  tokens per segment, train (messages format): P 812, R 240, A 190' for a split's counts."""
    seg = ", ".join(f"{k} {v}" for k, v in counts["segment_tokens"].items())
    fmt = f" ({counts['format']} format)" if counts.get("format") else ""
    return f"  tokens per segment, {split}{fmt}: {seg}"


def print_summary(path, s: dict) -> None:
    """Print the extraction summary of the store at `path` (stdout: the command's result)."""
    c = s["samples"]
    acc = " ".join(f"{seg}={_fmt(s.get(f'teacher_acc_{seg}'))}" for seg in ("R", "A", "all"))
    ce = " ".join(f"{seg}={_fmt(s.get(f'teacher_ce_{seg}'))}" for seg in SEGS)
    lines = [
        f"store {path}: train samples kept {c['train']['kept']} / skipped {c['train']['skipped']}"
        + skip_reasons(c["train"])
        + (f", eval kept {c['eval']['kept']} / skipped {c['eval']['skipped']}" if "eval" in c else "")
        + (skip_reasons(c["eval"]) if "eval" in c else ""),
        f"  tokens {s['tokens']}, states {s['stored_state_bytes'] / 1e6:.1f} MB stored vs "
        f"{s['raw_16bit_state_bytes'] / 1e6:.1f} MB raw 16-bit (ratio {s['compression_ratio']:.3f}x, "
        f"{s['bytes_per_token']:.0f} B/token)" + _word_note(s),
        f"  wall {s['wall_s_last_run']:.1f} s this run ({s['tokens_computed_last_run']} tokens computed, "
        f"{s['tokens_computed_last_run'] / max(s.get('extract_loop_s_last_run', 0.0), 1e-9):.0f} tokens/s in "
        f"the extraction loop, all {s.get('processes_last_run', 1)} process(es) together)",
        f"  teacher, teacher-forced on the train split: answer-token accuracy {acc}; CE per target segment {ce}",
    ]
    lines += [segment_line(split, sc) for split, sc in c.items() if sc.get("segment_tokens")]
    if "logits_bytes_per_token" in s:
        lines.append(
            f"  top-k log-probs: {s['logits_stored_bytes'] / 1e6:.1f} MB ({s['logits_bytes_per_token']:.0f} "
            f"B/token), mean captured probability mass {_fmt(s['topk_mass_mean'])}"
        )
    if "eval_tokens" in s:
        ce_ev = " ".join(f"{seg}={_fmt(s.get(f'teacher_eval_ce_{seg}'))}" for seg in SEGS)
        lines.append(
            f"  held-out: {s['eval_tokens']} tokens of top-k log-probs (mass {_fmt(s['eval_topk_mass_mean'])}); "
            f"teacher accuracy R={_fmt(s.get('teacher_eval_acc_R'))} A={_fmt(s.get('teacher_eval_acc_A'))}; "
            f"CE {ce_ev}"
        )
    for split, sc in c.items():
        if "completions" in sc:
            g = sc["completions"]
            lines.append(
                f"  teacher-written {split}: kept {g['kept']} / {g['source_rows']} rows, rejected {g['rejected']}, "
                f"cut at max_new_tokens {g['cut_at_max_new_tokens']}"
            )
    print("\n".join(lines), flush=True)
