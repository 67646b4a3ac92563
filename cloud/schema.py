"""The cloud's Postgres schema: numbered migrations, then one table per synced table.

How it works: ``migrate`` takes a transaction-scoped advisory lock (so workers starting
together take turns), applies every numbered migration not yet recorded in
``schema_migrations`` (each in its own transaction), then brings the per-registry tables up
to date in one more transaction: ``CREATE TABLE IF NOT EXISTS`` for new tables and
``ADD COLUMN IF NOT EXISTS`` for columns added to a spec later. A column whose stored type
differs from its spec is refused rather than silently reinterpreted.

Every table is keyed by ``site_id`` first (the tenancy invariant, and the Citus
distribution column should the fleet outgrow one server).
"""

from __future__ import annotations

import asyncpg

from sync_protocol.schema import ColumnType, Registry, TableSpec

#: Postgres type of each synced column type
PG_TYPES: dict[ColumnType, str] = {
    ColumnType.TEXT: "text",
    ColumnType.INT: "bigint",
    ColumnType.BOOL: "boolean",
    ColumnType.BYTES: "bytea",
}

#: row-level bookkeeping columns every synced table carries after its spec columns
META_COLUMNS = ("_rev", "_hlc", "_origin", "_fv", "_deleted")

_LOCK_KEY = 0x46594E4C4F  # "FYNLO": serialises migrations across workers

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "sites, devices, ledger, feed, conflicts",
        """
        CREATE TABLE sites (
            site_id    text PRIMARY KEY,
            name       text NOT NULL,
            feed_head  bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE TABLE devices (
            node_id      text PRIMARY KEY,
            site_id      text NOT NULL REFERENCES sites (site_id),
            name         text NOT NULL,
            secret_hash  bytea NOT NULL,
            revoked      boolean NOT NULL DEFAULT false,
            created_at   timestamptz NOT NULL DEFAULT now(),
            last_push_at timestamptz,
            last_pull_at timestamptz,
            pull_cursor  bigint
        );
        CREATE INDEX devices_site ON devices (site_id);
        -- the dedupe watermark: the highest seq applied per (site, origin node)
        CREATE TABLE ledger (
            site_id    text NOT NULL REFERENCES sites (site_id),
            origin     text NOT NULL,
            last_seq   bigint NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (site_id, origin)
        );
        -- the change feed: one packed wire entry per touched row, at its last change's rev
        CREATE TABLE feed (
            site_id text NOT NULL,
            rev     bigint NOT NULL,
            tbl     text NOT NULL,
            pk      text NOT NULL,
            entry   bytea NOT NULL,
            PRIMARY KEY (site_id, rev)
        );
        CREATE TABLE conflicts (
            id             bigserial PRIMARY KEY,
            site_id        text NOT NULL REFERENCES sites (site_id),
            tbl            text NOT NULL,
            pk             text NOT NULL,
            change_origin  text NOT NULL,
            change_seq     bigint NOT NULL,
            columns        text[] NOT NULL,
            base           jsonb NOT NULL,
            local          jsonb NOT NULL,
            remote         jsonb NOT NULL,
            local_deleted  boolean NOT NULL DEFAULT false,
            remote_deleted boolean NOT NULL DEFAULT false,
            created_at     timestamptz NOT NULL DEFAULT now(),
            resolved_at    timestamptz,
            resolution     jsonb,
            resolved_by    text
        );
        CREATE INDEX conflicts_site ON conflicts (site_id, id);
        CREATE INDEX conflicts_open ON conflicts (site_id) WHERE resolved_at IS NULL;
        """,
    ),
    (
        2,
        "segments: the feed rev at which each pushed change took effect",
        """
        -- one row per push that applied something: changes first_seq..last_seq of origin
        -- took revs first_rev.. in order (acks repeat them for resent duplicates)
        CREATE TABLE segments (
            site_id   text NOT NULL REFERENCES sites (site_id),
            origin    text NOT NULL,
            first_seq bigint NOT NULL,
            last_seq  bigint NOT NULL,
            first_rev bigint NOT NULL,
            PRIMARY KEY (site_id, origin, last_seq)
        );
        """,
    ),
    (
        3,
        "segments by revision, for the pull page's own-ingest lookup",
        """
        CREATE INDEX segments_by_rev ON segments (site_id, origin, first_rev);
        """,
    ),
    (
        4,
        "feed entries that merely echo a node's own new rows back to it",
        """
        -- the node whose push created the row with exactly this state (no other writer and no
        -- earlier row), and the seq of its last change to it: that node holds the row already
        -- (unless restored from an older copy: it says up to which seq it holds its own)
        ALTER TABLE feed ADD COLUMN echo_of text, ADD COLUMN echo_seq bigint;
        """,
    ),
    (
        5,
        "payment providers: each provider payment's site and attempt, webhook events seen",
        """
        CREATE TABLE provider_payments (
            provider     text NOT NULL,
            provider_ref text NOT NULL,
            site_id      text NOT NULL REFERENCES sites (site_id),
            payment_id   text NOT NULL,
            kind         text NOT NULL,  -- payment | refund
            created_at   timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (provider, provider_ref)
        );
        CREATE UNIQUE INDEX provider_payments_by_attempt
            ON provider_payments (site_id, payment_id, kind);
        CREATE TABLE webhook_events (
            provider    text NOT NULL,
            event_id    text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (provider, event_id)
        );
        """,
    ),
)

#: names the registry may not use: they are the cloud's own tables
RESERVED_TABLES = frozenset(
    {
        "sites",
        "devices",
        "ledger",
        "feed",
        "conflicts",
        "segments",
        "schema_migrations",
        "provider_payments",
        "webhook_events",
    }
)


def quote(name: str) -> str:
    """Quote an identifier (spec names are checked identifiers; quoting also spares keywords)."""
    return '"' + name.replace('"', '""') + '"'


def table_ddl(spec: TableSpec) -> list[str]:
    """Statements that create or extend the table of one synced spec."""
    table = quote(spec.name)
    columns = "".join(f"    {quote(c.name)} {PG_TYPES[c.type]},\n" for c in spec.columns)
    create = (
        f"CREATE TABLE IF NOT EXISTS {table} (\n"
        "    site_id text NOT NULL,\n"
        "    id text NOT NULL,\n"
        f"{columns}"
        "    _rev bigint NOT NULL,\n"
        "    _hlc bigint NOT NULL,\n"
        "    _origin text NOT NULL,\n"
        "    _fv jsonb,\n"
        "    _deleted boolean NOT NULL DEFAULT false,\n"
        "    PRIMARY KEY (site_id, id)\n"
        ")"
    )
    adds = [
        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {quote(c.name)} {PG_TYPES[c.type]}"
        for c in spec.columns
    ]
    return [create, *adds]


async def migrate(conn: asyncpg.Connection, registry: Registry) -> list[int]:
    """Apply pending numbered migrations and sync the registry's tables; returns those applied."""
    clash = RESERVED_TABLES & set(registry.names())
    if clash:
        raise ValueError(f"synced table names clash with the cloud's own tables: {sorted(clash)}")
    applied: list[int] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version int PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
    for version, name, sql in MIGRATIONS:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            done = await conn.fetchval(
                "SELECT 1 FROM schema_migrations WHERE version = $1", version
            )
            if done:
                continue
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
            )
            applied.append(version)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        for spec in registry:
            for statement in table_ddl(spec):
                await conn.execute(statement)
        await _check_types(conn, registry)
    return applied


async def _check_types(conn: asyncpg.Connection, registry: Registry) -> None:
    rows = await conn.fetch(
        "SELECT table_name, column_name, data_type FROM information_schema.columns"
        " WHERE table_schema = current_schema() AND table_name = ANY($1::text[])",
        registry.names(),
    )
    stored = {(r["table_name"], r["column_name"]): r["data_type"] for r in rows}
    for spec in registry:
        for column in spec.columns:
            want = PG_TYPES[column.type]  # information_schema spells them alike
            have = stored.get((spec.name, column.name))
            if have != want:
                raise ValueError(
                    f"{spec.name}.{column.name} is {have} in Postgres but the registry says {want}"
                )
