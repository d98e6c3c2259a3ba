"""PNG plots for the ablation report (matplotlib, Agg backend: no display needed).

- loss_curves.png: train CE and held-out CE vs step, one line per arm (mean over seeds) with a band of
  ± one sample std across seeds at each logged step (steps every seed logged).
- cos_layers.png: final per-layer K and V cosine (train/cos_k_layer, train/cos_v_layer) per arm, bars with
  ± std error bars over seeds.
- deltas.png: Δ held-out CE and Δ R-segment answer accuracy vs the control with ± 2 SE bars.
- grouped_deltas.png (`python -m trainer.ablation.by_group`): the same Δ per held-out set and row group, for
  acc R, CE (R+A), agreement and needle mass.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from trainer.ablation.results import read_curve, resolve_run_dir
from trainer.ablation.stats import delta, mean_std

TRAIN_CE_KEYS = ("loss_ce", "train/loss_ce")
# Held-out CE over the segments training counts (eval/ce_trained); rows written before it existed: eval/ce.
EVAL_CE_KEYS = ("eval/ce_trained", "eval/ce")


def _save(fig, path: Path) -> Path:
    """Lay out, write at 110 dpi and close `fig`; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _legend(axes) -> None:
    """One legend, on the last panel that has labelled artists."""
    for ax in reversed(list(axes)):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
            return


def _band(curves: list[dict[int, float]]) -> tuple[list[int], list[float], list[float]]:
    """Steps logged by every seed, the mean and the sample std (0 for one seed) at each."""
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    means, stds = [], []
    for s in steps:
        xs = [c[s] for c in curves]
        m = sum(xs) / len(xs)
        means.append(m)
        stds.append(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0)
    return steps, means, stds


def plot_loss_curves(out_dir: Path, groups: dict[str, list[dict]]) -> Path | None:
    """loss_curves.png: train CE, held-out CE and R accuracy vs step per arm; None when no run logged any."""
    # The accuracy panel is the learning curve the budget is chosen from (distillation mostly shows as
    # faster learning, so where CE-only sits on it decides whether arms can differ at all).
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    drawn = False
    for ax, keys, title, ylabel in (
        (axes[0], TRAIN_CE_KEYS, "train CE (loss_ce)", "cross-entropy (nats/token)"),
        (axes[1], EVAL_CE_KEYS, "held-out CE, trained segments", "cross-entropy (nats/token)"),
        (axes[2], ("eval/acc_R",), "held-out answer-token accuracy in R", "accuracy"),
    ):
        for arm, rows in groups.items():
            curves = [c for c in (read_curve(resolve_run_dir(out_dir, r), keys) for r in rows) if c]
            steps, m, s = _band(curves)
            if not steps:
                continue
            (line,) = ax.plot(
                steps, m, marker="o" if len(steps) < 12 else None, ms=3, label=f"{arm} (n={len(curves)})"
            )
            ax.fill_between(
                steps,
                [a - b for a, b in zip(m, s)],
                [a + b for a, b in zip(m, s)],
                color=line.get_color(),
                alpha=0.2,
            )
            drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        if keys == TRAIN_CE_KEYS:  # from ln(V) ~ 10.8 at step 1 down to < 1: differences live at the bottom
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    if not drawn:
        plt.close(fig)
        return None
    _legend(axes)
    fig.suptitle("Loss and accuracy per arm: mean over seeds, band = ± 1 std")
    return _save(fig, out_dir / "loss_curves.png")


def _layer_stats(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    per_seed = [r.get("metrics", {}).get(key) for r in rows]
    per_seed = [v for v in per_seed if isinstance(v, list) and v]
    if not per_seed or len({len(v) for v in per_seed}) != 1:
        return [], []
    n = len(per_seed)
    means = [sum(col) / n for col in zip(*per_seed)]
    stds = [
        math.sqrt(sum((x - m) ** 2 for x in col) / (n - 1)) if n > 1 else 0.0
        for col, m in zip(zip(*per_seed), means)
    ]
    return means, stds


def plot_cos_layers(out_dir: Path, groups: dict[str, list[dict]]) -> Path | None:
    """cos_layers.png: final per-layer K and V cosine per arm; None when no arm has them (CE-only)."""
    data = {
        arm: {c: _layer_stats(rows, f"train/cos_{c}_layer") for c in ("k", "v")}
        for arm, rows in groups.items()
    }
    data = {a: d for a, d in data.items() if d["k"][0] or d["v"][0]}
    if not data:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(data)
    for ax, comp in zip(axes, ("k", "v")):
        for i, (arm, d) in enumerate(data.items()):
            m, s = d[comp]
            if m:
                xs = [j + (i - (len(data) - 1) / 2) * width for j in range(len(m))]
                ax.bar(xs, m, width, yerr=s, capsize=2, label=arm)
        n_layers = max(len(d[comp][0]) for d in data.values())
        ax.set_xticks(range(n_layers))
        ax.set_title(f"final per-layer cosine, {comp.upper()}")
        ax.set_xlabel("student layer")
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("cosine(student, projected teacher)")
    _legend(axes)
    return _save(fig, out_dir / "cos_layers.png")


def plot_deltas(out_dir: Path, stats: dict, control: str | None) -> Path | None:
    """deltas.png: Δ held-out CE and Δ R accuracy of each arm vs the control; None without a control."""
    if control is None:
        return None
    arms = [a for a in stats if a != control]
    panels = [("eval/ce_trained", "Δ held-out CE, trained segments (lower is better)")]
    if all(math.isnan(delta(stats, a, control, "eval/ce_trained")[0]) for a in stats if a != control):
        panels = [("eval/ce", "Δ held-out CE (lower is better)")]  # results written before ce_trained
    panels.append(("eval/acc_R", "Δ acc R (higher is better)"))
    if not arms:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(arms) + 2))
    drawn = False
    for ax, (key, title) in zip(axes, panels):
        ys, ds, errs = [], [], []
        for i, arm in enumerate(arms):
            d, se = delta(stats, arm, control, key)
            if not math.isnan(d):
                ys.append(i)
                ds.append(d)
                errs.append(0.0 if math.isnan(se) else 2 * se)
        if ds:
            ax.errorbar(ds, ys, xerr=errs, fmt="o", capsize=4)
            drawn = True
        ax.axvline(0.0, color="grey", lw=1)
        ax.set_yticks(range(len(arms)), arms)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
    if not drawn:
        plt.close(fig)
        return None
    fig.suptitle(f"Each arm minus the control '{control}' (bars = ± 2 SE over seeds)")
    return _save(fig, out_dir / "deltas.png")


def write_plots(out_dir: Path, groups: dict[str, list[dict]], stats: dict, control: str | None) -> list[Path]:
    """Write every plot that has data; returns the paths written."""
    paths = [
        plot_loss_curves(out_dir, groups),
        plot_cos_layers(out_dir, groups),
        plot_deltas(out_dir, stats, control),
    ]
    return [p for p in paths if p is not None]


GROUPED_PANELS = [
    ("eval/acc_R", "Δ acc R (higher is better)"),
    ("eval/ce_trained", "Δ CE R+A (lower is better)"),
    ("eval/agree_top1", "Δ agree top-1 (higher is better)"),
    ("needle/mass", "Δ needle mass (higher is better)"),
]


def plot_grouped_deltas(out_dir: Path, rows: list[dict], control: str | None) -> Path | None:
    """grouped_deltas.png: each arm minus the control per (held-out set, group), ± 2 SE; None without one.

    `rows`: results rows each carrying "grouped" = {set: {group: {metric: value}}} (by_group's evaluation).
    """
    arms = [a for a in dict.fromkeys(r["arm"] for r in rows) if a != control]
    if control is None or not arms or not any(r["arm"] == control for r in rows):
        return None
    cells = [(name, g) for name, groups in rows[0]["grouped"].items() for g in groups]
    fig, axes = plt.subplots(1, len(GROUPED_PANELS), figsize=(4 * len(GROUPED_PANELS), 0.45 * len(cells) + 2))
    for ax, (key, title) in zip(axes, GROUPED_PANELS):
        for j, arm in enumerate(arms):
            ys, ds, errs = [], [], []
            for i, (name, g) in enumerate(cells):
                stats = {
                    a: {key: mean_std([r["grouped"][name][g].get(key) for r in rows if r["arm"] == a])}
                    for a in (arm, control)
                }
                d, se = delta(stats, arm, control, key)
                if not math.isnan(d):
                    ys.append(i + 0.15 * (j - (len(arms) - 1) / 2))
                    ds.append(d)
                    errs.append(0.0 if math.isnan(se) else 2 * se)
            ax.errorbar(ds, ys, xerr=errs, fmt="o", capsize=3, label=arm)
        ax.axvline(0.0, color="grey", lw=1)
        ax.set_yticks(range(len(cells)), [f"{n} / {g}" for n, g in cells])
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    _legend(axes)
    fig.suptitle(f"Each arm minus '{control}' per held-out set / group (bars = ± 2 SE over seeds)")
    return _save(fig, out_dir / "grouped_deltas.png")
