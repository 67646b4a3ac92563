"""The menu as tablets read it, and what a new order line of it costs.

How it works. ``MENU_SQL`` reads categories, items, modifier groups and modifiers in one
statement (``edge.rows``), so the parts always agree; ``menu_from_row`` turns the result
into the typed ``Menu``. A value a row lacks (one the cloud wrote without that column) reads
as the registry's default. Items name their modifier groups by id and each group carries its
modifiers, so a group shared by many items is sent once.

``price_line`` prices a line inside the order's transaction: the item's price plus each
chosen modifier's price, copied onto the line (later menu edits never change it). The
choices must be modifiers of the item's groups, each group's count within its
``min_choices``..``max_choices``. An 86'd item or modifier is ``item_unavailable``.

Stations are lowercase slugs (``fields.Station``), not a fixed set: "kitchen" (the default)
and "bar" are the usual ones, and a site may add "grill", "pastry", ... Tickets go to
whatever station the item names when it is fired.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from shared.registry import MENU_CATEGORIES, MENU_ITEMS, MODIFIER_GROUPS, MODIFIERS

from .errors import ApiCode, ApiError, not_found
from .rows import as_bool, as_int, as_str, id_list, opt_int, opt_str, rows_json
from .tx import Tx

DEFAULT_STATION = "kitchen"


class Category(msgspec.Struct, frozen=True):
    """A section of the menu."""

    id: str
    name: str
    position: int
    active: bool


class MenuItem(msgspec.Struct, frozen=True):
    """Something that can be sold; ``price_pence`` is None only for an item not priced yet."""

    id: str
    category_id: str | None
    name: str
    price_pence: int | None
    currency: str
    station: str
    available: bool
    modifier_group_ids: list[str]
    position: int


class Modifier(msgspec.Struct, frozen=True):
    """One option of a modifier group; its price is added to the line's unit price."""

    id: str
    group_id: str
    name: str
    price_pence: int
    available: bool
    position: int


class ModifierGroup(msgspec.Struct, frozen=True):
    """A choice offered with items: between ``min_choices`` and ``max_choices`` modifiers."""

    id: str
    name: str
    min_choices: int
    max_choices: int
    position: int
    modifiers: list[Modifier]


class Menu(msgspec.Struct, frozen=True):
    """The whole menu, each list in display order."""

    categories: list[Category]
    items: list[MenuItem]
    modifier_groups: list[ModifierGroup]


class ChosenModifier(msgspec.Struct, frozen=True):
    """A modifier as chosen with a line: copied onto it, price included."""

    id: str
    group_id: str
    name: str
    price_pence: int


# -- reading the menu ------------------------------------------------------------------------

MENU_SQL = "SELECT " + ", ".join(
    rows_json(spec) for spec in (MENU_CATEGORIES, MENU_ITEMS, MODIFIER_GROUPS, MODIFIERS)
)

_rows = msgspec.json.Decoder(list[dict[str, Any]])


def category_of(row: dict[str, Any]) -> Category:
    """A category row as tablets see it."""
    return Category(
        row["id"], as_str(row, "name"), as_int(row, "position"), as_bool(row, "active", True)
    )


def item_of(row: dict[str, Any]) -> MenuItem:
    """An item row as tablets see it."""
    return MenuItem(
        row["id"],
        opt_str(row, "category_id"),
        as_str(row, "name"),
        opt_int(row, "price_pence"),
        as_str(row, "currency", "GBP"),
        as_str(row, "station", DEFAULT_STATION),
        as_bool(row, "available", True),
        id_list(row, "modifier_group_ids"),
        as_int(row, "position"),
    )


def modifier_of(row: dict[str, Any]) -> Modifier:
    """A modifier row as tablets see it."""
    return Modifier(
        row["id"],
        as_str(row, "group_id"),
        as_str(row, "name"),
        as_int(row, "price_pence"),
        as_bool(row, "available", True),
        as_int(row, "position"),
    )


def group_of(row: dict[str, Any], modifiers: list[Modifier]) -> ModifierGroup:
    """A modifier group row, with its modifiers, as tablets see it."""
    return ModifierGroup(
        row["id"],
        as_str(row, "name"),
        as_int(row, "min_choices", 0),
        as_int(row, "max_choices", 1),
        as_int(row, "position"),
        modifiers,
    )


def menu_from_row(row: Sequence[str]) -> Menu:
    """The ``Menu`` from the one row ``MENU_SQL`` returns."""
    categories, items, groups, modifiers = (_rows.decode(text) for text in row)
    by_group: dict[str, list[Modifier]] = {}
    for modifier in sorted(map(modifier_of, modifiers), key=lambda m: (m.position, m.name, m.id)):
        by_group.setdefault(modifier.group_id, []).append(modifier)
    return Menu(
        sorted(map(category_of, categories), key=lambda c: (c.position, c.name, c.id)),
        sorted(map(item_of, items), key=lambda i: (i.position, i.name, i.id)),
        sorted(
            (group_of(g, by_group.get(g["id"], [])) for g in groups),
            key=lambda g: (g.position, g.name, g.id),
        ),
    )


# -- pricing a line --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PricedLine:
    """What a new line of an item costs, with its modifiers, at this moment."""

    item_id: str
    name: str
    currency: str
    station: str
    unit_price_pence: int
    modifiers: tuple[ChosenModifier, ...]


def price_line(tx: Tx, item_id: str, modifier_ids: Sequence[str]) -> PricedLine:
    """Price one unit of ``item_id`` with ``modifier_ids``, or refuse the choice."""
    row = tx.get("menu_items", item_id)
    if row is None:
        raise not_found("menu item", item_id)
    item = item_of({"id": item_id, **row})
    if not item.available:
        raise ApiError(ApiCode.ITEM_UNAVAILABLE, f"{item.name} is 86'd", item_id=item_id)
    if item.price_pence is None:
        raise ApiError(ApiCode.ITEM_UNAVAILABLE, f"{item.name} has no price", item_id=item_id)
    if len(set(modifier_ids)) != len(modifier_ids):
        raise ApiError(ApiCode.INVALID_REQUEST, "a modifier is chosen twice", item_id=item_id)
    chosen = [_modifier(tx, item, modifier_id) for modifier_id in modifier_ids]
    for group_id in item.modifier_group_ids:
        _check_choices(tx, item, group_id, sum(1 for m in chosen if m.group_id == group_id))
    unit = item.price_pence + sum(m.price_pence for m in chosen)
    if unit < 0:
        raise ApiError(ApiCode.INVALID_REQUEST, "the modifiers take the price below zero")
    return PricedLine(item.id, item.name, item.currency, item.station, unit, tuple(chosen))


def _modifier(tx: Tx, item: MenuItem, modifier_id: str) -> ChosenModifier:
    row = tx.get("modifiers", modifier_id)
    if row is None:
        raise ApiError(ApiCode.NOT_FOUND, f"no modifier {modifier_id!r}", modifier_id=modifier_id)
    modifier = modifier_of({"id": modifier_id, **row})
    if modifier.group_id not in item.modifier_group_ids:
        raise ApiError(
            ApiCode.INVALID_REQUEST,
            f"{modifier.name} is not offered with {item.name}",
            item_id=item.id,
            modifier_id=modifier_id,
        )
    if not modifier.available:
        raise ApiError(
            ApiCode.ITEM_UNAVAILABLE, f"{modifier.name} is 86'd", modifier_id=modifier_id
        )
    return ChosenModifier(modifier.id, modifier.group_id, modifier.name, modifier.price_pence)


def _check_choices(tx: Tx, item: MenuItem, group_id: str, count: int) -> None:
    row = tx.get("modifier_groups", group_id)
    if row is None:  # the group was deleted: nothing left to ask
        return
    group = group_of({"id": group_id, **row}, [])
    if not group.min_choices <= count <= group.max_choices:
        raise ApiError(
            ApiCode.INVALID_REQUEST,
            f"{item.name}: choose {group.min_choices} to {group.max_choices} from"
            f" {group.name}, not {count}",
            item_id=item.id,
            group_id=group_id,
            min_choices=group.min_choices,
            max_choices=group.max_choices,
            chosen=count,
        )
