"""Orders as tablets read them: the header, its lines, totals in pence, and a version.

How it works. ``ORDER_SQL`` reads an order and its lines in one statement (``edge.rows``),
on the store's reader for a GET or inside the transaction that just changed the order, so
the answer to a write shows exactly what it committed. ``version`` is a short hash of the
header fields a tablet edits (table, covers, notes, server): a tablet sends it back as
``If-Match`` and a header edit made from a stale copy is refused (``409 stale_version``).
Adding, voiding or firing lines does not change it, so those never collide with a header edit.

Totals are integer pence over the lines not voided: ``subtotal_pence`` is the sum of
quantity × unit price (modifiers included); ``discount_pence`` is what the check's discount
takes off it (a percentage of it rounded half up by ``shared.money``, or a fixed amount, never
more than the subtotal); ``total_pence`` is what is due, the subtotal less the discount (tax
and service do not exist yet); ``voided_pence`` is what voids took off.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec

from shared.money import percent_of
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
    discount_pence: int
    total_pence: int
    voided_pence: int
    line_count: int
    item_count: int


class Discount(msgspec.Struct, frozen=True):
    """The check's discount: ``percent`` of the subtotal, or ``amount_pence`` off it."""

    percent: int | None
    amount_pence: int | None
    reason: str | None
    by: str | None
    approved_by: str | None


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
    discount: Discount | None
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

#: parameters: statuses as a JSON list (or None), business day (or None), limit. Each row:
#: the order's header and its lines' (quantity, unit price, voided) as in ``LINE_MONEY_SQL``
ORDERS_SQL = (
    f"SELECT {object_sql(ORDERS, 'o')},"
    " (SELECT coalesce(json_group_array(json_array(r.quantity, r.unit_price_pence,"
    " CASE WHEN r.voided THEN 1 ELSE 0 END)), '[]') FROM order_lines AS r"
    " WHERE r.order_id = o.id)"
    " FROM orders AS o"
    " WHERE (?1 IS NULL OR o.status IN (SELECT value FROM json_each(?1)))"
    " AND (?2 IS NULL OR o.business_day = ?2)"
    " ORDER BY o.opened_at_ms DESC, o.id LIMIT ?3"
)


class _StoredLine(msgspec.Struct, kw_only=True):
    """An ``order_lines`` row as ``rows_json`` gives it (absent or NULL: None)."""

    id: str
    rowid: int = msgspec.field(default=0, name="_rowid")
    item_id: str | None = None
    name: str | None = None
    quantity: int | None = None
    unit_price_pence: int | None = None
    modifiers: str | None = None
    notes: str | None = None
    course: int | None = None
    seat: int | None = None
    added_by: str | None = None
    added_at_ms: int | None = None
    moved_from: str | None = None
    fired: bool | None = None
    ticket_id: str | None = None
    voided: bool | None = None
    void_reason: str | None = None
    voided_by: str | None = None
    void_approved_by: str | None = None


_object = msgspec.json.Decoder(dict[str, Any])
_objects = msgspec.json.Decoder(list[dict[str, Any]])
_stored_lines = msgspec.json.Decoder(list[_StoredLine])
_modifiers = msgspec.json.Decoder(list[ChosenModifier])
_money = msgspec.json.Decoder(list[tuple[Any, Any, Any]])
_encode = msgspec.json.encode


def header_version(order: dict[str, Any]) -> str:
    """The version of an order's header (a row as ``Tx.get`` or a snapshot gives it)."""
    header = _encode([order.get(name) for name in HEADER_FIELDS])
    return hashlib.sha256(header).hexdigest()[:16]


def _chosen(text: str | None) -> list[ChosenModifier]:
    """A line's modifiers from their stored JSON (anything malformed reads as none)."""
    try:
        return _modifiers.decode(text or "[]")
    except msgspec.DecodeError:
        return []


def line_of(row: dict[str, Any]) -> LineView:
    """A stored line as tablets see it (a row of any shape: wrong types read as defaults)."""
    quantity, unit = as_int(row, "quantity"), as_int(row, "unit_price_pence")
    modifiers = _chosen(as_str(row, "modifiers", "[]"))
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


def totals_of(discount: Discount | None, lines: Sequence[LineView]) -> Totals:
    """The order's money from its discount and its lines."""
    return _totals(discount, [(ln.quantity, ln.unit_price_pence, ln.voided) for ln in lines])


def _totals(discount: Discount | None, lines: Sequence[tuple[int, int, bool]]) -> Totals:
    """Totals from the discount and each line's (quantity, unit price, voided)."""
    subtotal = voided = line_count = item_count = 0
    for quantity, unit, was_voided in lines:
        if was_voided:
            voided += quantity * unit
        else:
            subtotal += quantity * unit
            line_count += 1
            item_count += quantity
    off = discount_off(discount, subtotal)
    return Totals(
        subtotal_pence=subtotal,
        discount_pence=off,
        total_pence=subtotal - off,
        voided_pence=voided,
        line_count=line_count,
        item_count=item_count,
    )


def discount_off(discount: Discount | None, subtotal: int) -> int:
    """What ``discount`` takes off ``subtotal``: between 0 and the subtotal (a percentage wins
    over an amount if a row somehow has both)."""
    if discount is None or subtotal <= 0:
        return 0
    if discount.percent is not None:
        off = percent_of(subtotal, discount.percent)
    else:
        off = discount.amount_pence or 0
    return max(0, min(off, subtotal))


def discount_of(order: dict[str, Any]) -> Discount | None:
    """The discount of an order's row (None when it has none; wrong types read as none)."""
    percent, amount = opt_int(order, "discount_percent"), opt_int(order, "discount_pence")
    if percent is None and amount is None:
        return None
    return Discount(
        percent,
        amount,
        opt_str(order, "discount_reason"),
        opt_str(order, "discounted_by"),
        opt_str(order, "discount_approved_by"),
    )


#: each line's (quantity, unit price, voided) of one order, read as ``ORDER_SQL`` reads them
#: (voided by SQLite's truth value; a quantity or price that is not an integer counts as 0)
LINE_MONEY_SQL = (
    "SELECT quantity, unit_price_pence, CASE WHEN voided THEN 1 ELSE 0 END"
    " FROM order_lines WHERE order_id = ?"
)


def summary_from_row(row: Sequence[str]) -> OrderSummary:
    """The ``OrderSummary`` from a row of ``ORDERS_SQL`` (no line is built, only summed)."""
    return summary_from(_object.decode(row[0]), _money.decode(row[1]))


def summary_from(header: dict[str, Any], money: Sequence[Sequence[Any]]) -> OrderSummary:
    """An order's summary from its row (with ``id``) and its ``LINE_MONEY_SQL`` rows."""
    lines = [(q if type(q) is int else 0, u if type(u) is int else 0, bool(v)) for q, u, v in money]
    fields = _header(header)
    return OrderSummary(**fields, totals=_totals(fields["discount"], lines))


def _line_from_stored(s: _StoredLine) -> LineView:
    quantity, unit = s.quantity or 0, s.unit_price_pence or 0
    return LineView(
        s.id,
        s.item_id or "",
        s.name or "",
        quantity,
        unit,
        quantity * unit,
        _chosen(s.modifiers),
        s.notes,
        1 if s.course is None else s.course,
        s.seat,
        s.added_by,
        s.added_at_ms or 0,
        s.moved_from,
        bool(s.fired),
        s.ticket_id,
        bool(s.voided),
        s.void_reason,
        s.voided_by,
        s.void_approved_by,
    )


def lines_from_json(text: str) -> list[LineView]:
    """The lines of a ``rows_json(ORDER_LINES)`` array, in the order they were added."""
    try:
        stored = _stored_lines.decode(text)
    except msgspec.ValidationError:  # a value of an unexpected type: read row by row
        rows = _objects.decode(text)
        rows.sort(key=lambda r: (as_int(r, "added_at_ms"), as_int(r, "_rowid")))
        return [line_of(r) for r in rows]
    stored.sort(key=lambda s: (s.added_at_ms or 0, s.rowid))
    return [_line_from_stored(s) for s in stored]


def order_from_row(row: Sequence[str]) -> OrderView:
    """The ``OrderView`` from a row of ``ORDER_SQL``."""
    header = _object.decode(row[0])
    lines = lines_from_json(row[1])
    fields = _header(header)
    return OrderView(**fields, totals=totals_of(fields["discount"], lines), lines=lines)


def _header(header: dict[str, Any]) -> dict[str, Any]:
    """``OrderSummary``'s fields but ``totals`` from an order's row (with ``id``)."""
    return {
        "id": header["id"],
        "check_number": as_int(header, "check_number"),
        "business_day": as_str(header, "business_day"),
        "status": as_str(header, "status", "open"),
        "table_name": opt_str(header, "table_name"),
        "covers": opt_int(header, "covers"),
        "server_id": opt_str(header, "server_id"),
        "opened_by": opt_str(header, "opened_by"),
        "opened_at_ms": as_int(header, "opened_at_ms"),
        "closed_at_ms": opt_int(header, "closed_at_ms"),
        "notes": opt_str(header, "notes"),
        "currency": as_str(header, "currency", "GBP"),
        "discount": discount_of(header),
        "version": header_version(header),
    }
