"""Kitchen tickets as a station's screen sees them: the open ones, bump and recall.

Tickets are written when an order is fired (``tickets`` in the registry); here a kitchen
screen lists them and a cook bumps (done) or recalls (back on the screen) one. Bump and recall
are idempotent (bumping a bumped ticket changes nothing), so a double tap or a retry is
harmless, and each change reaches every screen as a live ``tickets:<station>`` event.

Who may bump: a paired device of kind ``kds`` (a kitchen screen has no employee login), or an
employee with ``kitchen.bump`` logged in on any other device (``Authorization: Bearer``, as on
every employee route). The routes are declared ``Auth.DEVICE`` and ``_check_bumper`` does the
rest, so the audit entry names the employee when there is one.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec

from shared.roles import Permission
from sync_protocol.changes import Op, Value

from ..tx import Tx
from .auth import AUTHENTICATOR
from .errors import ApiCode, ApiError
from .routing import ApiRoutes, Auth, Ctx

routes = ApiRoutes("kitchen")

KDS_KIND = "kds"  # the device kind of a kitchen screen
_FIELDS = (
    "order_id", "check_number", "table_name", "station", "course", "items", "fired_at_ms",
    "fired_by", "bumped", "bumped_at_ms",
)  # fmt: skip
_COLUMNS = ", ".join(("id", *_FIELDS))


class TicketQuery(msgspec.Struct, frozen=True):
    """Which tickets: a station's open ones, or its most recently bumped."""

    station: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "kitchen"
    state: Literal["open", "bumped"] = "open"
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50  # bumped ones only


class Ticket(msgspec.Struct, frozen=True):
    """A kitchen ticket: the lines of one course for one station, as fired."""

    id: str
    order_id: str | None
    check_number: int | None
    table_name: str | None
    station: str | None
    course: int | None
    items: list[Any]  # the lines as fired (the orders module's shape), parsed from JSON
    fired_at_ms: int | None
    fired_by: str | None
    bumped: bool
    bumped_at_ms: int | None


class TicketList(msgspec.Struct, frozen=True):
    """Tickets, oldest fired first (open) or most recently bumped first (bumped)."""

    tickets: list[Ticket]


def _items(text: Value) -> list[Any]:
    try:
        items = json.loads(str(text)) if text else []
    except ValueError:
        return []
    return items if isinstance(items, list) else []


def _ticket(row: tuple[Any, ...]) -> Ticket:
    tid, order, check, table, station, course, items, fired, by, bumped, bumped_at = row
    return Ticket(
        tid, order, check, table, station, course, _items(items), fired, by, bool(bumped),
        bumped_at,
    )  # fmt: skip


@routes.route(
    "GET",
    "/v1/kitchen/tickets",
    summary="A station's open tickets (oldest first), or its last bumped ones",
    query=TicketQuery,
    response=TicketList,
    auth=Auth.DEVICE,
)
async def list_tickets(ctx: Ctx) -> TicketList:
    """The open or recently bumped tickets of one station."""
    query: TicketQuery = ctx.query
    if query.state == "open":
        sql = (
            f"SELECT {_COLUMNS} FROM tickets WHERE station = ? AND NOT coalesce(bumped, 0)"
            " ORDER BY fired_at_ms, id"
        )
        params: tuple[Any, ...] = (query.station,)
    else:
        sql = (
            f"SELECT {_COLUMNS} FROM tickets WHERE station = ? AND coalesce(bumped, 0)"
            " ORDER BY bumped_at_ms DESC, id LIMIT ?"
        )
        params = (query.station, query.limit)
    return TicketList([_ticket(tuple(row)) for row in await ctx.store.query(sql, params)])


async def _check_bumper(ctx: Ctx) -> None:
    """Allow a kitchen screen, or an employee with ``kitchen.bump`` on another device."""
    device = ctx.principal
    assert device is not None  # a DEVICE route always has one
    if device.device_kind == KDS_KIND:
        return
    scheme, _, token = ctx.request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(
            ApiCode.NOT_LOGGED_IN,
            "bump from a kitchen screen, or log in as someone with kitchen.bump",
        )
    ctx.principal = await ctx.request.app[AUTHENTICATOR].session(token.strip(), device)
    ctx.require(Permission.KITCHEN_BUMP)


async def _set_bumped(ctx: Ctx, bumped: bool) -> Ticket:
    await _check_bumper(ctx)
    ticket_id = ctx.params["ticket_id"]
    found = await ctx.store.get("tickets", ticket_id)
    if found is not None and bool(found.get("bumped")) == bumped:  # a double tap: no change
        return _ticket((ticket_id, *(found.get(name) for name in _FIELDS)))

    def change(tx: Tx) -> Ticket:
        row = tx.get("tickets", ticket_id)
        if row is None:
            raise ApiError(ApiCode.NOT_FOUND, f"no ticket {ticket_id!r}", ticket_id=ticket_id)
        if bool(row.get("bumped")) != bumped:
            fields = {"bumped": bumped, "bumped_at_ms": tx.now_ms if bumped else None}
            tx.write("tickets", ticket_id, Op.UPDATE, fields)
            row.update(fields)
        return _ticket((ticket_id, *(row.get(name) for name in _FIELDS)))

    return await ctx.mutate(change)


_BUMP_ERRORS = (
    ApiCode.NOT_FOUND,
    ApiCode.NOT_LOGGED_IN,
    ApiCode.TOKEN_EXPIRED,
    ApiCode.WRONG_DEVICE,
    ApiCode.PERMISSION_DENIED,
)


@routes.route(
    "POST",
    "/v1/kitchen/tickets/{ticket_id}/bump",
    summary="Bump a ticket (done): a kitchen screen, or an employee with kitchen.bump",
    response=Ticket,
    auth=Auth.DEVICE,
    errors=_BUMP_ERRORS,
)
async def bump_ticket(ctx: Ctx) -> Ticket:
    """Mark a ticket done; it leaves the station's screens."""
    return await _set_bumped(ctx, True)


@routes.route(
    "POST",
    "/v1/kitchen/tickets/{ticket_id}/recall",
    summary="Recall a bumped ticket back onto the screens",
    response=Ticket,
    auth=Auth.DEVICE,
    errors=_BUMP_ERRORS,
)
async def recall_ticket(ctx: Ctx) -> Ticket:
    """Put a bumped ticket back on the station's screens."""
    return await _set_bumped(ctx, False)
