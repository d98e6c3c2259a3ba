"""Generate the embedded default dataset: key -> value retrieval the default teacher actually solves.

    python -m pipeline.data.default_data --out data/default [--n_train 2000 --n_eval 200 --seed 0]
    python -m pipeline.data.default_data --out data/default --check-teacher   # + teacher accuracy

Each sample states a few facts ("Mia's locker code is 4821."), asks for one of them, reasons by quoting
the fact and answers with the value:

    prompt:    "Mia's locker code is 4821. Leo's locker code is 3907. Ava's locker code is 1156.
                Question: What is Leo's locker code?"
    reasoning: "The text says Leo's locker code is 3907."
    answer:    "3907"

Why this task: it needs attention (the value must be retrieved from the prompt, the digits are
random so no prior helps), SmolLM2-135M-Instruct solves it teacher-forced (the bar is >= 80% on the
answer-bearing tokens of R and A; see `check_teacher`), and samples are short (~65 tokens) so a tiny
student can learn it and extraction stays cheap. Output is a pure function of (n_train, n_eval, seed):
`random.Random(seed)` drives every choice, and train / held-out prompts never coincide.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import torch

from pipeline.cli import command_parser, run_command
from pipeline.config.kvmap import DataConfig, KVMapConfig, ModelConfig
from pipeline.data.metrics import answer_token_accuracy
from pipeline.data.samples import tokenize_sample
from pipeline.models.load import load_model, pad_token_id

# Distinct, common first names (each one or two tokens for the SmolLM2 tokenizer).
NAMES = [
    "Mia",
    "Leo",
    "Ava",
    "Sam",
    "Noah",
    "Emma",
    "Liam",
    "Zoe",
    "Owen",
    "Lily",
    "Max",
    "Ruby",
    "Jack",
    "Nora",
    "Ben",
    "Ella",
    "Finn",
    "Ivy",
    "Luke",
    "Anna",
    "Theo",
    "Rose",
    "Adam",
    "Lucy",
    "Eli",
    "Grace",
    "Jake",
    "Chloe",
    "Ryan",
    "Alice",
    "Kyle",
    "Hannah",
    "Dan",
    "Julia",
    "Evan",
    "Sara",
    "Tom",
    "Kate",
    "Paul",
    "Laura",
    "Mark",
    "Emily",
    "Carl",
    "Olivia",
    "Hugo",
    "Maya",
    "Ian",
    "Clara",
    "Oscar",
    "Jane",
    "Victor",
    "Amy",
    "Felix",
    "Nina",
    "Henry",
    "Eva",
    "Simon",
    "Diana",
    "Peter",
    "Iris",
]
TEMPLATES = {
    "fact": "{name}'s locker code is {value}.",
    "question": "Question: What is {name}'s locker code?",
    "reasoning": "The text says {name}'s locker code is {value}.",
}
# How the default task's rows are rendered (configs/default.yaml sets the same data.* prefixes).
REASONING_PREFIX, ANSWER_PREFIX = "\n", "\nSo the answer is "
TRAIN_FILE = "train.jsonl"  # the file `data.generate_default` writes (and the only one it writes)
DEFAULTS = dict(n_train=2000, n_eval=200, seed=0, n_facts=3, digits=4)


def make_sample(rng: random.Random, n_facts: int = 3, digits: int = 4) -> dict:
    """One prompt / reasoning / answer row; all randomness comes from `rng`."""
    names = rng.sample(NAMES, n_facts)
    lo, hi = 10 ** (digits - 1), 10**digits - 1  # no leading zero: every value has `digits` digits
    values = [str(v) for v in rng.sample(range(lo, hi + 1), n_facts)]
    q = rng.randrange(n_facts)
    facts = " ".join(TEMPLATES["fact"].format(name=n, value=v) for n, v in zip(names, values))
    prompt = facts + "\n" + TEMPLATES["question"].format(name=names[q])
    reasoning = TEMPLATES["reasoning"].format(name=names[q], value=values[q])
    return {"prompt": prompt, "reasoning": reasoning, "answer": values[q]}


def make_rows(
    n_train: int, n_eval: int, seed: int = 0, n_facts: int = 3, digits: int = 4, n_extra_train: int = 0
):
    """(train_rows, eval_rows), deterministic in the arguments; no prompt occurs twice.

    `n_extra_train` more train rows are drawn after the held-out ones, so the first `n_train` train rows
    and the held-out rows are exactly those of `n_extra_train=0` (teacher-written data filters about
    half the prompts away and generates from more of them, against the same held-out prompts)."""
    if not 1 <= n_facts <= len(NAMES):
        raise ValueError(f"n_facts={n_facts!r}: expected an int in [1, {len(NAMES)}]")
    if not 1 <= digits <= 9:
        raise ValueError(f"digits={digits!r}: expected an int in [1, 9]")
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[dict] = []
    while len(rows) < n_train + n_eval + n_extra_train:
        s = make_sample(rng, n_facts, digits)
        if s["prompt"] not in seen:
            seen.add(s["prompt"])
            rows.append(s)
    train_rows = rows[:n_train] + rows[n_train + n_eval :]
    train = [{"id": f"train-{i:05d}", **r} for i, r in enumerate(train_rows)]
    held = [{"id": f"heldout-{i:05d}", **r} for i, r in enumerate(rows[n_train : n_train + n_eval])]
    return train, held


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """Write `rows` as JSON lines to `path` through a temporary file and a rename: a concurrent or killed
    writer never leaves a truncated file behind (the default dataset and the teacher's completions)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def generate(
    out,
    n_train: int = 2000,
    n_eval: int = 200,
    seed: int = 0,
    n_facts: int = 3,
    digits: int = 4,
    n_extra_train=0,
):
    """Write `out/train.jsonl` and `out/heldout.jsonl`; returns their paths.

    Example:
        >>> generate("data/default")  # the default config's data.train_path / data.eval_path
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    train, held = make_rows(n_train, n_eval, seed, n_facts, digits, n_extra_train)
    paths = {"train": out / TRAIN_FILE, "eval": out / "heldout.jsonl"}
    write_jsonl_atomic(paths["train"], train)
    write_jsonl_atomic(paths["eval"], held)
    return paths


def check_teacher(model, tokenizer, rows: list[dict], data_cfg=None, batch_size: int = 16) -> dict:
    """Teacher-forced accuracy of `model` on the answer-bearing tokens of R and A of `rows`.

    Returns answer_token_accuracy's dict summed over all rows (acc, acc_R, acc_A, n, ...) plus
    `exact_A` (fraction of samples whose every answer token in A is predicted).
    """
    data_cfg = data_cfg or DataConfig(reasoning_prefix=REASONING_PREFIX, answer_prefix=ANSWER_PREFIX)
    samples = [s for s in (tokenize_sample(r, tokenizer, data_cfg) for r in rows) if s is not None]
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    tot: dict[str, float] = {}
    exact = 0
    for b0 in range(0, len(samples), batch_size):
        batch = samples[b0 : b0 + batch_size]
        T = max(len(s["input_ids"]) for s in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)  # (B, T) right-padded
        seg = torch.full((len(batch), T), -1, dtype=torch.long)
        ans = torch.zeros((len(batch), T), dtype=torch.bool)
        for j, s in enumerate(batch):
            n = len(s["input_ids"])
            ids[j, :n], seg[j, :n], ans[j, :n] = s["input_ids"], s["segment_ids"], s["answer_mask"]
        with torch.no_grad():
            logits = model(
                ids.to(device), attention_mask=(seg >= 0).long().to(device), use_cache=False
            ).logits
        for j in range(len(batch)):
            r = answer_token_accuracy(logits[j].float().cpu(), ids[j], ans[j], seg[j])
            exact += int(r["n_A"] > 0 and r["correct_A"] == r["n_A"])
            for k in ("n", "correct", "n_R", "correct_R", "n_A", "correct_A"):
                tot[k] = tot.get(k, 0.0) + r[k]
    for suffix in ("", "_R", "_A"):
        n = tot.get(f"n{suffix}", 0.0)
        tot[f"acc{suffix}"] = tot.get(f"correct{suffix}", 0.0) / n if n else float("nan")
    tot["exact_A"] = exact / max(len(samples), 1)
    tot["samples"] = len(samples)
    tot["tokens"] = sum(len(s["input_ids"]) for s in samples)
    return tot


def generate_default_data(cfg: KVMapConfig) -> None:
    """With `data.generate_default`, write the embedded default dataset where `data.train_path` expects it.

    Only a missing `.../train.jsonl` is generated: any other train_path (your own file, a Hub dataset name
    such as `openai/gsm8k`) is read as it is, so the shipped config's `generate_default: true` never writes
    synthetic rows into a folder named after someone else's data.
    """
    train = Path(cfg.data.train_path)
    if cfg.data.generate_default and train.name == TRAIN_FILE and not train.exists():
        print(f"generating the default dataset in {train.parent}", file=sys.stderr, flush=True)
        generate(train.parent)


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.data.default_data`: see the module docstring."""
    ap = command_parser(
        "python -m pipeline.data.default_data",
        __doc__,
        examples=[
            "python -m pipeline.data.default_data --out data/default",
            "python -m pipeline.data.default_data --out data/default_plus --n_extra_train 2300 --check-teacher",
        ],
        config=False,
    )
    ap.add_argument("--out", default="data/default", help="output folder (train.jsonl, heldout.jsonl)")
    ap.add_argument("--n_train", type=int, default=DEFAULTS["n_train"])
    ap.add_argument("--n_eval", type=int, default=DEFAULTS["n_eval"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--n_facts", type=int, default=DEFAULTS["n_facts"])
    ap.add_argument("--digits", type=int, default=DEFAULTS["digits"])
    ap.add_argument("--n_extra_train", type=int, default=0, help="train rows drawn after the held-out ones")
    ap.add_argument("--check-teacher", action="store_true", help="also report the teacher's accuracy")
    ap.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--n_check", type=int, default=200, help="held-out rows used by --check-teacher")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for --check-teacher")
    a = ap.parse_args(argv)
    return run_command("default_data", lambda: _write_and_check(a))


def _write_and_check(a) -> int:
    """The command's body: write the dataset, then with --check-teacher measure the teacher on it."""
    paths = generate(a.out, a.n_train, a.n_eval, a.seed, a.n_facts, a.digits, a.n_extra_train)
    print(
        f"wrote {paths['train']} ({a.n_train + a.n_extra_train} rows) and {paths['eval']} ({a.n_eval} rows)"
    )
    if a.check_teacher:
        if a.threads:
            torch.set_num_threads(a.threads)
        model, tok = load_model(ModelConfig(path=a.teacher))
        rows = [json.loads(x) for x in paths["eval"].read_text().splitlines()[: a.n_check]]
        r = check_teacher(model, tok, rows)
        print(
            f"teacher {a.teacher} on {r['samples']} held-out samples ({r['tokens']} tokens), teacher-forced "
            f"answer-token accuracy: all {r['acc']:.3f} (n={r['n']:.0f}), R {r['acc_R']:.3f} "
            f"(n={r['n_R']:.0f}), A {r['acc_A']:.3f} (n={r['n_A']:.0f}); A exact {r['exact_A']:.3f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
