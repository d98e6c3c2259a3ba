"""kvmap-export: turn a run's student into a folder ready to publish, and optionally push it to the Hub.

    kvmap-export runs/default OUT [--push-to-hub USER/NAME] [--private] [--with-aligner] [--overwrite]

For a LoRA run (`student.lora`) the exported model is `student/merged/` (the adapters merged into the base
weights), so the folder needs no peft. The folder holds what `AutoModelForCausalLM.from_pretrained` / `pipeline("text-generation")` need: the
weights (safetensors), the config, the tokenizer with its chat template, a generation config (eos / pad from
the tokenizer) and a model card (`README.md`: teacher id and revision, store fingerprint, the arm's losses,
steps and tokens, held-out metrics; trainer/run/model_card.py). kvmap's own `aligner.*` files stay out
unless `--with-aligner`. The folder is written to a temporary sibling and renamed into place, so a failed
export leaves nothing half-written. `--push-to-hub` uploads it with `huggingface_hub` (a token from
`HF_TOKEN` or `huggingface-cli login`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from transformers import AutoConfig, AutoTokenizer, GenerationConfig

from pipeline.cli import command_parser, parse_args, run_command
from trainer.run.checkpoint import ALIGNER_META, ALIGNER_WEIGHTS, MERGED
from trainer.run.model_card import model_card

STUDENT = "student"
ADAPTER_CONFIG = "adapter_config.json"  # peft's file: student/ of a LoRA run


def _write_generation_config(folder: Path) -> None:
    """Write the folder's generation config with eos / pad from its tokenizer (so generation stops at the end
    of an assistant turn); an existing one keeps its other settings."""
    try:
        gen = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: start from the model config's defaults
        gen = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder))
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.eos_token_id is not None:
        gen.eos_token_id = tok.eos_token_id
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else gen.eos_token_id
    gen.save_pretrained(folder)


def export_student(
    run_dir: str | Path, out: str | Path, with_aligner: bool = False, overwrite: bool = False
) -> Path:
    """Write the publishable folder of `run_dir/student` to `out` (see the module docstring)."""
    run_dir, out = Path(run_dir), Path(out)
    student = run_dir / STUDENT
    # A LoRA run's student/ holds the adapter; the model to publish is its merged folder.
    lora = (student / ADAPTER_CONFIG).is_file()
    src = student / MERGED if lora else student
    if not (src / "config.json").is_file():
        raise FileNotFoundError(
            f"RUN_DIR={str(run_dir)!r}: no finished student ({src}/config.json missing): train it first "
            "(kvmap-train writes RUN_DIR/student at the end)"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"OUT={str(out)!r} exists: pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        skip = () if with_aligner else (ALIGNER_WEIGHTS, ALIGNER_META)
        shutil.copytree(src, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(*skip, "README.md"))
        if lora and with_aligner:  # the aligner lives beside the adapter, not in merged/
            for name in (ALIGNER_WEIGHTS, ALIGNER_META):
                if (student / name).is_file():
                    shutil.copy2(student / name, tmp / name)
        _write_generation_config(tmp)
        (tmp / "README.md").write_text(model_card(run_dir))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload `folder` to the Hub model repo `repo_id` (created when missing); returns the commit URL."""
    from huggingface_hub import HfApi  # lazy: only a push needs the Hub client (and its network)

    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, repo_type="model", commit_message="Upload kvmap student"
    )
    return str(getattr(info, "commit_url", info))


def main(argv: list[str] | None = None) -> int:
    """`kvmap-export`: see the module docstring."""
    p = command_parser(
        "kvmap-export",
        __doc__,
        config=False,
        examples=[
            "kvmap-export runs/default exports/default-student",
            "kvmap-export runs/ablations/demo/kd_only/seed_0 exports/kd --push-to-hub me/kd-student --private",
        ],
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished training run (holds student/)")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repo")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    p.add_argument("--with-aligner", action="store_true", help="keep kvmap's aligner.* files in the folder")
    p.add_argument("--overwrite", action="store_true", help="replace OUT when it exists")
    args = parse_args(p, argv)

    def body() -> None:
        out = export_student(args.run_dir, args.out, args.with_aligner, args.overwrite)
        print(out)
        if args.push_to_hub:
            print(push_to_hub(out, args.push_to_hub, args.private))

    return run_command("kvmap-export", body, extra=(FileExistsError,))


if __name__ == "__main__":
    raise SystemExit(main())
