"""A payment attempt's states, and the moves each provider's attempts may make between them.

Every provider's own statuses map onto these few (``PaymentState``), and each provider has
its table of moves (``TRANSITIONS``): the one place the edge, the cloud, the tests and the
docs read to know whether a status a webhook or a poll reports is a step forward, the same
news again, or impossible. A final state never moves again, except that a bank payment may
still complete after it was given up on (the guest's bank app finished late): that move is
allowed so it is recorded, and the checkout raises it as an alert and refunds one of the
two payments, never keeping both.

=================  ==========================================================
state              meaning
=================  ==========================================================
pending            created at the provider; the guest has not finished paying
requires_action    the guest must authenticate (3-D Secure)
authorized         the card is authorised; the money is captured later
succeeded          the money is taken
failed             declined, or authentication failed
cancelled          cancelled by the till before it completed
expired            the guest never paid in time (a bank QR lives 15 minutes)
=================  ==========================================================
"""

from __future__ import annotations

from enum import StrEnum


class PaymentState(StrEnum):
    """Where a payment attempt is."""

    PENDING = "pending"
    REQUIRES_ACTION = "requires_action"
    AUTHORIZED = "authorized"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


P = PaymentState

#: states a payment never leaves on its own
FINAL = frozenset({P.SUCCEEDED, P.FAILED, P.CANCELLED, P.EXPIRED})

#: states in which the till waits for the guest or the provider
OPEN = frozenset({P.PENDING, P.REQUIRES_ACTION, P.AUTHORIZED})

#: provider kind -> state -> the states it may move to
TRANSITIONS: dict[str, dict[PaymentState, frozenset[PaymentState]]] = {
    "bank": {
        P.PENDING: frozenset({P.SUCCEEDED, P.FAILED, P.CANCELLED, P.EXPIRED}),
        # a late completion after the till gave up: recorded, then refunded (see above)
        P.CANCELLED: frozenset({P.SUCCEEDED}),
        P.EXPIRED: frozenset({P.SUCCEEDED}),
        P.FAILED: frozenset(),
        P.SUCCEEDED: frozenset(),
    },
    "card": {
        P.PENDING: frozenset({P.REQUIRES_ACTION, P.AUTHORIZED, P.SUCCEEDED, P.FAILED, P.CANCELLED}),
        P.REQUIRES_ACTION: frozenset({P.PENDING, P.AUTHORIZED, P.SUCCEEDED, P.FAILED, P.CANCELLED}),
        P.AUTHORIZED: frozenset({P.SUCCEEDED, P.CANCELLED}),
        P.SUCCEEDED: frozenset(),
        P.FAILED: frozenset(),
        P.CANCELLED: frozenset(),
    },
    "cash": {P.SUCCEEDED: frozenset()},
}


def can_move(kind: str, current: PaymentState, target: PaymentState) -> bool:
    """Whether a ``kind`` payment may go from ``current`` to ``target`` (staying is not a move)."""
    return target in TRANSITIONS[kind].get(current, frozenset())


def late_completion(current: PaymentState, target: PaymentState) -> bool:
    """Whether this move is money arriving after the till gave up on it."""
    return current in (P.CANCELLED, P.EXPIRED) and target is P.SUCCEEDED
