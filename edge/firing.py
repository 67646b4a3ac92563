"""Firing an order: its unsent lines go to the kitchen as one ticket per station.

How it works. ``fire`` takes the order's lines that are neither fired nor voided (of one
course, or of all courses), groups them by the station their menu item names now (an item
deleted since goes to the default station), and writes one ``tickets`` row per station, in
station order. A ticket's ``items`` is a JSON snapshot of its lines, ``TicketItem`` each:
line id, name, quantity, the modifiers' names, notes, seat and course; a kitchen screen
shows that snapshot, never the live menu. A ticket's ``course`` is the course fired, or,
when all courses fire at once, their one course if they share it (else null). Each line is
marked fired with its ticket's id, and an open order moves to fired through the transition
table. Nothing is ever sent twice: a fire that finds nothing new is ``409 conflict``.
A line voided after it was fired is struck off its ticket by the void (``edge.ticket_voids``),
which finds the ticket's item by the ``line_id`` written here.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from shared.orders import OrderStatus
from sync_protocol.changes import Op

from .errors import ApiCode, ApiError
from .fields import Course
from .menu import DEFAULT_STATION
from .order_views import LineView, OrderView
from .orders import load, move, require_editable, status_of, view
from .rows import as_int, as_str
from .tx import Tx


class Fire(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which course to fire (absent: every line not sent yet)."""

    course: Course | None = None


class TicketItem(msgspec.Struct, frozen=True):
    """One line as the kitchen sees it on a ticket."""

    line_id: str
    name: str
    quantity: int
    modifiers: list[str]
    notes: str | None
    seat: int | None
    course: int


class Ticket(msgspec.Struct, frozen=True):
    """What one station must make for this fire."""

    id: str
    order_id: str  # the order fired
    station: str
    course: int | None
    items: list[TicketItem]


class Fired(msgspec.Struct, frozen=True):
    """The order after the fire, and the tickets it sent."""

    order: OrderView
    tickets: list[Ticket]


_encode = msgspec.json.Encoder().encode


def fire(
    tx: Tx, order_id: str, course: int | None, fired_by: str, new_id: Callable[[str], str]
) -> Fired:
    """Send the order's unsent lines (of ``course``, or all) to their stations."""
    order = load(tx, order_id)
    require_editable(order, "fire the order")
    lines = [
        line
        for line in view(tx, order_id).lines
        if not line.fired and not line.voided and (course is None or line.course == course)
    ]
    if not lines:
        raise ApiError(
            ApiCode.CONFLICT,
            "nothing to fire: every line is already sent or voided",
            order_id=order_id,
            course=course,
        )
    by_station: dict[str, list[LineView]] = {}
    for line in lines:
        by_station.setdefault(_station(tx, line.item_id), []).append(line)
    tickets = []
    for station in sorted(by_station):
        group = by_station[station]
        courses = {line.course for line in group}
        ticket = Ticket(
            new_id("tkt"),
            order_id,
            station,
            course if course is not None else (courses.pop() if len(courses) == 1 else None),
            [_item(line) for line in group],
        )
        tx.write(
            "tickets",
            ticket.id,
            Op.INSERT,
            {
                "order_id": order_id,
                "check_number": as_int(order, "check_number"),
                "table_name": order.get("table_name"),
                "station": station,
                "course": ticket.course,
                "items": _encode(ticket.items).decode(),
                "fired_at_ms": tx.now_ms,
                "fired_by": fired_by,
                "bumped": False,
            },
        )
        for line in group:
            tx.write("order_lines", line.id, Op.UPDATE, {"fired": True, "ticket_id": ticket.id})
        tickets.append(ticket)
    if status_of(order) is OrderStatus.OPEN:
        move(tx, order, OrderStatus.FIRED)
    return Fired(view(tx, order_id), tickets)


def _station(tx: Tx, item_id: str) -> str:
    item = tx.get("menu_items", item_id)
    return (as_str(item, "station") if item is not None else "") or DEFAULT_STATION


def _item(line: LineView) -> TicketItem:
    return TicketItem(
        line.id,
        line.name,
        line.quantity,
        [m.name for m in line.modifiers],
        line.notes,
        line.seat,
        line.course,
    )
