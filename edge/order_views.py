"""Orders as tablets read them: the header, its lines, totals in pence, and a version.

How it works. ``ORDER_SQL`` reads an order and its lines in one statement (``edge.rows``),
on the store's reader for a GET or inside the transaction that just changed the order, so
the answer to a write shows exactly what it committed. ``version`` is a short hash of the
header fields a tablet edits (table, covers, notes, server): a tablet sends it back as
``If-Match`` and a header edit made from a stale copy is refused (``409 stale_version``).
Adding, voiding or firing lines does not change it, so those never collide with a header edit.

Totals are integer pence over the lines not voided: ``subtotal_pence`` is the sum of
quantity × unit price (modifiers included); ``total_pence`` is what is due (the subtotal
until discounts, tax and service exist); ``voided_pence`` is what voids took off.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import msgspec

from shared.registry import ORDER_LINES, ORDERS

from .menu import ChosenModifier
from .rows import as_bool, as_int, as_str, object_sql, opt_int, opt_str, rows_json

#: the header fields a tablet edits, in the order ``version`` hashes them
HEADER_FIELDS = ("table_name", "covers", "notes", "server_id")


class LineView(msgspec.Struct, frozen=True):
    """One line: what was ordered, at what price, and what happened to it since."""

    id: str
    item_id: str
    name: str
    quantity: int
    unit_price_pence: int
    total_pence: int
    modifiers: list[ChosenModifier]
    notes: str | None
    course: int
    seat: int | None
    added_by: str | None
    added_at_ms: int
    moved_from: str | None
    fired: bool
    ticket_id: str | None
    voided: bool
    void_reason: str | None
    voided_by: str | None
    void_approved_by: str | None


class Totals(msgspec.Struct, frozen=True):
    """Money on the order, in pence, over the lines not voided."""

    subtotal_pence: int
    total_pence: int
    voided_pence: int
    line_count: int
    item_count: int


class OrderSummary(msgspec.Struct, frozen=True):
    """An order's header and totals; ``version`` is what ``If-Match`` sends back."""

    id: str
    check_number: int
    business_day: str
    status: str
    table_name: str | None
    covers: int | None
    server_id: str | None
    opened_by: str | None
    opened_at_ms: int
    closed_at_ms: int | None
    notes: str | None
    currency: str
    version: str
    totals: Totals


class OrderView(OrderSummary, frozen=True):
    """An order with its lines in the order they were added (voided ones included, marked)."""

    lines: list[LineView]


class OrderList(msgspec.Struct, frozen=True):
    """Orders, newest first."""

    orders: list[OrderSummary]


ORDER_SQL = (
    f"SELECT {object_sql(ORDERS, 'o')}, {rows_json(ORDER_LINES, 'r.order_id = o.id')}"
    " FROM orders AS o WHERE o.id = ?"
)

#: parameters: statuses as a JSON list (or None), business day (or None), limit
ORDERS_SQL = (
    f"SELECT {object_sql(ORDERS, 'o')}, {rows_json(ORDER_LINES, 'r.order_id = o.id')}"
    " FROM orders AS o"
    " WHERE (?1 IS NULL OR o.status IN (SELECT value FROM json_each(?1)))"
    " AND (?2 IS NULL OR o.business_day = ?2)"
    " ORDER BY o.opened_at_ms DESC, o.id LIMIT ?3"
)

_object = msgspec.json.Decoder(dict[str, Any])
_objects = msgspec.json.Decoder(list[dict[str, Any]])
_modifiers = msgspec.json.Decoder(list[ChosenModifier])


def header_version(order: dict[str, Any]) -> str:
    """The version of an order's header (a row as ``Tx.get`` or a snapshot gives it)."""
    header = json.dumps([order.get(name) for name in HEADER_FIELDS], separators=(",", ":"))
    return hashlib.sha256(header.encode()).hexdigest()[:16]


def line_of(row: dict[str, Any]) -> LineView:
    """A stored line as tablets see it."""
    quantity, unit = as_int(row, "quantity"), as_int(row, "unit_price_pence")
    try:
        modifiers = _modifiers.decode(as_str(row, "modifiers", "[]"))
    except msgspec.DecodeError:
        modifiers = []
    return LineView(
        row["id"],
        as_str(row, "item_id"),
        as_str(row, "name"),
        quantity,
        unit,
        quantity * unit,
        modifiers,
        opt_str(row, "notes"),
        as_int(row, "course", 1),
        opt_int(row, "seat"),
        opt_str(row, "added_by"),
        as_int(row, "added_at_ms"),
        opt_str(row, "moved_from"),
        as_bool(row, "fired", False),
        opt_str(row, "ticket_id"),
        as_bool(row, "voided", False),
        opt_str(row, "void_reason"),
        opt_str(row, "voided_by"),
        opt_str(row, "void_approved_by"),
    )


def totals_of(lines: Sequence[LineView]) -> Totals:
    """The order's money from its lines."""
    live = [line for line in lines if not line.voided]
    subtotal = sum(line.total_pence for line in live)
    voided = sum(line.total_pence for line in lines if line.voided)
    return Totals(subtotal, subtotal, voided, len(live), sum(line.quantity for line in live))


def order_from_row(row: Sequence[str]) -> OrderView:
    """The ``OrderView`` from a row of ``ORDER_SQL`` (or ``ORDERS_SQL``)."""
    header = _object.decode(row[0])
    rows = _objects.decode(row[1])
    rows.sort(key=lambda r: (as_int(r, "added_at_ms"), as_int(r, "_rowid")))  # as added
    lines = [line_of(r) for r in rows]
    return OrderView(
        header["id"],
        as_int(header, "check_number"),
        as_str(header, "business_day"),
        as_str(header, "status", "open"),
        opt_str(header, "table_name"),
        opt_int(header, "covers"),
        opt_str(header, "server_id"),
        opt_str(header, "opened_by"),
        as_int(header, "opened_at_ms"),
        opt_int(header, "closed_at_ms"),
        opt_str(header, "notes"),
        as_str(header, "currency", "GBP"),
        header_version(header),
        totals_of(lines),
        lines,
    )


def summary_of(order: OrderView) -> OrderSummary:
    """The order without its lines."""
    fields = {name: getattr(order, name) for name in OrderSummary.__struct_fields__}
    return OrderSummary(**fields)
