"""The edge's SQLite store: synced rows, the outbox of local changes, and sync cursors.

How it works. One writer connection takes every write under ``BEGIN IMMEDIATE``; a whole
transaction is one plain function (``Tx``), never a statement-by-statement conversation
between threads. (aiosqlite, which serves the reads, hands off once per statement; under
load each hand-off waits for the loop and the GIL, which made a five-statement write several
times slower at the tail.) Transactions queue in order; those that queued while the writer
was busy run as one group, each in its own savepoint, and share one ``COMMIT`` (group commit:
one fsync for many writes, and a failing one is undone alone; when SQLite itself undoes the
whole transaction, as on a full disk, the whole group fails and every caller gets a
``StorageError``). Where a group runs: a tablet's write is small (a few rows, a bounded
request), so its group's functions run right on the event loop, and only the ``COMMIT`` and
its fsync go to the writer's own thread (a one-worker executor, as datasette's write thread
is): run on that thread instead, every statement's release and retake of the GIL queued
behind the loop's HTTP work, which halved the writer's pace under load. A group with a heavy
job (a backlog's pulled page, a prune, an import), or one that finds the database locked by
another process (its ``BEGIN`` never waits on the loop), runs wholly on the writer thread.

How durable a commit is. A tablet's write, and everything the uplink must not forget (that
changes are about to be sent), commits at the store's ``synchronous`` level (FULL: fsynced
before the caller is answered). The uplink's other bookkeeping (recording the cloud's ack,
applying a pulled page that only confirms this node's changes) is something the edge can redo
from the cloud and that tablets never hear of, so a group made only of such transactions
commits at NORMAL: written to the WAL without an fsync, durable across a
crash of the process but not of the machine, until the next FULL commit, whose fsync covers
every frame before it. A power cut can therefore only lose a suffix of such bookkeeping
(SQLite's WAL keeps its prefix consistent): the edge then re-pushes changes the cloud
acknowledged, which it skips as duplicates, and re-pulls the page. That takes two of the
three fsyncs a live write costs off the writer, where a tablet's next write would wait
for them.

A second connection (aiosqlite) serves reads from WAL snapshots, so readers never see half a
transaction and never wait for a writer. A caller is answered only after the commit; a
cancelled caller cannot cut a transaction short (it runs to its end where it started),
and the in-memory copy of ``sync_state`` is replaced only after ``COMMIT``, so cursors move
only with what they describe. Local timestamps are taken inside the transaction that logs
them, so they rise with ``seq``.

A local write changes the row and appends a ``Change`` to ``outbox`` in the same
transaction; ``seq`` is ``last_seq + 1`` and is persisted with it (no gaps: a refused or
failed write rolls back whole). A pull page replaces each row with the cloud's state plus
this node's changes that state does not contain yet (``merge.rebase``). Which ones those
are:

* a change whose feed revision is known is contained in a state at revision ``r`` exactly
  when its revision is ``<= r``. Revisions come with the push answer (its ``segments``) and,
  so that an answer lost or still on the way leaves no doubt, with every pull page, which
  carries this node's segments for the revisions it covers;
* a change without a known revision is in none of the page's states (it was not sent, or
  its ingest committed after the page was read), so it is re-applied on top.

``reflected_through`` is the longest prefix of this node's changes that every state pulled
from now on contains (revision or ack mark at or below the pull cursor); those leave the
outbox, with ack marks no longer needed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

import aiosqlite
import msgpack

from sync_protocol.changes import Change, Op, RowState, Value, Values
from sync_protocol.checksum import Checksum, table_checksum
from sync_protocol.errors import ErrorCode, RemoteProtocolError
from sync_protocol.hlc import HybridClock
from sync_protocol.merge import rebase
from sync_protocol.schema import Registry
from sync_protocol.wire import PackedChange, PullPage, PushAck

from .errors import EDGE_ERRORS, EdgeError, EdgeErrorCode, StorageError
from .migrations import migrate
from .state import (
    OLDEST_UNSYNCED_SQL,
    STATE_KEYS,
    Cursors,
    State,
    StoreStatus,
    state_from,
    store_status,
)
from .state import status_from_file as status_from_file
from .tables import OUTBOX_COLUMNS, TableIO, change_from_row, prepare_write
from .tx import Event, Tx

T = TypeVar("T")

_EMPTY_MAP = b"\x80"  # msgpack {}
_JOINED_OUTBOX_COLUMNS = ", ".join(f"o.{c}" for c in OUTBOX_COLUMNS.split(", "))
Synchronous = Literal["OFF", "NORMAL", "FULL", "EXTRA"]
Write = tuple[str, str, Op | int, Values]

_CHUNK = 400  # (tbl, pk) pairs per IN (VALUES …) lookup
SCAN_PAGE = 5_000  #: rows read at a time by ``scan`` (a checksum, the audit chain's check)
#: the level of a commit the edge can redo from the cloud (levels below it stay as they are):
#: NORMAL in WAL mode keeps the file consistent and syncs at checkpoints, not per commit
_LAZY_LEVEL: dict[str, Synchronous] = {"FULL": "NORMAL", "EXTRA": "NORMAL"}

log = logging.getLogger(__name__)

#: SQLite's primary result codes that mean the file cannot take a write, and the edge error
#: each becomes (a caller sees a stable code, not an internal error)
_STORAGE_CODES = {
    sqlite3.SQLITE_FULL: EdgeErrorCode.STORAGE_FULL,
    sqlite3.SQLITE_BUSY: EdgeErrorCode.STORAGE_BUSY,
    sqlite3.SQLITE_LOCKED: EdgeErrorCode.STORAGE_BUSY,
    sqlite3.SQLITE_IOERR: EdgeErrorCode.STORAGE_FAILED,
    sqlite3.SQLITE_READONLY: EdgeErrorCode.STORAGE_FAILED,
    sqlite3.SQLITE_CORRUPT: EdgeErrorCode.STORAGE_FAILED,
    sqlite3.SQLITE_CANTOPEN: EdgeErrorCode.STORAGE_FAILED,
    sqlite3.SQLITE_NOTADB: EdgeErrorCode.STORAGE_FAILED,
}
_ALARM_EVERY_S = 60.0  # a storage failure is logged at most this often (it repeats per write)
_last_alarm = -_ALARM_EVERY_S


def storage_error(exc: BaseException) -> BaseException:
    """``exc`` as the ``StorageError`` its SQLite result code stands for (others as they are).

    The first of a run of them is logged as an error: a full disk stops every sale.
    """
    global _last_alarm
    code = getattr(exc, "sqlite_errorcode", None)
    edge_code = _STORAGE_CODES.get(code & 0xFF) if isinstance(code, int) else None
    if edge_code is None:
        return exc
    name = getattr(exc, "sqlite_errorname", "")
    now = time.monotonic()
    if now - _last_alarm >= _ALARM_EVERY_S:
        _last_alarm = now
        log.error("the edge cannot save a write: %s (%s)", exc, name)
    error = StorageError(edge_code, f"{EDGE_ERRORS[edge_code].meaning} ({exc})", sqlite=name)
    error.__cause__ = exc
    return error


def wall_clock_ms() -> int:
    """The machine's wall clock in ms since the epoch (the default ``now_ms``)."""
    return time.time_ns() // 1_000_000


class EdgeStore:
    """Synced rows, the outbox and sync cursors of one edge node, in one SQLite file."""

    def __init__(
        self,
        path: Path,
        registry: Registry,
        site_id: str,
        node_id: str,
        writer: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        reader: aiosqlite.Connection,
        state: State,
        clock: HybridClock,
        synchronous: Synchronous = "FULL",
    ) -> None:
        self.path = path
        self.registry = registry
        self.site_id = site_id
        self.node_id = node_id
        self.clock = clock
        #: transactions take local timestamps (on either thread), the loop merges remote ones
        self._clock_lock = threading.Lock()
        #: set after every committed local write (the uplink waits on it to push at once)
        self.changed = asyncio.Event()
        #: never used by two threads at once: the drainer runs one group at a time, its
        #: functions on the event loop or the executor's one thread, its commit on the latter
        self._writer = writer
        self._executor = executor
        self._reader = reader
        self._state = state
        #: the level durable commits use, and the one the writer connection is at now
        self._synchronous = synchronous
        self._synchronous_now = synchronous
        self._tables = {spec.name: TableIO(spec) for spec in registry}
        self._live: frozenset[str] = frozenset()
        self._subscribers: list[Callable[[list[Event]], None]] = []
        self._pending: list[_Job[Any]] = []
        self._drainer: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def open(
        cls,
        path: str | Path,
        registry: Registry,
        site_id: str,
        node_id: str,
        *,
        now_ms: Callable[[], int] = wall_clock_ms,
        synchronous: Synchronous = "FULL",
        live_tables: Iterable[str] = (),
        max_db_bytes: int | None = None,
    ) -> EdgeStore:
        """Migrate the file at ``path`` and open it for ``node_id`` of ``site_id``.

        ``max_db_bytes`` caps the database file: a write that would grow it past the cap is
        refused (``storage_full``) and nothing of it is kept, so the box's disk never fills.

        Every change to a row of ``live_tables`` (written here or pulled from the cloud)
        is also published as a ``row`` event (see ``subscribe``).
        """
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, not {synchronous}")
        if max_db_bytes is not None and max_db_bytes <= 0:
            raise ValueError("max_db_bytes must be positive (None: no cap)")
        path = Path(path)
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fynlo-edge-writer")

        def connect() -> tuple[sqlite3.Connection, State, int]:
            migrate(path, registry, site_id, node_id)
            conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            try:
                # busy_timeout 0: a BEGIN on the event loop must not wait (see _try_begin)
                for pragma in ("busy_timeout = 0", "journal_mode = WAL"):
                    conn.execute(f"PRAGMA {pragma}")
                conn.execute(f"PRAGMA synchronous = {synchronous}")
                if max_db_bytes is not None:
                    page = conn.execute("PRAGMA page_size").fetchone()[0]
                    conn.execute(f"PRAGMA max_page_count = {max(1, max_db_bytes // page)}")
                state = state_from(conn.execute("SELECT key, value FROM sync_state").fetchall())
                max_hlc = conn.execute("SELECT max(hlc) FROM outbox").fetchone()[0] or 0
            except BaseException:
                conn.close()
                raise
            return conn, state, max_hlc

        try:
            writer, state, max_hlc = await loop.run_in_executor(executor, connect)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        reader: aiosqlite.Connection | None = None
        try:
            reader = aiosqlite.connect(str(path), isolation_level=None)
            _daemon_thread(reader)
            await reader
            await reader.execute("PRAGMA busy_timeout = 5000")
            await reader.execute("PRAGMA query_only = ON")
        except BaseException:
            await loop.run_in_executor(executor, writer.close)
            executor.shutdown(wait=False)
            if reader is not None:
                await reader.close()
            raise
        clock = HybridClock(now_ms)
        clock.last = max(clock.last, max_hlc)
        store = cls(
            path, registry, site_id, node_id, writer, executor, reader, state, clock, synchronous
        )
        store._live = frozenset(live_tables) & set(store._tables)
        return store

    async def close(self) -> None:
        """Wait for the transaction in progress, then close both connections."""
        if self._closed:
            return
        self._closed = True  # no new transactions; the queued ones still run
        if self._drainer is not None:
            await asyncio.shield(self._drainer)
        await asyncio.get_running_loop().run_in_executor(self._executor, self._writer.close)
        self._executor.shutdown(wait=False)
        await self._reader.close()

    async def __aenter__(self) -> EdgeStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- transactions ----------------------------------------------------------------------

    async def _transact(
        self,
        body: Callable[[sqlite3.Connection, State], T],
        local: bool = False,
        heavy: bool = False,
        durable: bool = True,
    ) -> T:
        """Run ``body`` in a write transaction a cancelled caller cannot cut.

        Transactions queued while the writer is busy commit together (group commit): each
        runs in its own savepoint, so one that fails is undone alone and gets its error,
        and all of them share one ``COMMIT`` (one fsync). Every caller is answered only
        after that commit. ``heavy``: the body may run long, so its group runs on the writer
        thread, leaving the event loop free meanwhile. ``durable=False``: bookkeeping the edge
        can redo from the cloud; a group made only of such transactions commits without an
        fsync (see the module's docstring).
        """
        if self._closed:
            raise EdgeError(EdgeErrorCode.STORE_CLOSED, "the edge store is closed")
        job: _Job[T] = _Job(body, asyncio.get_running_loop().create_future(), local, heavy, durable)
        self._pending.append(job)
        if self._drainer is None:
            self._drainer = asyncio.ensure_future(self._drain())
        return await asyncio.shield(job.future)

    async def _drain(self) -> None:
        """Run queued transactions, in order, a group at a time, until none is left."""
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                jobs = self._pending[:_GROUP_MAX]
                del self._pending[:_GROUP_MAX]
                bodies = [job.body for job in jobs]
                durable = any(job.durable for job in jobs)
                try:
                    if any(job.heavy for job in jobs) or not self._try_begin(durable):
                        outcomes = await loop.run_in_executor(
                            self._executor, self._run_group, bodies, durable
                        )
                    else:  # begun on the loop: run the group here, commit on the thread
                        outcomes, state = self._run_bodies(bodies)
                        await loop.run_in_executor(self._executor, self._commit, state)
                except BaseException as exc:  # the commit failed: none of the group happened
                    for job in jobs:
                        _settle(job.future, exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                wrote = False
                events: list[Event] = []
                for job, outcome in zip(jobs, outcomes, strict=True):
                    if isinstance(outcome, _TxDone):
                        events += outcome.events
                        wrote = wrote or outcome.wrote
                        outcome = outcome.value
                    _settle(job.future, outcome)
                    wrote = wrote or (job.local and not isinstance(outcome, _Failed))
                if wrote:  # even if the caller was cancelled meanwhile, the uplink must know
                    self.changed.set()
                if events:
                    self._publish(events)
        finally:
            self._drainer = None

    def _try_begin(self, durable: bool) -> bool:
        """On the event loop: ``BEGIN IMMEDIATE`` unless another connection holds the write
        lock (then False, at once: the group waits for it on the writer thread)."""
        conn = self._writer
        if conn.in_transaction:  # never expected; refuse to build on a stray transaction
            conn.execute("ROLLBACK")
        self._set_synchronous(durable)
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:  # or an extended BUSY_*
                return False
            raise
        return True

    def _run_group(
        self, bodies: list[Callable[[sqlite3.Connection, State], Any]], durable: bool
    ) -> list[Any]:
        """On the writer thread: begin (waiting for a lock another process holds, as long as
        ``_BUSY_WAIT_MS``), run each body in its own savepoint, then commit them all."""
        conn = self._writer
        if conn.in_transaction:  # never expected; refuse to build on a stray transaction
            conn.execute("ROLLBACK")
        self._set_synchronous(durable)
        conn.execute(f"PRAGMA busy_timeout = {_BUSY_WAIT_MS}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        finally:
            conn.execute("PRAGMA busy_timeout = 0")
        outcomes, state = self._run_bodies(bodies)
        self._commit(state)
        return outcomes

    def _set_synchronous(self, durable: bool) -> None:
        """Before ``BEGIN`` (SQLite refuses the change inside a transaction): the level the
        group commits at, the store's own if ``durable``, else at most NORMAL."""
        level = self._synchronous if durable else _LAZY_LEVEL.get(self._synchronous)
        if level is not None and level != self._synchronous_now:
            self._writer.execute(f"PRAGMA synchronous = {level}")
            self._synchronous_now = level

    def _run_bodies(
        self, bodies: list[Callable[[sqlite3.Connection, State], Any]]
    ) -> tuple[list[Any], State]:
        """In the transaction just begun: each body in its own savepoint; the outcomes and
        the state to commit. If SQLite undoes the whole transaction, rolls back and raises."""
        conn = self._writer
        state = self._state
        outcomes: list[Any] = []
        try:
            for body in bodies:
                staged = replace(state)
                conn.execute("SAVEPOINT job")
                try:
                    result = body(conn, staged)
                    _save_state(conn, state, staged)
                except Exception as exc:  # this job's error goes back to its caller
                    if not conn.in_transaction:
                        # SQLite rolled the whole transaction back itself (a full disk, an
                        # I/O error): the group's earlier jobs are undone too, so every job
                        # of the group gets this error.
                        raise
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append(_Failed(exc))
                    continue
                conn.execute("RELEASE job")
                state = staged
                outcomes.append(result)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return outcomes, state

    def _commit(self, state: State) -> None:
        """On the writer thread: commit the group (nothing to commit: roll back), then
        make ``state`` the store's."""
        conn = self._writer
        try:
            conn.execute("COMMIT" if state is not self._state else "ROLLBACK")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self._state = state

    def observe(self, remote_hlc: int) -> None:
        """Merge a peer's HLC timestamp into this node's clock."""
        if remote_hlc:
            with self._clock_lock:
                self.clock.observe(remote_hlc)

    # -- local writes ----------------------------------------------------------------------

    async def write(self, table: str, pk: str, op: Op | int, fields: Values) -> Change:
        """Write one row and log the change, in one transaction; returns the change."""
        return (await self.write_many([(table, pk, op, fields)]))[0]

    async def write_many(self, writes: Sequence[Write]) -> list[Change]:
        """Write several rows atomically (all or nothing); returns their changes in order.

        More than ``_HEAVY_WRITES`` rows (an import, a seed) run on the writer thread.
        """
        for table, pk, op, fields in writes:  # refuse a malformed write before queueing
            prepare_write(self._io(table), pk, op, fields)
        if not writes:
            return []
        return await self.transaction(
            lambda tx: [tx.write(table, pk, op, fields) for table, pk, op, fields in writes],
            heavy=len(writes) > _HEAVY_WRITES,
        )

    async def transaction(self, fn: Callable[[Tx], T], *, heavy: bool = False) -> T:
        """Run ``fn`` in one write transaction; returns what it returns.

        ``fn`` is plain (not async) domain code: see ``edge.tx``. If it raises, nothing it
        did is kept and the error reaches the caller. It runs on the event loop unless it
        is ``heavy`` (long: thousands of rows): pass that, and it runs on the writer thread.
        """

        def body(conn: sqlite3.Connection, st: State) -> _TxDone[T]:
            tx = Tx(conn, st, self.node_id, self._tables, self.clock, self._clock_lock)
            value = fn(tx)
            if self._live:
                touched = dict.fromkeys((c.table, c.pk) for c in tx.changes)
                for table, pk in touched:
                    if table in self._live:
                        tx.emit("row", _row_event(table, pk, tx.get(table, pk)))
            return _TxDone(value, tx.events, bool(tx.changes))

        return await self._transact(body, heavy=heavy)  # type: ignore[arg-type]

    # -- live events -----------------------------------------------------------------------

    def subscribe(self, callback: Callable[[list[Event]], None]) -> Callable[[], None]:
        """Call ``callback`` (on the event loop) with each group of newly committed events.

        Returns the function that unsubscribes. Events come in ``seq`` order; a callback
        must not block (hand the events on to a queue).
        """
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def _publish(self, events: list[Event]) -> None:
        events.sort(key=lambda e: e.seq)
        for callback in list(self._subscribers):
            callback(events)

    async def query(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read on the edge's own tables (committed state; never blocks writes)."""
        return list(await self._reader.execute_fetchall(sql, params))

    async def events_after(self, seq: int, limit: int = 1000) -> list[Event]:
        """Committed events after ``seq`` (oldest first), for a subscriber catching up."""
        rows = await self._reader.execute_fetchall(
            "SELECT seq, topic, data, at_ms FROM events WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [Event(*row) for row in rows]

    async def event_bounds(self) -> tuple[int, int]:
        """The lowest and highest event seq kept ((0, 0) when none; older ones were pruned)."""
        rows = list(await self._reader.execute_fetchall("SELECT min(seq), max(seq) FROM events"))
        low, high = rows[0] if rows else (None, None)
        return int(low or 0), int(high or 0)

    # -- reads -----------------------------------------------------------------------------

    def _io(self, table: str) -> TableIO:
        io = self._tables.get(table)
        if io is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TABLE, f"table {table!r} is not synced")
        return io

    async def get(self, table: str, pk: str) -> dict[str, Value] | None:
        """A row's values (committed), or None."""
        io = self._io(table)
        rows = list(await self._reader.execute_fetchall(io.select_one, (pk,)))
        return io.values(rows[0]) if rows else None

    async def rows(self, table: str) -> dict[str, dict[str, Value]]:
        """Every row of a table, by primary key."""
        io = self._io(table)
        return {
            row[0]: io.values(row) for row in await self._reader.execute_fetchall(io.select_all)
        }

    async def checksum(self, table: str) -> Checksum:
        """The table's additive checksum, comparable with the cloud's (see ``scan``)."""
        io = self._io(table)

        def summed(rows: Iterator[Any]) -> Checksum:
            return table_checksum(((row[0], io.values(row)) for row in rows), io.names)

        return await self.scan(io.select_all, (), summed)

    async def scan(
        self, sql: str, params: Sequence[Any], consume: Callable[[Iterator[Any]], T]
    ) -> T:
        """``consume(rows)`` for a read of any length (a checksum, the audit chain's check):
        in a thread, on a connection opened for it, ``SCAN_PAGE`` rows at a time from one
        snapshot, so the table never sits in memory whole and the event loop serves tablets
        meanwhile. (Not on the shared reader: a statement open on it between pages would
        hold its snapshot, and the uplink and the live hub, reading beside it, would not see
        new writes until the scan was done.)"""

        def run() -> T:
            conn = sqlite3.connect(str(self.path))
            try:
                conn.execute("PRAGMA query_only = ON")
                conn.execute("PRAGMA busy_timeout = 5000")
                cursor = conn.execute(sql, params)

                def rows() -> Iterator[Any]:
                    while page := cursor.fetchmany(SCAN_PAGE):
                        yield from page

                return consume(rows())
            finally:
                conn.close()

        return await asyncio.to_thread(run)

    async def outbox_after(self, seq: int, limit: int) -> list[Change]:
        """Up to ``limit`` logged changes with a sequence number above ``seq``, in order."""
        rows = await self._reader.execute_fetchall(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [change_from_row(self.node_id, row) for row in rows]

    async def outbox_rows_after(self, seq: int, limit: int) -> list[PackedChange]:
        """``outbox_after`` as stored (column maps still packed): what a push sends as is."""
        rows = await self._reader.execute_fetchall(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )
        return [
            (s, t, p, o, f if f is not None else _EMPTY_MAP, b, h, old)
            for s, t, p, o, f, b, h, old in rows
        ]

    def cursors(self) -> Cursors:
        """The committed cursors."""
        s = self._state
        return Cursors(
            s.last_seq,
            s.sent_through,
            s.acked_through,
            s.pull_cursor,
            s.reflected_through,
            s.cloud_head,
        )

    async def status(self, now_ms: int | None = None) -> StoreStatus:
        """Outbox depth and age, cursors, conflicts and last successes."""
        state = self._state
        rows = list(
            await self._reader.execute_fetchall(OLDEST_UNSYNCED_SQL, (state.acked_through + 1,))
        )
        now = self.clock.now_ms() if now_ms is None else now_ms
        return store_status(state, rows[0][0] if rows else None, now)

    # -- push bookkeeping ------------------------------------------------------------------

    async def mark_sent(self, through: int) -> None:
        """Record that changes up to ``through`` are about to be sent (the cloud may apply them)."""

        def body(conn: sqlite3.Connection, st: State) -> None:
            st.sent_through = max(st.sent_through, min(through, st.last_seq))

        if through > self._state.sent_through:
            await self._transact(body)

    async def mark_unsent(self) -> None:
        """The last push was refused whole: nothing past the acknowledged watermark is applied."""

        def body(conn: sqlite3.Connection, st: State) -> None:
            st.sent_through = st.acked_through

        if self._state.sent_through != self._state.acked_through:
            await self._transact(body)

    async def record_ack(self, ack: PushAck) -> None:
        """Record the cloud's answer to a push: the watermark and an ack mark."""

        def body(conn: sqlite3.Connection, st: State) -> None:
            self._check_not_ahead(st, ack.acked_through)
            st.acked_through = max(st.acked_through, ack.acked_through)
            st.sent_through = max(st.sent_through, st.acked_through)
            st.last_push_ok_ms = self.clock.now_ms()
            if ack.acked_through > 0:
                conn.execute(
                    "INSERT INTO ack_marks (seq_through, head) VALUES (?, ?) "
                    "ON CONFLICT(seq_through) DO UPDATE SET head = min(head, excluded.head)",
                    (ack.acked_through, ack.head),
                )
            _record_revs(conn, ack.segments, ack.acked_through)
            _reflect(conn, st)

        # Not fsynced on its own: lost to a power cut, the ack is asked for again (the cloud
        # skips the changes it holds); ``mark_sent``, which must survive one, is durable.
        await self._transact(body, durable=False)

    async def record_watermark(self, acked_through: int) -> None:
        """The cloud already holds changes up to ``acked_through`` (learnt without a head)."""

        def body(conn: sqlite3.Connection, st: State) -> None:
            self._check_not_ahead(st, acked_through)
            st.acked_through = max(st.acked_through, acked_through)
            st.sent_through = max(st.sent_through, st.acked_through)

        await self._transact(body)

    async def rewind_acked(self, acked_through: int) -> None:
        """The cloud holds less than it acknowledged: resend from ``acked_through + 1``."""

        def body(conn: sqlite3.Connection, st: State) -> None:
            if acked_through < st.reflected_through:
                raise EdgeError(
                    EdgeErrorCode.CHANGES_LOST,
                    f"the cloud wants seq {acked_through + 1} but this edge kept only "
                    f"changes after {st.reflected_through}",
                    expected=acked_through + 1,
                    oldest_kept=st.reflected_through + 1,
                )
            st.acked_through = min(st.acked_through, acked_through)
            st.sent_through = min(st.sent_through, acked_through)
            conn.execute("DELETE FROM ack_marks WHERE seq_through > ?", (acked_through,))

        await self._transact(body)

    def _check_not_ahead(self, st: State, acked_through: int) -> None:
        if acked_through > st.last_seq:
            raise EdgeError(
                EdgeErrorCode.CLOUD_AHEAD,
                f"the cloud acknowledges seq {acked_through} but this node wrote only "
                f"{st.last_seq}",
                acked_through=acked_through,
                last_seq=st.last_seq,
            )

    # -- pull ------------------------------------------------------------------------------

    async def apply_page(self, page: PullPage) -> int:
        """Apply a feed page and move the pull cursor, in one transaction; returns rows written."""
        latest: dict[tuple[str, str], tuple[TableIO, int, RowState]] = {}
        for entry in page.entries:  # refuse the whole page before touching anything
            io = self._io(entry.table)
            latest[(entry.table, entry.state.pk)] = (io, entry.rev, io.check_state(entry.state))
        if page.next < page.cursor:
            raise RemoteProtocolError(ErrorCode.INVALID_CURSOR, "the page goes backwards")

        def body(conn: sqlite3.Connection, st: State) -> _TxDone[int]:
            if page.cursor != st.pull_cursor:
                raise RemoteProtocolError(
                    ErrorCode.INVALID_CURSOR,
                    f"page starts at {page.cursor} but this edge is at {st.pull_cursor}",
                )
            _record_revs(conn, page.segments, st.last_seq)
            logged = self._logged(conn, list(latest), st)
            upserts: dict[TableIO, list[tuple[Value, ...]]] = defaultdict(list)
            deletes: dict[TableIO, list[tuple[str]]] = defaultdict(list)
            for key, (io, rev, state) in latest.items():
                pending = [
                    change
                    for change, change_rev in logged.get(key, ())
                    if change_rev is None or change_rev > rev
                ]
                predicted = rebase(io.spec, state, pending)
                if predicted.deleted:
                    deletes[io].append((state.pk,))
                else:
                    upserts[io].append(io.params(state.pk, predicted.values))
            for io, keys in deletes.items():
                conn.executemany(io.delete, keys)
            for io, rows in upserts.items():
                conn.executemany(io.upsert, rows)
            events = _emit_rows(conn, self._live, upserts, deletes, self.clock.now_ms())
            st.pull_cursor = page.next
            st.cloud_head = max(page.head, page.next)
            st.cloud_conflicts = page.conflicts
            st.last_pull_ok_ms = self.clock.now_ms()
            _reflect(conn, st)
            return _TxDone(len(latest), events, False)

        # A page that only confirms this node's last few writes (what a live edge mostly
        # pulls: the feed skips its own rows) is bookkeeping as quick as a tablet's write, and
        # runs with them; a page with rows to write, or a backlog's thousands of changes to
        # revise and prune, runs on the writer thread.
        covered = sum(last - first + 1 for first, last, _ in page.segments)
        heavy = bool(latest) or covered > _HEAVY_WRITES
        # A page that only confirms is not fsynced on its own: lost to a power cut, it is
        # pulled again. One with rows is: tablets are told of them at once, and must never
        # have been sent an event (and its seq) that a power cut could take back.
        durable = bool(latest)
        return await self._transact(body, heavy=heavy, durable=durable)  # type: ignore[arg-type]

    def _logged(
        self, conn: sqlite3.Connection, keys: list[tuple[str, str]], st: State
    ) -> dict[tuple[str, str], list[tuple[Change, int | None]]]:
        """This node's unreflected changes to the given rows with their revisions, in order."""
        out: dict[tuple[str, str], list[tuple[Change, int | None]]] = defaultdict(list)
        above = st.reflected_through
        if st.last_seq <= above or not keys:
            return out
        for start in range(0, len(keys), _CHUNK):
            chunk = keys[start : start + _CHUNK]
            pairs = ", ".join("(?, ?)" for _ in chunk)
            params: list[Any] = [above]
            for table, pk in chunk:
                params += [table, pk]
            # A join from the keys, so SQLite walks the (tbl, pk, seq) index per key instead
            # of scanning the outbox (an IN over row values does not use the index).
            rows = conn.execute(
                f"WITH k(tbl, pk) AS (VALUES {pairs}) "
                f"SELECT {_JOINED_OUTBOX_COLUMNS}, o.rev "
                "FROM k JOIN outbox o ON o.tbl = k.tbl AND o.pk = k.pk AND o.seq > ? "
                "ORDER BY o.seq",
                [*params[1:], above],
            ).fetchall()
            for row in rows:
                change = change_from_row(self.node_id, row[:-1])
                out[(change.table, change.pk)].append((change, row[-1]))
        return out

    # -- conflicts mirror ------------------------------------------------------------------

    async def replace_conflicts(self, conflicts: Sequence[Mapping[str, Any]]) -> None:
        """Replace the local mirror of the site's open conflicts (as the cloud lists them)."""

        def body(conn: sqlite3.Connection, st: State) -> None:
            conn.execute("DELETE FROM conflicts")
            rows = [
                (
                    _conflict_id(c),
                    str(c.get("table", "")),
                    str(c.get("pk", "")),
                    msgpack.packb(dict(c), use_bin_type=True),
                )
                for c in conflicts
            ]
            conn.executemany(
                "INSERT OR REPLACE INTO conflicts (id, tbl, pk, body) VALUES (?, ?, ?, ?)", rows
            )
            st.cloud_conflicts = len(rows)

        await self._transact(body)

    async def conflicts(self) -> list[dict[str, Any]]:
        """The mirrored open conflicts of this site, as the cloud described them."""
        rows = await self._reader.execute_fetchall("SELECT body FROM conflicts ORDER BY id")
        return [msgpack.unpackb(row[0], raw=False) for row in rows]


def _daemon_thread(reader: aiosqlite.Connection) -> None:
    """Make the read connection's thread a daemon before it starts.

    The interpreter waits for every other thread before it exits, and aiosqlite's ends only
    when the connection is closed: a process leaving with a store it never closed (an error
    that skipped the cleanup, a second Ctrl-C during it) would hang instead of exiting, and
    its supervisor would never restart it. The thread only reads; nothing is lost by not
    waiting for it. (The writer's executor thread is stopped at exit by ``concurrent.futures``.)
    """
    thread = reader if isinstance(reader, threading.Thread) else getattr(reader, "_thread", None)
    if isinstance(thread, threading.Thread) and thread.ident is None:  # not started yet
        thread.daemon = True


_GROUP_MAX = 256  # transactions committed together at most
_HEAVY_WRITES = 100  # write_many with more rows (or a page confirming more) runs on the thread
_BUSY_WAIT_MS = 5000  # how long a write waits for a lock another process holds


@dataclass(slots=True)
class _Job(Generic[T]):
    """A transaction waiting for the writer."""

    body: Callable[[sqlite3.Connection, State], T]
    future: asyncio.Future[T]
    local: bool  # a local write: the uplink is told after it commits
    heavy: bool  # may run long: its group runs on the writer thread
    durable: bool  # False: bookkeeping the edge can redo, committed without an fsync


@dataclass(frozen=True, slots=True)
class _TxDone(Generic[T]):
    """What a transaction returns and the events it emitted (published after the commit)."""

    value: T
    events: list[Event]
    wrote: bool  # it logged local changes: the uplink is told


@dataclass(frozen=True, slots=True)
class _Failed:
    """A job's error, carried back to its caller."""

    error: BaseException


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # never expected: each job is settled once
        return
    if isinstance(outcome, _Failed):
        future.set_exception(storage_error(outcome.error))
    elif isinstance(outcome, BaseException):
        future.set_exception(storage_error(outcome))
    else:
        future.set_result(outcome)


# -- inside transactions --------------------------------------------------------------------


def _row_event(table: str, pk: str, values: Mapping[str, Value] | None) -> dict[str, Any]:
    """A ``row`` event's data: the row as it now is (``row`` None when it was deleted)."""
    return {"table": table, "id": pk, "row": None if values is None else dict(values)}


def _emit_rows(
    conn: sqlite3.Connection,
    live: frozenset[str],
    upserts: Mapping[TableIO, list[tuple[Value, ...]]],
    deletes: Mapping[TableIO, list[tuple[str]]],
    now_ms: int,
) -> list[Event]:
    """Log a ``row`` event for each pulled row of a live table; returns them."""
    data = [
        _row_event(io.spec.name, str(p[0]), dict(zip(io.names, p[1:], strict=True)))
        for io, rows in upserts.items()
        if io.spec.name in live
        for p in rows
    ]
    data += [
        _row_event(io.spec.name, key[0], None)
        for io, keys in deletes.items()
        if io.spec.name in live
        for key in keys
    ]
    out = []
    for item in data:
        text = json.dumps(item, separators=(",", ":"), ensure_ascii=False)
        cur = conn.execute(
            "INSERT INTO events (topic, data, at_ms) VALUES ('row', ?, ?)", (text, now_ms)
        )
        out.append(Event(int(cur.lastrowid or 0), "row", text, now_ms))
    return out


def _save_state(conn: sqlite3.Connection, before: State, after: State) -> int:
    """Write the keys ``after`` changed from ``before``; returns how many."""
    changed = [
        (v, k)
        for k in STATE_KEYS
        if (v := getattr(after, k)) != getattr(before, k) and k != "last_seq"  # by a trigger
    ]
    if changed:
        conn.executemany("UPDATE sync_state SET value = ? WHERE key = ?", changed)
    return len(changed)


def _load_row(conn: sqlite3.Connection, io: TableIO, pk: str) -> dict[str, Value] | None:
    row = conn.execute(io.select_one, (pk,)).fetchone()
    return io.values(row) if row is not None else None


def _scalar(conn: sqlite3.Connection, sql: str, params: Sequence[Any]) -> Any:
    row = conn.execute(sql, params).fetchone()
    return row[0] if row is not None else None


def _record_revs(
    conn: sqlite3.Connection, segments: Sequence[tuple[int, int, int]], upto: int
) -> None:
    """Store the feed revision of each of this node's changes the segments cover."""
    rows = [
        (first_rev, first_seq, first_seq, min(last_seq, upto))
        for first_seq, last_seq, first_rev in segments
        if first_seq <= min(last_seq, upto)
    ]
    if rows:
        conn.executemany("UPDATE outbox SET rev = ? + seq - ? WHERE seq BETWEEN ? AND ?", rows)


def _reflect(conn: sqlite3.Connection, st: State) -> None:
    """Advance ``reflected_through`` (revisions and marks at or below the cursor); prune."""
    by_mark = _scalar(
        conn, "SELECT max(seq_through) FROM ack_marks WHERE head <= ?", (st.pull_cursor,)
    )
    first_out = _scalar(
        conn,
        "SELECT min(seq) FROM outbox WHERE seq > ? AND (rev IS NULL OR rev > ?)",
        (st.reflected_through, st.pull_cursor),
    )
    if first_out is not None:
        by_rev = first_out - 1
    else:  # every logged change after reflected_through is at or below the cursor
        by_rev = _scalar(conn, "SELECT max(seq) FROM outbox WHERE seq > ?", (st.reflected_through,))
    reflected = min(max(by_mark or 0, by_rev or 0), st.acked_through)
    if reflected <= st.reflected_through:
        return
    st.reflected_through = reflected
    conn.execute("DELETE FROM outbox WHERE seq <= ?", (reflected,))
    conn.execute("DELETE FROM ack_marks WHERE seq_through < ?", (reflected,))


def _conflict_id(conflict: Mapping[str, Any]) -> str:
    if conflict.get("id") is not None:
        return str(conflict["id"])
    parts = ("change_origin", "change_seq", "table", "pk")
    return "/".join(str(conflict.get(p, "")) for p in parts)
