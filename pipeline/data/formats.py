"""Row formats -> one rendered string with a segment for every character and the answer's character spans.

Owns: detecting a row's format and rendering it. Imports only pipeline.config. Formats (`data.format`):

- `prr`: `prompt` / `reasoning` / `answer` fields, rendered as `prompt + reasoning_prefix + reasoning +
  answer_prefix + answer`, or with `data.chat_template` as one user turn and one assistant turn.
- `messages`: chat turns `[{role, content}, ...]` rendered with the teacher's chat template. P = every
  character outside the trained assistant turns (system, user and, with `data.train_turns: last`, the
  earlier assistant turns); in a trained assistant turn R = its reasoning (the `data.think_tags` span with
  the tags, or a `reasoning_content` / `reasoning` field) and A = the rest of the turn up to and including
  its end-of-turn token.
- `prompt_completion`: TRL's form: `prompt` and `completion` as strings or message lists; rendered as the
  messages `prompt + completion` (a string prompt is one user turn, a string completion one assistant turn)
  with the completion's assistant turns trained. A tokenizer without a chat template renders the plain
  concatenation `prompt + completion`.
- `text`: one field, every character in the segment `data.text_segment` (default A: trained).
- `auto`: decided per file from its first row (`detect_format`).

Segment ids come from character offsets of the rendered string (pipeline/data/samples.py), so they are exact
for any BPE. A row's own system message is used as given; kvmap adds one only when `data.system_prompt` is
set, and removes a default system prompt that a template injects by itself (SmolLM2's does) when the row has
none. No text is inserted that the row does not hold, except the template's own tokens.

Shapes: none (strings and character offsets).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipeline.config.kvmap import SEGMENTS, DataConfig

P, R, A = SEGMENTS["P"], SEGMENTS["R"], SEGMENTS["A"]
FORMATS = ("prr", "messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
REASONING_KEYS = ("reasoning_content", "reasoning")
_SENTINELS = ("\x02", "\x03", "\x04", "\x05")  # characters no template or row writes


class BadRow(ValueError):
    """A row whose `field` is missing, empty or of the wrong type (handled by `data.on_bad_row`)."""

    def __init__(self, field: str, why: str = "expected a non-empty string"):
        super().__init__(f"field {field!r}: {why}")
        self.field, self.why = field, why


@dataclass
class Rendered:
    """One row as text: `spans` (start, end, segment) cover the text in order; `answer_spans` are the
    answer-bearing character ranges; `add_special_tokens` is False when a chat template wrote them;
    `content` the character ranges that hold the row's own text, in order (None: the whole text), so a
    token outside them is template markup (cross-tokenizer alignment works on the content only)."""

    text: str
    spans: list[tuple[int, int, int]]
    answer_spans: list[tuple[int, int]] = field(default_factory=list)
    answer: str = ""
    add_special_tokens: bool = True
    content: list[tuple[int, int]] | None = None


def answer_occurrences(text: str, answer: str) -> list[tuple[int, int]]:
    """Character spans of the whole-word occurrences of `answer` in `text` (not preceded or followed by a
    letter or digit: "3907." holds 3907, "39071" does not). The rule for answer masks and `answer_match`."""
    pattern = r"(?<![0-9A-Za-z])" + re.escape(answer) + r"(?![0-9A-Za-z])"
    return [(m.start(), m.end()) for m in re.finditer(pattern, text)]


def detect_format(row: dict, data_cfg: DataConfig) -> str:
    """The format of a row (`data.format: auto` decides per file from its first row)."""
    if data_cfg.format != "auto":
        return data_cfg.format
    if "messages" in row:
        return "messages"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if row.get(data_cfg.prompt_field) is not None and row.get(data_cfg.answer_field) is not None:
        return "prr"
    if data_cfg.text_field in row:
        return "text"
    raise ValueError(
        f"data.format=auto: a row with the columns {sorted(row)} matches no format: expected 'messages', "
        f"'prompt' + 'completion', '{data_cfg.prompt_field}' + '{data_cfg.answer_field}' (+ "
        f"'{data_cfg.reasoning_field}'), or '{data_cfg.text_field}' (rename columns with data.columns)"
    )


def field_text(row: dict, name: str | None) -> str | None:
    """A usable string value or None (missing, null, empty/whitespace, or an unsupported type)."""
    if name is None:
        return None
    v = row.get(name)
    if isinstance(v, int) and not isinstance(v, bool):
        v = str(v)  # `answer: 4821` read as an int column
    return v if isinstance(v, str) and v.strip() else None


def render_row(row: dict, tokenizer, data_cfg: DataConfig, fmt: str) -> Rendered:
    """Render one row of format `fmt` (raises `BadRow` for a bad field, ValueError for a bad template)."""
    if fmt == "text":
        return render_text(row, data_cfg)
    if fmt == "prr":
        return render_prr(row, tokenizer, data_cfg)
    if fmt == "messages":
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise BadRow("messages", "expected a non-empty list of {role, content} turns")
        return render_messages(msgs, tokenizer, data_cfg, first_trained=0, gold=_gold(row, data_cfg))
    if fmt == "prompt_completion":
        return render_prompt_completion(row, tokenizer, data_cfg)
    raise ValueError(f"data.format={fmt!r}: expected one of auto, {', '.join(FORMATS)}")


def _gold(row: dict, data_cfg: DataConfig) -> str | None:
    """The answer string whose occurrences inside R are marked, when the row has one."""
    return field_text(row, data_cfg.answer_mask_field or data_cfg.answer_field)


def render_text(row: dict, data_cfg: DataConfig) -> Rendered:
    """A `text` row: every character in `data.text_segment`."""
    text = field_text(row, data_cfg.text_field)
    if text is None:
        raise BadRow(data_cfg.text_field)
    seg = SEGMENTS[data_cfg.text_segment]
    return Rendered(text, [(0, len(text), seg)], [(0, len(text))] if seg == A else [])


def render_prr(row: dict, tokenizer, data_cfg: DataConfig) -> Rendered:
    """A prompt / reasoning / answer row (see the module docstring)."""
    fields = [f for f in (data_cfg.prompt_field, data_cfg.reasoning_field, data_cfg.answer_field) if f]
    values = {f: field_text(row, f) for f in fields}
    for f in fields:
        if values[f] is None:
            raise BadRow(f)
    prompt, answer = values[data_cfg.prompt_field], values[data_cfg.answer_field]
    reasoning = values.get(data_cfg.reasoning_field) if data_cfg.reasoning_field else None
    content = None
    if data_cfg.chat_template:
        text, r0, a0 = _prr_chat(prompt, reasoning, answer, tokenizer, data_cfg)
        p0 = text.rfind(prompt, 0, r0)
        a_len = len(reasoning or "") + len(data_cfg.answer_prefix) + len(answer)
        content = [(p0, p0 + len(prompt)), (r0, r0 + a_len)]
    else:
        r_text = data_cfg.reasoning_prefix + reasoning if reasoning is not None else ""
        text = prompt + r_text + data_cfg.answer_prefix + answer
        r0, a0 = len(prompt), len(prompt) + len(r_text)
    ans_start = a0 + len(data_cfg.answer_prefix)
    spans = [(0, r0, P), (r0, a0, R), (a0, len(text), A)]
    if data_cfg.answer_mask_field is not None:  # e.g. the gold answer inside teacher-written R and A
        needle = field_text(row, data_cfg.answer_mask_field)
        if needle is None:
            raise BadRow(data_cfg.answer_mask_field)
        answer_spans = [(ans_start + a, ans_start + b) for a, b in answer_occurrences(answer, needle)]
    else:
        needle = answer
        answer_spans = [(ans_start, ans_start + len(answer))]
    if reasoning is not None:  # whole-word occurrences of the answer inside R
        r_start = text.find(reasoning, r0)
        answer_spans += [(r_start + a, r_start + b) for a, b in answer_occurrences(reasoning, needle)]
    return Rendered(text, spans, answer_spans, needle, not data_cfg.chat_template, content)


def _prr_chat(prompt: str, reasoning: str | None, answer: str, tokenizer, data_cfg: DataConfig):
    """`data.chat_template` for prr rows: (text, R start, A start) of one user + one assistant turn."""
    assistant = (reasoning or "") + data_cfg.answer_prefix + answer
    msgs = [{"role": "user", "content": prompt}]
    head = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": assistant}], tokenize=False)
    if not text.startswith(head) or text.find(assistant, len(head)) != len(head):
        raise ValueError(
            "data.chat_template=True: the tokenizer's template does not render the assistant "
            "turn right after the generation prompt; set chat_template=false"
        )
    return text, len(head), len(head) + len(reasoning or "")


def render_prompt_completion(row: dict, tokenizer, data_cfg: DataConfig) -> Rendered:
    """TRL's prompt / completion row (strings or message lists)."""
    prompt, completion = row.get("prompt"), row.get("completion")
    for name, v in (("prompt", prompt), ("completion", completion)):
        if not (isinstance(v, list) and v) and field_text(row, name) is None:
            raise BadRow(name, "expected a non-empty string or a list of {role, content} turns")
    if getattr(tokenizer, "chat_template", None) is None:
        if isinstance(prompt, list) or isinstance(completion, list):
            raise ValueError(
                "data.format=prompt_completion: message lists need a tokenizer with a chat template"
            )
        return _plain_completion(prompt, completion, data_cfg, _gold(row, data_cfg))
    p_msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    c_msgs = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
    return render_messages(
        p_msgs + c_msgs, tokenizer, data_cfg, first_trained=len(p_msgs), gold=_gold(row, data_cfg)
    )


def _plain_completion(prompt: str, completion: str, data_cfg: DataConfig, gold: str | None) -> Rendered:
    """No chat template: `prompt + completion`, the completion split into R / A by the think tags."""
    reasoning, answer_at = split_reasoning(completion, data_cfg.think_tags)
    text = prompt + completion
    r0, a0 = len(prompt), len(prompt) + answer_at
    spans = [(0, r0, P), (r0, a0, R), (a0, len(text), A)]
    answer_spans = [(a0, len(text))]
    if gold and reasoning:
        answer_spans += [(r0 + a, r0 + b) for a, b in answer_occurrences(completion[:answer_at], gold)]
    return Rendered(text, spans, answer_spans, gold or completion[answer_at:], add_special_tokens=True)


def split_reasoning(content: str, think_tags: list[str]) -> tuple[str | None, int]:
    """(the reasoning span with its tags, or None; where the answer starts in `content`).

    `<think>R</think>A`, or `R</think>A` when the template wrote the opening tag in its generation prompt.
    The answer starts right after the closing tag (whitespace there opens A's first token).
    """
    open_tag, close_tag = think_tags
    end = content.find(close_tag)
    if end < 0:
        return None, 0
    end += len(close_tag)
    start = content.find(open_tag)
    start = start if 0 <= start < end else 0
    return content[start:end], end


def _turns(messages: list, data_cfg: DataConfig) -> list[dict]:
    """Validated turns ({role, content, reasoning?}), with `data.system_prompt` prepended when set and the
    row has no system turn."""
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise BadRow(
                "messages", f"turn {i} is {str(m)[:60]!r}: expected {{role: {'|'.join(ROLES)}, content: str}}"
            )
        reasoning = next((m[k] for k in REASONING_KEYS if isinstance(m.get(k), str) and m[k].strip()), None)
        out.append({"role": m["role"], "content": m["content"], "reasoning": reasoning})
    if data_cfg.system_prompt is not None and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": data_cfg.system_prompt, "reasoning": None})
    return out


def _template_turn(t: dict, data_cfg: DataConfig) -> dict:
    """The message passed to the template: a separate reasoning field is written into the content inside
    the think tags (most templates, SmolLM2's included, do not render `reasoning_content`)."""
    if t["reasoning"] is None:
        return {"role": t["role"], "content": t["content"]}
    open_tag, close_tag = data_cfg.think_tags
    return {"role": t["role"], "content": f"{open_tag}{t['reasoning']}{close_tag}{t['content']}"}


def render_messages(
    messages: list, tokenizer, data_cfg: DataConfig, first_trained: int, gold: str | None
) -> Rendered:
    """Chat turns rendered with the teacher's template; assistant turns at index >= `first_trained` are
    trained (all of them with `data.train_turns: all`, else the last one)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("data.format=messages: the teacher's tokenizer has no chat template")
    turns = _turns(messages, data_cfg)
    first_trained += len(turns) - len(messages)  # a prepended system turn shifts the indices
    trained = [i for i, t in enumerate(turns) if t["role"] == "assistant" and i >= first_trained]
    if not trained:
        raise BadRow("messages", "expected an assistant turn to train on")
    if data_cfg.train_turns == "last":
        trained = trained[-1:]
    msgs = [_template_turn(t, data_cfg) for t in turns]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    if turns[0]["role"] != "system":
        text = strip_default_system(text, tokenizer)
    spans, answer_spans, content = _locate_turns(text, msgs, trained, tokenizer, data_cfg, gold)
    answer = gold or "".join(text[a:b] for a, b in answer_spans)
    return Rendered(text, spans, answer_spans, answer, add_special_tokens=False, content=content)


def _locate_turns(text, msgs, trained, tokenizer, data_cfg, gold):
    """Segment spans of the rendered conversation: each message's content is found in order; a trained
    assistant turn gives R (its think span) and A (the rest, through its end-of-turn token). Also returns
    each message's content range (the text the row holds; the rest is template)."""
    spans, answer_spans, content, cursor, p_start = [], [], [], 0, 0
    for i, m in enumerate(msgs):
        at = text.find(m["content"], cursor)
        if at < 0:
            raise ValueError(
                f"data.format=messages: the teacher's chat template does not render turn {i} "
                f"({m['role']}) verbatim; set data.format=prr with data.chat_template=false to render text as is"
            )
        cursor = at + len(m["content"])
        content.append((at, cursor))
        if i not in trained:
            continue
        reasoning, answer_at = split_reasoning(m["content"], data_cfg.think_tags)
        r0 = at + (m["content"].find(reasoning) if reasoning else 0)
        a0, a1 = at + answer_at, _turn_end(text, cursor, tokenizer)
        spans += [(p_start, r0, P), (r0, a0, R), (a0, a1, A)]
        answer_spans.append((a0, cursor))
        if gold and reasoning:
            answer_spans += [(r0 + a, r0 + b) for a, b in answer_occurrences(text[r0:a0], gold)]
        cursor = p_start = a1
    spans.append((p_start, len(text), P))
    return [s for s in spans if s[1] > s[0]], answer_spans, [c for c in content if c[1] > c[0]]


def _turn_end(text: str, end: int, tokenizer) -> int:
    """Where a trained assistant turn ends: after its end-of-turn token (the tokenizer's eos, e.g.
    `<|im_end|>`) when the template writes it right after the content, so the student learns to stop."""
    eos = getattr(tokenizer, "eos_token", None)
    if eos and text.startswith(eos, end):
        return end + len(eos)
    return end


def strip_default_system(text: str, tokenizer) -> str:
    """Remove the system turn a template injects by itself when the conversation has none (SmolLM2's
    template writes "You are a helpful AI assistant named SmolLM..."): kvmap renders what the row holds.

    Found by rendering one user turn with and without a sentinel system turn: the injected default is what
    the template writes where the sentinel was; its turn runs from the start of the render (after a BOS
    that is not a turn marker) to the start of the user turn.
    """
    s, u = _SENTINELS[0], _SENTINELS[1]
    user = [{"role": "user", "content": u}]
    with_sys = tokenizer.apply_chat_template([{"role": "system", "content": s}] + user, tokenize=False)
    no_sys = tokenizer.apply_chat_template(user, tokenize=False)
    pre, post = with_sys.split(s)
    if not (no_sys.startswith(pre) and no_sys.endswith(post)) or len(no_sys) == len(pre) + len(post):
        return text  # the template injects nothing (or not in a form kvmap can see)
    user_head = _user_head(tokenizer, u)
    bos = getattr(tokenizer, "bos_token", None) or ""
    start = len(bos) if bos and pre.startswith(bos) and not user_head.startswith(bos) else 0
    turn = no_sys[start : no_sys.index(user_head + u)]
    return text.replace(turn, "", 1) if turn and turn in text else text


def _user_head(tokenizer, u: str) -> str:
    """The template's text that opens a user turn (e.g. `<|im_start|>user\\n`): what a later user turn
    adds after the end of an assistant turn."""
    x, y = _SENTINELS[2], _SENTINELS[3]
    conv = [{"role": "user", "content": x}, {"role": "assistant", "content": y}]
    text = tokenizer.apply_chat_template(conv + [{"role": "user", "content": u}], tokenize=False)
    between = text[text.index(y) + 1 : text.index(u)]
    after_assistant = tokenizer.apply_chat_template(conv, tokenize=False).split(y)[1]
    return between[len(after_assistant) :] if between.startswith(after_assistant) else between
