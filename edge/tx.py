"""One edge store transaction as domain code sees it (run by the store's single writer).

A domain operation (open an order, add a line, 86 an item) is a plain function of a ``Tx``,
handed to ``EdgeStore.transaction``; everything it does commits together or not at all:

* ``get`` reads a synced row as this transaction sees it (its own writes included);
* ``write`` changes a synced row and logs the change in the outbox (so it syncs), exactly
  as ``EdgeStore.write`` does;
* ``query`` / ``one`` / ``execute`` run SQL on the edge's own tables (devices, sessions,
  idempotency keys, ...), which never sync;
* ``emit`` appends a live event (topic, JSON data) to the ``events`` table; events are
  published to subscribers only once the transaction has committed, in ``seq`` order, and
  a subscriber that missed some reads them back from the table.

A ``Tx`` must not be kept or used after its function returns.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from sync_protocol.changes import Change, Op, Value, Values
from sync_protocol.errors import ErrorCode, RemoteProtocolError
from sync_protocol.hlc import HybridClock
from sync_protocol.merge import apply_local, validate_change
from sync_protocol.schema import Author

from .state import State
from .tables import OUTBOX_COLUMNS, TableIO, pack, prepare_write

_encode = msgspec.json.encode

_LOG_CHANGE = (
    f"INSERT INTO outbox ({OUTBOX_COLUMNS}, written_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class Event:
    """A committed live event: ``data`` is its JSON text, encoded once for every subscriber."""

    seq: int
    topic: str
    data: str
    at_ms: int


class Tx:
    """Reads and writes inside one store transaction."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        state: State,
        node_id: str,
        tables: Mapping[str, TableIO],
        clock: HybridClock,
        clock_lock: threading.Lock,
    ) -> None:
        self._conn = conn
        self._state = state
        self._node_id = node_id
        self._tables = tables
        self._clock = clock
        self._clock_lock = clock_lock
        self._now_ms = clock.now_ms()
        self._seen: dict[tuple[str, str], dict[str, Value] | None] = {}
        self.changes: list[Change] = []
        self.events: list[Event] = []

    @property
    def node_id(self) -> str:
        """This edge's node id."""
        return self._node_id

    @property
    def now_ms(self) -> int:
        """The wall clock when the transaction started (one reading for all it writes)."""
        return self._now_ms

    def io(self, table: str) -> TableIO:
        """The storage of a synced table, or UNKNOWN_TABLE."""
        io = self._tables.get(table)
        if io is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TABLE, f"table {table!r} is not synced")
        return io

    # -- synced rows -----------------------------------------------------------------------

    def get(self, table: str, pk: str) -> dict[str, Value] | None:
        """A synced row as this transaction sees it, or None."""
        key = (table, pk)
        if key in self._seen:
            found = self._seen[key]
            return dict(found) if found is not None else None
        io = self.io(table)
        row = self._conn.execute(io.select_one, (pk,)).fetchone()
        values = io.values(row) if row is not None else None
        self._seen[key] = values
        return dict(values) if values is not None else None

    def write(
        self, table: str, pk: str, op: Op | int, fields: Values, *, new: bool = False
    ) -> Change:
        """Change a synced row and log the change, in this transaction; returns the change.

        ``new``: an insert under an id the caller has just made (random, or the next of a
        sequence), so no row can have it: the row is not read first, and should one exist
        after all the insert fails (``sqlite3.IntegrityError``) instead of merging into it.
        """
        io, pk, op, changed = prepare_write(self.io(table), pk, op, fields)
        if new and op is not Op.INSERT:
            raise ValueError("only an insert writes a new row")
        with self._clock_lock:
            hlc = self._clock.now()
        current = None if new else self.get(table, pk)
        old: dict[str, Value] | None = None
        if current is not None and op is Op.UPDATE:
            old = {name: current.get(name) for name in changed}
        elif current is not None and op is Op.DELETE:
            old = current
        st = self._state
        change = Change(
            self._node_id, st.last_seq + 1, table, pk, op, changed, st.pull_cursor, hlc, old
        )
        validate_change(io.spec, change, Author.EDGE)
        conn = self._conn
        if op is Op.DELETE:
            conn.execute(io.delete, (pk,))
            self._seen[(table, pk)] = None
        else:
            values = apply_local(io.spec, current, op, changed)
            conn.execute(io.insert if new else io.upsert, io.params(pk, values))
            self._seen[(table, pk)] = values
        conn.execute(
            _LOG_CHANGE,
            (
                change.seq,
                table,
                pk,
                int(op),
                pack(changed),
                change.base,
                hlc,
                pack(old),
                self._now_ms,
            ),
        )
        st.last_seq = change.seq
        self.changes.append(change)
        return change

    # -- the edge's own tables -------------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[Any]:
        """Rows of a statement on the edge's own tables."""
        return self._conn.execute(sql, params).fetchall()

    def one(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> Any:
        """The first row of a statement, or None."""
        return self._conn.execute(sql, params).fetchone()

    def execute(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        """Run a statement on the edge's own tables; returns the rows it changed."""
        return self._conn.execute(sql, params).rowcount

    # -- live events -----------------------------------------------------------------------

    def emit(self, topic: str, data: Mapping[str, Any]) -> None:
        """Publish ``data`` on ``topic`` once this transaction commits."""
        text = _encode(data).decode()
        cur = self._conn.execute(
            "INSERT INTO events (topic, data, at_ms) VALUES (?, ?, ?)",
            (topic, text, self._now_ms),
        )
        seq = cur.lastrowid
        assert seq is not None
        self.events.append(Event(seq, topic, text, self._now_ms))
