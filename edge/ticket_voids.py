"""Void marks on kitchen tickets: what the kitchen no longer has to make.

How it works. A ticket's ``items`` are the lines as fired, set once, each naming its order
line (``line_id``). When a fired line is voided (``order_lines.void_line`` or
``void_order``), the same transaction strikes its item off the ticket: ``voided_line_ids``
(a JSON list of line ids, in the ticket's item order) gains it, and once every item of the
ticket is struck off, the ticket's ``voided`` flag is set (a voided order voids all its
tickets; a ticket whose last item is voided is void as well). A line moved to another order
keeps its ticket, and its copy carries the ticket's item (``moved_from``): the move strikes
nothing (the food is still wanted), voiding the copy strikes the item.

Merging (``shared.registry``). ``voided`` is sticky: once set anywhere it stays set, so two
edges cannot undo each other's void. ``voided_line_ids`` is a set kept under
last-writer-wins, which has no union rule: two edges striking different items of one ticket
before they sync each write a list without the other's item, and one list wins. No void is
lost for all that, because the list is never the only record: each line's own ``voided`` is
sticky, every write starts from the stored list plus the items whose own line is voided
(``ticket_voids``), and so does every read (the kitchen routes; the screen also keeps the
marks it has shown). Only an item whose line was moved and then voided on the losing edge
depends on the list alone.
"""

from __future__ import annotations

import json
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Any

from .rows import json_list


def parse_items(text: object) -> list[Any]:
    """A ticket's ``items`` JSON as a list ([] when absent or not a list)."""
    return json_list(text)


def item_line_ids(items: list[Any]) -> list[str | None]:
    """Each item's order line id, in ticket order (None: an item that names none)."""
    return [
        item.get("line_id") if isinstance(item, dict) and isinstance(item.get("line_id"), str)
        else None
        for item in items
    ]  # fmt: skip


def stored_marks(text: object) -> list[str]:
    """The line ids a ticket's ``voided_line_ids`` JSON holds ([] when absent)."""
    return [mark for mark in json_list(text) if isinstance(mark, str)]


@dataclass(frozen=True, slots=True)
class TicketVoids:
    """What of a ticket was voided: the items struck off, and whether nothing is left."""

    line_ids: tuple[str, ...]  #: the struck items' line ids, in ticket order
    voided: bool  #: every item is struck off (or the ticket was marked void before)


def ticket_voids(ticket: Mapping[str, object], struck: Container[str]) -> TicketVoids:
    """A ticket's marks: the stored ones, plus each item whose line id is in ``struck``."""
    ids = item_line_ids(parse_items(ticket.get("items")))
    marked = set(stored_marks(ticket.get("voided_line_ids")))
    marked.update(i for i in ids if i is not None and i in struck)
    line_ids = tuple(dict.fromkeys(i for i in ids if i is not None and i in marked))
    every = bool(ids) and all(i is not None and i in marked for i in ids)
    return TicketVoids(line_ids, bool(ticket.get("voided")) or every)


def marks_json(line_ids: tuple[str, ...]) -> str:
    """The ``voided_line_ids`` text of ``line_ids``."""
    return json.dumps(list(line_ids), separators=(",", ":"))
