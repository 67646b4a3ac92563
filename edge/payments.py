"""Checkout at the edge: what a check owes, payments against it, refunds, exact to the penny.

How it works. Every function is domain code of one store transaction (``Tx``), like
``edge.orders``: what it writes syncs and is audited with the request, and a refusal undoes
all of it. A check's balance is its total (``edge.order_views``) less what its succeeded
payments paid off it, plus what refunds gave back; a payment may take any part of the
balance but never more (``409 overpayment``), so a check is paid by one tender or many, split
however the guests like (``shared.splits``). The payment that brings the balance to exactly
zero moves the order to ``paid``; an order closes only at a zero balance (``edge.orders``).

Each payment attempt is a ``payments`` row whose id is the provider's idempotency key; its
amounts are fixed when it is taken: the part of the bill, the tip (checked by the site's
``shared.gratuity`` rules, and for the employee who served the check unless another is
named), the fees and any surcharge (``shared.fees``). Payments, refunds and tills sync under
the ``manual`` strategy: the cloud never merges money by a rule.

Cash is taken into an open till (``edge.tills``): the guest hands over ``tendered_pence``,
at least the charge, and gets the difference back as change. Card, Apple Pay and pay by bank
go through the cloud's payment providers (``edge.payment_gateway``): the attempt is recorded
``pending``, holding its part of the balance so no other payment can take it twice, and
``settle`` brings the till's record in line with the provider's state when it arrives by
sync; an edge with no cloud answers ``409 tender_unavailable`` for them.

Refunds go back against one payment, never more than is left of it, counting refunds still
on their way (``409 refund_exceeds_payment``): a cash refund comes out of an open till at
once, a card or bank refund is recorded ``pending`` for the provider (``finish_refund``). A
refund above the site's ``refund_approval_above_pence`` needs ``payment.refund_large``,
which a server borrows with a manager's PIN (the route checks it).

A check whose lines were voided after it was paid (on another tablet, or offline) shows the
difference as ``refund_due_pence``: money taken is never silently kept or lost.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from shared.fees import FeeSchedule, Tender
from shared.gratuity import GratuitySettings, TipError
from shared.orders import EDITABLE, OrderStatus
from shared.payment_settings import PaymentSettings, with_overrides
from shared.splits import SplitError, SplitLine, by_amounts, by_items, by_seat, evenly
from sync_protocol.changes import Op

from . import tills
from .errors import ApiCode, ApiError, not_found
from .fields import Id, Reason
from .orders import load, move, net_paid, status_of, summary
from .tx import Tx

log = logging.getLogger(__name__)

Pence = Annotated[int, Meta(ge=0, le=100_000_000)]
Positive = Annotated[int, Meta(ge=1, le=100_000_000)]

#: tenders this edge takes by itself; the rest go through the cloud's providers
LOCAL_TENDERS = frozenset({Tender.CASH})
#: refunds that count against what a payment has left: done, or on their way
GIVEN_BACK = "('pending', 'succeeded')"


@dataclass(frozen=True)
class PaymentPolicy:
    """A site's payment rules: fees, tips, and when a refund needs a manager."""

    fees: FeeSchedule = field(default_factory=FeeSchedule)
    tips: GratuitySettings = field(default_factory=GratuitySettings)
    refund_approval_above_pence: int = 2000


def policy_of(settings: PaymentSettings, site_row: Mapping[str, Any] | None) -> PaymentPolicy:
    """The payment rules of ``settings`` with the owner's overrides (the ``site_settings`` row
    ``payments``, JSON, checked by the cloud before it was written). Overrides this edge
    cannot use (an older edge, a newer setting) are logged and left out, never half used."""
    if site_row is not None and site_row.get("value"):
        try:
            settings = with_overrides(settings, json.loads(str(site_row["value"])))
        except (ValueError, TypeError) as error:
            log.warning("the site's payment settings are not used: %s", error)
    return PaymentPolicy(settings.fees(), settings.gratuity(), settings.refund_approval_above_pence)


class NewPayment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A payment on a check: ``amount_pence`` off the balance, and a tip on top."""

    tender: Literal["cash", "card", "apple_pay", "bank"]
    amount_pence: Positive
    tip_pence: Pence = 0
    tip_preset: Decimal | None = None  #: the tip button pressed (its amount is checked)
    tip_employee_id: Id | None = None
    tendered_pence: Pence | None = None  #: cash handed over (default: exactly the charge)
    till_id: Id | None = None  #: the drawer, for cash
    #: a card: the card provider's payment method the reader or the guest's wallet gave
    payment_method: Annotated[str, Meta(min_length=1, max_length=255)] | None = None


class NewRefund(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Money back against a payment."""

    amount_pence: Positive
    reason: Reason
    till_id: Id | None = None  #: for cash: the drawer it comes out of (default: the payment's)
    #: give it back in cash from ``till_id`` whatever the payment's tender (a guest whose card
    #: was charged, or a cloud out of reach); default: the way it was paid
    in_cash: bool = False


class PaymentView(msgspec.Struct, frozen=True):
    """A payment as tablets read it."""

    id: str
    order_id: str
    tender: str
    status: str
    amount_pence: int
    tip_pence: int
    tip_employee_id: str | None
    surcharge_pence: int
    charged_pence: int
    provider_fee_pence: int
    platform_fee_pence: int
    tendered_pence: int | None
    change_pence: int
    refunded_pence: int
    till_id: str | None
    taken_by: str | None
    created_at_ms: int | None
    failure_code: str | None = None
    provider_state: str | None = None
    action_url: str | None = None  #: the bank's pay page (shown as a QR) or a 3-D Secure page
    expires_at_ms: int | None = None


class RefundView(msgspec.Struct, frozen=True):
    """A refund as tablets read it."""

    id: str
    payment_id: str
    order_id: str
    tender: str
    status: str
    amount_pence: int
    reason: str | None
    requested_by: str | None
    approved_by: str | None
    till_id: str | None


class TenderOffer(msgspec.Struct, frozen=True):
    """What paying the balance by one tender costs."""

    tender: str
    available: bool
    charge_pence: int
    surcharge_pence: int
    fees_pence: int


class TipOffer(msgspec.Struct, frozen=True):
    percent: str
    tip_pence: int


class Checkout(msgspec.Struct, frozen=True):
    """A check at the till: what it costs, what was paid, what is still due, and the choices."""

    order_id: str
    status: str
    total_pence: int
    paid_pence: int  #: off the bill, by succeeded payments
    refunded_pence: int
    balance_pence: int  #: still due (0 when paid exactly)
    refund_due_pence: int  #: paid beyond the total (lines voided after payment)
    tips_pence: int
    payments: list[PaymentView]
    refunds: list[RefundView]
    tenders: list[TenderOffer]
    bank_saves_pence: int
    saved_by: str
    tip_options: list[TipOffer]


class SplitRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How to split the balance: ``even`` into ``parts``; by ``items`` (guest -> line ids,
    a line named by several guests is shared); by ``seat``; or by ``amounts``."""

    method: Literal["even", "items", "seat", "amounts"]
    parts: Annotated[int, Meta(ge=1, le=100)] | None = None
    items: dict[str, list[Id]] | None = None
    amounts: list[Positive] | None = None


class SplitPart(msgspec.Struct, frozen=True):
    label: str
    amount_pence: int


class Split(msgspec.Struct, frozen=True):
    """Parts that add up to the balance exactly (with ``amounts``, what is left over)."""

    order_id: str
    balance_pence: int
    parts: list[SplitPart]
    unassigned_pence: int


_PAYMENT_COLUMNS = (
    "id, order_id, tender, status, amount_pence, tip_pence, tip_employee_id, surcharge_pence,"
    " charged_pence, provider_fee_pence, platform_fee_pence, tendered_pence, change_pence,"
    " till_id, taken_by, created_at_ms, failure_code, provider_state, action_url, expires_at_ms"
)
_REFUND_COLUMNS = (
    "id, payment_id, order_id, tender, status, amount_pence, reason, requested_by,"
    " approved_by, till_id"
)


def _refunded(tx: Tx, payment_ids: list[str]) -> dict[str, int]:
    if not payment_ids:
        return {}
    marks = ",".join("?" * len(payment_ids))
    rows = tx.query(
        f"SELECT payment_id, coalesce(sum(amount_pence), 0) FROM refunds"
        f" WHERE status IN {GIVEN_BACK} AND payment_id IN ({marks}) GROUP BY payment_id",
        payment_ids,
    )
    return {pid: int(total) for pid, total in rows}


def payments_of(tx: Tx, order_id: str) -> list[PaymentView]:
    """The order's payments, oldest first, with what was refunded of each."""
    rows = tx.query(
        f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE order_id = ? ORDER BY created_at_ms, id",
        (order_id,),
    )
    refunded = _refunded(tx, [row[0] for row in rows])
    return [_payment_view(row, refunded.get(row[0], 0)) for row in rows]


_PAYMENT_NAMES = [name.strip() for name in _PAYMENT_COLUMNS.split(",")]
_ZERO_IF_NULL = ("tip_pence", "surcharge_pence", "provider_fee_pence", "platform_fee_pence",
                 "change_pence")  # fmt: skip


def _payment_view(row: Any, refunded: int) -> PaymentView:
    values = dict(zip(_PAYMENT_NAMES, row, strict=True))
    for name in _ZERO_IF_NULL:
        values[name] = values[name] or 0
    return PaymentView(refunded_pence=refunded, **values)


def payment(tx: Tx, payment_id: str) -> PaymentView:
    """One payment, or ``not_found``."""
    rows = tx.query(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE id = ?", (payment_id,))
    if not rows:
        raise not_found("payment", payment_id)
    return _payment_view(rows[0], _refunded(tx, [payment_id]).get(payment_id, 0))


def refunds_of(tx: Tx, order_id: str) -> list[RefundView]:
    rows = tx.query(
        f"SELECT {_REFUND_COLUMNS} FROM refunds WHERE order_id = ? ORDER BY created_at_ms, id",
        (order_id,),
    )
    return [RefundView(*row) for row in rows]


@dataclass(frozen=True)
class _Balance:
    total: int
    paid: int
    refunded: int

    @property
    def due(self) -> int:
        return self.total - (self.paid - self.refunded)


def _balance(tx: Tx, order_id: str) -> _Balance:
    # What is paid off the bill net of refunds is ``orders.net_paid``, the one rule the close
    # checks too (a refund gives back the bill's part of a payment first, then its tip).
    paid = int(
        tx.one(
            "SELECT coalesce(sum(amount_pence), 0) FROM payments"
            " WHERE order_id = ? AND status = 'succeeded'",
            (order_id,),
        )[0]
    )
    total = summary(tx, order_id).totals.total_pence
    return _Balance(total, paid, paid - net_paid(tx, order_id))


def checkout(tx: Tx, order_id: str, policy: PaymentPolicy) -> Checkout:
    """The check as the till shows it, with each tender's cost on the balance."""
    order = load(tx, order_id)
    payments = payments_of(tx, order_id)
    balance = _balance(tx, order_id)
    due = max(balance.due, 0)
    comparison = policy.fees.compare(due)
    tenders = [
        TenderOffer(
            str(tender),
            tender in LOCAL_TENDERS,
            charge.charge_pence,
            charge.surcharge_pence,
            charge.fees.total_pence,
        )
        for tender, charge in comparison.charges.items()
    ]
    tips = [TipOffer(str(o.percent), o.tip_pence) for o in policy.tips.options(due)]
    return Checkout(
        order_id,
        str(status_of(order)),
        balance.total,
        balance.paid,
        balance.refunded,
        due,
        max(-balance.due, 0),
        sum(p.tip_pence for p in payments if p.status == "succeeded"),
        payments,
        refunds_of(tx, order_id),
        tenders,
        comparison.bank_saves_pence,
        comparison.saved_by,
        tips,
    )


def take_payment(
    tx: Tx,
    order_id: str,
    new: NewPayment,
    taken_by: str,
    payment_id: str,
    policy: PaymentPolicy,
    providers: bool = False,
) -> Checkout:
    """Take ``new`` against the order's balance; the one that clears it marks the order paid.

    Cash is taken at once. A card, Apple Pay or bank payment (``providers``: the cloud's
    payment providers are reachable) is recorded ``pending``, reserving its part of the
    balance, and settled when the provider's answer arrives (``settle``).
    """
    order = load(tx, order_id)
    status = status_of(order)
    if status not in EDITABLE:
        raise ApiError(
            ApiCode.INVALID_TRANSITION,
            f"a {status} order takes no payment",
            order_id=order_id,
            status=str(status),
        )
    tender = Tender(new.tender)
    if tender not in LOCAL_TENDERS and not providers:
        raise ApiError(
            ApiCode.TENDER_UNAVAILABLE,
            f"{tender} payments are not set up for this site: take cash",
            tender=str(tender),
        )
    if (new.payment_method is not None) != (tender in (Tender.CARD, Tender.APPLE_PAY)):
        raise ApiError(
            ApiCode.INVALID_REQUEST,
            "a card or Apple Pay payment names the payment method the reader or wallet gave;"
            " no other tender takes one",
        )
    due = _balance(tx, order_id).due
    waiting = _pending(tx, order_id)
    if new.amount_pence > due - waiting:
        left = max(due - waiting, 0)
        why = f" ({waiting} pence waits on a payment in progress)" if waiting else ""
        raise ApiError(
            ApiCode.OVERPAYMENT,
            f"{new.amount_pence} pence is more than the {left} pence due{why}",
            balance_pence=left,
        )
    try:
        tip = policy.tips.check(new.tip_pence, new.amount_pence, new.tip_preset)
    except TipError as error:
        raise ApiError(ApiCode.INVALID_TIP, error.message, reason=error.code) from None
    tip_for = new.tip_employee_id or order.get("server_id") or taken_by
    if tip and new.tip_employee_id is not None:
        employee = tx.get("employees", new.tip_employee_id)
        if employee is None:
            raise not_found("employee", new.tip_employee_id)
    charge = policy.fees.charge(tender, new.amount_pence)
    charged = charge.charge_pence + tip
    fields: dict[str, Any] = {
        "order_id": order_id,
        "business_day": order.get("business_day"),
        "tender": str(tender),
        "amount_pence": new.amount_pence,
        "tip_pence": tip,
        "tip_employee_id": tip_for if tip else None,
        "surcharge_pence": charge.surcharge_pence,
        "charged_pence": charged,
        "provider_fee_pence": charge.fees.provider_pence,
        "platform_fee_pence": charge.fees.platform_pence,
        "taken_by": taken_by,
        "created_at_ms": tx.now_ms,
    }
    if tender is not Tender.CASH:
        tx.write("payments", payment_id, Op.INSERT, fields | {"status": "pending"}, new=True)
        return checkout(tx, order_id, policy)
    fields |= _cash(tx, new, charged)
    done = {"status": "succeeded", "completed_at_ms": tx.now_ms}
    tx.write("payments", payment_id, Op.INSERT, fields | done, new=True)
    if new.amount_pence == due:
        move(tx, order, OrderStatus.PAID)
    return checkout(tx, order_id, policy)


def _pending(tx: Tx, order_id: str) -> int:
    """Pence of the check reserved by payments still waiting on their provider."""
    row = tx.one(
        "SELECT coalesce(sum(amount_pence), 0) FROM payments"
        " WHERE order_id = ? AND status = 'pending'",
        (order_id,),
    )
    return int(row[0])


def end_attempt(tx: Tx, payment_id: str, state: str, failure_code: str | None) -> PaymentView:
    """Give up on a pending attempt (the provider refused it, or could not be asked)."""
    row = tx.get("payments", payment_id)
    if row is None:
        raise not_found("payment", payment_id)
    if row.get("status") == "pending":
        tx.write(
            "payments",
            payment_id,
            Op.UPDATE,
            {"status": state, "failure_code": failure_code, "completed_at_ms": tx.now_ms},
        )
    return payment(tx, payment_id)


def settle(tx: Tx, payment_id: str, refund_id: str) -> list[str]:
    """Bring the till's record of an attempt in line with the provider's; returns the ids of
    refunds this starts (for the provider to carry out).

    A success counts towards the check and marks it paid when it clears the balance. A
    success the check no longer needs (it was paid another way meanwhile, or the till gave
    up on this attempt and fell back to card) is recorded, raised as an alert, and refunded
    in full: money is never kept twice. A failure, cancellation or expiry frees the part of
    the balance it held; the tablets are told, so a bank payment falls back to card.
    """
    row = tx.get("payments", payment_id)
    if row is None:
        return []
    status, provider = row.get("status"), row.get("provider_state")
    order_id = str(row.get("order_id"))
    amount = int(row.get("amount_pence") or 0)
    if provider == status or provider is None:
        return []
    if provider == "succeeded" and status in ("pending", "cancelled", "expired", "failed"):
        order = load(tx, order_id)
        due = _balance(tx, order_id).due
        editable = status_of(order) in EDITABLE
        tx.write(
            "payments",
            payment_id,
            Op.UPDATE,
            {"status": "succeeded", "completed_at_ms": tx.now_ms, "failure_code": None},
        )
        if status == "pending" and editable and amount <= due:
            if amount == due:
                move(tx, order, OrderStatus.PAID)
            return []
        tx.write(
            "refunds",
            refund_id,
            Op.INSERT,
            {
                "payment_id": payment_id,
                "order_id": order_id,
                "business_day": row.get("business_day"),
                "tender": row.get("tender"),
                "amount_pence": row.get("charged_pence"),
                "reason": "paid twice: the check was settled another way first",
                "requested_by": "system",
                "created_at_ms": tx.now_ms,
                "status": "pending",
            },
            new=True,
        )
        tx.emit(
            "payments",
            {
                "kind": "late_payment_refunded",
                "alert": True,
                "payment_id": payment_id,
                "order_id": order_id,
                "refund_id": refund_id,
                "amount_pence": row.get("charged_pence"),
            },
        )
        return [refund_id]
    if status == "pending" and provider in ("failed", "cancelled", "expired"):
        tx.write(
            "payments",
            payment_id,
            Op.UPDATE,
            {
                "status": provider,
                "completed_at_ms": tx.now_ms,
                "failure_code": row.get("provider_failure") or provider,
            },
        )
        tx.emit(
            "payments",
            {
                "kind": "fallback",
                "payment_id": payment_id,
                "order_id": order_id,
                "state": provider,
                "offer": "card" if row.get("tender") == Tender.BANK else None,
            },
        )
    return []


def _cash(tx: Tx, new: NewPayment, charged: int) -> dict[str, Any]:
    if new.till_id is None:
        raise ApiError(ApiCode.INVALID_REQUEST, "a cash payment names the till it goes into")
    tills.require_open(tx, new.till_id)
    tendered = charged if new.tendered_pence is None else new.tendered_pence
    if tendered < charged:
        raise ApiError(
            ApiCode.INSUFFICIENT_TENDER,
            f"{tendered} pence handed over does not cover {charged} pence",
            charged_pence=charged,
        )
    return {"till_id": new.till_id, "tendered_pence": tendered, "change_pence": tendered - charged}


def refund_needs_approval(amount_pence: int, policy: PaymentPolicy) -> bool:
    """Whether a refund of ``amount_pence`` needs ``payment.refund_large``."""
    return amount_pence > policy.refund_approval_above_pence


def refund(
    tx: Tx,
    payment_id: str,
    new: NewRefund,
    requested_by: str,
    approved_by: str | None,
    refund_id: str,
    policy: PaymentPolicy,
    providers: bool = False,
) -> Checkout:
    """Give ``new.amount_pence`` back against a succeeded payment: cash out of an open till at
    once (for any payment, with ``in_cash``); card and bank money recorded ``pending`` for the
    provider (``finish_refund``)."""
    paid = payment(tx, payment_id)
    if paid.status != "succeeded":
        raise ApiError(
            ApiCode.INVALID_TRANSITION,
            f"a {paid.status} payment took nothing to refund",
            payment_id=payment_id,
        )
    left = paid.charged_pence - paid.refunded_pence
    if new.amount_pence > left:
        raise ApiError(
            ApiCode.REFUND_EXCEEDS_PAYMENT,
            f"{new.amount_pence} pence is more than the {left} pence left of the payment",
            refundable_pence=left,
        )
    tender = Tender.CASH if new.in_cash else Tender(paid.tender)
    order = load(tx, paid.order_id)
    fields: dict[str, Any] = {
        "payment_id": payment_id,
        "order_id": paid.order_id,
        "business_day": order.get("business_day"),
        "tender": str(tender),
        "amount_pence": new.amount_pence,
        "reason": new.reason,
        "requested_by": requested_by,
        "approved_by": approved_by,
        "created_at_ms": tx.now_ms,
    }
    if tender not in LOCAL_TENDERS:
        if not providers:
            raise ApiError(
                ApiCode.TENDER_UNAVAILABLE,
                f"{tender} refunds need the cloud, which is out of reach: try again later",
                tender=str(tender),
            )
        tx.write("refunds", refund_id, Op.INSERT, fields | {"status": "pending"}, new=True)
        return checkout(tx, paid.order_id, policy)
    till_id = new.till_id or paid.till_id
    if till_id is None:
        raise ApiError(ApiCode.INVALID_REQUEST, "a cash refund names the till it comes out of")
    tills.require_open(tx, till_id)
    tills.require_cash(tx, till_id, new.amount_pence)
    done = {"till_id": till_id, "status": "succeeded", "completed_at_ms": tx.now_ms}
    tx.write("refunds", refund_id, Op.INSERT, fields | done, new=True)
    return checkout(tx, paid.order_id, policy)


def finish_refund(tx: Tx, refund_id: str, state: str, failure_code: str | None) -> None:
    """Record what the provider did with a pending refund."""
    row = tx.get("refunds", refund_id)
    if row is None or row.get("status") != "pending" or state == "pending":
        return
    tx.write(
        "refunds",
        refund_id,
        Op.UPDATE,
        {"status": state, "completed_at_ms": tx.now_ms, "failure_code": failure_code},
    )


def split(tx: Tx, order_id: str, how: SplitRequest) -> Split:
    """Parts of the order's balance that add up to it exactly."""
    load(tx, order_id)
    due = max(_balance(tx, order_id).due, 0)
    try:
        if how.method == "even":
            if how.parts is None:
                raise SplitError("invalid_split", "an even split names its number of parts")
            parts = [
                SplitPart(f"{i + 1} of {how.parts}", p)
                for i, p in enumerate(evenly(due, how.parts))
            ]
            return Split(order_id, due, parts, 0)
        if how.method == "amounts":
            if not how.amounts:
                raise SplitError("invalid_split", "a split by amounts names the amounts")
            named, left = by_amounts(due, how.amounts)
            return Split(
                order_id, due, [SplitPart(str(i + 1), a) for i, a in enumerate(named)], left
            )
        lines = _live_lines(tx, order_id)
        if how.method == "seat":
            seats = by_seat(due, [(amount, seat) for _, amount, seat in lines])
            label = "seat {}".format
            return Split(order_id, due, [SplitPart(label(s), p) for s, p in seats.items()], 0)
        if not how.items:
            raise SplitError("invalid_split", "a split by items names each guest's line ids")
        return Split(order_id, due, _by_items(due, lines, how.items), 0)
    except SplitError as error:
        raise ApiError(ApiCode.INVALID_REQUEST, error.message, reason=error.code) from None


def _live_lines(tx: Tx, order_id: str) -> list[tuple[str, int, int | None]]:
    rows = tx.query(
        "SELECT id, quantity * unit_price_pence, seat FROM order_lines"
        " WHERE order_id = ? AND NOT coalesce(voided, 0) ORDER BY added_at_ms, id",
        (order_id,),
    )
    return [(lid, int(amount or 0), seat) for lid, amount, seat in rows]


def _by_items(
    due: int, lines: list[tuple[str, int, int | None]], items: dict[str, list[str]]
) -> list[SplitPart]:
    guests = list(items)
    had: dict[str, list[str]] = {}
    for guest, line_ids in items.items():
        for line_id in line_ids:
            had.setdefault(line_id, []).append(guest)
    known = {lid for lid, _, _ in lines}
    stray = sorted(set(had) - known)
    if stray:
        raise SplitError("invalid_split", f"not live lines of this check: {', '.join(stray)}")
    missing = sorted(known - set(had))
    if missing:
        raise SplitError("invalid_split", f"lines no guest had: {', '.join(missing)}")
    split_lines = [SplitLine(amount, tuple(had[lid])) for lid, amount, _ in lines]
    return [
        SplitPart(g, p) for g, p in zip(guests, by_items(due, split_lines, guests), strict=True)
    ]


class TenderTotals(msgspec.Struct, frozen=True):
    tender: str
    payments: int
    amount_pence: int  #: off the bills
    tips_pence: int
    surcharge_pence: int
    charged_pence: int
    provider_fee_pence: int
    platform_fee_pence: int
    refunded_pence: int


class EmployeeTips(msgspec.Struct, frozen=True):
    employee_id: str
    tips_pence: int
    payments: int


class DayTakings(msgspec.Struct, frozen=True):
    """A business day's money: each tender's takings, fees and refunds, and tips by employee."""

    business_day: str
    tenders: list[TenderTotals]
    charged_pence: int
    refunded_pence: int
    provider_fee_pence: int
    platform_fee_pence: int
    net_pence: int  #: charged - refunded - fees: what the restaurant keeps
    tips: list[EmployeeTips]


def day_takings(tx: Tx, day: str) -> DayTakings:
    """The succeeded payments and refunds of business day ``day``, summed."""
    refunded = dict(
        tx.query(
            "SELECT tender, sum(amount_pence) FROM refunds"
            " WHERE business_day = ? AND status = 'succeeded' GROUP BY tender",
            (day,),
        )
    )
    rows = tx.query(
        "SELECT tender, count(*), sum(amount_pence), sum(tip_pence), sum(surcharge_pence),"
        " sum(charged_pence), sum(provider_fee_pence), sum(platform_fee_pence)"
        " FROM payments WHERE business_day = ? AND status = 'succeeded'"
        " GROUP BY tender ORDER BY tender",
        (day,),
    )
    tenders = [
        TenderTotals(
            str(tender),
            int(n),
            int(amount or 0),
            int(tip or 0),
            int(surcharge or 0),
            int(charged or 0),
            int(fee or 0),
            int(platform or 0),
            int(refunded.get(tender) or 0),
        )  # fmt: skip
        for tender, n, amount, tip, surcharge, charged, fee, platform in rows
    ]
    tips = [
        EmployeeTips(str(who), int(total or 0), int(n))
        for who, total, n in tx.query(
            "SELECT tip_employee_id, sum(tip_pence), count(*) FROM payments"
            " WHERE business_day = ? AND status = 'succeeded' AND tip_pence > 0"
            " GROUP BY tip_employee_id ORDER BY tip_employee_id",
            (day,),
        )
    ]
    charged = sum(t.charged_pence for t in tenders)
    back = sum(int(v or 0) for v in refunded.values())
    provider = sum(t.provider_fee_pence for t in tenders)
    platform = sum(t.platform_fee_pence for t in tenders)
    return DayTakings(
        day, tenders, charged, back, provider, platform, charged - back - provider - platform, tips
    )
