"""Checked field types of the tablet API's request bodies (msgspec checks them when decoding).

A body that breaks one of these is refused whole with ``422 invalid_request`` naming the
field, before any domain code runs. Money is integer pence; text never holds a NUL (SQLite
and the sync engine refuse it), and names are not blank.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

#: ids of menu objects and orders: what the cloud and the edge generate, and short slugs
Id = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
#: a short label shown on tablets: one line, not blank
Name = Annotated[
    str, Meta(min_length=1, max_length=80, pattern=r"^[^\x00-\x1f]*[^\s\x00-\x1f][^\x00-\x1f]*$")
]
#: free text (notes, reasons); may span lines
Text = Annotated[str, Meta(max_length=500, pattern=r"^[^\x00]*$")]
#: a reason someone must give (a void): not blank
Reason = Annotated[str, Meta(min_length=1, max_length=200, pattern=r"^[^\x00]*[^\s\x00][^\x00]*$")]
#: a price in pence, up to £100,000
Pence = Annotated[int, Meta(ge=0, le=10_000_000)]
#: what a modifier adds to a line's unit price; it may take some off ("no side")
PenceDelta = Annotated[int, Meta(ge=-10_000_000, le=10_000_000)]
#: sort order on the tablets
Position = Annotated[int, Meta(ge=0, le=1_000_000)]
#: where an item's tickets go: a lowercase slug ("kitchen", "bar", "grill", "pastry", ...)
Station = Annotated[str, Meta(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]
#: how many of an item a line holds
Quantity = Annotated[int, Meta(ge=1, le=999)]
#: guests at a table (0 for a bar tab)
Covers = Annotated[int, Meta(ge=0, le=999)]
#: courses fire in order: 1 (starters), 2 (mains), ...
Course = Annotated[int, Meta(ge=1, le=9)]
#: seat number at the table
Seat = Annotated[int, Meta(ge=1, le=99)]
#: how many choices a modifier group asks for
Choices = Annotated[int, Meta(ge=0, le=50)]
