"""The menu as tablets see and change it: read it whole, 86 an item, and (managers) edit it.

The domain rules live in ``edge.menu`` (reading, pricing) and ``edge.menu_edit`` (authoring);
each route here checks the permission, decodes the body and runs one of them in
``ctx.mutate``, so every edit syncs to the cloud, is audited and takes ``Idempotency-Key``.
Every tablet sees an edit or an 86 at once through the live ``row`` events of the menu tables.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from shared.roles import Permission
from sync_protocol.changes import Op

from .. import menu_edit
from ..menu import MENU_SQL, Category, Menu, MenuItem, Modifier, ModifierGroup, menu_from_row
from ..menu_edit import (
    CategoryChanges,
    ItemChanges,
    ModifierChanges,
    ModifierGroupChanges,
    NewCategory,
    NewItem,
    NewModifier,
    NewModifierGroup,
)
from ..tx import Tx
from .auth import new_id
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


# -- reading the menu ------------------------------------------------------------------------


@routes.route(
    "GET",
    "/v1/menu",
    summary="The whole menu: categories, items (prices in pence, station, availability), "
    "modifier groups with their modifiers",
    response=Menu,
    permission=Permission.MENU_VIEW,
)
async def get_menu(ctx: Ctx) -> Menu:
    """The menu, read in one statement (its parts always agree)."""
    (row,) = await ctx.store.query(MENU_SQL)
    return menu_from_row(row)


# -- authoring (managers; the cloud dashboard edits the same synced rows) -------------------

_EDIT = (ApiCode.NOT_FOUND, ApiCode.CONFLICT)


class Deleted(msgspec.Struct, frozen=True):
    """What was deleted."""

    id: str
    deleted: bool = True


async def _delete(ctx: Ctx, object_id: str, remove: Callable[[Tx, str], None]) -> Deleted:
    """Run ``remove`` in ``ctx.mutate``; the answer (kept for a retry) names what went."""

    def change(tx: Tx) -> Deleted:
        remove(tx, object_id)
        return Deleted(object_id)

    return await ctx.mutate(change)


@routes.route(
    "POST",
    "/v1/menu/categories",
    summary="Add a menu section",
    body=NewCategory,
    response=Category,
    status=201,
    permission=Permission.MENU_EDIT,
)
async def create_category(ctx: Ctx, body: NewCategory) -> Category:
    """Create a category."""
    category_id = new_id("cat")
    return await ctx.mutate(lambda tx: menu_edit.add_category(tx, category_id, body))


@routes.route(
    "PATCH",
    "/v1/menu/categories/{category_id}",
    summary="Change a menu section (absent fields stay)",
    body=CategoryChanges,
    response=Category,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def update_category(ctx: Ctx, body: CategoryChanges) -> Category:
    """Change a category."""
    category_id = ctx.params["category_id"]
    return await ctx.mutate(lambda tx: menu_edit.change_category(tx, category_id, body))


@routes.route(
    "DELETE",
    "/v1/menu/categories/{category_id}",
    summary="Delete a menu section that holds no items",
    response=Deleted,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def delete_category(ctx: Ctx) -> Deleted:
    """Delete a category."""
    return await _delete(ctx, ctx.params["category_id"], menu_edit.remove_category)


@routes.route(
    "POST",
    "/v1/menu/items",
    summary="Add a menu item (price in pence, station, modifier groups)",
    body=NewItem,
    response=MenuItem,
    status=201,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def create_item(ctx: Ctx, body: NewItem) -> MenuItem:
    """Create an item."""
    item_id = new_id("itm")
    return await ctx.mutate(lambda tx: menu_edit.add_item(tx, item_id, body))


@routes.route(
    "PATCH",
    "/v1/menu/items/{item_id}",
    summary="Change a menu item (absent fields stay; lines already added keep their price)",
    body=ItemChanges,
    response=MenuItem,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def update_item(ctx: Ctx, body: ItemChanges) -> MenuItem:
    """Change an item."""
    item_id = ctx.params["item_id"]
    return await ctx.mutate(lambda tx: menu_edit.change_item(tx, item_id, body))


@routes.route(
    "DELETE",
    "/v1/menu/items/{item_id}",
    summary="Delete a menu item (lines already added keep their copy)",
    response=Deleted,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def delete_item(ctx: Ctx) -> Deleted:
    """Delete an item."""
    return await _delete(ctx, ctx.params["item_id"], menu_edit.remove_item)


@routes.route(
    "POST",
    "/v1/menu/modifier-groups",
    summary="Add a modifier group (between min_choices and max_choices modifiers per line)",
    body=NewModifierGroup,
    response=ModifierGroup,
    status=201,
    permission=Permission.MENU_EDIT,
)
async def create_modifier_group(ctx: Ctx, body: NewModifierGroup) -> ModifierGroup:
    """Create a modifier group."""
    group_id = new_id("mgr")
    return await ctx.mutate(lambda tx: menu_edit.add_modifier_group(tx, group_id, body))


@routes.route(
    "PATCH",
    "/v1/menu/modifier-groups/{group_id}",
    summary="Change a modifier group (absent fields stay)",
    body=ModifierGroupChanges,
    response=ModifierGroup,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def update_modifier_group(ctx: Ctx, body: ModifierGroupChanges) -> ModifierGroup:
    """Change a modifier group."""
    group_id = ctx.params["group_id"]
    return await ctx.mutate(lambda tx: menu_edit.change_modifier_group(tx, group_id, body))


@routes.route(
    "DELETE",
    "/v1/menu/modifier-groups/{group_id}",
    summary="Delete a modifier group no item offers (and its modifiers)",
    response=Deleted,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def delete_modifier_group(ctx: Ctx) -> Deleted:
    """Delete a modifier group."""
    return await _delete(ctx, ctx.params["group_id"], menu_edit.remove_modifier_group)


@routes.route(
    "POST",
    "/v1/menu/modifier-groups/{group_id}/modifiers",
    summary="Add a modifier to a group (its price in pence adds to the line's)",
    body=NewModifier,
    response=Modifier,
    status=201,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def create_modifier(ctx: Ctx, body: NewModifier) -> Modifier:
    """Create a modifier."""
    group_id, modifier_id = ctx.params["group_id"], new_id("mod")
    return await ctx.mutate(lambda tx: menu_edit.add_modifier(tx, group_id, modifier_id, body))


@routes.route(
    "PATCH",
    "/v1/menu/modifiers/{modifier_id}",
    summary="Change a modifier (absent fields stay)",
    body=ModifierChanges,
    response=Modifier,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def update_modifier(ctx: Ctx, body: ModifierChanges) -> Modifier:
    """Change a modifier."""
    modifier_id = ctx.params["modifier_id"]
    return await ctx.mutate(lambda tx: menu_edit.change_modifier(tx, modifier_id, body))


@routes.route(
    "DELETE",
    "/v1/menu/modifiers/{modifier_id}",
    summary="Delete a modifier (lines already added keep their copy)",
    response=Deleted,
    permission=Permission.MENU_EDIT,
    errors=_EDIT,
)
async def delete_modifier(ctx: Ctx) -> Deleted:
    """Delete a modifier."""
    return await _delete(ctx, ctx.params["modifier_id"], menu_edit.remove_modifier)
