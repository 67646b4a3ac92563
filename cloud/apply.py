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

The bulk of a catch-up is rows the cloud has never seen, each written by one change. Such a
row has nothing to merge (``apply_change`` would give the change's values over the defaults,
``merge.apply_local``), so it skips the merge and is kept as plain values (``NewRow``) from
which its COPY record and its feed entry are made directly; should a later change of the
run touch it again, it becomes a ``RowState`` and takes the general path from there.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import asyncpg

from sync_protocol.changes import Change, Conflict, Op, RowState
from sync_protocol.merge import OutcomeKind, apply_change, apply_local
from sync_protocol.schema import TableSpec

from . import conflicts as conflict_store
from .errors import CloudCode, CloudError
from .listen import CHANNEL
from .rows import NewRow, TableIO, new_row_state, pack_entry, pack_new_entry

Key = tuple[str, str]  #: (table, pk)

FEED_COLUMNS = ("site_id", "rev", "tbl", "pk", "entry", "echo_of", "echo_seq")


@dataclass(slots=True)
class Applied:
    """The result of applying a run of changes: final row states, feed revs, outcomes.

    A row that did not exist and that one change of the run wrote (most rows of a
    catch-up) is kept in ``created`` as plain values; every other touched row is in
    ``states`` with the revs of its last change in ``last_rev`` and ``last_seq``.
    """

    head: int
    created: dict[str, dict[str, NewRow]] = field(default_factory=dict)  #: table -> pk -> row
    states: dict[Key, RowState] = field(default_factory=dict)
    dirty: list[Key] = field(default_factory=list)  #: rows whose state changed, first-change order
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
    keys: Iterable[Key],
) -> dict[Key, RowState]:
    """The current states of the rows a run touches: one query per table."""
    by_table: dict[str, set[str]] = {}
    for table, pk in keys:
        pks = by_table.get(table)
        if pks is None:
            pks = by_table[table] = set()
        pks.add(pk)
    states: dict[Key, RowState] = {}
    for table, pks in by_table.items():
        for pk, state in (await io[table].load(conn, site_id, pks)).items():
            states[(table, pk)] = state
    return states


def apply_all(
    pairs: Iterable[tuple[TableSpec, Change]],
    current: dict[Key, RowState],
    head: int,
    echo_origin: str | None = None,
) -> Applied:
    """Apply validated changes in order at revs head+1, head+2, …; ``current`` (the stored
    states) is the working set and is changed."""
    stored = frozenset(current)
    result = Applied(head, stored=stored, echo_origin=echo_origin)
    created, states, dirty = result.created, result.states, result.dirty
    last_rev, last_seq = result.last_rev, result.last_seq
    outcomes, conflicts = result.outcomes, result.conflicts
    is_dirty: set[Key] = set()
    new_rows = 0
    rev = head
    for spec, change in pairs:
        rev += 1
        table, pk = change.table, change.pk
        key = (table, pk)
        before = current.get(key)
        if before is None:
            fresh = created.get(table)
            if fresh is None:
                fresh = created[table] = {}
            earlier = fresh.pop(pk, None)
            if earlier is None and change.op is not Op.DELETE:
                # Nobody has written this row: its values are the change's over the defaults.
                values = apply_local(spec, None, change.op, change.fields)
                fresh[pk] = (values, rev, change.hlc, change.origin, change.seq)
                new_rows += 1
                continue
            if earlier is not None:  # written earlier in this run: merge as usual from here
                before = current[key] = new_row_state(pk, earlier)
                is_dirty.add(key)
                dirty.append(key)
        outcome = apply_change(spec, before, change, rev)
        state = outcome.state
        if state is not before:
            current[key] = state
            if key not in is_dirty:
                is_dirty.add(key)
                dirty.append(key)
        states[key] = state
        last_rev[key] = rev
        last_seq[key] = change.seq
        outcomes[outcome.kind.value] += 1
        if outcome.conflict is not None:
            conflicts.append(outcome.conflict)
    if new_rows:
        outcomes[OutcomeKind.APPLIED.value] += new_rows  # what apply_change says of each
    result.head = rev
    return result


def touch(key: Key, state: RowState, head: int) -> Applied:
    """A feed entry for a row without a change (so every edge re-reads the cloud's values)."""
    result = Applied(head + 1)
    result.states[key] = state
    result.last_rev[key] = head + 1
    return result


def feed_records(site_id: str, applied: Applied) -> Iterator[tuple[object, ...]]:
    """The run's feed rows (``FEED_COLUMNS``), made one by one as COPY sends them: each
    touched row's packed state at the rev of its last change."""
    echo = applied.echo_origin
    for table, rows in applied.created.items():
        for pk, row in rows.items():
            entry = pack_new_entry(table, pk, row)
            # a row the pushing node created: the entry echoes what that node holds already
            yield (site_id, row[1], table, pk, entry, echo, None if echo is None else row[4])
    states, stored, last_seq = applied.states, applied.stored, applied.last_seq
    for key, rev in applied.last_rev.items():
        table, pk = key
        entry = pack_entry(rev, table, states[key])
        if echo is None or key in stored:
            yield (site_id, rev, table, pk, entry, None, None)
        else:
            yield (site_id, rev, table, pk, entry, echo, last_seq[key])


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
    for table in [*new, *(t for t in applied.created if t not in new)]:
        # No other writer can add these rows: every writer holds the site's lock.
        await io[table].insert_new(conn, site_id, new.get(table, ()), applied.created.get(table))
    if applied.last_rev or applied.created:
        records = feed_records(site_id, applied)
        await conn.copy_records_to_table("feed", records=records, columns=FEED_COLUMNS)
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
