"""Row states in and out of Postgres, a whole batch per statement (the ingest hot path).

A ``TableIO`` holds the SQL of one synced table, built once from its spec: load the rows a
batch touches (``id = ANY($2)``), upsert their final states from one set of column arrays
(``unnest``), COPY rows that do not exist yet, and read the live rows. Per-column versions
travel as ``_fv`` jsonb ``{column: [rev, hlc, origin]}``; most rows have none, so they cost
no JSON at all. A row one change created (``NewRow``, most of a catch-up) goes from its
plain values to its COPY record and its packed feed entry without a ``RowState``.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any

import asyncpg
import msgspec

from sync_protocol.changes import RowState, Value, Values, Version
from sync_protocol.checksum import Checksum, table_checksum
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


#: one encoder for every entry: msgspec writes the same msgpack bytes as ``msgpack.packb``
#: (``use_bin_type``) in half the time, and a catch-up packs one entry per row
_pack = msgspec.msgpack.Encoder().encode
CHECKSUM_PAGE = 5_000  #: rows read at a time for a checksum


def pack_entry(rev: int, table: str, state: RowState) -> bytes:
    """A feed entry packed as its wire row, ready to be stored and served as is."""
    return _pack(state_row(rev, table, state))


#: a row that one change created, as plain values: (values, rev, hlc, origin, seq); its state
#: is ``new_row_state`` (every column written by that change, so no per-column versions)
NewRow = tuple[dict[str, Value], int, int, str, int]


def new_row_state(pk: str, row: NewRow) -> RowState:
    """The ``RowState`` of a new row."""
    values, rev, hlc, origin, _seq = row
    return RowState(pk, values, Version(rev, hlc, origin), {}, False)


def pack_new_entry(table: str, pk: str, row: NewRow) -> bytes:
    """``pack_entry`` of a new row at the rev of its change, without building its state."""
    values, rev, hlc, origin, _seq = row
    return _pack([rev, table, pk, False, values, rev, hlc, origin, None])


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
        self.page_sql = (
            f"SELECT {listed} FROM {table} WHERE site_id = $1 AND NOT _deleted AND id > $2"
            " ORDER BY id LIMIT $3"
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
        self,
        conn: asyncpg.Connection,
        site_id: str,
        states: Sequence[RowState],
        created: Mapping[str, NewRow] | None = None,
    ) -> None:
        """Write rows that do not exist yet with COPY (the caller holds the site's lock)."""
        records = self.copy_records(site_id, states)
        if created:
            records = chain(records, self.new_records(site_id, created))
        elif not states:
            return
        await conn.copy_records_to_table(self.spec.name, records=records, columns=self.copy_columns)

    def copy_records(self, site_id: str, states: Iterable[RowState]) -> Iterator[tuple[Any, ...]]:
        """Rows as COPY records (``copy_columns``), made one by one as COPY sends them."""
        for s in states:
            fv = fv_json(s.fv) if s.fv else None
            yield (site_id, s.pk, *self._values(s.values), *s.version, fv, s.deleted)

    def new_records(self, site_id: str, rows: Mapping[str, NewRow]) -> Iterator[tuple[Any, ...]]:
        """``copy_records`` of new rows (``{pk: row}``)."""
        for pk, (values, rev, hlc, origin, _seq) in rows.items():
            yield (site_id, pk, *self._values(values), rev, hlc, origin, None, False)

    def _values(self, values: Values) -> tuple[Value, ...]:
        """The row's values in column order (one C call when every column is present)."""
        try:
            return self._getter(values)
        except KeyError:
            return tuple(values.get(n) for n in self.names)

    async def live_rows(
        self, conn: asyncpg.Connection, site_id: str
    ) -> dict[str, dict[str, Value]]:
        """Every live (not deleted) row of a site: ``{pk: {column: value}}``."""
        return self._by_id(await conn.fetch(self.live_sql, site_id))

    async def live_page(
        self, conn: asyncpg.Connection, site_id: str, after: str, limit: int
    ) -> dict[str, dict[str, Value]]:
        """Up to ``limit`` live rows of a site with ids after ``after``, in id order."""
        return self._by_id(await conn.fetch(self.page_sql, site_id, after, limit))

    def _by_id(self, records: Sequence[asyncpg.Record]) -> dict[str, dict[str, Value]]:
        names = self.names
        return {r[0]: dict(zip(names, tuple(r)[1:], strict=True)) for r in records}

    async def live_checksum(self, conn: asyncpg.Connection, site_id: str) -> Checksum:
        """The checksum of a site's live rows, summed a page at a time through a cursor (in
        the caller's transaction), so a site's years of orders never sit in memory at once."""
        names = self.names
        total = Checksum()
        cursor = await conn.cursor(self.live_sql, site_id)
        while page := await cursor.fetch(CHECKSUM_PAGE):
            pairs = ((r[0], dict(zip(names, tuple(r)[1:], strict=True))) for r in page)
            total += table_checksum(pairs, names)
        return total
