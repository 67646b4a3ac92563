"""Row states in and out of Postgres, a whole batch per statement (the ingest hot path).

A ``TableIO`` holds the SQL of one synced table, built once from its spec: load the rows a
batch touches (``id = ANY($2)``), upsert their final states from one set of column arrays
(``unnest``), and read the live rows. Per-column versions travel as ``_fv`` jsonb
``{column: [rev, hlc, origin]}``; most rows have none, so they cost no JSON at all.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import asyncpg
import msgpack

from sync_protocol.changes import RowState, Value, Values, Version
from sync_protocol.schema import TableSpec
from sync_protocol.wire import state_row

from .schema import META_COLUMNS, PG_TYPES, quote


def fv_json(fv: Mapping[str, Version]) -> str | None:
    """Per-column versions as ``_fv`` jsonb text, or None when there are none."""
    if not fv:
        return None
    return json.dumps({k: [v.rev, v.hlc, v.origin] for k, v in fv.items()}, separators=(",", ":"))


def fv_from_json(text: str | None) -> dict[str, Version]:
    """Per-column versions from ``_fv`` jsonb text (NULL: none)."""
    if not text:
        return {}
    return {k: Version(int(r), int(h), str(o)) for k, (r, h, o) in json.loads(text).items()}


#: one packer for every entry (``packb`` builds a new one per call); the event loop is single
#: threaded, and ``pack`` resets the packer after each call
_PACKER = msgpack.Packer(use_bin_type=True)


def pack_entry(rev: int, table: str, state: RowState) -> bytes:
    """A feed entry packed as its wire row, ready to be stored and served as is."""
    packed: bytes = _PACKER.pack(state_row(rev, table, state))
    return packed


class TableIO:
    """The SQL of one synced table and the conversions between its rows and ``RowState``."""

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.names: tuple[str, ...] = tuple(c.name for c in spec.columns)
        self._getter: Callable[[Values], tuple[Value, ...]]
        if len(self.names) > 1:
            self._getter = operator.itemgetter(*self.names)
        else:
            self._getter = lambda values: tuple(values[n] for n in self.names)
        table = quote(spec.name)
        cols = [quote(n) for n in self.names]
        listed = ", ".join(["id", *cols])
        self.select_sql = (
            f"SELECT {listed}, _rev, _hlc, _origin, _fv::text, _deleted FROM {table}"
            " WHERE site_id = $1 AND id = ANY($2::text[])"
        )
        self.live_sql = (
            f"SELECT {listed} FROM {table} WHERE site_id = $1 AND NOT _deleted ORDER BY id"
        )
        types = ["text", *(PG_TYPES[c.type] for c in spec.columns)]
        types += ["bigint", "bigint", "text", "text", "boolean"]
        arrays = ", ".join(f"${i + 2}::{t}[]" for i, t in enumerate(types))
        aliases = ", ".join(["id", *cols, "_rev", "_hlc", "_origin", "_fv", "_deleted"])
        updates = ", ".join(
            f"{c} = EXCLUDED.{c}" for c in [*cols, "_rev", "_hlc", "_origin", "_fv", "_deleted"]
        )
        self.copy_columns = ("site_id", "id", *self.names, *META_COLUMNS)
        self.upsert_sql = (
            f"INSERT INTO {table} (site_id, {aliases})"
            f" SELECT $1, {listed}, _rev, _hlc, _origin, _fv::jsonb, _deleted"
            f" FROM unnest({arrays}) AS u({aliases})"
            f" ON CONFLICT (site_id, id) DO UPDATE SET {updates}"
        )

    def _values_of(self, state: RowState) -> tuple[Value, ...]:
        """The row's values in column order (one C call when every column is present)."""
        try:
            return self._getter(state.values)
        except KeyError:
            return tuple(state.values.get(n) for n in self.names)

    def state(self, record: asyncpg.Record) -> RowState:
        """A loaded row (from ``select_sql``) as the engine's ``RowState``."""
        n = len(self.names)
        row = tuple(record)
        values = dict(zip(self.names, row[1 : n + 1], strict=True))
        rev, hlc, origin, fv, deleted = row[n + 1 :]
        return RowState(row[0], values, Version(rev, hlc, origin), fv_from_json(fv), deleted)

    async def load(
        self, conn: asyncpg.Connection, site_id: str, pks: Iterable[str]
    ) -> dict[str, RowState]:
        """The current states of the given rows of a site (absent rows are left out)."""
        records = await conn.fetch(self.select_sql, site_id, list(pks))
        return {r[0]: self.state(r) for r in records}

    async def upsert(
        self, conn: asyncpg.Connection, site_id: str, states: Sequence[RowState]
    ) -> None:
        """Write the final states of rows in one statement."""
        if not states:
            return
        arrays: list[list[Any]] = [[s.pk for s in states]]
        arrays += [[s.values.get(name) for s in states] for name in self.names]
        arrays.append([s.version.rev for s in states])
        arrays.append([s.version.hlc for s in states])
        arrays.append([s.version.origin for s in states])
        arrays.append([fv_json(s.fv) if s.fv else None for s in states])
        arrays.append([s.deleted for s in states])
        await conn.execute(self.upsert_sql, site_id, *arrays)

    async def insert_new(
        self, conn: asyncpg.Connection, site_id: str, states: Sequence[RowState]
    ) -> None:
        """Write rows that do not exist yet with COPY (the caller holds the site's lock)."""
        if not states:
            return
        records = [
            (
                site_id,
                s.pk,
                *self._values_of(s),
                s.version.rev,
                s.version.hlc,
                s.version.origin,
                fv_json(s.fv) if s.fv else None,
                s.deleted,
            )
            for s in states
        ]
        await conn.copy_records_to_table(self.spec.name, records=records, columns=self.copy_columns)

    async def live_rows(
        self, conn: asyncpg.Connection, site_id: str
    ) -> dict[str, dict[str, Value]]:
        """Every live (not deleted) row of a site: ``{pk: {column: value}}``."""
        records = await conn.fetch(self.live_sql, site_id)
        names = self.names
        return {r[0]: dict(zip(names, tuple(r)[1:], strict=True)) for r in records}
