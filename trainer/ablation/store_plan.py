"""The minimal store of a recipe: what every arm of a matrix reads, and the union stage 1 must extract.

    kvmap-ablate --config configs/ablations/structure_vs_kd_random_student.yaml --plan-store

Shapes: none (configuration). Why: stage 1 stores by default every head of every mapped layer, while an arm
such as `kd_heads_top` (logit KD + attention KL on a few retrieval heads) reads the Q and K of those heads and
the top-k logits only. Each arm's needs follow from its resolved config by the rules stage 2 applies
(`trainer.run.setup.needed_components`, `alignment.config.used_projections`): a loss term of weight 0 reads
nothing; a selected-head arm without a projector reads only its heads (`extract.heads: selected` with the
arm's `align.head_select`); any projector reads every head of its layers.
"""

from __future__ import annotations

from alignment.config import only_selected_heads, used_projections
from alignment.mapping.layer_map import build_layer_map, teacher_layers_needed
from pipeline.models.load import load_hf_config, model_geometry
from pipeline.pruning.meta import read_prune_meta
from trainer.ablation.config import plan_runs
from trainer.run.setup import needed_components


def _layers(cfg) -> list[int] | str:
    """The teacher layers an arm's layer map reads ("all" when they come from head scores)."""
    if cfg.align.init == "from_prune":
        return teacher_layers_needed(read_prune_meta(cfg.student)["kept_layers"])
    if cfg.align.layer_map == "heads":  # chosen in stage 2 from head scores over every stored layer
        return "all"
    L_t = model_geometry(load_hf_config(cfg.teacher))["layers"]
    L_s = model_geometry(load_hf_config(cfg.student))["layers"]
    return teacher_layers_needed(build_layer_map(cfg.align.layer_map, L_t, L_s))


def arm_needs(cfg) -> dict:
    """What stage 2 reads of the store for one resolved config (pipeline.config.kvmap.KVMapConfig).

    Returns {"components": [q, k, v, logits subset], "layers": [teacher layers] | "all" | [],
    "heads": "all" | "selected" | [[layer, head], ...], "head_select": {method, top, samples} (selected),
    "texts": whether it reads the samples' texts and char spans (a cross-tokenizer arm, known by its
    `loss_config.kd_cross`)}.
    """
    structural = cfg.lambda_kv != 0
    comps = list(needed_components(cfg)) if structural else []
    if cfg.loss_config.alpha_logit > 0:
        comps.append("logits")
    out = {"components": comps, "layers": _layers(cfg) if structural else [], "heads": "all"}
    out["texts"] = cfg.loss_config.kd_cross is not None
    hs, lc = cfg.align.head_select, cfg.loss_config
    projected = used_projections(lc, hs.method, cfg.kv_projection_mode)
    only_heads = not projected and only_selected_heads(lc.relation)
    if structural and hs.method != "all" and only_heads:
        if hs.method == "list":
            out["heads"] = [list(p) for p in hs.heads]
        else:
            out["heads"] = "selected"
            out["head_select"] = {"method": hs.method, "top": hs.top, "samples": hs.samples}
    return out


def union_needs(needs: list[dict]) -> dict:
    """The one store every arm can train from: the union of components and layers; selected heads only
    when every arm that reads states asks for the same selection, else every head."""
    comps = [c for c in ("q", "k", "v", "logits") if any(c in n["components"] for n in needs)]
    states = [n for n in needs if any(c in n["components"] for c in ("q", "k", "v"))]
    layers: list[int] | str = []
    if any(n["layers"] == "all" for n in states):
        layers = "all"
    elif states:
        layers = sorted({t for n in states for t in n["layers"]})
    out = {"components": comps, "layers": layers, "heads": "all", "texts": any(n["texts"] for n in needs)}
    picks = {repr((n["heads"], n.get("head_select"), n["layers"])) for n in states}
    if len(picks) == 1 and states[0]["heads"] != "all":
        out["heads"] = states[0]["heads"]
        if "head_select" in states[0]:
            out["head_select"] = states[0]["head_select"]
    return out


def format_store_plan(arms: list[tuple[str, dict]], union: dict) -> list[str]:
    """One line per arm, then the union as an `extract:` section to paste into the base config."""
    w = max([18] + [len(name) for name, _ in arms]) + 2  # a long arm name keeps its column
    lines = [f"{'arm':<{w}}{'components':<22}{'layers':<24}heads"]
    for name, n in arms:
        reads_states = any(c in n["components"] for c in ("q", "k", "v"))
        heads = n["heads"] if n["heads"] != "selected" else f"selected {n['head_select']}"
        layers, heads = (str(n["layers"]), heads) if reads_states else ("-", "-")
        lines.append(f"{name:<{w}}{','.join(n['components']) or '-':<22}{layers:<24}{heads}")
    lines += ["", "union to extract (stage 1 config):", "extract:"]
    if union["layers"] != []:
        lines.append(f"  layers: {union['layers']}")
    lines.append(f"  components: [{', '.join(union['components'])}]")
    if union["heads"] != "all":
        lines.append(f"  heads: {union['heads']}")
    if "head_select" in union:
        hs = union["head_select"]
        lines.append(f"  head_select: {{method: {hs['method']}, top: {hs['top']}, samples: {hs['samples']}}}")
    if not union["texts"]:  # no cross-tokenizer arm: the texts and char spans are not read
        lines.append("  texts: false")
    return lines


def store_plan(abl) -> list[str]:
    """`kvmap-ablate --plan-store`: each arm's needs (its first seed's resolved config) and their union; with
    `only_arms`, those arms only (the minimal store of a sub-matrix)."""
    seen, arms = set(), []
    wanted = set(abl.only_arms or [a.name for a in abl.arms])
    for spec in plan_runs(abl):
        if spec.arm in wanted and spec.arm not in seen:
            seen.add(spec.arm)
            arms.append((spec.arm, arm_needs(spec.cfg)))
    return format_store_plan(arms, union_needs([n for _, n in arms]))
