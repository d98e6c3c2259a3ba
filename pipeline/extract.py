"""Stage 1: run the teacher over the dataset once and store its per-layer Q/K/V (schema: pipeline/store/schema.py).

    accelerate launch pipeline/extract.py --config configs/default.yaml [key=value ...] [--overwrite]
    python pipeline/extract.py --config configs/default.yaml          # one process

Shape glossary: B batch, T tokens (padded batch length), H query heads, G KV heads, D head dim,
N packed tokens of the train split.

How the work is split (why it is resumable and rank-count independent):
- Each rank tokenises one block of the rows into a staging folder beside the store and the ranks exchange
  the samples' lengths (pipeline/data/split_shards.py), so before any forward every rank holds the packed
  layout (offsets of all samples), the same one a single process makes, and reads any chunk's tokens from
  the staged shares; no rank holds the split's tokens in RAM.
- The packed axis is cut into write chunks of `extract.chunk_tokens` tokens (one zarr shard per state
  array). A chunk is the unit of work: its owner forwards every sample overlapping it (a sample that
  straddles a chunk boundary is forwarded by both owners; each keeps its own part), in batches of
  `extract.batch_size` samples sorted by length within the chunk. Batches depend only on the chunk, so
  the stored bits are the same with 1 or N processes and after a resume.
- Rank r takes every world-th unfinished chunk; a chunk's done-marker is written after its data, so a
  killed run recomputes only chunks without a marker. Writing (bf16/fp16 encode happens in the main
  thread; compression + IO in `extract.writer_threads` threads) overlaps the next forward.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from alignment.mapping.layer_map import build_layer_map, teacher_layers_needed
from pipeline.analysis.head_scores import head_scores, ranked_heads
from pipeline.cli import command_parser, config_from_args, parse_args, run_command
from pipeline.config.configlib import ConfigError
from pipeline.config.kvmap import KVMapConfig
from pipeline.data.completions import teacher_completions
from pipeline.data.default_data import generate_default_data
from pipeline.data.samples import load_samples
from pipeline.data.split_shards import remove_staging
from pipeline.data.trained_tokens import check_trained_tokens
from pipeline.extraction.chunk import extract_writer_chunk
from pipeline.extraction.head_probe import (
    heads_record,
    listed_heads,
    probe_samples,
    top_heads,
    write_probe_store,
)
from pipeline.extraction.inputs import load_split
from pipeline.extraction.plan import make_plan, state_shapes
from pipeline.extraction.plan_report import check_free_space, format_plan
from pipeline.extraction.store_attrs import config_fingerprint, logits_attrs, state_components, teacher_attrs
from pipeline.extraction.summary import add_up_ranks, print_summary, summarise
from pipeline.models.capture import capture_qkv
from pipeline.models.load import load_hf_config, load_model, model_geometry, pad_token_id
from pipeline.pruning.meta import read_prune_meta
from pipeline.store.location import StoreLocation, remove_store
from pipeline.store.packed_split import PackedSplit
from pipeline.store.reader import KVStore
from pipeline.store.writer import AsyncChunkWriter, StoreWriter


def student_num_layers(model_cfg) -> int:
    """Decoder layer count of the student named by a ModelConfig (config dict, HF folder, .gguf, builtin)."""
    return model_geometry(load_hf_config(model_cfg))["layers"]


def resolve_layers(cfg: KVMapConfig, num_teacher_layers: int) -> list[int]:
    """Teacher layers to store: `extract.layers` = "all", "map" (what the layer map needs for `student`)
    or an explicit list. Returns sorted unique indices."""
    spec = cfg.extract.layers
    if not state_components(cfg):
        return []  # a logits-only store holds no per-layer states
    if spec == "all":
        return list(range(num_teacher_layers))
    if spec == "map":
        if cfg.align.init == "from_prune":  # a student pruned from the teacher: its kept layers
            return teacher_layers_needed(read_prune_meta(cfg.student)["kept_layers"])
        if cfg.align.layer_map == "heads":  # chosen in stage 2 from the store's own head scores
            raise ConfigError(
                "extract.layers='map' with align.layer_map='heads': the layers come from head scores of the "
                "stored states; expected extract.layers: all (or a list of the layers to score)"
            )
        layer_map = build_layer_map(cfg.align.layer_map, num_teacher_layers, student_num_layers(cfg.student))
        return teacher_layers_needed(layer_map)
    if isinstance(spec, list) and spec:
        bad = [x for x in spec if not 0 <= x < num_teacher_layers]
        if not bad:
            return sorted(set(spec))
    raise ConfigError(
        f"extract.layers={spec!r}: expected 'map', 'all' or a non-empty list of teacher layer indices in "
        f"[0, {num_teacher_layers})"
    )


def _existing_attrs(path: StoreLocation) -> dict | None:
    meta = path.read_json("zarr.json")
    if meta is None:
        if not path.is_empty():
            raise ValueError(f"extract.store='{path}' exists and is not a kvmap store: choose another path")
        return None
    attrs = meta.get("attributes", {})
    if "schema_version" not in attrs:
        raise ValueError(f"extract.store='{path}' is a zarr group but not a kvmap store: choose another path")
    return attrs


def check_store_target(path: StoreLocation) -> None:
    """Before the teacher loads: `extract.store` must be new, empty or a kvmap store. A plain file or a
    foreign folder is refused here, in one line, not after minutes of loading a large teacher."""
    if not path.remote and Path(path.url).exists() and not Path(path.url).is_dir():
        raise ValueError(
            f"extract.store='{path}' is a file: expected a folder (new, or a kvmap store to resume) such as "
            "stores/name.zarr, or a URL"
        )
    _existing_attrs(path)


def plan_store(path: str | Path | StoreLocation, fingerprint: str, overwrite: bool) -> str:
    """'create' | 'resume' | 'done' for the store at `path` (read-only; every rank computes the same)."""
    attrs = _existing_attrs(StoreLocation(path))
    if attrs is None or "config_fingerprint" not in attrs or overwrite:
        return "create"  # absent, killed during creation, or --overwrite
    if attrs["config_fingerprint"] != fingerprint:
        raise ValueError(
            f"extract.store='{path}' was made with a different config (fingerprint "
            f"{attrs['config_fingerprint']} != {fingerprint}): pass --overwrite to replace it"
        )
    return "done" if attrs.get("complete") else "resume"


def select_store_heads(cfg: KVMapConfig, model, train: PackedSplit, attrs: dict, pad_id: int) -> dict:
    """`extract.heads`: the store's attributes with the held heads recorded (`heads`) and its layers cut to
    theirs; "selected" first scores every query head of the candidate layers on a probe
    (pipeline/extraction/head_probe.py) and records the scores too (`head_select`, read by stage 2)."""
    spec, geo = cfg.extract.heads, model_geometry(model.config)
    if spec == "all" or not attrs["components"]:
        return attrs
    if spec == "selected":
        hs = cfg.extract.head_select
        n = probe_samples(train, hs.samples)
        loc = write_probe_store(cfg, model, train, attrs, state_shapes(geo), pad_id, n)
        try:
            scores = head_scores(loc, "train", n, progress=False)
        finally:
            loc.delete()
        chosen = top_heads(ranked_heads(scores, by=hs.method.removeprefix("top_")), hs.top)
        scores = {k: v for k, v in scores.items() if k not in ("store", "fingerprint")}
        attrs["head_select"] = {"method": hs.method, "top": hs.top, "samples": n, "scores": scores}
    else:
        chosen = listed_heads(spec, attrs["layers"], geo["heads"])
    attrs["heads"] = heads_record(chosen, geo["heads"], geo["kv_heads"], attrs["components"])
    attrs["layers"] = sorted({layer for layer, _ in chosen})
    return attrs


def _prepare(cfg: KVMapConfig, state, overwrite: bool):
    """Load the teacher, have it write the completions (`data.completions: teacher`), tokenise both splits,
    resolve the layers and build the store attributes (every rank)."""
    torch.manual_seed(cfg.seed)
    model, tokenizer = load_model(cfg.teacher)
    if cfg.teacher.device == "auto" and state.num_processes > 1:
        model.to(state.device)  # one device per rank
    with state.main_process_first():  # rank 0 generates the default data if missing; others then read it
        if state.is_main_process:
            generate_default_data(cfg)
    cfg, completion_counts, completion_settings = teacher_completions(cfg, model, tokenizer, state, overwrite)
    with state.main_process_first():  # rank 0 fills the datasets cache; the others then read it
        for split in ("train", "eval") if cfg.data.eval_path is not None else ("train",):
            load_samples(cfg.data, split)
    train, counts_train = load_split(cfg, "train", tokenizer, state)  # each process its share of the rows
    ev = load_split(cfg, "eval", tokenizer, state)
    where = f"data.train_path={cfg.data.train_path!r}"
    check_trained_tokens(cfg, counts_train["segment_tokens"], counts_train["format"], where)
    counts = {"train": counts_train} | ({"eval": ev[1]} if ev is not None else {})
    for split, c in completion_counts.items():
        counts[split]["completions"] = c
    eval = ev[0] if ev is not None else None
    geo = model_geometry(model.config)
    layers = resolve_layers(cfg, geo["layers"])
    attrs = select_store_heads(
        cfg, model, train, teacher_attrs(cfg, model, tokenizer, layers), pad_token_id(tokenizer)
    )
    logits = logits_attrs(cfg, geo["vocab"], eval is not None and eval.num_tokens > 0)
    if logits is not None:
        attrs["logits"] = logits
    attrs["dataset"] = {
        "train": {"source": cfg.data.train_path, **counts["train"]},
        **({"eval": {"source": cfg.data.eval_path, **counts["eval"]}} if "eval" in counts else {}),
    }
    if completion_settings is not None:  # teacher-written R and A: how they were generated
        attrs["completions"] = completion_settings
    attrs["config_fingerprint"] = config_fingerprint(cfg, attrs, train, eval)
    return model, tokenizer, train, eval, counts, attrs


def _extract_loop(
    cfg, state, model, writer: StoreWriter, splits: dict, pad_id: int, first=None
) -> tuple[int, float, float]:
    """This rank's share of the unfinished chunks (every world-th), written by the async writer; `first`
    is chunk 0's (bufs, stats) as the plan's probe computed them (the same bits: not computed twice).

    Returns (train tokens computed, loop wall seconds, loop CPU seconds of all threads).
    """
    todo = writer.todo_chunks()
    state.wait_for_everyone()  # every rank listed the same unfinished chunks before anyone writes
    mine = todo[state.process_index :: state.num_processes]
    bar = tqdm(
        total=sum(writer.chunk_range(c)[1] - writer.chunk_range(c)[0] for c in mine),
        unit="tok",
        unit_scale=True,
        desc=f"extract rank {state.process_index}/{state.num_processes}",
        disable=not state.is_main_process,
    )
    out = AsyncChunkWriter(writer, cfg.extract.writer_threads, cfg.extract.max_pending_chunks)
    computed, t_loop, cpu_loop = 0, time.perf_counter(), time.process_time()
    try:
        capture = (  # a logits-only store captures nothing
            capture_qkv(model, writer.layers, tuple(writer.components))
            if writer.components
            else nullcontext()
        )
        with torch.inference_mode(), capture as cap:
            for c in mine:
                if c == 0 and first is not None:
                    bufs, stats = first
                    bar.update(stats["tokens"])
                else:
                    bufs, stats = extract_writer_chunk(cfg, model, cap, writer, splits, c, pad_id, bar.update)
                out.submit(c, bufs, stats)
                if writer.chunk_split(c) == "train":
                    computed += stats["tokens"]  # train tokens (the summary's unit)
    except BaseException:
        out.close(raise_errors=False)  # finish what is queued (its markers stay valid), keep the 1st error
        raise
    finally:
        bar.close()
    out.close()
    return computed, time.perf_counter() - t_loop, time.process_time() - cpu_loop


def _remove_staging(cfg: KVMapConfig, state) -> None:
    """Once every rank is past reading them, delete the splits' staged tokens (pipeline/data/split_shards.py)."""
    state.wait_for_everyone()
    if state.is_main_process:
        remove_staging(cfg.extract.store, cfg.extract.storage_options)
    state.wait_for_everyone()


def _state(cfg: KVMapConfig) -> PartialState:
    # accelerate only forms a multi-process CPU group (gloo) when asked for cpu=True; without it every
    # process of `accelerate launch --multi_gpu` on a GPU-less machine believes it is alone.
    return PartialState(cpu=cfg.teacher.device == "cpu" or not torch.cuda.is_available())


def _plan(cfg, state, model, tokenizer, train, eval, attrs) -> dict:
    """`make_plan` (pipeline/extraction/plan.py): every rank probes chunk 0, so every rank can refuse."""
    geo = model_geometry(model.config)
    return make_plan(cfg, model, train, eval, attrs, geo, pad_token_id(tokenizer), state.num_processes)


def plan_extraction(cfg: KVMapConfig) -> dict:
    """`--plan`: the plan of `cfg.extract.store` (bytes and time, measured on chunk 0); writes no store."""
    state = _state(cfg)
    check_store_target(StoreLocation(cfg.extract.store, cfg.extract.storage_options))
    model, tokenizer, train, eval, _, attrs = _prepare(cfg, state, overwrite=False)
    plan = _plan(cfg, state, model, tokenizer, train, eval, attrs)
    plan.pop("chunk")
    _remove_staging(cfg, state)
    return plan


def run_extraction(cfg: KVMapConfig, overwrite: bool = False, force: bool = False) -> dict:
    """Extract (or resume) the store `cfg.extract.store`; returns the summary dict (see module docstring).
    Prints the plan's estimate first and refuses to start when the store's filesystem lacks the space
    (unless `force`)."""
    t0 = time.perf_counter()
    state = _state(cfg)
    path = StoreLocation(cfg.extract.store, cfg.extract.storage_options)
    check_store_target(path)
    model, tokenizer, train, eval, counts, attrs = _prepare(cfg, state, overwrite)
    action = plan_store(path, attrs["config_fingerprint"], overwrite)
    state.wait_for_everyone()  # everyone has read the old store before rank 0 replaces it
    if action == "done":
        _remove_staging(cfg, state)
        if state.is_main_process:
            print(
                f"store {path} is complete (config fingerprint {attrs['config_fingerprint']}): nothing to do"
            )
        return KVStore(path).attrs["summary"]
    plan = _plan(cfg, state, model, tokenizer, train, eval, attrs)
    if state.is_main_process:  # a message, not the result: stderr
        print("\n".join(format_plan(plan, str(path))[:3]), file=sys.stderr, flush=True)
    check_free_space(str(path), plan["bytes_needed"], plan["free_space"], force)
    if action == "create" and state.is_main_process:
        remove_store(path)
        StoreWriter.create(
            path,
            attrs=attrs,
            train=train,
            eval=eval,
            state_shapes=state_shapes(model_geometry(model.config)),
            chunk_tokens=cfg.extract.chunk_tokens,
            inner_chunk_tokens=cfg.extract.inner_chunk_tokens,
        )
    state.wait_for_everyone()
    writer = StoreWriter(path)
    pad_id = pad_token_id(tokenizer)
    computed, loop_s, loop_cpu_s = _extract_loop(
        cfg, state, model, writer, {"train": train, "eval": eval}, pad_id, plan.pop("chunk")
    )
    computed, loop_s, loop_cpu_s = add_up_ranks(state, computed, loop_s, loop_cpu_s)  # synchronises
    summary = None
    if state.is_main_process:
        summary = summarise(writer, counts, time.perf_counter() - t0, computed)
        summary["extract_loop_s_last_run"] = loop_s  # forwards + capture + writing, no model load
        summary["extract_loop_cpu_s_last_run"] = loop_cpu_s  # CPU seconds of all threads (writers too)
        summary["processes_last_run"] = state.num_processes
        writer.mark_complete(summary)
        print_summary(path, summary)
    _remove_staging(cfg, state)
    return summary if summary is not None else KVStore(path).attrs.get("summary", {})


def main(argv: list[str] | None = None) -> int:
    """`kvmap-extract` / `accelerate launch pipeline/extract.py`: see the module docstring."""
    p = command_parser(
        "kvmap-extract",
        __doc__,
        sections=["teacher", "data", "extract"],
        examples=[
            "kvmap-extract --config configs/default.yaml extract.store=stores/mine.zarr",
            "accelerate launch --num_processes 2 pipeline/extract.py --config configs/default.yaml --overwrite",
        ],
    )
    p.add_argument(
        "--overwrite", action="store_true", help="delete an existing store first (else: resume it)"
    )
    p.add_argument(
        "--plan",
        action="store_true",
        help="print the bytes and time the store will take (measured on the first chunk), write nothing",
    )
    p.add_argument("--json", action="store_true", help="with --plan: the plan as one JSON object")
    p.add_argument("--force", action="store_true", help="start even when the estimate exceeds the free space")
    args = parse_args(p, argv)
    if args.json and not args.plan:
        p.error("--json: expected together with --plan")
    if args.plan:
        return run_command("extract", lambda: _print_plan(config_from_args(KVMapConfig, args), args.json))
    # run_extraction returns the summary; the command's exit status is 0
    return run_command(
        "extract",
        lambda: run_extraction(config_from_args(KVMapConfig, args), args.overwrite, args.force) and 0,
    )


def _print_plan(cfg: KVMapConfig, as_json: bool) -> int:
    """`--plan [--json]`: the plan on stdout (the command's result)."""
    plan = plan_extraction(cfg)
    print(json.dumps(plan) if as_json else "\n".join(format_plan(plan, cfg.extract.store)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
