"""The long-context retrieval task: deterministic, balanced over types, answers recoverable from the
context exactly as each type says, and lengths near the target for the teacher's tokenizer."""

from __future__ import annotations

import re

import pytest

from pipeline.data.retrieval_task import OBJECT, TYPES, generate, make_rows


def _facts(prompt: str) -> dict[str, str]:
    return dict(re.findall(rf"(\w+)'s {OBJECT} is (\d+)\.", prompt))


def test_rows_are_deterministic_balanced_and_unique():
    a, b = make_rows(12, 6, 256, seed=3), make_rows(12, 6, 256, seed=3)
    assert a == b and make_rows(12, 6, 256, seed=4)["train"] != a["train"]
    assert [r["type"] for r in a["train"]] == list(TYPES) * 4
    prompts = [r["prompt"] for rows in a.values() for r in rows]
    assert len(prompts) == len(set(prompts))
    assert {r["length"] for r in a["eval_long"]} == {512} and {r["length"] for r in a["eval"]} == {256}


@pytest.mark.parametrize("qtype", TYPES)
def test_answers_follow_from_the_context(qtype):
    for r in make_rows(0, 9, 384, seed=1, types=(qtype,))["eval"]:
        context, question = r["prompt"].rsplit("\n", 1)
        facts = _facts(context)
        names = re.findall(r"(\w+)'s", question)
        if qtype == "needle":
            assert r["answer"] == facts[names[0]]
        elif qtype == "multi_key":
            assert r["answer"] == f"{facts[names[0]]} and {facts[names[1]]}"
        else:  # the asked name has no code of its own: only the link to another name
            (a,) = names
            assert a not in facts
            (b,) = re.findall(rf"{a}'s {OBJECT} is the same as (\w+)'s\.", context)
            assert r["answer"] == facts[b]
        assert 0.0 <= r["depth"] <= 1.0
        assert all(v in r["reasoning"] for v in r["answer"].split(" and "))  # R quotes every value


def test_context_length_is_near_the_target_for_the_teacher_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pipeline.models.load import resolve_path

    tok = transformers.AutoTokenizer.from_pretrained(resolve_path("builtin:smollm2-135m-instruct"))
    paths = generate(tmp_path, n_train=3, n_eval=3, length=512, seed=0)
    import json

    for split, target in (("eval", 512), ("eval_long", 1024)):
        for line in paths[split].read_text().splitlines():
            n = len(tok(json.loads(line)["prompt"]).input_ids)
            assert 0.85 * target <= n <= 1.15 * target, (split, n)


def test_bad_arguments_fail_in_one_line():
    with pytest.raises(ValueError, match="length=32: expected an int >= 64"):
        make_rows(1, 1, 32)
    with pytest.raises(ValueError, match="types=\\['lookup'\\]"):
        make_rows(1, 1, 128, types=("lookup",))
