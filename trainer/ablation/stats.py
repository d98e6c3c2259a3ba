"""Statistics over an A/B matrix's result rows: per-arm mean / std / n, the difference to a control with
its standard error, and the 2-SE verdict. Pure functions; imports nothing of kvmap.
"""

from __future__ import annotations

import math


def number_or_none(x) -> float | None:
    """A finite float, or None for missing / null / NaN / non-numeric values."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def mean_std(values: list) -> tuple[float, float, int]:
    """(mean, sample std (ddof=1; nan when n < 2), n) over the numeric values; (nan, nan, 0) when none."""
    xs = [v for v in (number_or_none(x) for x in values) if v is not None]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1)) if n > 1 else math.nan
    return m, s, n


def row_metric(row: dict, key: str):
    """A row's final metric; `wall_s` falls back to the runner's wall time, `align/params` to aligner_params."""
    m = row.get("metrics", {})
    if key in m:
        return m[key]
    if key == "wall_s":
        return row.get("wall_s")
    if key == "align/params":
        return row.get("aligner_params")
    return None


def group_rows(rows: list[dict], arm_order: list[str]) -> dict[str, list[dict]]:
    """Rows per arm, arms in `arm_order` first then by first appearance; rows within an arm by seed."""
    groups: dict[str, list[dict]] = {a: [] for a in arm_order}
    for row in rows:
        groups.setdefault(row["arm"], []).append(row)
    return {a: sorted(rs, key=lambda r: r["seed"]) for a, rs in groups.items() if rs}


def arm_stats(
    groups: dict[str, list[dict]], keys: list[str]
) -> dict[str, dict[str, tuple[float, float, int]]]:
    """{arm: {metric: (mean, std, n)}}."""
    return {a: {k: mean_std([row_metric(r, k) for r in rs]) for k in keys} for a, rs in groups.items()}


def delta(stats: dict, arm: str, control: str, key: str) -> tuple[float, float]:
    """(mean(arm) - mean(control), standard error of that difference (nan when a side has < 2 seeds))."""
    ma, sa, na = stats[arm][key]
    mc, sc, nc = stats[control][key]
    if na == 0 or nc == 0:
        return math.nan, math.nan
    se = math.sqrt(sa**2 / na + sc**2 / nc) if na > 1 and nc > 1 else math.nan
    return ma - mc, se


def verdict(d: float, se: float, better: str | None) -> str:
    """'better' / 'worse' when |d| > 2 SE, 'noise' when within, '' when SE is unknown."""
    if math.isnan(d) or math.isnan(se):
        return ""
    if abs(d) <= 2 * se:
        return "noise"
    improved = d < 0 if better == "lower" else d > 0
    return "better" if improved else "worse"
