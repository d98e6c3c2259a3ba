"""`data.completions: teacher`: have the teacher write every row's R and A, resumably and rank-sharded.

Files (in `data.generation.out_dir`, by default beside the store: `<extract.store minus .zarr>.completions/`):

    settings.json               what the completions depend on (teacher, prefixes, generation, sources)
    train.parts/chunk_00000.jsonl   one per `generation.chunk_rows` source rows; its existence = done
    train.jsonl                 the kept completions (what extraction reads), in source-row order
    train.rejected.jsonl        the rejected ones, with `reject_reason`
    eval.*                      the same for the held-out split (teacher-written and filtered the same way)

Every line holds prompt, reasoning (= reasoning_prefix + R), answer (A), gold, source_row, the stop
reasons, kept / reject_reason and the generation settings. A part file is written to a temporary name
and renamed, so a killed run leaves no half-written part and a rerun regenerates only missing chunks.
Rank r of `accelerate launch` takes every world-th missing chunk; chunks (not ranks) fix the batches and,
with sampling, the seed (`generation.seed + chunk`), so 1 and N processes write the same files.
Existing completions made with other settings are refused (`--overwrite` regenerates them).

    python -m pipeline.data.completions --config configs/teacher_data.yaml [key=value ...]   # generation only
    accelerate launch pipeline/extract.py --config configs/teacher_data.yaml             # + extraction
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from pipeline.cli import command_parser, config_from_args, parse_args, run_command
from pipeline.config.configlib import ConfigError, to_dict
from pipeline.config.kvmap import DataConfig, KVMapConfig
from pipeline.data.default_data import generate_default_data, write_jsonl_atomic
from pipeline.data.formats import answer_occurrences, field_text
from pipeline.data.generate import REJECT_REASONS, complete_rows
from pipeline.data.samples import load_samples
from pipeline.models.load import load_model
from pipeline.store.location import is_url

SPLIT_PATHS = {"train": "train_path", "eval": "eval_path"}


def completions_dir(cfg: KVMapConfig) -> Path:
    """Where the completions of `cfg` live (`data.generation.out_dir`, or beside the store)."""
    if cfg.data.generation.out_dir is not None:
        return Path(cfg.data.generation.out_dir)
    if is_url(cfg.extract.store):  # Path() of a URL would be a local folder named "s3:"
        raise ConfigError(
            f"config key 'data.generation.out_dir': null with extract.store='{cfg.extract.store}' (a URL): "
            "expected a local folder for the teacher's completions (written beside local stores only)"
        )
    store = Path(cfg.extract.store)
    return store.with_name(store.name.removesuffix(".zarr") + ".completions")


def _file_sha(path: str | None) -> str | None:
    if path is None or not Path(path).is_file():
        return path  # a dataset folder: its path stands for it
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def completion_settings(cfg: KVMapConfig) -> dict:
    """Everything the written completions depend on (part of the store fingerprint)."""
    d = cfg.data
    gen = {k: v for k, v in to_dict(d.generation).items() if k != "out_dir"}
    if not gen["drop_cut"]:  # completions written before the key existed keep their settings (and resume)
        del gen["drop_cut"]
    keys = ("prompt_field", "answer_field", "reasoning_prefix", "answer_prefix", "chat_template")
    keys += ("max_new_tokens", "filter", "max_train_samples", "max_eval_samples")
    return {
        "teacher": {k: v for k, v in to_dict(cfg.teacher).items() if k != "device"},
        "data": {k: getattr(d, k) for k in keys},
        "generation": gen,
        "sources": {s: _file_sha(getattr(d, key)) for s, key in SPLIT_PATHS.items()},
    }


def completions_data_config(cfg: KVMapConfig, eval_kept: int | None = None) -> DataConfig:
    """The DataConfig that extraction reads: the written JSONL, answer mask on the gold answer.

    `eval_kept=0` (no held-out completion survived the filter) leaves the held-out split out."""
    out = completions_dir(cfg)
    return dataclasses.replace(
        cfg.data,
        train_path=str(out / "train.jsonl"),
        eval_path=str(out / "eval.jsonl") if cfg.data.eval_path is not None and eval_kept != 0 else None,
        generate_default=False,
        prompt_field="prompt",
        reasoning_field="reasoning",
        answer_field="answer",
        answer_mask_field="gold",
        reasoning_prefix="",  # already inside the written reasoning
        max_train_samples=None,  # applied to the source rows
        max_eval_samples=None,
        completions="dataset",  # the texts now are the dataset
    )


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _prepare_dir(out: Path, settings: dict, overwrite: bool) -> None:
    """Create `out` with settings.json, or check that existing completions were made with `settings`."""
    meta = out / "settings.json"
    if meta.is_file() and json.loads(meta.read_text()) != settings:
        if not overwrite:
            raise ValueError(
                f"data.generation.out_dir='{out}' holds completions made with other settings: pass "
                "--overwrite to regenerate them, or choose another data.generation.out_dir"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not meta.is_file():
        write_jsonl_atomic(meta, [settings])


def _complete_chunk(model, tokenizer, cfg: KVMapConfig, rows, chunk: int, settings: dict) -> list[dict]:
    """Records of one chunk of source rows (rows without a prompt or gold answer: skipped, counted)."""
    d = cfg.data
    start = chunk * d.generation.chunk_rows
    idx = range(start, min(start + d.generation.chunk_rows, len(rows)))
    good = [i for i in idx if field_text(rows[i], d.prompt_field) and field_text(rows[i], d.answer_field)]
    if d.on_bad_row == "error" and len(good) < len(idx):
        bad = next(i for i in idx if i not in good)
        raise ValueError(f"row {bad}: needs non-empty {d.prompt_field!r} and {d.answer_field!r} fields")
    if d.generation.do_sample:
        torch.manual_seed(d.generation.seed + chunk)  # per chunk: the same with any rank count
    recs = complete_rows(
        model,
        tokenizer,
        [field_text(rows[i], d.prompt_field) for i in good],
        [field_text(rows[i], d.answer_field) for i in good],
        d,
    )
    out = [{**r, "source_row": i, "generation": settings} for i, r in zip(good, recs)]
    return out + [{"source_row": i, "kept": False, "reject_reason": "bad_row"} for i in idx if i not in good]


def _count(records: list[dict]) -> dict:
    gen = [r for r in records if r["reject_reason"] != "bad_row"]
    rejected = {k: sum(r["reject_reason"] == k for r in records) for k in (*REJECT_REASONS, "bad_row")}
    return {
        "source_rows": len(records),
        "generated": len(gen),
        "kept": sum(r["kept"] for r in records),
        "rejected": rejected,
        "cut_at_max_new_tokens": {
            "reasoning": sum(r["stop_reasoning"] == "max_new_tokens" for r in gen),
            "answer": sum(r["stop_answer"] == "max_new_tokens" for r in gen),
        },
        "new_tokens": sum(r["new_tokens"] for r in gen),
        # the teacher's own accuracy (its A holds the gold answer) and how often it ran out of budget
        "teacher_answer_rate": sum(bool(answer_occurrences(r["answer"], r["gold"])) for r in gen)
        / max(len(gen), 1),
        "budget_hit_rate": sum("max_new_tokens" in (r["stop_reasoning"], r["stop_answer"]) for r in gen)
        / max(len(gen), 1),
    }


def _generate_split(cfg, split, model, tokenizer, state, out: Path, settings: dict) -> dict:
    rows = load_samples(cfg.data, split)
    parts = out / f"{split}.parts"
    if state.is_main_process:
        parts.mkdir(exist_ok=True)
    state.wait_for_everyone()
    n_chunks = -(-len(rows) // cfg.data.generation.chunk_rows)
    todo = [c for c in range(n_chunks) if not (parts / f"chunk_{c:05d}.jsonl").is_file()]
    state.wait_for_everyone()  # every rank listed the same missing chunks before anyone writes
    mine = todo[state.process_index :: state.num_processes]
    bar = tqdm(
        mine,
        desc=f"teacher writes {split} rank {state.process_index}/{state.num_processes}",
        disable=not state.is_main_process,
    )
    for c in bar:
        recs = _complete_chunk(model, tokenizer, cfg, rows, c, settings)
        write_jsonl_atomic(parts / f"chunk_{c:05d}.jsonl", recs)
    state.wait_for_everyone()
    records = [r for c in range(n_chunks) for r in _read_jsonl(parts / f"chunk_{c:05d}.jsonl")]
    records.sort(key=lambda r: r["source_row"])
    if state.is_main_process:
        write_jsonl_atomic(out / f"{split}.jsonl", [r for r in records if r["kept"]])
        write_jsonl_atomic(out / f"{split}.rejected.jsonl", [r for r in records if not r["kept"]])
    return _count(records) | {"chunks_generated_last_run": len(todo)}


def write_completions(cfg: KVMapConfig, model, tokenizer, state=None, overwrite: bool = False):
    """Have the teacher write (or resume) the completions of both splits; every rank must call it.

    Args:
        cfg: `data.completions` must be "teacher".
        state: an accelerate PartialState (None: a single process).
    Returns:
        (DataConfig pointing at the written JSONL, {split: counts}); counts hold source_rows, generated,
        kept, rejected {empty, no_answer_match, cut, bad_row}, cut_at_max_new_tokens {reasoning, answer},
        teacher_answer_rate, budget_hit_rate,
        new_tokens, chunks_generated_last_run.
    Example:
        >>> data_cfg, counts = write_completions(cfg, model, tok)
    """
    state = state or PartialState()
    out = completions_dir(cfg)
    settings = completion_settings(cfg)
    if state.is_main_process:
        _prepare_dir(out, settings, overwrite)
    state.wait_for_everyone()
    if json.loads((out / "settings.json").read_text()) != settings:  # another rank's view: refuse too
        raise ValueError(f"data.generation.out_dir='{out}' holds completions made with other settings")
    counts = {}
    for split, key in SPLIT_PATHS.items():
        if getattr(cfg.data, key) is not None:
            counts[split] = _generate_split(cfg, split, model, tokenizer, state, out, settings)
    state.wait_for_everyone()
    if counts["train"]["kept"] == 0:
        raise ValueError(
            f"data.completions=teacher: no train completion was kept ({counts['train']['rejected']}); "
            f"see {out / 'train.rejected.jsonl'}"
        )
    return completions_data_config(cfg, counts.get("eval", {}).get("kept")), counts


def teacher_completions(cfg: KVMapConfig, model, tokenizer, state, overwrite: bool):
    """With `data.completions: teacher`, have the teacher write R and A first (pipeline/data/completions.py);
    returns (cfg reading the written JSONL, {split: generation counts}, the generation settings), else
    (cfg, {}, None)."""
    if cfg.data.completions != "teacher":
        return cfg, {}, None
    data_cfg, counts = write_completions(cfg, model, tokenizer, state, overwrite)
    return dataclasses.replace(cfg, data=data_cfg), counts, completion_settings(cfg)


def main(argv: list[str] | None = None) -> int:
    """Write (or resume) the completions only, without extracting."""
    p = command_parser(
        "python -m pipeline.data.completions",
        __doc__,
        sections=["teacher", "data (completions: teacher, filter, generation)"],
        examples=[
            "python -m pipeline.data.completions --config configs/teacher_data.yaml",
            "accelerate launch -m pipeline.data.completions --config configs/teacher_data.yaml --overwrite",
        ],
    )
    p.add_argument("--overwrite", action="store_true", help="regenerate instead of resuming")
    args = parse_args(p, argv)

    def body() -> None:
        cfg = config_from_args(KVMapConfig, args)
        if cfg.data.completions != "teacher":
            raise ConfigError(f"data.completions={cfg.data.completions!r}: expected 'teacher' here")
        state = PartialState(cpu=cfg.teacher.device == "cpu" or not torch.cuda.is_available())
        model, tok = load_model(cfg.teacher)
        if state.is_main_process:
            generate_default_data(cfg)
        _, counts = write_completions(cfg, model, tok, state, args.overwrite)
        if state.is_main_process:
            print(json.dumps({"out_dir": str(completions_dir(cfg)), **counts}, indent=1), flush=True)

    return run_command("completions", body)


if __name__ == "__main__":
    raise SystemExit(main())
