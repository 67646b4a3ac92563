"""Splitting a check between guests, so that the parts always add up to what is due.

How it works. Every split ends in ``shared.money.allocate``: the amount due (the total after
the discount) is divided in proportion to each guest's weight, each part rounded down, and
the pence left over go to the parts that lost most in rounding. So the parts sum to the
total exactly, and none is more than a penny from its exact share.

- ``evenly``: ``n`` equal parts, the odd pence to the first ones (£100 three ways is
  £33.34, £33.33, £33.33).
- ``by_items``: each guest pays for the lines they had; a line several guests shared is
  divided evenly between them; the check's discount (or anything else between the lines'
  sum and the total) is spread over the guests in proportion to what they had.
- ``by_seat``: ``by_items`` with the seat numbers the lines were rung up on; lines without a
  seat are shared by every seat.
- ``by_amounts``: guests name what they pay; what is left is the balance still due.

A part of 0 is allowed (a guest who had nothing); a split refuses (``SplitError`` with a
stable code) what it cannot honour: no guests, a line for nobody, amounts over the total.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .money import allocate

#: the most parts a check splits into (a table of 100 is a party, not a split)
MAX_PARTS = 100


class SplitError(ValueError):
    """A split that cannot be made; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class SplitLine:
    """A line's amount (after its own voids) and the guests who had it."""

    amount_pence: int
    guests: tuple[str, ...]


def evenly_between(total_pence: int, parts: int) -> list[int]:
    return allocate(total_pence, [1] * parts)


def evenly(total_pence: int, parts: int) -> list[int]:
    """``total_pence`` in ``parts`` equal parts, the odd pence first."""
    if not 1 <= parts <= MAX_PARTS:
        raise SplitError("invalid_split", f"a check splits into 1 to {MAX_PARTS} parts")
    return evenly_between(total_pence, parts)


def by_items(total_pence: int, lines: Iterable[SplitLine], guests: Sequence[str]) -> list[int]:
    """Each guest's part of ``total_pence`` (in ``guests``' order) by the lines they had."""
    if not 1 <= len(guests) <= MAX_PARTS or len(set(guests)) != len(guests):
        raise SplitError("invalid_split", f"name 1 to {MAX_PARTS} different guests")
    index = {guest: i for i, guest in enumerate(guests)}
    had = [0] * len(guests)
    for line in lines:
        if line.amount_pence < 0:
            raise SplitError("invalid_split", "a line's amount is never negative")
        sharing = sorted({index[g] for g in line.guests if g in index})
        if len(sharing) != len(set(line.guests)) or not sharing:
            raise SplitError(
                "invalid_split", "every line is had by one or more of the split's guests"
            )
        for i, share in zip(sharing, evenly_between(line.amount_pence, len(sharing)), strict=True):
            had[i] += share
    return allocate(total_pence, had)


def by_seat(total_pence: int, lines: Iterable[tuple[int, int | None]]) -> dict[int, int]:
    """Each seat's part of ``total_pence`` from ``(amount, seat)`` lines; seatless lines are
    shared by every seat (with no seat at all, the check is one part, seat 0)."""
    lines = list(lines)
    seats = sorted({seat for _, seat in lines if seat is not None})
    if not seats:
        return {0: total_pence}
    names = [str(seat) for seat in seats]
    split = by_items(
        total_pence,
        (
            SplitLine(amount, (str(seat),) if seat is not None else tuple(names))
            for amount, seat in lines
        ),
        names,
    )
    return dict(zip(seats, split, strict=True))


def by_amounts(total_pence: int, amounts: Sequence[int]) -> tuple[list[int], int]:
    """The named amounts, and the balance they leave (never below 0)."""
    if not 1 <= len(amounts) <= MAX_PARTS:
        raise SplitError("invalid_split", f"name 1 to {MAX_PARTS} amounts")
    if any(a <= 0 for a in amounts):
        raise SplitError("invalid_split", "each amount is at least a penny")
    if sum(amounts) > total_pence:
        raise SplitError(
            "split_exceeds_total",
            f"the amounts add up to {sum(amounts)} pence, more than the {total_pence} due",
        )
    return list(amounts), total_pence - sum(amounts)
