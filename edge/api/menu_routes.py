"""The menu as tablets see and change it."""

from __future__ import annotations

import msgspec

from shared.roles import Permission
from sync_protocol.changes import Op

from ..tx import Tx
from .errors import ApiCode, ApiError
from .routing import ApiRoutes, Ctx

routes = ApiRoutes("menu")


class Availability(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Whether an item can be sold now (false: 86'd)."""

    available: bool


class ItemAvailability(msgspec.Struct, frozen=True):
    """An item's availability after the change."""

    item_id: str
    available: bool


@routes.route(
    "POST",
    "/v1/menu/items/{item_id}/availability",
    summary="86 an item (or bring it back); every tablet sees it at once",
    body=Availability,
    response=ItemAvailability,
    permission=Permission.MENU_86,
    errors=(ApiCode.NOT_FOUND,),
)
async def set_availability(ctx: Ctx, body: Availability) -> ItemAvailability:
    """Mark an item available or 86'd."""
    item_id = ctx.params["item_id"]

    def change(tx: Tx) -> ItemAvailability:
        item = tx.get("menu_items", item_id)
        if item is None:
            raise ApiError(ApiCode.NOT_FOUND, f"no menu item {item_id!r}", item_id=item_id)
        if bool(item.get("available", True)) != body.available:
            tx.write("menu_items", item_id, Op.UPDATE, {"available": body.available})
        return ItemAvailability(item_id, body.available)

    return await ctx.mutate(change)
