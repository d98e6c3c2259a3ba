"""The teacher writes a sample's completion from its prompt: R, then A after `answer_prefix`.

Shape glossary: B batch of prompts, T prompt tokens (left-padded), N new tokens.

Sequence-level distillation data (Kim & Rush 2016; TRL's `seq_kd`; reasoning distillation filtered by
answer correctness). For each prompt:
- context = `prompt + reasoning_prefix` (with `data.chat_template`: the chat-rendered user turn and
  generation prompt, then `reasoning_prefix`), tokenised exactly as pipeline/data/samples.py tokenises a sample;
- R = the teacher's continuation of the context until the first stop string (cut before it), EOS, or
  `data.max_new_tokens` ("cut": no stop string or EOS came);
- A = the continuation of `context + R + answer_prefix`, a second `generate` call, with the same stop
  rule and `data.generation.answer_max_new_tokens`. The R/A boundary is therefore exactly where
  `answer_prefix` was appended, never guessed from the text.
The written reasoning is `reasoning_prefix + R` (the prefix belongs to R, and data.py's chat rendering
has no reasoning prefix of its own), so extraction re-renders the very text the teacher continued.

Batches are left-padded (so every row's new tokens start at the same column) and use the KV cache;
greedy results equal one-prompt-at-a-time `generate` (tested).
"""

from __future__ import annotations

import torch

from pipeline.config.kvmap import DataConfig, GenerationConfig
from pipeline.data.formats import answer_occurrences
from pipeline.models.load import pad_token_id

REJECT_REASONS = ("empty", "no_answer_match", "cut")


def generation_context(prompt: str, tokenizer, data_cfg: DataConfig) -> tuple[str, bool]:
    """(text R is generated after, add_special_tokens) for a prompt, rendered as pipeline/data/samples.py does."""
    if data_cfg.chat_template:
        msgs = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return head + data_cfg.reasoning_prefix, False  # the template already holds its specials
    return prompt + data_cfg.reasoning_prefix, True


def _eos_ids(model, tokenizer) -> list[int]:
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    for extra in [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)]:
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template closes an assistant turn with (e.g. ChatML's <|im_end|>), or [].

    Why: a chat model ends its answer with the end of its turn, which need not be its configured EOS; a
    completion that runs past it writes the next turn's template into R or A."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    mark = "\u2063kvmap\u2063"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "u"}, {"role": "assistant", "content": mark}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation has no usable end-of-turn mark
        return []
    tail = text.split(mark, 1)[-1] if mark in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [ids[0]] if ids and ids[0] in special else []


def _finish(new_ids: list[int], tokenizer, eos: list[int], stop_strings: list[str]) -> dict:
    """Cut one row's new tokens at EOS, decode, cut the text before the first stop string."""
    n = next((i for i, t in enumerate(new_ids) if t in eos), None)
    ids = new_ids if n is None else new_ids[:n]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop_strings) if i >= 0]
    if hits:
        return {"text": text[: min(hits)], "ids": ids, "stop": "stop_string"}
    return {"text": text, "ids": ids, "stop": "eos" if n is not None else "max_new_tokens"}


@torch.no_grad()
def generate_continuations(
    model, tokenizer, texts: list[str], max_new_tokens: int, gen: GenerationConfig, add_special_tokens: bool
) -> list[dict]:
    """The teacher's continuation of each text, in batches of `gen.batch_size` (left padding, KV cache).

    Args:
        texts: contexts to continue; each is tokenised alone, then left-padded into its batch.
        max_new_tokens: generation budget per row.
        gen: sampling settings and stop strings (`do_sample=False`: greedy).
    Returns:
        One dict per text: "text" (decoded, cut before the first stop string), "ids" (new token ids up
        to the first EOS), "stop" ("stop_string" | "eos" | "max_new_tokens": the last means cut).
    Example:
        >>> generate_continuations(model, tok, ["Q: 2+2?\\n"], 16, GenerationConfig(), True)[0]["text"]
    """
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    eos = _eos_ids(model, tokenizer)
    sampling = dict(temperature=gen.temperature, top_p=gen.top_p) if gen.do_sample else {}
    stop = dict(stop_strings=list(gen.stop_strings), tokenizer=tokenizer) if gen.stop_strings else {}
    enc = [tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"] for t in texts]
    out = []
    for b0 in range(0, len(enc), gen.batch_size):
        batch = enc[b0 : b0 + gen.batch_size]
        T = max(len(p) for p in batch)
        ids = torch.full((len(batch), T), pad, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for b, p in enumerate(batch):
            ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
            mask[b, T - len(p) :] = 1
        seqs = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=gen.do_sample,
            # rows that finish early are filled with this: EOS, so `_finish` cuts every row at its end
            # (a pad id could also be a real token of the continuation)
            pad_token_id=eos[0] if eos else pad,
            eos_token_id=eos or None,
            use_cache=True,
            **sampling,
            **stop,
        )  # (B, T + N)
        out += [_finish(row, tokenizer, eos, gen.stop_strings) for row in seqs[:, T:].tolist()]
    return out


def judge(reasoning: str, answer: str, gold: str, filter_: str, cut: bool = False) -> str | None:
    """None to keep a completion, else the rejection reason (one of REJECT_REASONS).

    "empty": R or A is blank (nothing to learn, and data.py would skip it); "cut" (`generation.drop_cut`
    passes cut=True when R or A hit its token budget); "no_answer_match": the gold answer does not occur in
    A as a whole word (`filter: answer_match`, the answer-mask rule) or A does not start with it
    (`answer_exact`, applied to A as `exact_answer` cut it).
    """
    if not reasoning.strip() or not answer.strip():
        return "empty"
    if cut:
        return "cut"
    if filter_ == "answer_match" and not answer_occurrences(answer, gold):
        return "no_answer_match"
    if filter_ == "answer_exact" and answer.strip() != gold.strip():
        return "no_answer_match"
    return None


def exact_answer(answer: str, gold: str) -> str:
    """A cut right after the gold value when A starts with it (leading spaces kept); else A unchanged (the
    filter then rejects it): "8253. Laura's locker" -> "8253"."""
    spans = answer_occurrences(answer, gold.strip())
    if spans and not answer[: spans[0][0]].strip():
        return answer[: spans[0][1]]
    return answer


def complete_rows(model, tokenizer, prompts: list[str], golds: list[str], data_cfg: DataConfig) -> list[dict]:
    """Teacher-written R and A for each prompt, judged against its gold answer.

    Returns one record per prompt: prompt, reasoning (= reasoning_prefix + R), answer (A), gold,
    stop_reasoning / stop_answer ("max_new_tokens" = cut), new_tokens (R + A tokens generated), kept,
    reject_reason.
    """
    gen = data_cfg.generation
    contexts, special = zip(*(generation_context(p, tokenizer, data_cfg) for p in prompts))
    special = special[0] if special else True
    rs = generate_continuations(model, tokenizer, list(contexts), data_cfg.max_new_tokens, gen, special)
    a_contexts = [c + r["text"] + data_cfg.answer_prefix for c, r in zip(contexts, rs)]
    gen_a = generate_continuations(model, tokenizer, a_contexts, gen.answer_max_new_tokens, gen, special)
    records = []
    for prompt, gold, r, a in zip(prompts, golds, rs, gen_a):
        if data_cfg.filter == "answer_exact":
            a["text"] = exact_answer(a["text"], gold)
        cut = gen.drop_cut and "max_new_tokens" in (r["stop"], a["stop"])
        reason = judge(r["text"], a["text"], gold, data_cfg.filter, cut)
        records.append(
            {
                "prompt": prompt,
                "reasoning": data_cfg.reasoning_prefix + r["text"],
                "answer": a["text"],
                "gold": gold,
                "stop_reasoning": r["stop"],
                "stop_answer": a["stop"],
                "new_tokens": len(r["ids"]) + len(a["ids"]),
                "kept": reason is None,
                "reject_reason": reason,
            }
        )
    return records
