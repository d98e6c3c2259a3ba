"""Does the configured training select any token? Checked before stage 1 extracts and before stage 2's
first step, so a data set whose rows all fall outside the trained segments (e.g. plain `text` rows as P under
`train.ce_segments: [R, A]`) stops with one line instead of training on nothing.

Owns: `segment_token_counts` (tokens per segment name of a segment-id array) and `check_trained_tokens`.
Imports only pipeline.config (both stages call it; its one home).

Shapes: segment_ids (N,) int, any integer dtype.
"""

from __future__ import annotations

import numpy as np

from pipeline.config.kvmap import SEGMENTS, KVMapConfig


def segment_token_counts(segment_ids) -> dict[str, int]:
    """{P: n, R: n, A: n} of a segment-id array (padding ids < 0 are not counted)."""
    ids = np.asarray(segment_ids)
    return {name: int((ids == sid).sum()) for name, sid in SEGMENTS.items()}


def trained_segment_keys(cfg: KVMapConfig) -> dict[str, list[str]]:
    """{config key: segments} of the loss terms this config trains: CE reads `train.ce_segments`, logit KD
    `train.kd_segments` (or CE's when null); the structural loss (lambda_kv > 0 or auto) reads
    `train.struct_segments`."""
    loss, t = cfg.loss_config, cfg.train
    keys = {}
    kd_own = loss.alpha_logit > 0 and t.kd_segments is not None
    if loss.ce_weight > 0 or (loss.alpha_logit > 0 and not kd_own):
        keys["train.ce_segments"] = list(t.ce_segments)
    if kd_own:
        keys["train.kd_segments"] = list(t.kd_segments)
    if cfg.lambda_kv == "auto" or cfg.lambda_kv > 0:
        keys["train.struct_segments"] = list(cfg.train.struct_segments)
    return keys


def check_trained_tokens(cfg: KVMapConfig, counts: dict[str, int], fmt: str | None, where: str) -> None:
    """Raise one ValueError line when a trained term's segments select no token of the data.

    Args:
        counts: tokens per segment name (`segment_token_counts`).
        fmt: the data's format (`data.format` as detected), for the message.
        where: what was counted, e.g. "data.train_path='rows.jsonl'" or "train.store='s.zarr'".
    """
    found = ", ".join(f"{k} {v}" for k, v in counts.items())
    for key, segs in trained_segment_keys(cfg).items():
        if sum(counts.get(s, 0) for s in segs) == 0:
            present = [s for s, n in counts.items() if n > 0]
            raise ValueError(
                f"{where} ({fmt or 'unknown'} format): {key}={segs} selects no token (tokens per segment: "
                f"{found}); set {key} to segments the data has ({present}) or change data.format / "
                "data.text_segment"
            )
