"""Kitchen tickets as a station's screen sees them: the open ones, bump and recall.

Tickets are written when an order is fired (``tickets`` in the registry); here a kitchen
screen lists them and a cook bumps (done) or recalls (back on the screen) one. Bump and recall
are idempotent (bumping a bumped ticket changes nothing), so a double tap or a retry is
harmless, and each change reaches every screen as a live ``tickets:<station>`` event.

Who may bump: a paired device of kind ``kds`` (a kitchen screen has no employee login), or an
employee with ``kitchen.bump`` logged in on any other device (``Authorization: Bearer``, as on
every employee route). The routes are declared ``Auth.DEVICE`` and ``_check_bumper`` does the
rest, so the audit entry names the employee when there is one.

Voids (``edge.ticket_voids``): a ticket says whether it is void (every item on it voided)
and which items were struck off (by the ``line_id`` each item names). The marks are read as
the stored ones plus every item whose own order line is voided (not moved), so a mark lost
to a concurrent write on another edge still shows.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from typing import Annotated, Any, Literal

import msgspec

from shared.roles import Permission
from sync_protocol.changes import Op

from ..order_lines import struck_off
from ..store import EdgeStore
from ..ticket_voids import item_line_ids, parse_items, ticket_voids
from ..tx import Tx
from .auth import AUTHENTICATOR
from .errors import ApiCode, ApiError
from .routing import ApiRoutes, Auth, Ctx

routes = ApiRoutes("kitchen")

KDS_KIND = "kds"  # the device kind of a kitchen screen
_FIELDS = (
    "order_id", "check_number", "table_name", "station", "course", "items", "fired_at_ms",
    "fired_by", "bumped", "bumped_at_ms", "voided", "voided_line_ids",
)  # fmt: skip
_COLUMNS = ", ".join(("id", *_FIELDS))


class TicketQuery(msgspec.Struct, frozen=True):
    """Which tickets: a station's open ones, or its most recently bumped."""

    station: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "kitchen"
    state: Literal["open", "bumped"] = "open"
    limit: Annotated[int, msgspec.Meta(ge=1, le=500)] = 50  # bumped ones only


class Ticket(msgspec.Struct, frozen=True):
    """A kitchen ticket: the lines of one course for one station, as fired, and its voids."""

    id: str
    order_id: str | None
    check_number: int | None
    table_name: str | None
    station: str | None
    course: int | None
    items: list[Any]  # the lines as fired (the firing module's shape), parsed from JSON
    fired_at_ms: int | None
    fired_by: str | None
    bumped: bool
    bumped_at_ms: int | None
    voided: bool  # every item on it was voided: nothing left to make
    voided_line_ids: list[str]  # the items struck off (their line ids), in ticket order


class TicketList(msgspec.Struct, frozen=True):
    """Tickets, oldest fired first (open) or most recently bumped first (bumped)."""

    tickets: list[Ticket]


def _ticket(tid: str, row: Mapping[str, Any], struck: Container[str]) -> Ticket:
    """A ticket from its row; ``struck`` holds the line ids whose lines are voided."""
    voids = ticket_voids(row, struck)
    g = row.get
    return Ticket(
        tid, g("order_id"), g("check_number"), g("table_name"), g("station"), g("course"),
        parse_items(g("items")), g("fired_at_ms"), g("fired_by"), bool(g("bumped")),
        g("bumped_at_ms"), voids.voided, list(voids.line_ids),
    )  # fmt: skip


def _line_ids(rows: Iterable[Mapping[str, Any]]) -> list[str]:
    """The order lines the tickets' items name."""
    return [
        line_id
        for row in rows
        for line_id in item_line_ids(parse_items(row.get("items")))
        if line_id is not None
    ]


async def _struck(store: EdgeStore, rows: Iterable[Mapping[str, Any]]) -> set[str]:
    """Which of the lines the tickets' items name are voided (read on the store's reader)."""
    ids = _line_ids(rows)
    if not ids:
        return set()
    found = await store.query(
        "SELECT id, voided, void_reason FROM order_lines"
        " WHERE id IN (SELECT value FROM json_each(?))",
        (msgspec.json.encode(ids).decode(),),
    )
    return {r[0] for r in found if struck_off({"voided": r[1], "void_reason": r[2]})}


def _struck_in(tx: Tx, row: Mapping[str, Any]) -> set[str]:
    """``_struck`` for one ticket, inside a transaction."""
    return {i for i in _line_ids([row]) if struck_off(tx.get("order_lines", i))}


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
    rows = [
        (row[0], dict(zip(_FIELDS, row[1:], strict=True)))
        for row in await ctx.store.query(sql, params)
    ]
    struck = await _struck(ctx.store, (row for _, row in rows))
    return TicketList([_ticket(tid, row, struck) for tid, row in rows])


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
        return _ticket(ticket_id, found, await _struck(ctx.store, [found]))

    def change(tx: Tx) -> Ticket:
        row = tx.get("tickets", ticket_id)
        if row is None:
            raise ApiError(ApiCode.NOT_FOUND, f"no ticket {ticket_id!r}", ticket_id=ticket_id)
        if bool(row.get("bumped")) != bumped:
            fields = {"bumped": bumped, "bumped_at_ms": tx.now_ms if bumped else None}
            tx.write("tickets", ticket_id, Op.UPDATE, fields)
            row.update(fields)
        return _ticket(ticket_id, row, _struck_in(tx, row))

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
