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
`--mode both` the modes sit side by side. Exit status 1 on any NaN/inf or shape mismatch, 2 on bad input.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from pipeline.cli import command_parser, config_from_args, parse_args, run_command
from pipeline.config.configlib import ConfigError
from pipeline.config.kvmap import KVMapConfig
from trainer.data.loader import collate_right_pad

OUTLIER_RMS = 6.0


def attention_probs(q: torch.Tensor, k: torch.Tensor, spec, mask: torch.Tensor) -> torch.Tensor:
    """Attention probabilities (float64) of one layer with padding keys masked (`alignment.geometry.attention_probs`).

    Shapes: q (B, H, T, D), k (B, G, T, D), mask (B, T) bool -> (B, H, T, T). `spec`: a float scale or a
    one-layer LogitSpec (the aligner's `teacher_logits` / `student_logits` at that layer).
    """
    from alignment.geometry.attention_probs import attention_probs as probs

    return probs(q.double(), k.double(), spec, key_mask=mask)


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
    from alignment import effective_rank

    rows = x.permute(0, 2, 1, 3)[mask].reshape(-1, x.shape[-1])  # (N*X, D)
    rows = rows[torch.isfinite(rows).all(-1)]
    return effective_rank(rows) if rows.shape[0] else float("nan")


def _cos(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    c = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)  # (B, X, T)
    w = mask[:, None, :].double().expand_as(c)
    return float((c.nan_to_num(0.0) * w).sum() / w.sum().clamp_min(1))


def profile_mode(mode: str, cfg: KVMapConfig, teacher_cfg, student, batch: dict, s_states: dict) -> dict:
    """Rows (one per student layer x component) and per-layer attention stats for one projection mode."""
    from alignment import attention_kl, create_aligner

    torch.manual_seed(cfg.seed)
    aligner = create_aligner(mode, teacher_cfg, student.config, cfg.align)
    loaded = _maybe_load_aligner(aligner, cfg, mode)
    aligner.eval()
    with torch.no_grad():
        out = aligner.align(batch["k_t"], batch["v_t"], batch["q_t"], batch["segment_ids"])
        plan, mask_t = out.plan, batch["attention_mask"].bool()
        s = {c: s_states[c] if plan.is_identity else aligner.warp_student(s_states[c], plan) for c in "qkv"}
        rows, attn, problems = [], [], []
        for ls, lt in enumerate(aligner.layer_map):
            slot = aligner.teacher_layers.index(lt)
            for c in ("q", "k", "v"):
                t_x = batch[f"{c}_t"][:, slot]  # (B, X_t, T, D_t)
                a_x, s_x = getattr(out, c)[:, ls], s[c][:, ls]  # (B, X_s, T', D_s)
                nt, ot = _bad(t_x, mask_t)
                na, oa = _bad(a_x, out.mask)
                ns, os_ = _bad(s_x, out.mask)
                shape_ok = tuple(a_x.shape) == tuple(s_x.shape)
                if not shape_ok:
                    problems.append(
                        f"layer {ls} {c}: aligned {tuple(a_x.shape)} != student {tuple(s_x.shape)}"
                    )
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
            sl = slice(ls, ls + 1)
            hm = out.head_mix
            if hm is not None and hm.dim() == 3:
                hm = hm[ls]
            spec_s, spec_t = _layer_spec(aligner.student_logits, ls), _layer_spec(aligner.teacher_logits, ls)
            p_s = attention_probs(s["q"][:, ls], s["k"][:, ls], spec_s, out.mask)
            p_a = attention_probs(out.q[:, ls], out.k[:, ls], spec_s, out.mask)
            p_t = attention_probs(out.q_t_raw[:, ls], out.k_t_raw[:, ls], spec_t, out.mask)
            kw = dict(scale_s=spec_s.scale, softcap_s=spec_s.softcap, window_s=spec_s.window)
            kl_a = attention_kl(s["q"][:, sl], s["k"][:, sl], out.q[:, sl], out.k[:, sl], out.mask,
                                scale_t=spec_s.scale, **kw)  # fmt: skip
            kl_t = float("nan")
            if hm is not None or aligner.H_t == aligner.H_s:
                kl_t = attention_kl(s["q"][:, sl], s["k"][:, sl], out.q_t_raw[:, sl], out.k_t_raw[:, sl], out.mask,
                                    scale_t=spec_t.scale, softcap_t=spec_t.softcap, window_t=spec_t.window,
                                    head_mix=hm, **kw)  # fmt: skip
            attn.append(
                {
                    "layer": ls,
                    "H_student": mean_entropy(p_s, out.mask),
                    "H_aligned": mean_entropy(p_a, out.mask),
                    "H_teacher": mean_entropy(p_t, out.mask),
                    "KL_aligned": float(kl_a),
                    "KL_teacher": float(kl_t),
                }
            )
            for k_, v_ in attn[-1].items():
                if isinstance(v_, float) and not math.isfinite(v_) and k_ != "KL_teacher":
                    problems.append(f"layer {ls}: {k_} is {v_}")
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
    if not cfg.student.path:
        return "fresh init"
    folder = Path(cfg.student.path)
    meta, weights = folder / "aligner.json", folder / "aligner.safetensors"
    if not (meta.is_file() and weights.is_file()) or json.loads(meta.read_text()).get("mode") != mode:
        return "fresh init"
    from safetensors.torch import load_file

    aligner.load_state_dict(load_file(str(weights)))
    return f"trained ({weights})"


def load_batches(cfg: KVMapConfig, args, layers: list[int]):
    """(teacher HF-like config, list of collated batches with q_t/k_t/v_t for `layers`), tokens cropped to T."""
    from pipeline.models.geometry import teacher_config_from_attrs
    from trainer.run.setup import store_path_of
    from trainer.run.store_checks import check_layers, open_store

    B, T, n = args.batch_size, args.seq_length, args.num_batches
    store_path = store_path_of(cfg)  # a StoreLocation: a local folder or a URL (s3://, memory://)
    present = store_path.exists() if store_path.remote else store_path.local_path().exists()
    store = open_store(store_path) if (present or not args.live_teacher) else None
    if store is not None:
        split_n = store.num_samples("train")
        if split_n < B * n:
            raise ValueError(
                f"--batch_size {B} x --num_batches {n}: store '{store_path}' has {split_n} samples"
            )
        tokens = [store.read_sample(i, components=()) for i in range(B * n)]
    else:
        from pipeline.data import samples as data
        from pipeline.models.load import load_tokenizer

        tok = load_tokenizer(cfg.student.tokenizer or cfg.teacher.path)
        tokens = []
        for row in data.load_samples(cfg.data, "train"):
            s = data.tokenize_sample(row, tok, cfg.data)
            if s is not None:
                tokens.append(s)
            if len(tokens) == B * n:
                break
    crop = [
        {k: v[:T] for k, v in s.items() if k in ("input_ids", "segment_ids", "answer_mask")} for s in tokens
    ]
    for i, s in enumerate(crop):
        s["index"] = torch.tensor(i)
    if args.live_teacher:
        from pipeline.models.capture import capture_qkv
        from pipeline.models.load import load_model

        teacher, _ = load_model(cfg.teacher)
        teacher_cfg = teacher.config
        with torch.no_grad(), capture_qkv(teacher, layers=layers) as cap:
            for s in crop:
                teacher(input_ids=s["input_ids"][None].to(teacher.device), use_cache=False)
                for c in ("q", "k", "v"):
                    s[c] = torch.stack(
                        [getattr(cap, c)[lt][0].float().cpu() for lt in layers]
                    )  # (L_sel, X, T, D)
    else:
        teacher_cfg = teacher_config_from_attrs(store.attrs, store.path)
        check_layers(store, layers, ("q", "k", "v"))
        states = store.read_samples(list(range(B * n)), layers=layers)
        for s, st in zip(crop, states):
            for c in ("q", "k", "v"):
                s[c] = st[c][:, :, :T]  # (L_sel, X, T, D)
    return teacher_cfg, [collate_right_pad(crop[i * B : (i + 1) * B], 0) for i in range(n)]


def format_report(results: list[dict]) -> str:
    """One table per metric group; with two modes, their columns side by side."""
    lines = []
    for r in results:
        lines.append(
            f"[{r['mode']}] layer_map={r['layer_map']} trainable params={r['params']} aligner={r['aligner']}"
        )
    names = [r["mode"] for r in results]
    lines.append("")
    lines.append("per layer / component: shapes teacher->aligned->student (B, heads, T, D)")
    for row in results[0]["rows"]:
        lines.append(f"  s{row['layer']}<-t{row['t_layer']} {row['comp']}  " + "   ".join(
            f"{r['mode']}: {r['rows'][results[0]['rows'].index(row)]['shapes']}" for r in results))  # fmt: skip
    head = f"  {'layer':<8}{'c':<3}" + "".join(f"| {n:^51}" for n in names)
    sub = f"  {'':<11}" + "".join(
        f"| {'cos':>7} {'erank t':>8} {'erank a':>8} {'nan t/a/s':>11} {'outl t/a/s':>12} " for _ in names
    )
    lines += ["", head, sub]
    for i, row in enumerate(results[0]["rows"]):
        cells = ""
        for r in results:
            x = r["rows"][i]
            cells += f"| {x['cos']:>7.3f} {x['erank_t']:>8.2f} {x['erank_a']:>8.2f} {x['nonfinite']:>11} {x['outliers']:>12} "
        lines.append(f"  {'s' + str(row['layer']):<8}{row['comp']:<3}" + cells)
    lines += ["", f"  {'layer':<11}" + "".join(f"| {n:^48}" for n in names)]
    lines.append(
        f"  {'':<11}"
        + "".join(
            f"| {'H_stu':>7} {'H_ali':>7} {'H_tea':>7} {'KL(ali||s)':>11} {'KL(tea||s)':>11} " for _ in names
        )
    )
    for i, a0 in enumerate(results[0]["attn"]):
        cells = ""
        for r in results:
            a = r["attn"][i]
            cells += f"| {a['H_student']:>7.3f} {a['H_aligned']:>7.3f} {a['H_teacher']:>7.3f} {a['KL_aligned']:>11.4f} {a['KL_teacher']:>11.4f} "
        lines.append(f"  {'s' + str(a0['layer']):<11}" + cells)
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

    def body() -> int:
        if args.batch_size < 1 or args.seq_length < 2:
            raise ConfigError(
                f"--batch_size {args.batch_size} / --seq_length {args.seq_length}: expected >= 1 / >= 2"
            )
        return _run(config_from_args(KVMapConfig, args), args)

    return run_command("profile", body, extra=(KeyError,))


def _run(cfg: KVMapConfig, args) -> int:
    from alignment import build_layer_map, teacher_layers_needed
    from pipeline.models.capture import capture_qkv
    from pipeline.models.geometry import teacher_config_from_attrs
    from pipeline.models.load import load_model
    from trainer.run.setup import store_path_of

    torch.manual_seed(cfg.seed)
    student, _ = load_model(cfg.student)
    L_s = student.config.num_hidden_layers
    if args.live_teacher:
        from pipeline.models.load import load_hf_config, model_geometry

        L_t = model_geometry(load_hf_config(cfg.teacher))["layers"]
    else:
        from trainer.run.store_checks import open_store

        store = open_store(store_path_of(cfg))
        L_t = teacher_config_from_attrs(store.attrs, store.path)["num_hidden_layers"]
    layers = teacher_layers_needed(build_layer_map(cfg.align.layer_map, L_t, L_s))
    teacher_cfg, batches = load_batches(cfg, args, layers)
    modes = ("structured", "flat") if args.mode == "both" else (args.mode,)
    status = 0
    for bi, batch in enumerate(batches):
        with torch.no_grad(), capture_qkv(student) as cap:
            student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        s_states = {c: cap.stack(c) for c in ("q", "k", "v")}  # (B, L_s, H|G, T, D_s)
        results = [profile_mode(m, cfg, teacher_cfg, student, batch, s_states) for m in modes]
        T = batch["input_ids"].shape[1]
        print(
            f"== batch {bi}: B={batch['input_ids'].shape[0]} T={T} source={'live teacher' if args.live_teacher else 'store'}"
        )
        print(format_report(results))
        for r in results:
            for p in r["problems"]:
                print(f"PROBLEM [{r['mode']}] {p}")
                status = 1
    print("status: " + ("FAIL (NaN/inf or shape mismatch above)" if status else "ok"))
    return status


if __name__ == "__main__":
    sys.exit(main())
