"""Parked conflicts: storing them as jsonb, reading them back, and turning a person's choice
into the write that resolves it.

Column values may be bytes (``BYTES`` columns), which JSON cannot hold: they are stored as
``{"$bytes": "<base64>"}`` and come back as bytes, so a resolution writes exactly what the
edge sent. JSON answers spell them the same way.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from sync_protocol.changes import Conflict, Op, RowState, Value
from sync_protocol.errors import ErrorCode, RemoteProtocolError
from sync_protocol.merge import resolve_values
from sync_protocol.schema import Merge, TableSpec

_BYTES_KEY = "$bytes"


class Choice(StrEnum):
    """What a person chose for a parked conflict."""

    LOCAL = "local"  #: the edge's values (or its delete)
    REMOTE = "remote"  #: the cloud's values, as they stand
    VALUES = "values"  #: values the person typed


def json_default(value: object) -> object:
    """``json.dumps`` hook: bytes as ``{"$bytes": base64}``."""
    if isinstance(value, bytes):
        return {_BYTES_KEY: base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _bytes_hook(obj: dict[str, Any]) -> object:
    if len(obj) == 1 and isinstance(obj.get(_BYTES_KEY), str):
        return base64.b64decode(obj[_BYTES_KEY])
    return obj


def dumps(value: object) -> str:
    """JSON text of a value that may hold bytes or datetimes."""
    return json.dumps(value, default=json_default, separators=(",", ":"))


def loads(text: str | None) -> Any:
    """Read JSON written by ``dumps`` (bytes come back as bytes)."""
    return None if text is None else json.loads(text, object_hook=_bytes_hook)


#: the conflict columns, in the order ``conflict_rows`` gives them
INSERT_COLUMNS = (
    "site_id",
    "tbl",
    "pk",
    "change_origin",
    "change_seq",
    "columns",
    "base",
    "local",
    "remote",
    "local_deleted",
    "remote_deleted",
)

INSERT_SQL = (
    f"INSERT INTO conflicts ({', '.join(INSERT_COLUMNS)})"
    " VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9::jsonb, $10, $11)"
)

#: the columns ``conflict_dict`` reads (for SELECT and RETURNING)
COLUMNS = (
    "id, site_id, tbl, pk, change_origin, change_seq, columns, base::text, local::text,"
    " remote::text, local_deleted, remote_deleted, created_at, resolved_at,"
    " resolution::text, resolved_by"
)
SELECT_SQL = f"SELECT {COLUMNS} FROM conflicts"


def conflict_row(site_id: str, c: Conflict) -> tuple[object, ...]:
    """Arguments of ``INSERT_SQL`` for one parked conflict."""
    return (
        site_id,
        c.table,
        c.pk,
        c.change_origin,
        c.change_seq,
        list(c.columns),
        dumps(dict(c.base)),
        dumps(dict(c.local)),
        dumps(dict(c.remote)),
        c.local_deleted,
        c.remote_deleted,
    )


def _ms(value: datetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


def conflict_dict(r: asyncpg.Record) -> dict[str, Any]:
    """A stored conflict as the API shows it (times as ms since the epoch)."""
    return {
        "id": r["id"],
        "site_id": r["site_id"],
        "table": r["tbl"],
        "pk": r["pk"],
        "change_origin": r["change_origin"],
        "change_seq": r["change_seq"],
        "columns": list(r["columns"]),
        "base": loads(r["base"]),
        "local": loads(r["local"]),
        "remote": loads(r["remote"]),
        "local_deleted": r["local_deleted"],
        "remote_deleted": r["remote_deleted"],
        "created_at_ms": _ms(r["created_at"]),
        "resolved_at_ms": _ms(r["resolved_at"]),
        "resolution": loads(r["resolution"]),
        "resolved_by": r["resolved_by"],
    }


def parse_choice(choose: object, values: object) -> tuple[Choice, Mapping[str, object]]:
    """Check the shape of a resolution request: a known choice and a map of values."""
    try:
        choice = Choice(str(choose)) if isinstance(choose, str) else Choice("")
    except ValueError:
        raise RemoteProtocolError(
            ErrorCode.INVALID_RESOLUTION, "choose must be 'local', 'remote' or 'values'"
        ) from None
    if values is None:
        values = {}
    if not isinstance(values, Mapping):
        raise RemoteProtocolError(ErrorCode.INVALID_RESOLUTION, "values must be a map")
    if choice is Choice.VALUES and not values:
        raise RemoteProtocolError(ErrorCode.INVALID_RESOLUTION, "choose=values needs values")
    if choice is not Choice.VALUES and values:
        raise RemoteProtocolError(
            ErrorCode.INVALID_RESOLUTION, f"values are only taken with choose=values, not {choice}"
        )
    return choice, values


def resolution_write(
    spec: TableSpec,
    conflict: Mapping[str, Any],
    current: RowState | None,
    choice: Choice,
    values: Mapping[str, object],
) -> tuple[Op, dict[str, Value]] | None:
    """The write that carries out a choice: (op, fields), or None to keep the cloud's row."""
    if choice is Choice.REMOTE:
        return None
    if choice is Choice.LOCAL:
        if conflict["local_deleted"]:
            return Op.DELETE, {}
        fields: dict[str, Value] = dict(conflict["local"])
    else:
        fields = resolve_values(spec, values)
        parked = set(conflict["columns"])
        stray = set(fields) - parked
        if stray:
            raise RemoteProtocolError(
                ErrorCode.INVALID_RESOLUTION,
                f"values name columns outside the conflict: {sorted(stray)}",
            )
        for name in fields:  # a group's parked columns are decided as one
            unnamed = sorted(parked.intersection(spec.group_of.get(name, ())) - set(fields))
            if unnamed:
                raise RemoteProtocolError(
                    ErrorCode.INVALID_RESOLUTION,
                    f"{name} is decided together with {', '.join(unnamed)}: name them too",
                )
    # The write sets whole groups. A group is parked whole, so its columns are all named
    # here; only a conflict parked before groups were decided as one lacks some, and those
    # were written alike on both sides, so they keep the row's values.
    row = current.values if current is not None else {}
    for name in list(fields):
        for member in spec.group_of.get(name, ()):
            fields.setdefault(member, row.get(member))
    if current is None or current.deleted:
        # The row is gone at the cloud: the chosen values bring it back (an insert may set
        # columns that are otherwise immutable).
        return Op.INSERT, fields
    immutable = {c.name for c in spec.columns if c.merge is Merge.IMMUTABLE}
    return Op.UPDATE, {k: v for k, v in fields.items() if k not in immutable}
