"""Reading synced rows: several tables as JSON in one SQL statement, and typed values.

How it works. ``rows_json(spec, where)`` is a scalar subquery that folds a table's matching
rows into one JSON array of objects: ``id``, every column (booleans as JSON booleans, bytes
as hex) and ``_rowid``, SQLite's row number, which rises in the order rows were first
written here (lines added in one request keep their order by it). A read that needs several
tables (the menu; an order and its lines) selects one such subquery per table in a single
statement: SQLite runs a statement against one snapshot, so the parts always agree, whether
the statement runs on the store's reader connection or inside a write transaction
(``Tx.one``), where it also sees that transaction's own writes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sync_protocol.schema import ColumnType, TableSpec


def _q(name: str) -> str:
    return f'"{name}"'


def object_sql(spec: TableSpec, alias: str = "") -> str:
    """A ``json_object(...)`` expression of one row of ``spec`` (columns under ``alias``)."""
    prefix = f"{alias}." if alias else ""
    parts = ["'id'", f"{prefix}id", "'_rowid'", f"{prefix}rowid"]
    for column in spec.columns:
        ref = prefix + _q(column.name)
        if column.type is ColumnType.BOOL:
            truth = f"CASE WHEN {ref} IS NULL THEN 'null' WHEN {ref} THEN 'true' ELSE 'false' END"
            expr = f"json({truth})"
        elif column.type is ColumnType.BYTES:
            expr = f"hex({ref})"
        else:
            expr = ref
        parts += [f"'{column.name}'", expr]
    return f"json_object({', '.join(parts)})"


def rows_json(spec: TableSpec, where: str = "") -> str:
    """A scalar subquery: the rows of ``spec`` matching ``where`` as one JSON array."""
    alias = "r"
    condition = f" WHERE {where}" if where else ""
    return (
        f"(SELECT coalesce(json_group_array({object_sql(spec, alias)}), '[]')"
        f" FROM {_q(spec.name)} AS {alias}{condition})"
    )


# -- typed values of a row (``Tx.get`` or a decoded snapshot); absent or NULL: the default --


def as_int(row: Mapping[str, object], name: str, default: int = 0) -> int:
    """An integer column's value."""
    value = row.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def as_str(row: Mapping[str, object], name: str, default: str = "") -> str:
    """A text column's value."""
    value = row.get(name)
    return value if isinstance(value, str) else default


def opt_int(row: Mapping[str, object], name: str) -> int | None:
    """An integer column's value, or None."""
    value = row.get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def opt_str(row: Mapping[str, object], name: str) -> str | None:
    """A text column's value, or None."""
    value = row.get(name)
    return value if isinstance(value, str) else None


def as_bool(row: Mapping[str, object], name: str, default: bool) -> bool:
    """A boolean column's value (stored 0/1 or decoded from JSON)."""
    value = row.get(name)
    return default if value is None else bool(value)


def json_list(value: object) -> list[Any]:
    """A text value holding a JSON list (absent, malformed or not a list: empty)."""
    if not isinstance(value, str) or not value:
        return []
    try:
        parsed = json.loads(value)
    except ValueError:
        return []
    return parsed if isinstance(parsed, list) else []


def id_list(row: Mapping[str, object], name: str) -> list[str]:
    """A text column holding a JSON list of ids (anything malformed reads as empty)."""
    return [x for x in json_list(row.get(name)) if isinstance(x, str)]
