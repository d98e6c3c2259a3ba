"""Config section `prune:` of `pipeline/prune.py` (a student cut from the teacher's own weights).

Assembled into `pipeline.config.kvmap.KVMapConfig`; see docs/guides/pruned-students.md.
"""

from __future__ import annotations

from dataclasses import dataclass

DEPTH_SPECS = ("map", "importance", "contiguous")
WIDTH_KEYS = ("heads_per_kv_group", "kv_heads", "intermediate_size", "hidden_size")


@dataclass
class PruneConfig:
    """Which teacher layers / heads / channels the pruned student keeps, and the calibration data.

    Depth (`layers`): "map" (the teacher layers `align.layer_map` picks for `num_layers` student layers),
    "importance" (keep the `num_layers` blocks with the largest 1 - cos(block input, block output)),
    "contiguous" (Minitron: greedily remove the contiguous window of `drop_block` layers whose removal costs
    the least calibration LM loss, never the last layer, until `num_layers` remain), or an explicit list of
    teacher layer indices. Width: each 0 = keep all; otherwise the count to keep, chosen
    by mean activation magnitude on `calibration_samples` rows of the train split.
    """

    out: str | None = None  # output HF folder; null = `student.path`
    layers: str | list[int] = "map"  # "map" | "importance" | "contiguous" | explicit teacher layers
    num_layers: int = 0  # student layers for map / importance / contiguous; 0 = as many as the teacher
    drop_block: int = 0  # contiguous: layers removed per greedy round; 0 = all at once (one window)
    heads_per_kv_group: int = 0  # query heads kept in each kept KV group (GQA grouping stays consistent)
    kv_heads: int = 0  # KV heads (groups) kept per layer
    intermediate_size: int = 0  # MLP channels kept per layer
    hidden_size: int = 0  # residual-stream (embedding) channels kept
    calibration_samples: int = 64  # train rows (random, `seed`) the importance scores are computed on
    batch_size: int = 8  # calibration samples per teacher forward
    seed: int | None = None  # calibration sample choice; null = top-level `seed`

    def __post_init__(self):
        if isinstance(self.layers, str) and self.layers not in DEPTH_SPECS:
            raise ValueError(
                f"prune.layers={self.layers!r}: expected 'map', 'importance', 'contiguous' or a list of "
                "teacher layer indices"
            )
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("prune.layers=[]: expected a non-empty list of teacher layer indices")
        for key in ("num_layers", "drop_block", *WIDTH_KEYS):
            if getattr(self, key) < 0:
                raise ValueError(f"prune.{key}={getattr(self, key)!r}: expected an int >= 0 (0 = keep all)")
        for key in ("calibration_samples", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"prune.{key}={getattr(self, key)!r}: expected an int >= 1")
