"""Authoring the menu at the edge: a manager's edits (the cloud dashboard edits the same rows).

How it works. Each kind of menu object has a ``New…`` body, every field checked by msgspec
as it is decoded, and a ``…Changes`` body whose absent fields stay as they are. Creating,
changing and deleting are plain writes of the synced rows in the caller's transaction, so
they sync to the cloud and are audited like any other write. The rules that span rows are
checked here: an item's category and modifier groups exist; a group asks for at most as many
choices as it allows, and allows at least one; nothing is deleted that something else still
names (a category with items, a group offered with an item: ``409 conflict`` listing them).
Deleting a group deletes its modifiers. Availability (86) has its own route and permission.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import UNSET, Meta, UnsetType

from sync_protocol.changes import Op, Value

from .errors import ApiCode, ApiError, not_found
from .fields import Choices, Id, Name, Pence, PenceDelta, Position, Station
from .menu import (
    DEFAULT_STATION,
    Category,
    MenuItem,
    Modifier,
    ModifierGroup,
    category_of,
    group_of,
    item_of,
    modifier_of,
)
from .tx import Tx

T = TypeVar("T")
GroupIds = Annotated[list[Id], Meta(max_length=20)]


class NewCategory(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new menu section."""

    name: Name
    position: Position = 0
    active: bool = True


class CategoryChanges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Changes to a section; absent fields stay."""

    name: Name | UnsetType = UNSET
    position: Position | UnsetType = UNSET
    active: bool | UnsetType = UNSET


class NewItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new item: price in pence, the station its tickets go to, the groups it offers."""

    category_id: Id
    name: Name
    price_pence: Pence
    station: Station = DEFAULT_STATION
    modifier_group_ids: GroupIds = []
    position: Position = 0
    available: bool = True


class ItemChanges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Changes to an item; absent fields stay."""

    category_id: Id | UnsetType = UNSET
    name: Name | UnsetType = UNSET
    price_pence: Pence | UnsetType = UNSET
    station: Station | UnsetType = UNSET
    modifier_group_ids: GroupIds | UnsetType = UNSET
    position: Position | UnsetType = UNSET
    available: bool | UnsetType = UNSET


class NewModifierGroup(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new choice offered with items (e.g. 'Cooking': exactly one)."""

    name: Name
    min_choices: Choices = 0
    max_choices: Choices = 1
    position: Position = 0


class ModifierGroupChanges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Changes to a modifier group; absent fields stay."""

    name: Name | UnsetType = UNSET
    min_choices: Choices | UnsetType = UNSET
    max_choices: Choices | UnsetType = UNSET
    position: Position | UnsetType = UNSET


class NewModifier(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new option of a group; its price (pence, may be negative) adds to the line's."""

    name: Name
    price_pence: PenceDelta = 0
    position: Position = 0
    available: bool = True


class ModifierChanges(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Changes to a modifier; absent fields stay."""

    name: Name | UnsetType = UNSET
    price_pence: PenceDelta | UnsetType = UNSET
    position: Position | UnsetType = UNSET
    available: bool | UnsetType = UNSET


def _fields(body: msgspec.Struct) -> dict[str, Value]:
    """The fields a body sets, as column values (lists as JSON text)."""
    out: dict[str, Value] = {}
    for name in body.__struct_fields__:
        value: Any = getattr(body, name)
        if value is UNSET:
            continue
        out[name] = json.dumps(value) if isinstance(value, list) else value
    if not out:
        raise ApiError(ApiCode.INVALID_REQUEST, "nothing to change")
    return out


def _exists(tx: Tx, table: str, kind: str, object_id: str) -> dict[str, Value]:
    row = tx.get(table, object_id)
    if row is None:
        raise not_found(kind, object_id)
    return {"id": object_id, **row}


def _check_item(tx: Tx, fields: dict[str, Value]) -> None:
    category_id = fields.get("category_id")
    if isinstance(category_id, str):
        _exists(tx, "menu_categories", "category", category_id)
    groups = fields.get("modifier_group_ids")
    if isinstance(groups, str):
        ids: list[str] = json.loads(groups)
        if len(set(ids)) != len(ids):
            raise ApiError(ApiCode.INVALID_REQUEST, "a modifier group is listed twice")
        for group_id in ids:
            _exists(tx, "modifier_groups", "modifier group", group_id)


def _check_choices(group: ModifierGroup) -> None:
    if group.max_choices < 1 or group.min_choices > group.max_choices:
        raise ApiError(
            ApiCode.INVALID_REQUEST,
            "max_choices must be at least 1 and at least min_choices",
            min_choices=group.min_choices,
            max_choices=group.max_choices,
        )


def _save(
    tx: Tx,
    table: str,
    object_id: str,
    op: Op,
    fields: dict[str, Value],
    view: Callable[[dict[str, Any]], T],
) -> T:
    tx.write(table, object_id, op, fields)
    return view(_exists(tx, table, "row", object_id))


def _refuse_if_named(kind: str, object_id: str, by: list[str]) -> None:
    if by:
        raise ApiError(
            ApiCode.CONFLICT,
            f"the {kind} is still named by {len(by)} item(s)",
            id=object_id,
            item_ids=by,
        )


# -- categories ------------------------------------------------------------------------------


def add_category(tx: Tx, category_id: str, new: NewCategory) -> Category:
    """Create a menu section."""
    return _save(tx, "menu_categories", category_id, Op.INSERT, _fields(new), category_of)


def change_category(tx: Tx, category_id: str, changes: CategoryChanges) -> Category:
    """Change a menu section."""
    _exists(tx, "menu_categories", "category", category_id)
    return _save(tx, "menu_categories", category_id, Op.UPDATE, _fields(changes), category_of)


def remove_category(tx: Tx, category_id: str) -> None:
    """Delete a menu section that no item is in."""
    _exists(tx, "menu_categories", "category", category_id)
    rows = tx.query("SELECT id FROM menu_items WHERE category_id = ? ORDER BY id", (category_id,))
    _refuse_if_named("category", category_id, [r[0] for r in rows])
    tx.write("menu_categories", category_id, Op.DELETE, {})


# -- items -----------------------------------------------------------------------------------


def add_item(tx: Tx, item_id: str, new: NewItem) -> MenuItem:
    """Create a menu item."""
    fields = _fields(new)
    _check_item(tx, fields)
    return _save(tx, "menu_items", item_id, Op.INSERT, fields, item_of)


def change_item(tx: Tx, item_id: str, changes: ItemChanges) -> MenuItem:
    """Change a menu item (its price applies to lines added from now on)."""
    _exists(tx, "menu_items", "menu item", item_id)
    fields = _fields(changes)
    _check_item(tx, fields)
    return _save(tx, "menu_items", item_id, Op.UPDATE, fields, item_of)


def remove_item(tx: Tx, item_id: str) -> None:
    """Delete a menu item (lines already sold keep their copy of it)."""
    _exists(tx, "menu_items", "menu item", item_id)
    tx.write("menu_items", item_id, Op.DELETE, {})


# -- modifier groups and modifiers -----------------------------------------------------------

_OFFERING = (
    "SELECT i.id FROM menu_items AS i, json_each(CASE WHEN json_valid(i.modifier_group_ids)"
    " THEN i.modifier_group_ids ELSE '[]' END) AS g WHERE g.value = ? ORDER BY i.id"
)


def add_modifier_group(tx: Tx, group_id: str, new: NewModifierGroup) -> ModifierGroup:
    """Create a modifier group (with no modifiers yet)."""
    fields = _fields(new)
    _check_choices(group_of({"id": group_id, **fields}, []))
    return _save(tx, "modifier_groups", group_id, Op.INSERT, fields, _group_view(tx))


def change_modifier_group(tx: Tx, group_id: str, changes: ModifierGroupChanges) -> ModifierGroup:
    """Change a modifier group (its choice limits apply to lines added from now on)."""
    current = _exists(tx, "modifier_groups", "modifier group", group_id)
    fields = _fields(changes)
    _check_choices(group_of({**current, **fields}, []))
    return _save(tx, "modifier_groups", group_id, Op.UPDATE, fields, _group_view(tx))


def remove_modifier_group(tx: Tx, group_id: str) -> None:
    """Delete a modifier group no item offers, and its modifiers."""
    _exists(tx, "modifier_groups", "modifier group", group_id)
    _refuse_if_named("modifier group", group_id, [r[0] for r in tx.query(_OFFERING, (group_id,))])
    for (modifier_id,) in tx.query("SELECT id FROM modifiers WHERE group_id = ?", (group_id,)):
        tx.write("modifiers", modifier_id, Op.DELETE, {})
    tx.write("modifier_groups", group_id, Op.DELETE, {})


def add_modifier(tx: Tx, group_id: str, modifier_id: str, new: NewModifier) -> Modifier:
    """Create a modifier in a group."""
    _exists(tx, "modifier_groups", "modifier group", group_id)
    fields = {**_fields(new), "group_id": group_id}
    return _save(tx, "modifiers", modifier_id, Op.INSERT, fields, modifier_of)


def change_modifier(tx: Tx, modifier_id: str, changes: ModifierChanges) -> Modifier:
    """Change a modifier (its price applies to lines added from now on)."""
    _exists(tx, "modifiers", "modifier", modifier_id)
    return _save(tx, "modifiers", modifier_id, Op.UPDATE, _fields(changes), modifier_of)


def remove_modifier(tx: Tx, modifier_id: str) -> None:
    """Delete a modifier (lines already sold keep their copy of it)."""
    _exists(tx, "modifiers", "modifier", modifier_id)
    tx.write("modifiers", modifier_id, Op.DELETE, {})


def _group_view(tx: Tx) -> Callable[[dict[str, Any]], ModifierGroup]:
    def view(row: dict[str, Any]) -> ModifierGroup:
        rows = tx.query("SELECT id FROM modifiers WHERE group_id = ?", (row["id"],))
        modifiers = [modifier_of(_exists(tx, "modifiers", "modifier", r[0])) for r in rows]
        modifiers.sort(key=lambda m: (m.position, m.name, m.id))
        return group_of(row, modifiers)

    return view
