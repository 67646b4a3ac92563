"""The sync cursors the edge persists in ``sync_state``, and the status read from them."""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sync_protocol.hlc import COUNTER_BITS

from .migrations import STATE_DEFAULTS


@dataclass(slots=True)
class State:
    """The in-memory copy of ``sync_state``; replaced only after a commit."""

    last_seq: int = 0
    sent_through: int = 0
    acked_through: int = 0
    pull_cursor: int = 0
    reflected_through: int = 0
    cloud_head: int = 0
    cloud_conflicts: int = 0
    last_push_ok_ms: int = 0
    last_pull_ok_ms: int = 0


STATE_KEYS = tuple(f.name for f in dataclasses.fields(State))
assert set(STATE_KEYS) == set(STATE_DEFAULTS), "sync_state keys and State disagree"


@dataclass(frozen=True, slots=True)
class Cursors:
    """Where this node stands: issued, sent, acknowledged, pulled, reflected."""

    last_seq: int
    sent_through: int
    acked_through: int
    pull_cursor: int
    reflected_through: int
    cloud_head: int


@dataclass(frozen=True, slots=True)
class StoreStatus:
    """What the store knows about sync health (the uplink adds the live part)."""

    outbox_depth: int  #: changes written here and not yet acknowledged by the cloud
    oldest_unsynced_age_ms: int  #: age of the oldest unacknowledged change (0: none)
    last_seq: int
    acked_through: int
    pull_cursor: int
    cloud_head: int
    open_conflicts: int
    last_push_ok_ms: int | None
    last_pull_ok_ms: int | None

    def to_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict."""
        return asdict(self)


#: when the oldest unacknowledged change was written (by this node's wall clock; rows
#: logged before migration 2 fall back to their HLC's wall part)
OLDEST_UNSYNCED_SQL = (
    f"SELECT coalesce(written_ms, hlc >> {COUNTER_BITS}) FROM outbox WHERE seq = ?"
)


def store_status(state: State, oldest_ms: int | None, now_ms: int) -> StoreStatus:
    """The status from the cursors and when the oldest unacknowledged change was written."""
    depth = state.last_seq - state.acked_through
    age = max(0, now_ms - oldest_ms) if depth > 0 and oldest_ms is not None else 0
    return StoreStatus(
        outbox_depth=depth,
        oldest_unsynced_age_ms=age,
        last_seq=state.last_seq,
        acked_through=state.acked_through,
        pull_cursor=state.pull_cursor,
        cloud_head=state.cloud_head,
        open_conflicts=state.cloud_conflicts,
        last_push_ok_ms=state.last_push_ok_ms or None,
        last_pull_ok_ms=state.last_pull_ok_ms or None,
    )


def state_from(rows: Iterable[Sequence[Any]]) -> State:
    """The cursors from ``sync_state``'s (key, value) rows."""
    values = {k: v for k, v in rows if k in STATE_DEFAULTS}
    return State(**{k: int(values.get(k, STATE_DEFAULTS[k])) for k in STATE_KEYS})


def status_from_file(path: str | Path, now_ms: int) -> StoreStatus:
    """Read the status straight from a database file (read-only; the edge need not run)."""
    if not Path(path).exists():
        raise FileNotFoundError(path)
    conn = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
    try:
        state = state_from(conn.execute("SELECT key, value FROM sync_state"))
        row = conn.execute(OLDEST_UNSYNCED_SQL, (state.acked_through + 1,)).fetchone()
        return store_status(state, row[0] if row else None, now_ms)
    finally:
        conn.close()
