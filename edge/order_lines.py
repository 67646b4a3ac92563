"""Order lines: add them (priced from the menu), void them, move them to another order.

How it works. Lines are add-only (``shared.registry``): a line is inserted once with its
price, modifiers and notes copied onto it, and afterwards only its flags change (fired,
voided). So two tablets adding lines to one order at once each insert their own rows and
neither can lose the other's; the store's single writer runs them one after the other.

* ``add_lines`` prices every line with ``menu.price_line`` and inserts them all, or none.
* ``void_line`` is its own change (``voided`` is sticky). A line that was not fired needs
  ``order.void_line``; a fired one also needs ``order.void_sent``, which the route checks
  (or a manager's approval lends) before the transaction and passes in as ``may_void_sent``.
  A fired line's void records who approved it: the lending manager, or the employee who
  holds ``order.void_sent`` themself.
* ``void_order`` voids the whole check: each line still live is voided exactly as
  ``void_line`` would (one change per line, the same reason for all), then the order moves
  to ``voided`` through the transition table. If any live line was fired, the route must
  have passed ``may_void_sent`` (as for a single fired line); lines voided before are left
  as they are.
* ``move_lines`` voids each line in its order (reason ``"moved"``) and adds a copy to the
  other order with ``moved_from`` naming the original; a fired line stays fired (and the
  receiving order becomes fired if it was only open). A move is not waste, so it needs
  ``order.transfer`` rather than a void permission.
* Both voids strike a fired line off its kitchen ticket in the same transaction
  (``edge.ticket_voids``), so every screen of its station sees it, and it syncs; a line
  never fired touches no ticket.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from shared.orders import OrderStatus
from sync_protocol.changes import Op, Value

from .errors import ApiCode, ApiError, not_found
from .fields import Course, Id, Quantity, Reason, Seat, Text
from .menu import price_line
from .order_views import LineView, OrderSummary, OrderView, line_of
from .orders import load, move, require_editable, require_move, status_of, summary, view
from .rows import as_bool, as_str
from .ticket_voids import item_line_ids, marks_json, parse_items, stored_marks, ticket_voids
from .tx import Tx

NewId = Callable[[str], str]

MOVED = "moved"  # the void reason of a line moved to another order

#: line columns a move copies as they are
_COPIED = ("item_id", "name", "quantity", "unit_price_pence", "modifiers", "notes", "course",
           "seat", "fired", "ticket_id")  # fmt: skip


class NewLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A line to add: an item, how many, its modifier choices, notes, course and seat."""

    item_id: Id
    quantity: Quantity = 1
    modifiers: Annotated[list[Id], Meta(max_length=20)] = []
    notes: Text | None = None
    course: Course = 1
    seat: Seat | None = None


class NewLines(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Several lines added together: all of them, or none."""

    lines: Annotated[list[NewLine], Meta(min_length=1, max_length=50)]


class VoidLine(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why a line is voided."""

    reason: Reason


class VoidOrder(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why the whole check is voided (the reason every line is voided with)."""

    reason: Reason


class MoveLines(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Lines to move to another order (each at most once)."""

    line_ids: Annotated[list[Id], Meta(min_length=1, max_length=50)]
    to_order_id: Id


class LinesAdded(msgspec.Struct, frozen=True):
    """The order's header, version and totals after the add, and the lines added (with
    their ids), in the order they were sent.

    Not the order's other lines: an add is answered (and its answer kept for a retry) in the
    size of what it added, however long the check has grown. A tablet reads the whole order
    with ``GET /v1/orders/{id}``; the live ``row`` events bring it other tablets' lines.
    """

    order: OrderSummary
    lines: list[LineView]
    line_ids: list[str]


class LinesMoved(msgspec.Struct, frozen=True):
    """Both orders after a move."""

    source: OrderView
    target: OrderView


def add_lines(
    tx: Tx, order_id: str, lines: Sequence[NewLine], added_by: str, new_id: NewId
) -> LinesAdded:
    """Price and add ``lines`` to an open or fired order."""
    order = load(tx, order_id)
    require_editable(order, "add lines")
    currency = as_str(order, "currency", "GBP")
    ids = []
    for line in lines:
        priced = price_line(tx, line.item_id, line.modifiers)
        if priced.currency != currency:
            raise ApiError(
                ApiCode.INVALID_REQUEST,
                f"{priced.name} is priced in {priced.currency}, the order in {currency}",
                item_id=line.item_id,
            )
        line_id = new_id("ln")
        tx.write(
            "order_lines",
            line_id,
            Op.INSERT,
            {
                "order_id": order_id,
                "item_id": priced.item_id,
                "name": priced.name,
                "quantity": line.quantity,
                "unit_price_pence": priced.unit_price_pence,
                "modifiers": msgspec.json.encode(priced.modifiers).decode(),
                "notes": line.notes,
                "course": line.course,
                "seat": line.seat,
                "added_by": added_by,
                "added_at_ms": tx.now_ms,
            },
            new=True,
        )
        ids.append(line_id)
    added = [line_of({"id": i, **(tx.get("order_lines", i) or {})}) for i in ids]
    return LinesAdded(summary(tx, order_id), added, ids)


def line_of_order(tx: Tx, order_id: str, line_id: str) -> dict[str, Any]:
    """A line of ``order_id`` (with its id), or ``not_found``."""
    line = tx.get("order_lines", line_id)
    if line is None or line.get("order_id") != order_id:
        raise not_found("line", line_id)
    return {"id": line_id, **line}


def void_line(
    tx: Tx,
    order_id: str,
    line_id: str,
    reason: str,
    voided_by: str,
    may_void_sent: bool,
    approved_by: str | None,
) -> OrderView:
    """Void a line; a fired one only when ``may_void_sent`` (permission or approval)."""
    order = load(tx, order_id)
    require_editable(order, "void a line")
    line = _live_line(tx, order_id, line_id)
    fired = as_bool(line, "fired", False)
    if fired and not may_void_sent:
        raise _approval_required("the line was sent to the kitchen")
    tx.write("order_lines", line_id, Op.UPDATE, _void(reason, voided_by, fired, approved_by))
    if fired:
        _strike_off_tickets(tx, [line_id])
    return view(tx, order_id)


def sent_lines_live(order: OrderView) -> bool:
    """Whether any line of ``order`` not voided yet was sent to the kitchen."""
    return any(line.fired and not line.voided for line in order.lines)


def void_order(
    tx: Tx,
    order_id: str,
    reason: str,
    voided_by: str,
    may_void_sent: bool,
    approved_by: str | None,
) -> OrderView:
    """Void every live line and the order; fired lines only when ``may_void_sent``."""
    order = load(tx, order_id)
    require_move(order, OrderStatus.VOIDED)
    current = view(tx, order_id)
    if sent_lines_live(current) and not may_void_sent:
        raise _approval_required("lines of the order were sent to the kitchen")
    sent = []
    for line in current.lines:
        if not line.voided:
            fields = _void(reason, voided_by, line.fired, approved_by)
            tx.write("order_lines", line.id, Op.UPDATE, fields)
            if line.fired:
                sent.append(line.id)
    _strike_off_tickets(tx, sent)
    move(tx, order, OrderStatus.VOIDED, closed_at_ms=tx.now_ms)
    return view(tx, order_id)


def move_lines(tx: Tx, order_id: str, body: MoveLines, moved_by: str, new_id: NewId) -> LinesMoved:
    """Move lines to another order: void each here, add its copy there."""
    if body.to_order_id == order_id:
        raise ApiError(ApiCode.INVALID_REQUEST, "the lines are already on that order")
    if len(set(body.line_ids)) != len(body.line_ids):
        raise ApiError(ApiCode.INVALID_REQUEST, "a line is listed twice")
    source = load(tx, order_id)
    require_editable(source, "move lines")
    target = load(tx, body.to_order_id)
    require_editable(target, "move lines to it")
    any_fired = False
    for line_id in body.line_ids:
        line = _live_line(tx, order_id, line_id)
        tx.write(
            "order_lines",
            line_id,
            Op.UPDATE,
            {"voided": True, "void_reason": MOVED, "voided_by": moved_by},
        )
        copy: dict[str, Value] = {name: line.get(name) for name in _COPIED}
        copy |= {"order_id": target["id"], "moved_from": line_id}
        copy |= {"added_by": moved_by, "added_at_ms": tx.now_ms}
        tx.write("order_lines", new_id("ln"), Op.INSERT, copy)
        any_fired = any_fired or as_bool(line, "fired", False)
    if any_fired and status_of(target) is OrderStatus.OPEN:
        move(tx, target, OrderStatus.FIRED)
    return LinesMoved(view(tx, order_id), view(tx, target["id"]))


def _void(reason: str, voided_by: str, fired: bool, approved_by: str | None) -> dict[str, Value]:
    """A line's void change; a fired line's names who approved it."""
    fields: dict[str, Value] = {"voided": True, "void_reason": reason, "voided_by": voided_by}
    if fired:
        fields["void_approved_by"] = approved_by or voided_by
    return fields


def struck_off(line: Mapping[str, object] | None) -> bool:
    """Whether a line's item is off the kitchen's list: voided, and not moved elsewhere."""
    return line is not None and bool(line.get("voided")) and line.get("void_reason") != MOVED


def _strike_off_tickets(tx: Tx, voided: Sequence[str]) -> None:
    """Strike the just-voided fired lines ``voided`` off their tickets (``edge.ticket_voids``)."""
    by_ticket: dict[str, list[str]] = {}
    for line_id in voided:
        line = tx.get("order_lines", line_id)
        ticket_id = line.get("ticket_id") if line is not None else None
        if isinstance(ticket_id, str) and ticket_id:
            by_ticket.setdefault(ticket_id, []).append(line_id)
    for ticket_id, line_ids in by_ticket.items():
        ticket = tx.get("tickets", ticket_id)
        if ticket is None:
            continue
        items = {i for i in item_line_ids(parse_items(ticket.get("items"))) if i is not None}
        struck = {_item_carried(tx, line_id, items) for line_id in line_ids}
        struck |= {i for i in items if struck_off(tx.get("order_lines", i))}
        marks = ticket_voids(ticket, struck)
        fields: dict[str, Value] = {}
        if list(marks.line_ids) != stored_marks(ticket.get("voided_line_ids")):
            fields["voided_line_ids"] = marks_json(marks.line_ids)
        if marks.voided and not ticket.get("voided"):
            fields["voided"] = True
        if fields:
            tx.write("tickets", ticket_id, Op.UPDATE, fields)


def _item_carried(tx: Tx, line_id: str, items: set[str]) -> str:
    """The ticket item a line carries: its own, or, for a moved copy, the line it replaces."""
    current, seen = line_id, set()
    while current not in items and current not in seen:
        seen.add(current)
        line = tx.get("order_lines", current)
        moved_from = line.get("moved_from") if line is not None else None
        if not isinstance(moved_from, str):
            break
        current = moved_from
    return current


def _approval_required(why: str) -> ApiError:
    return ApiError(
        ApiCode.APPROVAL_REQUIRED,
        f"{why}: voiding needs a manager's approval",
        permission="order.void_sent",
    )


def _live_line(tx: Tx, order_id: str, line_id: str) -> dict[str, Any]:
    line = line_of_order(tx, order_id, line_id)
    if as_bool(line, "voided", False):
        raise ApiError(
            ApiCode.CONFLICT,
            "the line is already voided",
            line_id=line_id,
            void_reason=line.get("void_reason"),
        )
    return line
