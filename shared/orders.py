"""Orders: the status every order moves through, and the moves allowed between them.

``ORDER_TRANSITIONS`` is the one table that the edge's order code, the tests and the docs
read. Closing straight from ``open`` or ``fired`` is for a check with nothing to pay (every
line voided, or none at all); the edge refuses it otherwise, until payments move the order to
``paid``. ``voided`` ends a check abandoned as a whole (every line is voided with it), and
only from ``open`` or ``fired``: a paid check is never voided.
"""

from __future__ import annotations

from enum import StrEnum


class OrderStatus(StrEnum):
    """Where an order is in its life, in the only order it may move."""

    OPEN = "open"
    FIRED = "fired"
    PAID = "paid"
    CLOSED = "closed"
    VOIDED = "voided"


#: status -> the statuses it may move to (forward only)
ORDER_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.OPEN: frozenset(
        {OrderStatus.FIRED, OrderStatus.PAID, OrderStatus.CLOSED, OrderStatus.VOIDED}
    ),
    OrderStatus.FIRED: frozenset({OrderStatus.PAID, OrderStatus.CLOSED, OrderStatus.VOIDED}),
    OrderStatus.PAID: frozenset({OrderStatus.CLOSED}),
    OrderStatus.CLOSED: frozenset(),
    OrderStatus.VOIDED: frozenset(),
}

#: statuses in which lines may be added, voided, moved and fired, and the header edited
EDITABLE: frozenset[OrderStatus] = frozenset({OrderStatus.OPEN, OrderStatus.FIRED})

#: statuses in forward order; concurrent edits keep the furthest one. ``voided`` ranks below
#: ``paid`` and ``closed``: a check voided on one side while it was paid or closed on the
#: other (one of them offline) keeps the payment's status, because money taken is a fact and
#: a void only an intent. The void's own line voids still stand (each is its own change), so
#: such a check shows what was paid against lines no longer sold: a refund, not a lost
#: payment. (Locally ``voided`` is final and reached only from ``open`` or ``fired``.)
ORDER_STATUS_RANKS: tuple[str, ...] = tuple(
    s.value
    for s in (
        OrderStatus.OPEN,
        OrderStatus.FIRED,
        OrderStatus.VOIDED,
        OrderStatus.PAID,
        OrderStatus.CLOSED,
    )
)


def can_move(current: OrderStatus, target: OrderStatus) -> bool:
    """Whether an order may go from ``current`` to ``target``."""
    return target in ORDER_TRANSITIONS[current]
