"""Orders for the tablets: open, read, add and void lines, fire, edit, discount, transfer,
move, close, void.

Each route checks who may call it, decodes its body, and runs one domain function of
``edge.orders`` / ``edge.order_lines`` / ``edge.firing`` in ``ctx.mutate`` (one transaction:
synced, audited, idempotent under ``Idempotency-Key``). Every answer that changes an order
carries the order as it now is, with its lines, totals and header ``version``, except a line
add, which carries the header, version and totals with just the lines it added (its cost
stays the same however long the check); header edits send that version back as ``If-Match``
(see ``edge.orders``). Voiding a line that was fired
needs ``order.void_sent`` on top of ``order.void_line``: a server gets it for one void with
a manager's ``X-Fynlo-Approval``. Voiding the whole order is the same rule over its lines: a
manager's approval is needed (and spent) only when a line still live was fired. A discount
(set or taken off) needs ``order.discount``, which a server borrows the same way.
"""

from __future__ import annotations

import json
from typing import Annotated

import msgspec
from msgspec import Meta

from shared.orders import OrderStatus, can_move
from shared.roles import Permission

from .. import firing, order_lines, orders
from ..errors import not_found
from ..firing import Fire, Fired
from ..order_lines import (
    LinesAdded,
    LinesMoved,
    MoveLines,
    NewLine,
    NewLines,
    VoidLine,
    VoidOrder,
    sent_lines_live,
)
from ..order_views import (
    ORDER_SQL,
    ORDERS_SQL,
    OrderList,
    OrderView,
    order_from_row,
    summary_from_row,
)
from ..orders import HeaderChanges, NewDiscount, NewOrder, Transfer
from .auth import new_id
from .errors import ApiCode
from .routing import ApiRoutes, Ctx

routes = ApiRoutes("orders")

_FOUND = (ApiCode.NOT_FOUND,)
_CHANGE = (ApiCode.NOT_FOUND, ApiCode.INVALID_TRANSITION)
#: a change that may need (and spend) a manager's approval
_APPROVED = (*_CHANGE, ApiCode.APPROVAL_REQUIRED, ApiCode.APPROVAL_INVALID)


_STATUS = "|".join(s.value for s in OrderStatus)
#: one status or several, comma-separated ("open,fired": every check still running)
Statuses = Annotated[str, Meta(pattern=rf"^({_STATUS})(,({_STATUS}))*$")]


class OrderQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which orders: by status(es) and business day (ISO date), newest first, at most ``limit``."""

    status: Statuses | None = None
    business_day: Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")] | None = None
    limit: Annotated[int, Meta(ge=1, le=500)] = 100


def _employee(ctx: Ctx) -> str:
    assert ctx.employee_id is not None  # EMPLOYEE routes always have one
    return ctx.employee_id


def _if_match(ctx: Ctx) -> str | None:
    """The version in ``If-Match`` (quotes and a weak ``W/`` prefix are accepted)."""
    value = ctx.request.headers.get("If-Match")
    if value is None:
        return None
    value = value.strip().removeprefix("W/")
    return value.strip('"')


@routes.route(
    "POST",
    "/v1/orders",
    summary="Open an order (its check number is the next of the business day)",
    body=NewOrder,
    response=OrderView,
    status=201,
    permission=Permission.ORDER_OPEN,
    errors=_FOUND,
)
async def open_order(ctx: Ctx, body: NewOrder) -> OrderView:
    """Open an order for a table."""
    order_id, who = new_id("ord"), _employee(ctx)
    return await ctx.mutate(lambda tx: orders.open_order(tx, order_id, body, who))


@routes.route(
    "GET",
    "/v1/orders",
    summary="Orders (e.g. ?status=open,fired), newest first, with their totals",
    query=OrderQuery,
    response=OrderList,
    permission=Permission.ORDER_VIEW,
)
async def list_orders(ctx: Ctx) -> OrderList:
    """Orders matching the query, without their lines."""
    q: OrderQuery = ctx.query
    statuses = json.dumps(q.status.split(",")) if q.status is not None else None
    rows = await ctx.store.query(ORDERS_SQL, (statuses, q.business_day, q.limit))
    return OrderList([summary_from_row(row) for row in rows])


@routes.route(
    "GET",
    "/v1/orders/{order_id}",
    summary="An order with its lines, totals in pence, and its header version",
    response=OrderView,
    permission=Permission.ORDER_VIEW,
    errors=_FOUND,
)
async def get_order(ctx: Ctx) -> OrderView:
    """One order, as committed."""
    order_id = ctx.params["order_id"]
    rows = await ctx.store.query(ORDER_SQL, (order_id,))
    if not rows:
        raise not_found("order", order_id)
    return order_from_row(rows[0])


@routes.route(
    "PATCH",
    "/v1/orders/{order_id}",
    summary="Edit the header (table, covers, notes); If-Match: <version> refuses stale edits",
    body=HeaderChanges,
    response=OrderView,
    permission=Permission.ORDER_EDIT,
    errors=(*_CHANGE, ApiCode.STALE_VERSION),
)
async def edit_order(ctx: Ctx, body: HeaderChanges) -> OrderView:
    """Change the order's header."""
    order_id, version = ctx.params["order_id"], _if_match(ctx)
    return await ctx.mutate(lambda tx: orders.edit_header(tx, order_id, body, version))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/lines",
    summary="Add a line: an item with modifiers, notes, course and seat, priced from the menu",
    body=NewLine,
    response=LinesAdded,
    status=201,
    permission=Permission.ORDER_EDIT,
    errors=(*_CHANGE, ApiCode.ITEM_UNAVAILABLE),
)
async def add_line(ctx: Ctx, body: NewLine) -> LinesAdded:
    """Add one line to an order."""
    order_id, who = ctx.params["order_id"], _employee(ctx)
    return await ctx.mutate(lambda tx: order_lines.add_lines(tx, order_id, [body], who, new_id))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/lines/batch",
    summary="Add several lines at once (all or none)",
    body=NewLines,
    response=LinesAdded,
    status=201,
    permission=Permission.ORDER_EDIT,
    errors=(*_CHANGE, ApiCode.ITEM_UNAVAILABLE),
)
async def add_lines(ctx: Ctx, body: NewLines) -> LinesAdded:
    """Add several lines to an order in one transaction."""
    order_id, who = ctx.params["order_id"], _employee(ctx)
    return await ctx.mutate(lambda tx: order_lines.add_lines(tx, order_id, body.lines, who, new_id))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/lines/{line_id}/void",
    summary="Void a line; once fired it needs order.void_sent or a manager's approval",
    body=VoidLine,
    response=OrderView,
    permission=Permission.ORDER_VOID_LINE,
    errors=(*_APPROVED, ApiCode.CONFLICT),
)
async def void_line(ctx: Ctx, body: VoidLine) -> OrderView:
    """Void one line of an order."""
    order_id, line_id, who = ctx.params["order_id"], ctx.params["line_id"], _employee(ctx)
    line = await ctx.store.get("order_lines", line_id)
    if line is not None and line.get("order_id") == order_id and line.get("fired") is True:
        ctx.require(Permission.ORDER_VOID_SENT)  # spends an approval if one is needed
        may_void_sent = True
    else:  # not fired (yet): an approval is not spent on it
        assert ctx.principal is not None
        may_void_sent = Permission.ORDER_VOID_SENT in ctx.principal.permissions
    return await ctx.mutate(
        lambda tx: order_lines.void_line(
            tx, order_id, line_id, body.reason, who, may_void_sent, ctx.approved_by
        )
    )


@routes.route(
    "POST",
    "/v1/orders/{order_id}/lines/move",
    summary="Move lines to another order (each is voided here and copied there)",
    body=MoveLines,
    response=LinesMoved,
    permission=Permission.ORDER_TRANSFER,
    errors=(*_CHANGE, ApiCode.CONFLICT),
)
async def move_lines(ctx: Ctx, body: MoveLines) -> LinesMoved:
    """Move lines between orders."""
    order_id, who = ctx.params["order_id"], _employee(ctx)
    return await ctx.mutate(lambda tx: order_lines.move_lines(tx, order_id, body, who, new_id))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/fire",
    summary="Send unsent lines (of one course, or all) to the kitchen: a ticket per station",
    body=Fire,
    response=Fired,
    permission=Permission.ORDER_EDIT,
    errors=(*_CHANGE, ApiCode.CONFLICT),
)
async def fire_order(ctx: Ctx, body: Fire) -> Fired:
    """Fire an order's unsent lines."""
    order_id, who = ctx.params["order_id"], _employee(ctx)
    return await ctx.mutate(lambda tx: firing.fire(tx, order_id, body.course, who, new_id))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/transfer",
    summary="Move the order to another table and/or hand it to another server",
    body=Transfer,
    response=OrderView,
    permission=Permission.ORDER_TRANSFER,
    errors=(*_CHANGE, ApiCode.STALE_VERSION),
)
async def transfer_order(ctx: Ctx, body: Transfer) -> OrderView:
    """Transfer an order."""
    order_id, version = ctx.params["order_id"], _if_match(ctx)
    return await ctx.mutate(lambda tx: orders.transfer(tx, order_id, body, version))


@routes.route(
    "PUT",
    "/v1/orders/{order_id}/discount",
    summary="Give the check a discount (a percentage or an amount off, with a reason); "
    "order.discount or a manager's approval",
    body=NewDiscount,
    response=OrderView,
    permission=Permission.ORDER_DISCOUNT,
    errors=_APPROVED,
)
async def set_discount(ctx: Ctx, body: NewDiscount) -> OrderView:
    """Set (or replace) the order's discount."""
    order_id, who = ctx.params["order_id"], _employee(ctx)
    return await ctx.mutate(
        lambda tx: orders.set_discount(tx, order_id, body, who, ctx.approved_by or who)
    )


@routes.route(
    "DELETE",
    "/v1/orders/{order_id}/discount",
    summary="Take the check's discount off; order.discount or a manager's approval",
    response=OrderView,
    permission=Permission.ORDER_DISCOUNT,
    errors=_APPROVED,
)
async def remove_discount(ctx: Ctx) -> OrderView:
    """Remove the order's discount."""
    order_id = ctx.params["order_id"]
    return await ctx.mutate(lambda tx: orders.remove_discount(tx, order_id))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/close",
    summary="Close the order: once paid, or when nothing is left to pay",
    response=OrderView,
    permission=Permission.ORDER_CLOSE,
    errors=(*_CHANGE, ApiCode.BALANCE_DUE),
)
async def close_order(ctx: Ctx) -> OrderView:
    """Close an order."""
    order_id = ctx.params["order_id"]
    return await ctx.mutate(lambda tx: orders.close_order(tx, order_id))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/void",
    summary="Void the whole order and its live lines; once any was fired, order.void_sent or "
    "a manager's approval",
    body=VoidOrder,
    response=OrderView,
    permission=Permission.ORDER_VOID_LINE,
    errors=_APPROVED,
)
async def void_order(ctx: Ctx, body: VoidOrder) -> OrderView:
    """Void an open or fired order with every line still on it."""
    order_id, who = ctx.params["order_id"], _employee(ctx)
    rows = await ctx.store.query(ORDER_SQL, (order_id,))
    current = order_from_row(rows[0]) if rows else None
    if (
        current is not None
        and can_move(OrderStatus(current.status), OrderStatus.VOIDED)
        and sent_lines_live(current)
    ):
        ctx.require(Permission.ORDER_VOID_SENT)  # spends an approval if one is needed
        may_void_sent = True
    else:  # nothing sent, or the order cannot be voided: an approval is not spent on it
        assert ctx.principal is not None
        may_void_sent = Permission.ORDER_VOID_SENT in ctx.principal.permissions
    return await ctx.mutate(
        lambda tx: order_lines.void_order(
            tx, order_id, body.reason, who, may_void_sent, ctx.approved_by
        )
    )
