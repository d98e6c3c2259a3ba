"""How a stage-1 plan is shown and checked against the disk: the free space of the store's filesystem, the
bytes a (resumed) run still has to write, the one-line refusal when they do not fit, and the plan as text.

Pure functions over the plan dict that `plan.make_plan` builds; imports only the store location.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.store.location import StoreLocation


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest existing parent (where a new store's folder would be made)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(loc: StoreLocation) -> dict:
    """{"free_bytes", "checked_at"} of a local store's filesystem, or {"free_bytes": None, "skipped": why}
    for a URL (object storage has no free space to ask for)."""
    if loc.remote:
        return {"free_bytes": None, "skipped": "URL store: free-space check skipped"}
    where = nearest_existing(Path(loc.url))
    return {"free_bytes": int(shutil.disk_usage(where).free), "checked_at": str(where)}


def needed_bytes(plan: dict, existing: int) -> int:
    """Bytes a run still has to write: the estimate less what a resumed store already holds."""
    return max(0, int(plan["bytes_total"]) - int(existing))


def check_free_space(store: str, needed: int, space: dict, force: bool) -> None:
    """Refuse (one-line ValueError naming extract.store) when the store's filesystem has less free space
    than the estimate; `force` or a URL store skips the check."""
    free = space.get("free_bytes")
    if force or free is None or free >= needed:
        return
    raise ValueError(
        f"extract.store={store!r}: the plan estimates {_size(needed)} ({needed} bytes) but its filesystem "
        f"has {_size(free)} ({free} bytes) free at {space['checked_at']}: free space, choose another "
        "extract.store, or pass --force"
    )


def _size(b: float) -> str:
    for unit, f in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if b >= f:
            return f"{b / f:.1f} {unit}"
    return f"{b:.0f} B"


def _duration(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.1f} s"


def _space_line(plan: dict) -> str:
    space = plan.get("free_space") or {}
    if space.get("free_bytes") is None:
        return f"  {space.get('skipped', 'free space unknown')}"
    enough = (
        "enough" if space["free_bytes"] >= plan["bytes_needed"] else "NOT enough (--force to start anyway)"
    )
    return f"  free space: {_size(space['free_bytes'])} at {space['checked_at']}: {enough}"


def format_plan(plan: dict, store: str) -> list[str]:
    """The plan as text: 3 estimate lines (what every extraction prints first), then one line per component."""
    p = plan["probe"]
    lines = [
        f"plan for extract.store={store!r}: {plan['train_tokens']:,} train + {plan['eval_tokens']:,} "
        f"held-out tokens",
        f"  estimate: {_size(plan['bytes_total'])} ({plan['bytes_total']:,} bytes, "
        f"{plan['bytes_per_token']:,.0f} B/token), ~{_duration(plan['seconds_estimate'])} for the extraction "
        f"loop on {plan['processes']} process(es) (probe: chunk 0, {p['tokens']:,} tokens at "
        f"{p['tokens_per_s']:,.0f} tokens/s)",
        _space_line(plan),
        f"  {'component':<16}{'tokens':>14}{'raw B/token':>14}{'ratio':>8}{'B/token':>12}{'bytes':>16}",
    ]
    for name, c in plan["components"].items():
        lines.append(
            f"  {name:<16}{c['tokens']:>14,}{c['raw_bytes_per_token']:>14,.1f}{c['ratio']:>8.3f}"
            f"{c['bytes_per_token']:>12,.1f}{c['bytes']:>16,}"
        )
    if plan.get("heads"):
        held = ", ".join(f"{c} {n}" for c, n in plan["heads"].items())
        lines.append(f"  layers {plan['layers']}; heads held over them: {held}")
    return lines
