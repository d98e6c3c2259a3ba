"""Stage-1 verification tool: push one or two batches through the aligner and compare with the student.

    python -m trainer.profile_alignment --config configs/default.yaml --mode both --batch_size 4 --seq_length 128
    python -m trainer.profile_alignment --config ... --mode structured --live-teacher   # teacher forward here

Shape glossary: B batch, L_s student layers, H query heads, G KV heads, T tokens, D head dim (`_t` teacher,
`_s` student, `a` aligned = teacher projected into student geometry).

Forward only, no training. Teacher states come from the store (default) or from a live teacher forward
with capture (`--live-teacher`; tokens from the store when it exists, else from `data`). The student is
`cfg.student` (random init, or a trained folder: if it holds `aligner.json` of the same mode, the trained
aligner weights are loaded too). Per student layer and component it prints shapes (teacher -> aligned ->
student), NaN/inf counts and outlier counts (|x| > 6 x the tensor's RMS) of each, cosine(student, aligned)
for K, V and Q, effective rank of the raw and the projected teacher component (a collapsing projector
shows as a projected rank far below the raw one), attention entropy of student / aligned teacher /
teacher's own attention, and KL(aligned || student), KL(teacher's own, head-mixed || student). With
`--mode both` the modes sit side by side. Exit status 1 on any NaN/inf or shape mismatch (`profile: error: ...` on stderr after the
report), 2 on bad input.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from alignment import attention_kl, build_layer_map, create_aligner, effective_rank, teacher_layers_needed
from alignment.geometry.attention_probs import attention_probs as geometry_attention_probs
from pipeline.cli import CommandFailed, command_parser, config_from_args, parse_args, run_command
from pipeline.config.configlib import ConfigError
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.samples import load_samples, tokenize_sample
from pipeline.models.capture import capture_qkv
from pipeline.models.geometry import teacher_config_from_attrs
from pipeline.models.load import load_hf_config, load_model, load_tokenizer, model_geometry
from trainer.data.loader import collate_right_pad
from trainer.run.setup import store_path_of
from trainer.run.store_checks import check_layers, open_store

OUTLIER_RMS = 6.0


def attention_probs(q: torch.Tensor, k: torch.Tensor, spec, mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (float64) of one layer with padding keys masked (`alignment.geometry.attention_probs`).

    Shapes: q (B, H, T, D), k (B, G, T, D), mask (B, T) bool -> (B, H, T, T). `spec`: a float scale or a
    one-layer LogitSpec (the aligner's `teacher_logits` / `student_logits` at that layer).
    """
    return geometry_attention_probs(q.double(), k.double(), spec, key_mask=mask)


def _layer_spec(spec, ls: int):
    """The one-layer LogitSpec of student layer `ls` from an aligner's per-student-layer spec."""
    return spec.select(torch.tensor([ls])) if spec.window is not None or torch.is_tensor(spec.scale) else spec


def mean_entropy(p: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean row entropy (nats) over real query rows and heads. p (B, H, T, T), mask (B, T)."""
    h = -(torch.special.xlogy(p, p)).sum(-1)  # (B, H, T)
    w = mask[:, None, :].double().expand_as(h)
    return float((h * w).sum() / w.sum().clamp_min(1))


def _bad(x: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """(NaN/inf count, outlier count) over real tokens. x (B, X, T, D), mask (B, T)."""
    real = x.permute(0, 2, 1, 3)[mask]  # (N, X, D)
    nonfinite = int((~torch.isfinite(real)).sum())
    fin = real[torch.isfinite(real)]
    rms = float(fin.double().pow(2).mean().sqrt()) if fin.numel() else 0.0
    return nonfinite, int((fin.abs() > OUTLIER_RMS * rms).sum()) if rms > 0 else 0


def _erank(x: torch.Tensor, mask: torch.Tensor) -> float:
    """Effective rank of the real-token vectors of x (B, X, T, D) whose entries are all finite (NaN if none)."""
    rows = x.permute(0, 2, 1, 3)[mask].reshape(-1, x.shape[-1])  # (N*X, D)
    rows = rows[torch.isfinite(rows).all(-1)]
    return effective_rank(rows) if rows.shape[0] else float("nan")


def _cos(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean cosine over real tokens and heads of a, b (B, X, T, D); mask (B, T)."""
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (B, X, T)
    w = mask[:, None, :].double().expand_as(c)
    return float((c.nan_to_num(0.0) * w).sum() / w.sum().clamp_min(1))


def component_rows(ls: int, lt: int, slot: int, batch: dict, out, s: dict) -> tuple[list[dict], list[str]]:
    """One row per component (q, k, v) of student layer `ls` <- teacher layer `lt`, and the problems found.

    `slot`: lt's index in the batch's teacher layers; `out`: the aligner's output; `s`: the student's
    states on the aligned time axis.
    """
    rows, problems, mask_t = [], [], batch["attention_mask"].bool()
    for c in ("q", "k", "v"):
        t_x = batch[f"{c}_t"][:, slot]  # (B, X_t, T, D_t)
        a_x, s_x = getattr(out, c)[:, ls], s[c][:, ls]  # (B, X_s, T', D_s)
        nt, ot = _bad(t_x, mask_t)
        na, oa = _bad(a_x, out.mask)
        ns, os_ = _bad(s_x, out.mask)
        shape_ok = tuple(a_x.shape) == tuple(s_x.shape)
        if not shape_ok:
            problems.append(f"layer {ls} {c}: aligned {tuple(a_x.shape)} != student {tuple(s_x.shape)}")
        if nt + na + ns:
            problems.append(f"layer {ls} {c}: NaN/inf teacher={nt} aligned={na} student={ns}")
        rows.append(
            {
                "layer": ls,
                "t_layer": lt,
                "comp": c,
                "shapes": f"{tuple(t_x.shape)}->{tuple(a_x.shape)}->{tuple(s_x.shape)}",
                "nonfinite": f"{nt}/{na}/{ns}",
                "outliers": f"{ot}/{oa}/{os_}",
                "cos": _cos(s_x, a_x, out.mask) if shape_ok else float("nan"),
                "erank_t": _erank(t_x, mask_t),
                "erank_a": _erank(a_x, out.mask),
            }
        )
    return rows, problems


def attention_row(aligner, out, s: dict, ls: int) -> tuple[dict, list[str]]:
    """Attention entropies and KLs of student layer `ls`, and the non-finite ones as problems (KL to the
    teacher's own attention is NaN by design when its heads cannot be mixed onto the student's)."""
    sl = slice(ls, ls + 1)
    hm = out.head_mix
    if hm is not None and hm.dim() == 3:
        hm = hm[ls]
    spec_s, spec_t = _layer_spec(aligner.student_logits, ls), _layer_spec(aligner.teacher_logits, ls)
    p_s = attention_probs(s["q"][:, ls], s["k"][:, ls], spec_s, out.mask)
    p_a = attention_probs(out.q[:, ls], out.k[:, ls], spec_s, out.mask)
    p_t = attention_probs(out.q_t_raw[:, ls], out.k_t_raw[:, ls], spec_t, out.mask)
    student = dict(scale_s=spec_s.scale, softcap_s=spec_s.softcap, window_s=spec_s.window)
    q_s, k_s = s["q"][:, sl], s["k"][:, sl]
    kl_a = attention_kl(q_s, k_s, out.q[:, sl], out.k[:, sl], out.mask, scale_t=spec_s.scale, **student)
    kl_t = float("nan")
    if hm is not None or aligner.H_t == aligner.H_s:
        teacher = dict(scale_t=spec_t.scale, softcap_t=spec_t.softcap, window_t=spec_t.window, head_mix=hm)
        kl_t = attention_kl(q_s, k_s, out.q_t_raw[:, sl], out.k_t_raw[:, sl], out.mask, **teacher, **student)
    row = {
        "layer": ls,
        "H_student": mean_entropy(p_s, out.mask),
        "H_aligned": mean_entropy(p_a, out.mask),
        "H_teacher": mean_entropy(p_t, out.mask),
        "KL_aligned": float(kl_a),
        "KL_teacher": float(kl_t),
    }
    problems = [
        f"layer {ls}: {k} is {v}"
        for k, v in row.items()
        if isinstance(v, float) and not math.isfinite(v) and k != "KL_teacher"
    ]
    return row, problems


def profile_mode(mode: str, cfg: KVMapConfig, teacher_cfg, student, batch: dict, s_states: dict) -> dict:
    """Rows (one per student layer x component) and per-layer attention stats for one projection mode."""
    torch.manual_seed(cfg.seed)
    aligner = create_aligner(mode, teacher_cfg, student.config, cfg.align)
    loaded = _maybe_load_aligner(aligner, cfg, mode)
    aligner.eval()
    rows, attn, problems = [], [], []
    with torch.no_grad():
        out = aligner.align(batch["k_t"], batch["v_t"], batch["q_t"], batch["segment_ids"])
        plan = out.plan
        s = {c: s_states[c] if plan.is_identity else aligner.warp_student(s_states[c], plan) for c in "qkv"}
        for ls, lt in enumerate(aligner.layer_map):
            layer_rows, layer_problems = component_rows(
                ls, lt, aligner.teacher_layers.index(lt), batch, out, s
            )
            row, attn_problems = attention_row(aligner, out, s, ls)
            rows += layer_rows
            attn.append(row)
            problems += layer_problems + attn_problems
    return {
        "mode": mode,
        "layer_map": aligner.layer_map,
        "params": aligner.num_parameters(trainable_only=True),
        "aligner": loaded,
        "rows": rows,
        "attn": attn,
        "problems": problems,
    }


def _maybe_load_aligner(aligner, cfg: KVMapConfig, mode: str) -> str:
    """Load the trained aligner of `cfg.student` when its folder holds one of this mode; says which it is."""
    if not cfg.student.path:
        return "fresh init"
    folder = Path(cfg.student.path)
    meta, weights = folder / "aligner.json", folder / "aligner.safetensors"
    if not (meta.is_file() and weights.is_file()) or json.loads(meta.read_text()).get("mode") != mode:
        return "fresh init"
    projected = json.loads(meta.read_text()).get("projections", ["k", "v", "q"])  # before the key: all
    if tuple(projected) != aligner.projections:
        return f"fresh init (the trained aligner projects only {projected})"
    aligner.load_state_dict(load_file(str(weights)))
    return f"trained ({weights})"


def store_tokens(store, batch_size: int, num_batches: int) -> list[dict]:
    """The first batch_size x num_batches train samples' tokens from the store."""
    count, split_n = batch_size * num_batches, store.num_samples("train")
    if split_n < count:
        raise ValueError(
            f"--batch_size {batch_size} x --num_batches {num_batches}: store '{store.path}' has {split_n} samples"
        )
    return [store.read_sample(i, components=()) for i in range(count)]


def data_tokens(cfg: KVMapConfig, count: int) -> list[dict]:
    """The first `count` usable train samples of `data`, tokenized (--live-teacher without a store)."""
    tok = load_tokenizer(cfg.student.tokenizer or cfg.teacher.path)
    tokens = []
    for row in load_samples(cfg.data, "train"):
        sample = tokenize_sample(row, tok, cfg.data)
        if sample is not None:
            tokens.append(sample)
        if len(tokens) == count:
            break
    return tokens


def add_live_teacher_states(cfg: KVMapConfig, samples: list[dict], layers: list[int]):
    """q/k/v (L_sel, X, T, D) of `layers` from a teacher forward on each sample; returns the teacher config."""
    teacher, _ = load_model(cfg.teacher)
    with torch.no_grad(), capture_qkv(teacher, layers=layers) as cap:
        for s in samples:
            teacher(input_ids=s["input_ids"][None].to(teacher.device), use_cache=False)
            for c in ("q", "k", "v"):
                s[c] = torch.stack(
                    [getattr(cap, c)[lt][0].float().cpu() for lt in layers]
                )  # (L_sel, X, T, D)
    return teacher.config


def add_store_states(store, samples: list[dict], layers: list[int], T: int) -> None:
    """q/k/v (L_sel, X, T, D) of `layers` from the store, cropped to T tokens."""
    check_layers(store, layers, ("q", "k", "v"))
    states = store.read_samples(list(range(len(samples))), layers=layers)
    for s, st in zip(samples, states):
        for c in ("q", "k", "v"):
            s[c] = st[c][:, :, :T]  # (L_sel, X, T, D)


def load_batches(cfg: KVMapConfig, args, layers: list[int]):
    """(teacher HF-like config, list of collated batches with q_t/k_t/v_t for `layers`), tokens cropped to T."""
    B, T, n = args.batch_size, args.seq_length, args.num_batches
    store_path = store_path_of(cfg)  # a StoreLocation: a local folder or a URL (s3://, memory://)
    present = store_path.exists() if store_path.remote else store_path.local_path().exists()
    store = open_store(store_path) if (present or not args.live_teacher) else None
    tokens = store_tokens(store, B, n) if store is not None else data_tokens(cfg, B * n)
    keys = ("input_ids", "segment_ids", "answer_mask")
    crop = [{k: v[:T] for k, v in s.items() if k in keys} for s in tokens]
    for i, s in enumerate(crop):
        s["index"] = torch.tensor(i)
    if args.live_teacher:
        teacher_cfg = add_live_teacher_states(cfg, crop, layers)
    else:
        teacher_cfg = teacher_config_from_attrs(store.attrs, store.path)
        add_store_states(store, crop, layers, T)
    return teacher_cfg, [collate_right_pad(crop[i * B : (i + 1) * B], 0) for i in range(n)]


def _mode_table(results: list[dict], part: str, header: str, sub: str, cell) -> list[str]:
    """Rows of `part` ("rows" or "attn") with each mode's cells side by side under `header` / `sub`."""
    lines = ["", header, sub]
    for i, row in enumerate(results[0][part]):
        label = f"s{row['layer']}"
        label = f"  {label:<8}{row['comp']:<3}" if part == "rows" else f"  {label:<11}"
        lines.append(label + "".join(cell(r[part][i]) for r in results))
    return lines


def format_report(results: list[dict]) -> str:
    """One table per metric group; with two modes, their columns side by side."""
    lines = [
        f"[{r['mode']}] layer_map={r['layer_map']} trainable params={r['params']} aligner={r['aligner']}"
        for r in results
    ]
    names = [r["mode"] for r in results]
    lines += ["", "per layer / component: shapes teacher->aligned->student (B, heads, T, D)"]
    for i, row in enumerate(results[0]["rows"]):
        shapes = "   ".join(f"{r['mode']}: {r['rows'][i]['shapes']}" for r in results)
        lines.append(f"  s{row['layer']}<-t{row['t_layer']} {row['comp']}  {shapes}")
    lines += _mode_table(
        results,
        "rows",
        f"  {'layer':<8}{'c':<3}" + "".join(f"| {n:^51}" for n in names),
        f"  {'':<11}"
        + "".join(
            f"| {'cos':>7} {'erank t':>8} {'erank a':>8} {'nan t/a/s':>11} {'outl t/a/s':>12} " for _ in names
        ),
        lambda x: (
            f"| {x['cos']:>7.3f} {x['erank_t']:>8.2f} {x['erank_a']:>8.2f} {x['nonfinite']:>11} "
            f"{x['outliers']:>12} "
        ),
    )
    lines += _mode_table(
        results,
        "attn",
        f"  {'layer':<11}" + "".join(f"| {n:^48}" for n in names),
        f"  {'':<11}"
        + "".join(
            f"| {'H_stu':>7} {'H_ali':>7} {'H_tea':>7} {'KL(ali||s)':>11} {'KL(tea||s)':>11} " for _ in names
        ),
        lambda a: (
            f"| {a['H_student']:>7.3f} {a['H_aligned']:>7.3f} {a['H_teacher']:>7.3f} "
            f"{a['KL_aligned']:>11.4f} {a['KL_teacher']:>11.4f} "
        ),
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """CLI entry; returns 0 (clean), 1 (NaN/inf or shape mismatch found) or 2 (bad input)."""
    ap = command_parser(
        "kvmap-profile",
        __doc__,
        sections=["student", "teacher (--live-teacher)", "data", "align", "train.store", "extract.store"],
        examples=[
            "kvmap-profile --config configs/demo.yaml --mode both --batch_size 4 --seq_length 128",
            "kvmap-profile --config configs/default.yaml --mode structured --live-teacher",
        ],
    )
    ap.add_argument("--mode", choices=("structured", "flat", "both"), default="both")
    ap.add_argument("--batch_size", type=int, default=2, help="samples per batch (>= 1)")
    ap.add_argument("--seq_length", type=int, default=128, help="tokens per sample, cropped (>= 2)")
    ap.add_argument("--num_batches", type=int, choices=(1, 2), default=1)
    ap.add_argument(
        "--live-teacher", action="store_true", help="run the teacher here instead of reading the store"
    )
    args = parse_args(ap, argv)

    def body() -> None:
        if args.batch_size < 1 or args.seq_length < 2:
            raise ConfigError(
                f"--batch_size {args.batch_size} / --seq_length {args.seq_length}: expected >= 1 / >= 2"
            )
        profile(config_from_args(KVMapConfig, args), args)

    return run_command("profile", body, extra=(KeyError,))


def teacher_depth(cfg: KVMapConfig, args) -> int:
    """The teacher's number of layers: from its HF config with --live-teacher, else from the store."""
    if args.live_teacher:
        return model_geometry(load_hf_config(cfg.teacher))["layers"]
    store = open_store(store_path_of(cfg))
    return teacher_config_from_attrs(store.attrs, store.path)["num_hidden_layers"]


def profile(cfg: KVMapConfig, args) -> None:
    """Print the report of every batch and mode; raises CommandFailed naming the first problem if any."""
    torch.manual_seed(cfg.seed)
    student, _ = load_model(cfg.student)
    layer_map = build_layer_map(
        cfg.align.layer_map, teacher_depth(cfg, args), student.config.num_hidden_layers
    )
    teacher_cfg, batches = load_batches(cfg, args, teacher_layers_needed(layer_map))
    modes = ("structured", "flat") if args.mode == "both" else (args.mode,)
    problems = []
    for bi, batch in enumerate(batches):
        with torch.no_grad(), capture_qkv(student) as cap:
            student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        s_states = {c: cap.stack(c) for c in ("q", "k", "v")}  # (B, L_s, H|G, T, D_s)
        results = [profile_mode(m, cfg, teacher_cfg, student, batch, s_states) for m in modes]
        B, T = batch["input_ids"].shape
        print(f"== batch {bi}: B={B} T={T} source={'live teacher' if args.live_teacher else 'store'}")
        print(format_report(results))
        for r in results:
            for p in r["problems"]:
                print(f"PROBLEM [{r['mode']}] {p}")
                problems.append(f"[{r['mode']}] {p}")
    print("status: " + ("FAIL (NaN/inf or shape mismatch above)" if problems else "ok"))
    if problems:
        raise CommandFailed(f"{len(problems)} problem(s) (NaN/inf or shape mismatch), first: {problems[0]}")


if __name__ == "__main__":
    sys.exit(main())
