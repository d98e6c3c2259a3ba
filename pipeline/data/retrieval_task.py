"""Generate the long-context retrieval task: many key -> value facts among distractors, three question types.

    python -m pipeline.data.retrieval_task --out data/retrieval --length 512 [--n_train 2000 --n_eval 200]
    python -m pipeline.data.retrieval_task --out data/retrieval --length 512 --check-teacher --n_check 40

The context is a shuffled list of sentences, about `length` tokens (`TOKENS_PER_SENTENCE` tokens each for
SmolLM2's tokenizer):
- key facts, one per name: "Mia's locker code is 4821." (every name has at most one locker code);
- distractors with the same shape on other objects: "Leo's bike lock code is 5521." (the name alone does not
  find the fact: the object must match too);
- neutral filler sentences.
Question types (in the spirit of RULER's needle / multi-key / variable tracking):
- `needle`: one locker code. R: "The text says Leo's locker code is 3907." A: "3907".
- `multi_key`: two locker codes. A: "3907 and 4821".
- `two_hop`: "Mia's locker code is the same as Leo's." somewhere, Leo's code elsewhere: the answer needs
  two lookups. R quotes both links.

Files: `train.jsonl` and `heldout.jsonl` at `length` and `heldout_long.jsonl` at 2 x `length` (length
generalisation). Every row carries `type`, `length` (the target) and `depth`: the asked fact's relative
position, 0 = first sentence. Output is a pure function of the arguments (`random.Random(seed)` drives
every choice). No prompt occurs twice across the splits. `--check-teacher` reports the teacher's
teacher-forced accuracy per type and split (`pipeline.data.default_data.check_teacher`): keep the types it
answers.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from pipeline.cli import command_parser, run_command
from pipeline.data.default_data import NAMES, write_jsonl_atomic

TYPES = ("needle", "multi_key", "two_hop")
TOKENS_PER_SENTENCE = 11  # mean over the sentence mix, SmolLM2 tokenizer (facts 12, fillers 7-10)
OBJECT = "locker code"
DISTRACTOR_OBJECTS = ("bike lock code", "phone PIN", "door code", "safe code")
FILLERS = (
    "The weather was mild that day.",
    "Everyone arrived at the gym before noon.",
    "The hallway lights were replaced last week.",
    "A new vending machine stands near the stairs.",
    "The coach posted the schedule on the board.",
    "Lunch was served in the main hall.",
    "Someone left an umbrella by the door.",
    "The pool opens early on weekdays.",
    "Music played softly in the background.",
    "The janitor cleaned the floors after class.",
    "Most lockers are painted blue.",
    "The bus was ten minutes late.",
)
SPLIT_FILES = {"train": "train.jsonl", "eval": "heldout.jsonl", "eval_long": "heldout_long.jsonl"}


def _code(rng: random.Random, used: set[str]) -> str:
    while True:
        v = str(rng.randrange(1000, 10000))
        if v not in used:
            used.add(v)
            return v


def _context(rng: random.Random, length: int, n_keys: int) -> tuple[list[str], dict[str, str], set[str]]:
    """Sentences of a context of about `length` tokens with at least `n_keys` key facts.

    Returns (sentences, locker codes {name: code}, codes used)."""
    n = max(length // TOKENS_PER_SENTENCE, n_keys + 2)
    n_facts = min(len(NAMES), max(n_keys, n // 4))
    names = rng.sample(NAMES, n_facts)
    used: set[str] = set()
    codes = {name: _code(rng, used) for name in names}
    sentences = [f"{name}'s {OBJECT} is {v}." for name, v in codes.items()]
    n_distractors = (n - n_facts) // 2
    for _ in range(n_distractors):
        sentences.append(f"{rng.choice(NAMES)}'s {rng.choice(DISTRACTOR_OBJECTS)} is {_code(rng, used)}.")
    sentences += [rng.choice(FILLERS) for _ in range(n - len(sentences))]
    rng.shuffle(sentences)
    return sentences, codes, used


def _depth(sentences: list[str], needle: str) -> float:
    return round(sentences.index(needle) / max(len(sentences) - 1, 1), 3)


def make_sample(rng: random.Random, qtype: str, length: int) -> dict:
    """One prompt / reasoning / answer row of type `qtype` with a context of about `length` tokens."""
    if qtype not in TYPES:
        raise ValueError(f"question type {qtype!r}: expected one of {list(TYPES)}")
    sentences, codes, used = _context(rng, length, n_keys=2)
    a, b = rng.sample(sorted(codes), 2)
    fact = f"{a}'s {OBJECT} is {codes[a]}."
    if qtype == "needle":
        question = f"Question: What is {a}'s {OBJECT}?"
        reasoning, answer = f"The text says {fact}", codes[a]
    elif qtype == "multi_key":
        question = f"Question: What are {a}'s and {b}'s {OBJECT}s?"
        reasoning = f"The text says {fact} The text says {b}'s {OBJECT} is {codes[b]}."
        answer = f"{codes[a]} and {codes[b]}"
    else:  # two_hop: a's own fact becomes a link to b's
        link = f"{a}'s {OBJECT} is the same as {b}'s."
        sentences[sentences.index(fact)] = link
        fact = link
        question = f"Question: What is {a}'s {OBJECT}?"
        reasoning = f"The text says {link} The text says {b}'s {OBJECT} is {codes[b]}."
        answer = codes[b]
    prompt = " ".join(sentences) + "\n" + question
    return {
        "prompt": prompt,
        "reasoning": reasoning,
        "answer": answer,
        "type": qtype,
        "length": length,
        "depth": _depth(sentences, fact),
    }


def make_rows(n_train: int, n_eval: int, length: int, seed: int = 0, types=TYPES) -> dict[str, list[dict]]:
    """{"train", "eval", "eval_long"} rows, deterministic in the arguments; types cycle row by row so every
    split holds them in equal shares; no prompt occurs twice."""
    for key, v in (("n_train", n_train), ("n_eval", n_eval), ("length", length)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (64 if key == "length" else 0):
            raise ValueError(f"{key}={v!r}: expected an int >= {64 if key == 'length' else 0}")
    bad = [t for t in types if t not in TYPES]
    if bad or not types:
        raise ValueError(f"types={list(types)!r}: expected a non-empty subset of {list(TYPES)}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {}
    for split, n, L in (
        ("train", n_train, length),
        ("eval", n_eval, length),
        ("eval_long", n_eval, 2 * length),
    ):
        rows = []
        while len(rows) < n:
            s = make_sample(rng, types[len(rows) % len(types)], L)
            if s["prompt"] not in seen:
                seen.add(s["prompt"])
                rows.append({"id": f"{split}-{len(rows):05d}", **s})
        out[split] = rows
    return out


def generate(
    out, n_train: int = 2000, n_eval: int = 200, length: int = 512, seed: int = 0, types=TYPES
) -> dict:
    """Write the three split files into `out`; returns {split: path}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = make_rows(n_train, n_eval, length, seed, tuple(types))
    paths = {split: out / name for split, name in SPLIT_FILES.items()}
    for split, path in paths.items():
        write_jsonl_atomic(path, rows[split])
    return paths


def teacher_table(model, tokenizer, paths: dict, n_check: int) -> list[dict]:
    """The teacher's teacher-forced accuracy per (split, type) on the first `n_check` rows of each type."""
    from pipeline.config.kvmap import DataConfig
    from pipeline.data.default_data import ANSWER_PREFIX, check_teacher

    data_cfg = DataConfig(reasoning_prefix="\n", answer_prefix=ANSWER_PREFIX, max_length=8192)
    table = []
    for split in ("eval", "eval_long"):
        rows = [json.loads(x) for x in Path(paths[split]).read_text().splitlines()]
        for qtype in TYPES:
            sel = [r for r in rows if r["type"] == qtype][:n_check]
            if sel:
                r = check_teacher(model, tokenizer, sel, data_cfg, batch_size=4)
                table.append(
                    {
                        "split": split,
                        "type": qtype,
                        "samples": r["samples"],
                        "acc_R": r["acc_R"],
                        "acc_A": r["acc_A"],
                        "exact_A": r["exact_A"],
                        "tokens_mean": r["tokens"] / max(r["samples"], 1),
                    }
                )
    return table


def main(argv: list[str] | None = None) -> int:
    """`python -m pipeline.data.retrieval_task`: see the module docstring."""
    ap = command_parser(
        "python -m pipeline.data.retrieval_task",
        __doc__,
        examples=["python -m pipeline.data.retrieval_task --out data/retrieval --length 512 --check-teacher"],
        config=False,
    )
    ap.add_argument("--out", default="data/retrieval", help="output folder (train, heldout, heldout_long)")
    ap.add_argument("--length", type=int, default=512, help="context tokens of train and heldout (x2: long)")
    ap.add_argument("--n_train", type=int, default=2000)
    ap.add_argument("--n_eval", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--types", default=",".join(TYPES), help=f"comma-separated subset of {','.join(TYPES)}")
    ap.add_argument("--check-teacher", action="store_true", help="report the teacher's accuracy per type")
    ap.add_argument("--teacher", default="builtin:smollm2-135m-instruct")
    ap.add_argument("--n_check", type=int, default=40, help="held-out rows per type for --check-teacher")
    a = ap.parse_args(argv)
    return run_command("retrieval_task", lambda: _write_and_check(a))


def _write_and_check(a) -> int:
    types = tuple(t.strip() for t in a.types.split(",") if t.strip())
    paths = generate(a.out, a.n_train, a.n_eval, a.length, a.seed, types)
    print(f"wrote {', '.join(str(p) for p in paths.values())} (length {a.length}, long {2 * a.length})")
    if a.check_teacher:
        from pipeline.config.kvmap import ModelConfig
        from pipeline.models.load import load_model

        model, tok = load_model(ModelConfig(path=a.teacher))
        print(
            "| split | type | samples | mean tokens | acc R | acc A | exact A |\n|---|---|---|---|---|---|---|"
        )
        for r in teacher_table(model, tok, paths, a.n_check):
            print(
                f"| {r['split']} | {r['type']} | {r['samples']} | {r['tokens_mean']:.0f} | {r['acc_R']:.3f} | "
                f"{r['acc_A']:.3f} | {r['exact_A']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
