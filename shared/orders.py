"""Orders: the status every order moves through, and the moves allowed between them."""

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
    OrderStatus.OPEN: frozenset({OrderStatus.FIRED, OrderStatus.PAID, OrderStatus.VOIDED}),
    OrderStatus.FIRED: frozenset({OrderStatus.PAID, OrderStatus.VOIDED}),
    OrderStatus.PAID: frozenset({OrderStatus.CLOSED}),
    OrderStatus.CLOSED: frozenset(),
    OrderStatus.VOIDED: frozenset(),
}

#: statuses in forward order; concurrent edits keep the furthest one
ORDER_STATUS_RANKS: tuple[str, ...] = tuple(s.value for s in OrderStatus)


def can_move(current: OrderStatus, target: OrderStatus) -> bool:
    """Whether an order may go from ``current`` to ``target``."""
    return target in ORDER_TRANSITIONS[current]
