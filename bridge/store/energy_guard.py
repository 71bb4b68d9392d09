"""The guard that keeps energy integration right when several writers share one database.

A writer plans each batmon's energy (bridge/energy.py) from the state it last wrote. With
several workers on one PostgreSQL database, another worker may have written a newer reading
of the same batmon since: planned from a stale state, the update would count time twice
and could move the counters down (docs/BATTERY.md). So a writer may say, in a batmon's
update, which ``last_reading`` its plan started from (``PLANNED_FROM``). Every store then
applies that update only while the row still has that ``last_reading``; otherwise it
refuses the whole write (rows too) with :class:`StaleState`, carrying the row's state, and
the writer plans the readings again from it. The rule is here once; each store applies it
in its own transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from bridge.energy import COLUMNS as ENERGY_COLUMNS

PLANNED_FROM = "planned_from"
"""Key of a batmon update (not a column): the last_reading the plan started from (or None)."""
STATE_COLUMNS = ("last_reading", *ENERGY_COLUMNS)
"""What a writer needs to plan again: the row's latest reading time and its energy state."""
UNGUARDED: Any = object()
R = TypeVar("R")


class StaleState(Exception):
    """Another writer moved these batmons on since the plan: nothing was written.

    ``states`` maps each batmon id to its row's ``STATE_COLUMNS`` as they are now.
    """

    def __init__(self, states: dict[int, dict[str, Any]]) -> None:
        super().__init__(f"planned from a stale state: batmon(s) {sorted(states)}")
        self.states = states


def split(changes: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The update's columns, and the last_reading it was planned from (``UNGUARDED`` when
    it does not say)."""
    if PLANNED_FROM not in changes:
        return changes, UNGUARDED
    columns = dict(changes)
    return columns, columns.pop(PLANNED_FROM)


def guarded(base: Any) -> bool:
    """True when ``split`` found a PLANNED_FROM."""
    return base is not UNGUARDED


def holds(row_last_reading: float | None, base: Any) -> bool:
    """The plan's start is still the row's state (or the update is not guarded)."""
    return base is UNGUARDED or row_last_reading == base


def apply(updates: Sequence[tuple[int, dict[str, Any]]],
          update: Callable[[int, dict[str, Any], Any], tuple[bool, R]],
          state: Callable[[int], dict[str, Any] | None]) -> dict[int, R]:  # fmt: skip
    """Apply each update with ``update(batmon_id, columns, base)`` -> (row updated, what the
    store wants back), guarded on ``last_reading IS base`` when ``guarded(base)``, inside
    the caller's transaction; raise StaleState, for the caller to roll back, if a guarded
    one did not hold for a batmon that exists (``state`` reads its row). Returns what each
    update gave back."""
    stale: dict[int, dict[str, Any]] = {}
    results: dict[int, R] = {}
    for batmon_id, changes in updates:
        columns, base = split(changes)
        applied, results[batmon_id] = update(batmon_id, columns, base)
        if not applied and guarded(base):
            found = state(batmon_id)
            if found is not None:
                stale[batmon_id] = found
    if stale:
        raise StaleState(stale)
    return results
