"""Orders at the edge: open one with its check number, edit its header, transfer it, close it.

How it works. Every function here is plain domain code of one store transaction (``Tx``):
what it writes syncs and is audited with the request, and a refusal (``ApiError``) undoes all
of it. An order's status moves only through ``shared.orders.ORDER_TRANSITIONS`` (``move``);
a move the table does not allow is ``409 invalid_transition`` naming from and to. Lines can
change, and the header be edited, only while the status is ``EDITABLE`` (open or fired).

Check numbers. Each order gets the next number of its business day from the edge's own
``check_numbers`` table, in the transaction that opens it; the store runs one write
transaction at a time, so two tablets opening orders at once never get the same number, and
a failed open takes its number back with it. The business day is the local date of the edge
clock, shifted so that the day starts at ``DAY_STARTS_AT`` (04:00): a check opened at 01:30
belongs to the evening before. The first check of a day starts after the highest number any
order of that day already has (an edge rebuilt from the cloud never reuses one).

Closing. An order closes when its payments (``edge.payments``) cover its total exactly:
from ``paid``, or straight from open or fired when nothing is left to pay (every line voided,
no lines at all, a discount that takes the whole subtotal, or payments that already match a
total voids brought down). Otherwise the close is ``409 balance_due`` saying what is still
due, or what was paid beyond the total and must be refunded first.

Discounts. A check carries at most one discount (``set_discount``): a whole percentage of the
subtotal, or a fixed amount off it, with a reason, who gave it and who approved it (the
manager whose PIN lent ``order.discount``, or the giver who holds it). A percentage follows
the check as lines come and go; an amount never takes more than the subtotal. Setting one
replaces the one before; ``remove_discount`` takes it off. Only while the order is editable.

Voiding. A whole check is voided from open or fired (``order_lines.void_order``): each line
still live is voided, then the order moves to ``voided`` with ``closed_at_ms``. Voided is
terminal like closed; a paid, closed or voided order cannot be voided.

Header edits. ``edit_header`` and ``transfer`` take the ``If-Match`` version the tablet read
(``order_views.header_version``); a different current version is ``409 stale_version`` with
the current order in ``details.current``. Without ``If-Match`` the last write wins.
"""

from __future__ import annotations

from datetime import datetime, time, timedelta, tzinfo
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from shared.orders import EDITABLE, OrderStatus, can_move
from shared.registry import DISCOUNT_COLUMNS
from sync_protocol.changes import Op, Value

from .errors import ApiCode, ApiError, not_found
from .fields import Covers, Id, Name, Reason, Text
from .order_views import (
    LINE_MONEY_SQL,
    ORDER_SQL,
    OrderSummary,
    OrderView,
    header_version,
    order_from_row,
    summary_from,
)
from .rows import as_str
from .tx import Tx

#: when the business day starts, in the edge's local time: checks before it count as the
#: previous day's (a late service closes after midnight)
DAY_STARTS_AT = time(4, 0)


class NewOrder(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An order to open: where, for how many, and whose it is (default: whoever opens it)."""

    table_name: Name
    covers: Covers
    notes: Text | None = None
    server_id: Id | None = None


class NewDiscount(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A discount on the whole check: ``percent`` of the subtotal or ``amount_pence`` off it
    (exactly one), and why."""

    reason: Reason
    percent: Annotated[int, Meta(ge=1, le=100)] | None = None
    amount_pence: Annotated[int, Meta(ge=1, le=100_000_000)] | None = None

    def __post_init__(self) -> None:
        if (self.percent is None) == (self.amount_pence is None):
            raise ValueError("give exactly one of percent and amount_pence")


class HeaderChanges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Changes to an order's header; absent fields stay (``notes`` null clears them)."""

    table_name: Name | UnsetType = UNSET
    covers: Covers | UnsetType = UNSET
    notes: Text | None | UnsetType = UNSET


class Transfer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Move an order to another table, hand it to another server, or both."""

    table_name: Name | UnsetType = UNSET
    server_id: Id | UnsetType = UNSET


def business_day(now_ms: int, tz: tzinfo | None = None, starts_at: time = DAY_STARTS_AT) -> str:
    """The ISO date of the business day at ``now_ms`` (``tz`` None: the edge's local zone)."""
    local = datetime.fromtimestamp(now_ms // 1000, tz)
    return (local - timedelta(hours=starts_at.hour, minutes=starts_at.minute)).date().isoformat()


def next_check_number(tx: Tx, day: str) -> int:
    """Allocate the next check number of ``day`` (in the caller's transaction)."""
    rows = tx.query(
        "UPDATE check_numbers SET last = last + 1 WHERE business_day = ? RETURNING last", (day,)
    )
    if rows:
        return int(rows[0][0])
    highest = tx.one(
        "SELECT coalesce(max(check_number), 0) FROM orders WHERE business_day = ?", (day,)
    )
    number = int(highest[0]) + 1
    tx.execute("INSERT INTO check_numbers (business_day, last) VALUES (?, ?)", (day, number))
    return number


# -- reading and moving ----------------------------------------------------------------------


def view(tx: Tx, order_id: str) -> OrderView:
    """The order with its lines and totals, as this transaction sees it."""
    row = tx.one(ORDER_SQL, (order_id,))
    if row is None:
        raise not_found("order", order_id)
    return order_from_row(row)


def summary(tx: Tx, order_id: str) -> OrderSummary:
    """The order's header, version and totals, as this transaction sees it (no lines: the
    cost does not grow with the check)."""
    return summary_from(load(tx, order_id), tx.query(LINE_MONEY_SQL, (order_id,)))


def load(tx: Tx, order_id: str) -> dict[str, Any]:
    """An order's row (with its id), or ``not_found``."""
    row = tx.get("orders", order_id)
    if row is None:
        raise not_found("order", order_id)
    return {"id": order_id, **row}


def status_of(order: dict[str, Any]) -> OrderStatus:
    """An order row's status."""
    return OrderStatus(as_str(order, "status", OrderStatus.OPEN.value))


def require_editable(order: dict[str, Any], action: str) -> None:
    """Refuse to ``action`` an order that is no longer open or fired."""
    status = status_of(order)
    if status not in EDITABLE:
        raise ApiError(
            ApiCode.INVALID_TRANSITION,
            f"cannot {action}: the order is {status}",
            order_id=order["id"],
            status=str(status),
        )


def require_move(order: dict[str, Any], target: OrderStatus) -> None:
    """Refuse (``invalid_transition``) unless the table lets the order go to ``target``."""
    current = status_of(order)
    if not can_move(current, target):
        between: dict[str, object] = {"from": str(current), "to": str(target)}
        raise ApiError(
            ApiCode.INVALID_TRANSITION,
            f"an order cannot go from {current} to {target}",
            order_id=order["id"],
            **between,
        )


def move(tx: Tx, order: dict[str, Any], target: OrderStatus, **fields: Value) -> None:
    """Move an order to ``target`` if the transition table allows it (with other fields)."""
    require_move(order, target)
    tx.write("orders", order["id"], Op.UPDATE, {"status": target.value, **fields})


# -- the header ------------------------------------------------------------------------------


def open_order(tx: Tx, order_id: str, new: NewOrder, opened_by: str) -> OrderView:
    """Open an order with the next check number of the business day."""
    server_id = new.server_id or opened_by
    _check_employee(tx, server_id)
    day = business_day(tx.now_ms)
    tx.write(
        "orders",
        order_id,
        Op.INSERT,
        {
            "check_number": next_check_number(tx, day),
            "business_day": day,
            "opened_at_ms": tx.now_ms,
            "table_name": new.table_name,
            "covers": new.covers,
            "server_id": server_id,
            "opened_by": opened_by,
            "notes": new.notes,
            "status": OrderStatus.OPEN.value,
        },
    )
    return view(tx, order_id)


def edit_header(tx: Tx, order_id: str, changes: HeaderChanges, if_match: str | None) -> OrderView:
    """Change table, covers or notes, refusing an edit made from a stale copy."""
    return _change_header(tx, order_id, _set_fields(changes), if_match, "edit the order")


def transfer(tx: Tx, order_id: str, to: Transfer, if_match: str | None) -> OrderView:
    """Move the order to another table and/or server."""
    fields = _set_fields(to)
    if isinstance(fields.get("server_id"), str):
        _check_employee(tx, str(fields["server_id"]))
    return _change_header(tx, order_id, fields, if_match, "transfer the order")


#: what succeeded payments paid off a check, less what refunds gave back of it
NET_PAID_SQL = """
SELECT coalesce(sum(p.amount_pence - min(p.amount_pence, coalesce(r.back, 0))), 0)
FROM payments p
LEFT JOIN (SELECT payment_id, sum(amount_pence) AS back FROM refunds
           WHERE status IN ('pending', 'succeeded') GROUP BY payment_id) r
  ON r.payment_id = p.id
WHERE p.order_id = ? AND p.status = 'succeeded'
"""


def net_paid(tx: Tx, order_id: str) -> int:
    """Pence paid off the check by payments, less what refunds gave back of them."""
    return int(tx.one(NET_PAID_SQL, (order_id,))[0])


def close_order(tx: Tx, order_id: str) -> OrderView:
    """Close an order whose payments cover its total exactly (none: nothing to pay)."""
    order = load(tx, order_id)
    status = status_of(order)
    if status in EDITABLE or status is OrderStatus.PAID:
        totals = summary(tx, order_id).totals
        due = totals.total_pence - net_paid(tx, order_id)
        if due:
            between: dict[str, object] = {"from": str(status), "to": OrderStatus.CLOSED.value}
            if due > 0:
                why = f"{due} pence of {totals.total_pence} still needs payment (or a void)"
            else:
                why = f"{-due} pence was paid beyond the total: refund it first"
            raise ApiError(
                ApiCode.BALANCE_DUE,
                f"cannot close: {why}",
                order_id=order_id,
                due_pence=max(due, 0),
                refund_due_pence=max(-due, 0),
                **between,
            )
    move(tx, order, OrderStatus.CLOSED, closed_at_ms=tx.now_ms)
    return view(tx, order_id)


def set_discount(
    tx: Tx, order_id: str, discount: NewDiscount, given_by: str, approved_by: str
) -> OrderView:
    """Give the check ``discount`` (replacing any before it)."""
    require_editable(load(tx, order_id), "discount the order")
    given = (discount.percent, discount.amount_pence, discount.reason, given_by, approved_by)
    tx.write("orders", order_id, Op.UPDATE, dict(zip(DISCOUNT_COLUMNS, given, strict=True)))
    return view(tx, order_id)


def remove_discount(tx: Tx, order_id: str) -> OrderView:
    """Take the check's discount off (an order without one is left as it is)."""
    order = load(tx, order_id)
    require_editable(order, "change the discount")
    if order.get("discount_percent") is not None or order.get("discount_pence") is not None:
        tx.write("orders", order_id, Op.UPDATE, dict.fromkeys(DISCOUNT_COLUMNS))
    return view(tx, order_id)


def _change_header(
    tx: Tx, order_id: str, fields: dict[str, Value], if_match: str | None, action: str
) -> OrderView:
    order = load(tx, order_id)
    if if_match is not None and if_match != "*" and if_match != header_version(order):
        raise ApiError(
            ApiCode.STALE_VERSION,
            "the order changed since this tablet read it",
            current=view(tx, order_id),
        )
    require_editable(order, action)
    tx.write("orders", order_id, Op.UPDATE, fields)
    return view(tx, order_id)


def _set_fields(body: msgspec.Struct) -> dict[str, Value]:
    fields: dict[str, Value] = {
        name: getattr(body, name)
        for name in body.__struct_fields__
        if getattr(body, name) is not UNSET
    }
    if not fields:
        raise ApiError(ApiCode.INVALID_REQUEST, "nothing to change")
    return fields


def _check_employee(tx: Tx, employee_id: str) -> None:
    employee = tx.get("employees", employee_id)
    if employee is None or employee.get("active") is False:
        raise not_found("employee", employee_id)
