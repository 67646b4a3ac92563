"""Apply a run of changes to a site, in one transaction (shared by ingest, writes and
resolutions).

Theory of operation. A writer first locks the site's row (``SELECT feed_head … FOR
UPDATE``): that serialises every writer of one site, while sites proceed in parallel, and it
makes revisions gap-free in visibility: revs are allocated under the lock and the lock is
released only after the commit is visible, so no reader can see rev N+2 while N+1 is still
in flight. Each change gets its own rev (head+1, head+2, …). The current rows are loaded
with one query per table, each change goes through ``merge.apply_change`` in order (later
changes see earlier ones), and then, per table, one upsert writes the rows whose state
changed; the feed gets one entry per touched row at the rev of its last change (also for
rows whose change was overridden or parked, so the writer re-syncs to the cloud's values);
conflicts are inserted; the head moves and ``pg_notify`` fires at commit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import asyncpg

from sync_protocol.changes import Change, Conflict, RowState
from sync_protocol.merge import apply_change
from sync_protocol.schema import TableSpec

from . import conflicts as conflict_store
from .errors import CloudCode, CloudError
from .listen import CHANNEL
from .rows import TableIO, pack_entry

Key = tuple[str, str]  #: (table, pk)

FEED_COLUMNS = ("site_id", "rev", "tbl", "pk", "entry", "echo_of", "echo_seq")


@dataclass(slots=True)
class Applied:
    """The result of applying a run of changes: final row states, feed revs, outcomes."""

    head: int
    states: dict[Key, RowState] = field(default_factory=dict)
    dirty: list[Key] = field(default_factory=list)  #: rows whose state changed, first-touch order
    last_rev: dict[Key, int] = field(default_factory=dict)  #: rev of each row's last change
    last_seq: dict[Key, int] = field(default_factory=dict)  #: seq of each row's last change
    outcomes: Counter[str] = field(default_factory=Counter)
    conflicts: list[Conflict] = field(default_factory=list)
    stored: frozenset[Key] = frozenset()  #: rows that existed in Postgres before the run
    #: the node whose push this run applies: a row it created here is already on that node,
    #: exactly as the feed entry states it (it computed the same values from nothing)
    echo_origin: str | None = None


async def lock_site(conn: asyncpg.Connection, site_id: str) -> int:
    """Lock the site's row for this transaction; returns its feed head."""
    head = await conn.fetchval("SELECT feed_head FROM sites WHERE site_id = $1 FOR UPDATE", site_id)
    if head is None:
        raise CloudError(CloudCode.SITE_NOT_FOUND, f"no site {site_id!r}", site=site_id)
    return int(head)


async def load_states(
    conn: asyncpg.Connection,
    io: Mapping[str, TableIO],
    site_id: str,
    keys: Sequence[Key],
) -> dict[Key, RowState]:
    """The current states of the rows a run touches: one query per table."""
    by_table: dict[str, set[str]] = {}
    for table, pk in keys:
        by_table.setdefault(table, set()).add(pk)
    states: dict[Key, RowState] = {}
    for table, pks in by_table.items():
        for pk, state in (await io[table].load(conn, site_id, pks)).items():
            states[(table, pk)] = state
    return states


def apply_all(
    pairs: Sequence[tuple[TableSpec, Change]],
    current: dict[Key, RowState],
    head: int,
    echo_origin: str | None = None,
) -> Applied:
    """Apply validated changes in order at revs head+1, head+2, …; ``current`` is updated."""
    result = Applied(head, stored=frozenset(current), echo_origin=echo_origin)
    states, dirty, last_rev = result.states, result.dirty, result.last_rev
    outcomes = result.outcomes
    seen_dirty: set[Key] = set()
    rev = head
    for spec, change in pairs:
        rev += 1
        key = (change.table, change.pk)
        before = current.get(key)
        outcome = apply_change(spec, before, change, rev)
        state = outcome.state
        if state is not before:
            current[key] = state
            if key not in seen_dirty:
                seen_dirty.add(key)
                dirty.append(key)
        states[key] = state
        last_rev[key] = rev
        result.last_seq[key] = change.seq
        outcomes[outcome.kind.value] += 1
        if outcome.conflict is not None:
            result.conflicts.append(outcome.conflict)
    result.head = rev
    return result


def touch(key: Key, state: RowState, head: int) -> Applied:
    """A feed entry for a row without a change (so every edge re-reads the cloud's values)."""
    result = Applied(head + 1)
    result.states[key] = state
    result.last_rev[key] = head + 1
    return result


async def persist(
    conn: asyncpg.Connection, io: Mapping[str, TableIO], site_id: str, applied: Applied
) -> None:
    """Write changed rows, feed entries and conflicts, move the head and notify at commit."""
    new: dict[str, list[RowState]] = {}
    old: dict[str, list[RowState]] = {}
    states, stored = applied.states, applied.stored
    for key in applied.dirty:
        (old if key in stored else new).setdefault(key[0], []).append(states[key])
    for table, rows in old.items():
        await io[table].upsert(conn, site_id, rows)
    for table, rows in new.items():
        # No other writer can add these rows: every writer holds the site's lock.
        await io[table].insert_new(conn, site_id, rows)
    echo = applied.echo_origin
    feed = [
        (
            site_id,
            rev,
            table,
            pk,
            pack_entry(rev, table, states[(table, pk)]),
            *((None, None) if echo is None or key in stored else (echo, applied.last_seq[key])),
        )
        for key, rev in applied.last_rev.items()
        for table, pk in (key,)
    ]
    if feed:
        await conn.copy_records_to_table("feed", records=feed, columns=FEED_COLUMNS)
    if applied.conflicts:
        await conn.executemany(
            conflict_store.INSERT_SQL,
            [conflict_store.conflict_row(site_id, c) for c in applied.conflicts],
        )
    await conn.execute(
        "WITH moved AS (UPDATE sites SET feed_head = $2 WHERE site_id = $1)"
        " SELECT pg_notify($3, $1)",
        site_id,
        applied.head,
        CHANNEL,
    )
