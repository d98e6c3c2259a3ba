"""Greedy answer exact-match: decode from the prompt, read the answer after the answer lead-in, compare.

Shape glossary: B batch, T prompt tokens (left-padded), N new tokens.

What counts as the generated answer (stated once, because templates vary): a stored sample is
P (prompt) | R (reasoning) | A (answer segment = lead-in + answer, e.g. "\\nAnswer: 3907"). From the sample
we know the reference answer (the text of A's answer-bearing tokens) and the lead-in (A's text before
the answer, e.g. "Answer:"). The student decodes greedily from P (up to `max_new_tokens` or EOS); its
answer is the text after the FIRST occurrence of the lead-in in the generation, up to the end of that
line. Exact match = that text, whitespace-stripped, equals the reference answer, or starts with it
followed by a non-alphanumeric character (so "3907." and "3907 <next sample>" match, "39071" does not).
A sample whose A segment has no lead-in (answer_prefix "") matches when the stripped generation ends with
the answer as a whole word (the model must have stopped with EOS right after it).
Samples without answer-bearing tokens in A are not counted.
"""

from __future__ import annotations

import re

import torch

from pipeline.config.kvmap import SEGMENTS
from pipeline.models.load import pad_token_id


def reference_of(sample: dict, tokenizer) -> tuple[list[int], str, str] | None:
    """(prompt token ids, lead-in text, answer text) of a stored sample, or None when it has no answer.

    Shapes: sample input_ids / segment_ids / answer_mask (T,).
    """
    ids, seg, ans = sample["input_ids"], sample["segment_ids"], sample["answer_mask"].bool()
    a_pos = (seg == SEGMENTS["A"]).nonzero().flatten()
    a_ans = (ans & (seg == SEGMENTS["A"])).nonzero().flatten()
    p_pos = (seg == SEGMENTS["P"]).nonzero().flatten()
    if len(a_ans) == 0 or len(p_pos) == 0:
        return None
    prompt = ids[: int(p_pos.max()) + 1].tolist()  # P is a prefix of the sample
    answer = tokenizer.decode(ids[a_ans].tolist(), skip_special_tokens=True).strip()
    a_text = tokenizer.decode(ids[a_pos].tolist(), skip_special_tokens=True)
    cut = a_text.find(answer)
    lead = a_text[: max(cut, 0)].strip()
    return prompt, lead, answer


def generated_matches(generated: str, lead: str, answer: str) -> bool:
    """The exact-match rule of the module docstring on decoded text."""
    if not answer:
        return False
    if lead:
        at = generated.find(lead)
        if at < 0:
            return False
        rest = generated[at + len(lead) :].lstrip(" \t")
        line = rest.split("\n", 1)[0].strip()
        return line == answer or (line.startswith(answer) and not line[len(answer)].isalnum())
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer) + r"$"
    return re.search(pattern, generated.strip()) is not None


@torch.no_grad()
def greedy_generate(
    model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos_id, device, synced: bool = False
) -> list[list[int]]:
    """Greedy continuation token ids for each prompt (left-padded batch; EOS ends a row). `synced`: keep
    forwarding until every process is done (HF `synced_gpus`), which a sharded student needs."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p) :] = torch.tensor(p)
        mask[b, T - len(p) :] = 1
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        synced_gpus=synced,
    )  # (B, T + N)
    new = out[:, T:].tolist()
    rows = []
    for r in new:
        if eos_id is not None and eos_id in r:
            r = r[: r.index(eos_id)]
        rows.append(r)
    return rows


def greedy_exact_match(
    model, tokenizer, dataset, indices, max_new_tokens: int, batch_size: int, device, synced: bool = False
):
    """(hits, counted) over dataset samples `indices` (see the module docstring for the rule); `synced` as
    in `greedy_generate`.

    Args:
        model: the student (eval mode); tokenizer: its tokenizer (decodes generations and references).
        dataset: a trainer.data.loader.StoreDataset over the held-out split; indices: dataset indices to decode.
    """
    refs = []
    for i in indices:
        r = reference_of(dataset[i], tokenizer)
        if r is not None:
            refs.append(r)
    pad_id = pad_token_id(tokenizer)
    hits = 0
    for b0 in range(0, len(refs), batch_size):
        chunk = refs[b0 : b0 + batch_size]
        gens = greedy_generate(
            model, [r[0] for r in chunk], max_new_tokens, pad_id, tokenizer.eos_token_id, device, synced
        )
        for (_, lead, answer), g in zip(chunk, gens):
            hits += generated_matches(tokenizer.decode(g, skip_special_tokens=True), lead, answer)
    return hits, len(refs)
