"""The edge database's schema: numbered migrations, then the registry's tables.

``migrate`` is synchronous (run it with ``asyncio.to_thread`` before opening the async
connections). It works in three steps, each one transaction:

1. numbered migrations in ``MIGRATIONS`` that are not yet in ``schema_migrations`` run in
   order, each in its own transaction together with its ``schema_migrations`` row;
2. the registry step creates every synced table that is missing and adds every missing
   column (sqlite-utils), so adding a table or a column to ``shared.registry`` needs no
   hand-written migration. It never drops or retypes anything;
3. the node's identity (site and node id) is written on first open and checked on every
   later one: a file that belongs to another node is refused, because reusing its sequence
   numbers would make the cloud drop this node's changes as duplicates.

Synced tables hold business columns only: ``<name>(id TEXT PRIMARY KEY, <columns>)``, with
booleans stored as 0/1. ``outbox`` holds this node's changes until every state pulled from
then on contains them; ``outbox.rev`` is the feed revision at which the cloud applied one
(from the ack's ``segments``), NULL until known; ``outbox.written_ms`` is this node's wall
clock when it logged the change (for the status's oldest-unsynced age). ``ack_marks`` keeps
``(seq_through, head)`` of each ack; ``conflicts`` mirrors the cloud's open parked conflicts
of the site. ``events`` holds the live events published to tablets and screens
(``edge.tx``), each with its ``seq``, topic, JSON data and wall time.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sqlite_utils

from sync_protocol.schema import ColumnType, Registry

from .errors import EdgeError, EdgeErrorCode

#: the Python type sqlite-utils maps to each column type's SQLite affinity
SQL_TYPES: dict[ColumnType, type] = {
    ColumnType.TEXT: str,
    ColumnType.INT: int,
    ColumnType.BOOL: int,
    ColumnType.BYTES: bytes,
}

#: sync_state keys holding integers, with their initial values
STATE_DEFAULTS: dict[str, int] = {
    "last_seq": 0,  #: the highest seq this node has issued (no gaps below it)
    "sent_through": 0,  #: the highest seq ever sent to the cloud (maybe unacknowledged)
    "acked_through": 0,  #: the cloud's dedupe watermark for this node, as last acknowledged
    "pull_cursor": 0,  #: the cloud feed revision this edge has applied everything up to
    "reflected_through": 0,  #: seqs certainly contained in every row state pulled from now on
    "cloud_head": 0,  #: the cloud feed head seen on the last pull page
    "cloud_conflicts": 0,  #: open parked conflicts of the site, per the last pull page
    "last_push_ok_ms": 0,  #: wall time of the last acknowledged push (0: never)
    "last_pull_ok_ms": 0,  #: wall time of the last applied pull page (0: never)
}

#: names the edge uses for its own tables; a synced table may not take them
RESERVED = frozenset(
    {
        "schema_migrations",
        "sync_state",
        "outbox",
        "ack_marks",
        "conflicts",
        "events",
        "devices",
        "pairing_codes",
        "sessions",
        "approvals",
        "pin_failures",
        "idempotency",
        "check_numbers",
    }
)


@dataclass(frozen=True, slots=True)
class Migration:
    """One numbered schema step."""

    version: int
    name: str
    apply: Callable[[sqlite3.Connection], None]


def _core_tables(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE sync_state (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    conn.execute(
        """CREATE TABLE outbox (
            seq INTEGER PRIMARY KEY,
            tbl TEXT NOT NULL,
            pk TEXT NOT NULL,
            op INTEGER NOT NULL,
            fields BLOB NOT NULL,
            base INTEGER NOT NULL,
            hlc INTEGER NOT NULL,
            old BLOB,
            rev INTEGER
        )"""
    )
    conn.execute("CREATE INDEX outbox_row ON outbox (tbl, pk, seq)")
    # last_seq moves with every logged change, inside the statement that logs it.
    conn.execute(
        """CREATE TRIGGER outbox_last_seq AFTER INSERT ON outbox BEGIN
            UPDATE sync_state SET value = NEW.seq WHERE key = 'last_seq' AND value < NEW.seq;
        END"""
    )
    conn.execute("CREATE TABLE ack_marks (seq_through INTEGER PRIMARY KEY, head INTEGER NOT NULL)")
    conn.execute(
        """CREATE TABLE conflicts (
            id TEXT PRIMARY KEY,
            tbl TEXT NOT NULL,
            pk TEXT NOT NULL,
            body BLOB NOT NULL
        )"""
    )
    conn.executemany(
        "INSERT INTO sync_state (key, value) VALUES (?, ?)", sorted(STATE_DEFAULTS.items())
    )


def _outbox_written_ms(conn: sqlite3.Connection) -> None:
    # The HLC's wall part is no clock reading: after observing the cloud, a slow clock's
    # timestamps stay at the cloud's time, so the age of unsynced changes needs its own.
    conn.execute("ALTER TABLE outbox ADD COLUMN written_ms INTEGER")


def _events(conn: sqlite3.Connection) -> None:
    # Live events for tablets and kitchen screens, numbered in commit order; a client that
    # reconnects asks for those after the last seq it saw. AUTOINCREMENT: a seq is never
    # reused, even after the newest events are pruned.
    conn.execute(
        """CREATE TABLE events (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            topic TEXT NOT NULL,
            data TEXT NOT NULL,
            at_ms INTEGER NOT NULL
        )"""
    )


def _api(conn: sqlite3.Connection) -> None:
    # Credentials are stored as SHA-256 hex of the token (edge.api.auth), never the token.
    conn.execute(
        """CREATE TABLE devices (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            kind TEXT NOT NULL,
            token_hash TEXT NOT NULL UNIQUE,
            paired_at_ms INTEGER NOT NULL,
            paired_by TEXT,
            revoked_at_ms INTEGER
        )"""
    )
    conn.execute(
        """CREATE TABLE pairing_codes (
            code_hash TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            created_by TEXT,
            expires_ms INTEGER NOT NULL,
            used_at_ms INTEGER
        )"""
    )
    conn.execute(
        """CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            employee_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            access_hash TEXT NOT NULL UNIQUE,
            access_expires_ms INTEGER NOT NULL,
            refresh_hash TEXT NOT NULL UNIQUE,
            refresh_expires_ms INTEGER NOT NULL,
            created_ms INTEGER NOT NULL,
            revoked_at_ms INTEGER
        )"""
    )
    conn.execute(
        """CREATE TABLE approvals (
            id TEXT PRIMARY KEY,
            token_hash TEXT NOT NULL UNIQUE,
            manager_id TEXT NOT NULL,
            device_id TEXT NOT NULL,
            expires_ms INTEGER NOT NULL,
            used_at_ms INTEGER
        )"""
    )
    # Wrong PINs: per employee (lockout) and per device (slow-down).
    conn.execute(
        """CREATE TABLE pin_failures (
            subject TEXT PRIMARY KEY,
            failures INTEGER NOT NULL,
            last_ms INTEGER NOT NULL,
            locked_until_ms INTEGER
        )"""
    )
    conn.execute(
        """CREATE TABLE idempotency (
            device_id TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            status INTEGER NOT NULL,
            body BLOB NOT NULL,
            at_ms INTEGER NOT NULL,
            PRIMARY KEY (device_id, key)
        ) WITHOUT ROWID"""
    )
    # Check numbers: one counter per business day, allocated in the order's transaction.
    conn.execute(
        "CREATE TABLE check_numbers (business_day TEXT PRIMARY KEY, last INTEGER NOT NULL)"
    )


def _idempotency_by_age(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE INDEX idempotency_by_age ON idempotency (at_ms)")


def _idempotency_rowid(conn: sqlite3.Connection) -> None:
    """Answers move to a rowid table, found by a unique index on (device, key).

    An answer is a whole response (an order with its lines: kilobytes). In a WITHOUT ROWID
    table the row lives in the primary-key b-tree, so every answer overflowed its page and
    a lookup walked a deep tree of them: a miss cost as much as an insert (40-50 µs each,
    on every change a tablet sent). The index now holds only the keys.
    """
    conn.execute(
        """CREATE TABLE idempotency_answers (
            device_id TEXT NOT NULL,
            key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            status INTEGER NOT NULL,
            body BLOB NOT NULL,
            at_ms INTEGER NOT NULL
        )"""
    )
    conn.execute(
        "INSERT INTO idempotency_answers (device_id, key, fingerprint, status, body, at_ms)"
        " SELECT device_id, key, fingerprint, status, body, at_ms FROM idempotency"
        " ORDER BY at_ms"
    )
    conn.execute("DROP TABLE idempotency")
    conn.execute("ALTER TABLE idempotency_answers RENAME TO idempotency")
    conn.execute("CREATE UNIQUE INDEX idempotency_key ON idempotency (device_id, key)")
    conn.execute("CREATE INDEX idempotency_by_age ON idempotency (at_ms)")


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "sync core tables", _core_tables),
    Migration(2, "outbox: local wall time of each change", _outbox_written_ms),
    Migration(3, "live events", _events),
    Migration(4, "tablet API: devices, sessions, approvals, PIN attempts, idempotency", _api),
    Migration(5, "idempotency answers expire: found by age", _idempotency_by_age),
    Migration(6, "idempotency answers in a rowid table, keyed by an index", _idempotency_rowid),
)


def _applied(conn: sqlite3.Connection) -> set[int]:
    conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            applied_at_ms INTEGER NOT NULL
        )"""
    )
    return {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}


def _run_numbered(conn: sqlite3.Connection) -> list[int]:
    done = _applied(conn)
    ran: list[int] = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            migration.apply(conn)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at_ms) VALUES (?, ?, ?)",
                (migration.version, migration.name, int(time.time() * 1000)),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        ran.append(migration.version)
    return ran


def sync_registry_tables(conn: sqlite3.Connection, registry: Registry) -> None:
    """Create missing synced tables and add missing columns, in one transaction."""
    reserved = RESERVED & set(registry.names())
    if reserved:
        raise ValueError(f"synced tables may not be named {sorted(reserved)}")
    db = sqlite_utils.Database(conn, execute_plugins=False)
    with db.atomic():
        for spec in registry:
            table = db.table(spec.name)
            wanted = {c.name: SQL_TYPES[c.type] for c in spec.columns}
            if not table.exists():
                table.create({"id": str, **wanted}, pk="id", not_null={"id"})
                continue
            present = table.columns_dict
            for name, py_type in wanted.items():
                if name not in present:
                    table.add_column(name, py_type)


#: indexes on synced tables for the edge's own reads (table, name, columns); created after the
#: registry step (the tables are created there), only where the table has those columns
INDEXES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("order_lines", "order_lines_by_order", ("order_id",)),
    ("orders", "orders_by_day", ("business_day", "check_number")),
    ("orders", "orders_by_status", ("status",)),
    ("tickets", "tickets_by_station", ("station", "bumped")),
)


def create_indexes(conn: sqlite3.Connection, registry: Registry) -> None:
    """Create the ``INDEXES`` whose table and columns the registry has (idempotent)."""
    for table, name, columns in INDEXES:
        spec = registry.get(table) if table in registry.names() else None
        if spec is None or not set(columns) <= {c.name for c in spec.columns}:
            continue
        cols = ", ".join(f'"{c}"' for c in columns)
        conn.execute(f'CREATE INDEX IF NOT EXISTS "{name}" ON "{table}" ({cols})')


def _check_identity(conn: sqlite3.Connection, site_id: str, node_id: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = dict(
            conn.execute("SELECT key, value FROM sync_state WHERE key IN ('site_id', 'node_id')")
        )
        if not rows:
            conn.executemany(
                "INSERT INTO sync_state (key, value) VALUES (?, ?)",
                [("site_id", site_id), ("node_id", node_id)],
            )
        elif rows.get("site_id") != site_id or rows.get("node_id") != node_id:
            raise EdgeError(
                EdgeErrorCode.IDENTITY_MISMATCH,
                f"this database belongs to site {rows.get('site_id')!r} node "
                f"{rows.get('node_id')!r}, not site {site_id!r} node {node_id!r}",
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def migrate(path: str | Path, registry: Registry, site_id: str, node_id: str) -> list[int]:
    """Bring the database at ``path`` up to date; returns the migration numbers that ran."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        ran = _run_numbered(conn)
        sync_registry_tables(conn, registry)
        create_indexes(conn, registry)
        _check_identity(conn, site_id, node_id)
        return ran
    finally:
        conn.close()
