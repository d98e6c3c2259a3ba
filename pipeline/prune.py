"""Cut a student out of the teacher's own weights (depth and width pruning) and write it as an HF folder.

    python pipeline/prune.py --config configs/pruned.yaml [key=value ...] [--overwrite]
    accelerate launch pipeline/prune.py --config configs/pruned.yaml      # rank 0 works, the others wait

Shape glossary: B batch, T tokens (calibration batches are right-padded).

Steps: load the teacher once; validate the `prune:` counts against its geometry (one-line errors before any
forward); run `prune.calibration_samples` random train rows (pipeline/data/samples.py tokenisation, `prune.seed`)
through it with importance hooks (pipeline/pruning/importance.py); choose what to keep
(pipeline/pruning/select.py); slice the weights (pipeline/pruning/slicing.py); write the folder (config.json,
safetensors, tokenizer, generation config, prune_meta.json) into a temp folder and rename it into place,
so an interrupted run never leaves a half-written student. `student.path` then points at the folder.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from pipeline.cli import command_parser, config_from_args, parse_args, run_command
from pipeline.config.configlib import ConfigError, git_sha, to_dict
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.default_data import generate_default_data
from pipeline.data.samples import load_samples, tokenize_sample
from pipeline.models.load import load_model, pad_token_id
from pipeline.pruning.block_removal import drop_contiguous_blocks, search_evaluations
from pipeline.pruning.importance import compute_importance
from pipeline.pruning.meta import FORMAT, META_FILE
from pipeline.pruning.select import check_counts, choose_layers, explicit_layers, make_plan
from pipeline.pruning.slicing import build_pruned_model, teacher_shape


def output_folder(cfg: KVMapConfig, overwrite: bool) -> Path:
    """`prune.out`, or `student.path` when null; refuses to replace an existing folder without --overwrite."""
    where = cfg.prune.out or cfg.student.path
    if where is None or where.startswith("builtin:"):
        raise ConfigError(
            f"prune.out={cfg.prune.out!r}, student.path={cfg.student.path!r}: expected a folder path to write to"
        )
    out = Path(where).expanduser()
    if out.exists() and not overwrite:
        raise ConfigError(
            f"prune.out='{out}' exists: pass --overwrite to replace it, or choose another folder"
        )
    return out


def calibration_batches(cfg: KVMapConfig, tokenizer, seed: int) -> tuple[list, dict]:
    """`prune.calibration_samples` random train rows (seeded), tokenised like stage 1, as right-padded batches.

    Returns ([(input_ids (B, T), attention_mask (B, T)), ...], description for prune_meta.json).
    """
    rows = load_samples(cfg.data, "train")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    chosen, ids = [], []
    for r in order:
        s = tokenize_sample(rows[r], tokenizer, cfg.data, None, row_index=r)
        if s is not None:
            chosen.append(r)
            ids.append(s["input_ids"])
        if len(ids) == cfg.prune.calibration_samples:
            break
    if not ids:
        raise ValueError(f"data.train_path={cfg.data.train_path!r}: no usable calibration sample")
    pad = pad_token_id(tokenizer)
    batches = []
    for b in range(0, len(ids), cfg.prune.batch_size):
        chunk = ids[b : b + cfg.prune.batch_size]
        T = max(len(x) for x in chunk)
        x = torch.full((len(chunk), T), pad, dtype=torch.long)  # (B, T)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)  # (B, T)
        for j, seq in enumerate(chunk):
            x[j, : len(seq)], mask[j, : len(seq)] = seq, 1
        batches.append((x, mask))
    desc = {
        "source": cfg.data.train_path,
        "split": "train",
        "samples": len(ids),
        "tokens": sum(len(x) for x in ids),
        "rows": sorted(chosen),
        "seed": seed,
        "max_length": cfg.data.max_length,
    }
    return batches, desc


def write_folder(out: Path, student, tokenizer, meta: dict) -> None:
    """Save into a temp folder next to `out`, then rename: `out` is either complete or untouched."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        student.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        tmp.chmod(0o755)
        if out.exists():  # --overwrite (checked before any work)
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def contiguous_layers(cfg: KVMapConfig, teacher, shape, batches) -> tuple[list[int] | None, list[dict]]:
    """`prune.layers: contiguous`: the kept layers and the per-round removal costs (else None, [])."""
    if cfg.prune.layers != "contiguous":
        return None, []
    keep, block = check_counts(cfg.prune, shape)["layers"], cfg.prune.drop_block
    n = search_evaluations(shape.layers, keep, block)
    with tqdm(total=n, desc="prune: removal cost of contiguous blocks", unit="cand") as bar:
        return drop_contiguous_blocks(teacher, batches, keep, block, bar)


def _meta(cfg, teacher, shape, plan, scores, calib, removal) -> dict:
    return {
        "format": FORMAT,
        "teacher": {"path": cfg.teacher.path, "model_type": teacher.config.model_type, **vars(shape)},
        "kept_layers": plan.layers,
        "kept_query_heads": plan.q_heads,
        "kept_kv_heads": plan.kv_heads,
        "kept_mlp_channels": plan.mlp,
        "kept_hidden_channels": plan.hidden,
        "importance": {k: scores[k].tolist() for k in ("depth", "heads", "mlp", "hidden")},
        "block_removal": removal,  # prune.layers: contiguous: each round's window and every candidate's loss
        "calibration": calib,
        "prune_config": to_dict(cfg.prune),
        "layer_map_spec": cfg.align.layer_map,
        "git_sha": git_sha(),
    }


def run_prune(cfg: KVMapConfig, overwrite: bool = False) -> dict:
    """Prune the teacher of `cfg` into `prune.out` (or `student.path`); returns the prune_meta dict."""
    t0 = time.perf_counter()
    out = output_folder(cfg, overwrite)
    teacher, tokenizer = load_model(cfg.teacher)
    shape = teacher_shape(teacher)
    counts = check_counts(cfg.prune, shape)
    if isinstance(cfg.prune.layers, list):
        explicit_layers(cfg.prune.layers, shape.layers)
    elif cfg.prune.layers == "map":
        choose_layers(cfg.prune, cfg.align.layer_map, shape, None)  # errors before the calibration
    generate_default_data(cfg)
    seed = cfg.prune.seed if cfg.prune.seed is not None else cfg.seed
    batches, calib = calibration_batches(cfg, tokenizer, seed)
    with tqdm(total=len(batches), desc="prune: calibration", unit="batch") as bar:
        scores = compute_importance(teacher, batches, bar)
    searched, removal = contiguous_layers(cfg, teacher, shape, batches)
    layers = choose_layers(cfg.prune, cfg.align.layer_map, shape, scores["depth"], searched)
    plan = make_plan(layers, counts, scores, shape)
    student = build_pruned_model(teacher, plan)
    meta = _meta(cfg, teacher, shape, plan, scores, calib, removal)
    write_folder(out, student, tokenizer, meta)
    n_t, n_s = (sum(p.numel() for p in m.parameters()) for m in (teacher, student))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(
        f"pruned student -> {out}: layers {plan.layers}, {len(plan.q_heads[0])} Q / {len(plan.kv_heads[0])} KV "
        f"heads, MLP {len(plan.mlp[0])}, hidden {len(plan.hidden)}; {n_s / 1e6:.1f}M of {n_t / 1e6:.1f}M "
        f"parameters; {calib['samples']} calibration samples ({calib['tokens']} tokens); "
        f"wall {time.perf_counter() - t0:.1f} s, peak RSS {peak:.2f} GiB",
        flush=True,
    )
    return meta


def main(argv: list[str] | None = None) -> int:
    """`kvmap-prune` / `python pipeline/prune.py`: see the module docstring."""
    p = command_parser(
        "kvmap-prune",
        __doc__,
        sections=["teacher", "student", "data", "prune"],
        examples=[
            "kvmap-prune --config configs/pruned.yaml",
            "kvmap-prune --config configs/pruned_narrow.yaml prune.out=students/narrow --overwrite",
        ],
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing prune.out folder")
    args = parse_args(p, argv)
    state = PartialState(cpu=not torch.cuda.is_available())
    rc = 0
    if state.is_main_process:

        def body() -> None:
            torch.manual_seed(0)  # from_config's throwaway init: deterministic, then overwritten
            run_prune(config_from_args(KVMapConfig, args), overwrite=args.overwrite)

        rc = run_command("prune", body)
    state.wait_for_everyone()
    return rc


if __name__ == "__main__":
    sys.exit(main())
