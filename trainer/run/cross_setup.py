"""Stage-2 setup of a cross-tokenizer arm: a student whose tokenizer differs from the store's teacher.

Shapes: none (wiring). Decided once, before any step: whether the arm is cross-tokenizer (the student's
vocabulary hash differs from the store's tokenizer record), that the store keeps the texts and char spans
such an arm re-tokenises (stage 1 writes them), and the cross-vocabulary KD term (`loss_config.kd_cross`,
alignment/losses/cross_vocab.py) with its exact-match vocabulary map built from both tokenizers' decoded
token strings. Every refusal is one line naming the key, the value and what was expected.
"""

from __future__ import annotations

from pipeline.config.configlib import ConfigError
from pipeline.config.kvmap import KVMapConfig
from pipeline.models.load import load_tokenizer
from trainer.data.cross_tokens import CrossTokenDataset
from trainer.objective.step import KDTerm
from trainer.run.setup import require_store_logits
from trainer.run.store_checks import tokenizer_fingerprint


def is_cross_tokenizer(store, tokenizer) -> bool:
    """True when the student's tokenizer differs from the store's teacher tokenizer (by vocabulary hash)."""
    rec = store.attrs.get("tokenizer") or {}
    if tokenizer is None or not rec.get("hash"):
        return False
    return tokenizer_fingerprint(tokenizer) != rec["hash"]


def check_cross(cfg: KVMapConfig, store, tokenizer, cross: bool) -> None:
    """A cross-tokenizer arm needs a store with texts (train and eval) and a `kd_cross` mode for its logit KD;
    a same-tokenizer arm must leave `kd_cross` unset."""
    lc = cfg.loss_config
    name = getattr(tokenizer, "name_or_path", "?")
    if not cross:
        if lc.kd_cross is not None:
            raise ConfigError(
                f"loss_config.kd_cross={lc.kd_cross!r}: the student's tokenizer {name!r} is the store's, expected "
                "null (kd_cross is the logit KD of a student with another tokenizer)"
            )
        return
    for split in store.splits:
        if not store.has_text(split):
            raise ConfigError(
                f"student tokenizer {name!r} differs from the store's "
                f"{(store.attrs.get('tokenizer') or {}).get('name')!r} and store '{store.path}' keeps no texts / "
                f"char_spans for split {split!r}: expected a store written with them (extract.texts: true) for a "
                "cross-tokenizer arm"
            )
    if lc.alpha_logit > 0 and lc.kd_cross is None:
        raise ConfigError(
            f"loss_config.kd_cross=None with alpha_logit={lc.alpha_logit} and student tokenizer {name!r} differing "
            "from the store's: expected exact_uld or uld (the vocabularies differ)"
        )


TEMPLATED_FORMATS = ("messages", "prompt_completion")


def cross_dataset(cfg: KVMapConfig, store, split: str, tokenizer, **kw) -> CrossTokenDataset:
    """A split on the student's tokens: a store rendered with a chat template (messages / prompt_completion
    rows, or `data.chat_template`) is re-rendered from its source rows with the student's own template (the
    config's `data`, as stage 1 read it); a plain-text store is read as stored."""
    fmt = (store.attrs.get("dataset") or {}).get(split, {}).get("format")
    templated = fmt in TEMPLATED_FORMATS or cfg.data.chat_template
    return CrossTokenDataset(
        store.path, split, tokenizer=tokenizer, data_cfg=cfg.data if templated else None, **kw
    )


def token_strings(tokenizer) -> list[str | None]:
    """Each id's decoded string, None for special tokens and for pieces that do not decode on their own
    (a partial UTF-8 byte decodes to U+FFFD): the keys of the exact-match map."""
    n = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
    return [None if i in special or "\ufffd" in t or not t else t for i, t in enumerate(texts)]


def build_cross_kd(cfg: KVMapConfig, store, student_tokenizer):
    """The cross-vocabulary KD term (`KDTerm` of a `CrossVocabKD`) when alpha_logit > 0, else None."""
    from alignment.losses.cross_vocab import CrossVocabKD, exact_match_map

    lc = cfg.loss_config
    if lc.alpha_logit == 0:
        return None
    require_store_logits(lc.alpha_logit, store)
    if lc.kd_temperature != 1.0:
        raise ConfigError(
            f"loss_config.kd_temperature={lc.kd_temperature}: expected 1.0 with kd_cross (the stored log-probs are "
            "at temperature 1 and ULD compares probabilities as they are)"
        )
    vocab_map = None
    if lc.kd_cross == "exact_uld":
        t = cfg.teacher
        teacher_tok = load_tokenizer(
            t.tokenizer or t.path, t.trust_remote_code, t.revision, key="teacher.path"
        )
        vocab_map = exact_match_map(token_strings(teacher_tok), token_strings(student_tokenizer))
    return KDTerm(CrossVocabKD(lc.kd_cross, vocab_map), float(lc.alpha_logit))
