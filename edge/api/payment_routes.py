"""Payments for the tablets: the checkout sheet, splits, payments, refunds, and cash tills.

Each route runs one domain function of ``edge.payments`` or ``edge.tills`` in one store
transaction (``ctx.mutate``: synced, audited, idempotent under ``Idempotency-Key``, so a
tablet that lost the answer to a payment retries it without taking the money twice). The
site's payment rules (``PaymentPolicy``: fees, tips, the refund threshold) come from the
edge's ``[payments]`` settings. A refund above the threshold needs ``payment.refund_large``,
which a server borrows with a manager's ``X-Fynlo-Approval``.
"""

from __future__ import annotations

import base64
import contextlib
import io
from typing import Annotated, Any

import msgspec
import qrcode
from aiohttp import web
from msgspec import Meta
from qrcode.image.pure import PyPNGImage
from qrcode.image.svg import SvgPathImage

from shared.payment_settings import PaymentSettings
from shared.roles import Permission

from .. import payments, tills
from ..payment_gateway import (
    CloudPayments,
    GatewayOffline,
    GatewayRefused,
    ask_provider,
    send_refund,
)
from ..payments import (
    Checkout,
    DayTakings,
    NewPayment,
    NewRefund,
    PaymentPolicy,
    PaymentView,
    Split,
    SplitRequest,
)
from ..tills import CloseTill, Movement, OpenTill, TillList, TillSummary
from .auth import new_id
from .errors import ApiCode, ApiError
from .routing import ApiRoutes, Ctx

routes = ApiRoutes("payments")

#: the edge's [payments] settings, set by the app from its config (the defaults otherwise)
SETTINGS = web.AppKey("payment_settings", PaymentSettings)
#: the cloud's payment endpoints (absent: no cloud configured, so cash only)
GATEWAY = web.AppKey("payment_gateway", CloudPayments)

_FOUND = (ApiCode.NOT_FOUND,)
_PAY = (
    ApiCode.NOT_FOUND,
    ApiCode.INVALID_TRANSITION,
    ApiCode.OVERPAYMENT,
    ApiCode.INSUFFICIENT_TENDER,
    ApiCode.INVALID_TIP,
    ApiCode.TENDER_UNAVAILABLE,
    ApiCode.TILL_NOT_OPEN,
    ApiCode.PAYMENTS_OFFLINE,
    ApiCode.PAYMENT_DECLINED,
)
_REFUND = (
    ApiCode.NOT_FOUND,
    ApiCode.INVALID_TRANSITION,
    ApiCode.REFUND_EXCEEDS_PAYMENT,
    ApiCode.TENDER_UNAVAILABLE,
    ApiCode.TILL_NOT_OPEN,
    ApiCode.INSUFFICIENT_CASH,
    ApiCode.APPROVAL_REQUIRED,
    ApiCode.APPROVAL_INVALID,
)


async def _policy(ctx: Ctx) -> PaymentPolicy:
    # The owner's overrides from the cloud (a synced row) apply at once, request by request.
    settings = ctx.request.app.get(SETTINGS) or PaymentSettings()
    return payments.policy_of(settings, await ctx.store.get("site_settings", "payments"))


def _employee(ctx: Ctx) -> str:
    assert ctx.employee_id is not None  # EMPLOYEE routes always have one
    return ctx.employee_id


class DayQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which business day (ISO date)."""

    business_day: Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")]


@routes.route(
    "GET",
    "/v1/reports/takings",
    summary="A business day's takings: per tender, fees (the platform's too), refunds, and "
    "tips per employee",
    query=DayQuery,
    response=DayTakings,
    permission=Permission.REPORT_VIEW,
)
async def day_takings(ctx: Ctx) -> DayTakings:
    """The day's takings."""
    day = ctx.query.business_day
    return await ctx.store.transaction(lambda tx: payments.day_takings(tx, day))


class TillQuery(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which tills: of a business day (ISO date), and/or open or closed ones."""

    business_day: Annotated[str, Meta(pattern=r"^\d{4}-\d{2}-\d{2}$")] | None = None
    status: Annotated[str, Meta(pattern=r"^(open|closed)$")] | None = None


@routes.route(
    "GET",
    "/v1/orders/{order_id}/checkout",
    summary="The check at the till: total, paid, balance, each tender's cost, tip presets",
    response=Checkout,
    permission=Permission.PAYMENT_TAKE,
    errors=_FOUND,
)
async def get_checkout(ctx: Ctx) -> Checkout:
    """The order's checkout sheet."""
    order_id, policy = ctx.params["order_id"], await _policy(ctx)
    return await ctx.store.transaction(lambda tx: payments.checkout(tx, order_id, policy))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/split",
    summary="Split the balance evenly, by items, by seat or by amounts (parts sum exactly)",
    body=SplitRequest,
    response=Split,
    permission=Permission.PAYMENT_TAKE,
    errors=_FOUND,
)
async def split_check(ctx: Ctx, body: SplitRequest) -> Split:
    """Parts of the balance for the guests to pay (nothing is written)."""
    order_id = ctx.params["order_id"]
    return await ctx.store.transaction(lambda tx: payments.split(tx, order_id, body))


@routes.route(
    "POST",
    "/v1/orders/{order_id}/payments",
    summary="Take a payment against the balance (cash into a till; a tip on top)",
    body=NewPayment,
    response=Checkout,
    status=201,
    permission=Permission.PAYMENT_TAKE,
    errors=_PAY,
)
async def take_payment(ctx: Ctx, body: NewPayment) -> Checkout:
    """Take a payment: cash at once; card and bank through the cloud's providers."""
    order_id, who, policy = ctx.params["order_id"], _employee(ctx), await _policy(ctx)
    gateway = ctx.request.app.get(GATEWAY)
    local = body.tender == "cash"
    if not local and gateway is not None and not gateway.online():
        raise ApiError(ApiCode.PAYMENTS_OFFLINE)
    payment_id = new_id("pay")
    sheet = await ctx.mutate(
        lambda tx: payments.take_payment(
            tx, order_id, body, who, payment_id, policy, providers=gateway is not None
        )
    )
    if local or gateway is None:
        return sheet
    started = next((p for p in sheet.payments if p.id == payment_id), None)
    if started is None or started.status != "pending":
        return sheet  # an Idempotency-Key replay of an attempt already under way
    return await _ask_provider(ctx, gateway, order_id, payment_id, policy, body.payment_method)


async def _ask_provider(
    ctx: Ctx,
    gateway: CloudPayments,
    order_id: str,
    payment_id: str,
    policy: PaymentPolicy,
    payment_method: str | None,
) -> Checkout:
    """Have the cloud's provider take a pending attempt, and show the check as it now is."""
    answer = await ask_provider(ctx.store, gateway, order_id, payment_id, payment_method)
    sheet = await ctx.store.transaction(lambda tx: payments.checkout(tx, order_id, policy))
    # The provider's columns reach this edge by sync a moment later: show its answer now.
    return msgspec.structs.replace(
        sheet,
        payments=[
            msgspec.structs.replace(
                p,
                provider_state=answer.get("state") or p.provider_state,
                action_url=answer.get("action_url") or p.action_url,
                expires_at_ms=answer.get("expires_at_ms") or p.expires_at_ms,
            )
            if p.id == payment_id
            else p
            for p in sheet.payments
        ],
    )


@routes.route(
    "GET",
    "/v1/payments/{payment_id}",
    summary="One payment, with what was refunded of it",
    response=PaymentView,
    permission=Permission.PAYMENT_TAKE,
    errors=_FOUND,
)
async def get_payment(ctx: Ctx) -> PaymentView:
    """One payment."""
    payment_id = ctx.params["payment_id"]
    return await ctx.store.transaction(lambda tx: payments.payment(tx, payment_id))


@routes.route(
    "POST",
    "/v1/payments/{payment_id}/refunds",
    summary="Refund part or all of a payment; above the site's threshold, "
    "payment.refund_large or a manager's approval",
    body=NewRefund,
    response=Checkout,
    status=201,
    permission=Permission.PAYMENT_REFUND,
    errors=_REFUND,
)
async def refund_payment(ctx: Ctx, body: NewRefund) -> Checkout:
    """Refund a payment: cash from a till at once; card and bank money by the provider."""
    payment_id, who, policy = ctx.params["payment_id"], _employee(ctx), await _policy(ctx)
    if payments.refund_needs_approval(body.amount_pence, policy):
        ctx.require(Permission.PAYMENT_REFUND_LARGE)  # spends an approval if one is needed
    gateway = ctx.request.app.get(GATEWAY)
    refund_id = new_id("ref")
    online = gateway is not None and gateway.online()
    sheet = await ctx.mutate(
        lambda tx: payments.refund(
            tx, payment_id, body, who, ctx.approved_by, refund_id, policy, providers=online
        )
    )
    mine = next((r for r in sheet.refunds if r.id == refund_id), None)
    if gateway is None or mine is None or mine.status != "pending":
        return sheet
    try:
        await send_refund(ctx.store, gateway, refund_id)
    except GatewayOffline:
        pass  # it stays pending; the payment watcher sends it again
    return await ctx.store.transaction(lambda tx: payments.checkout(tx, sheet.order_id, policy))


@routes.route(
    "POST",
    "/v1/payments/{payment_id}/cancel",
    summary="Cancel a card or bank payment still waiting for the guest",
    response=PaymentView,
    permission=Permission.PAYMENT_TAKE,
    errors=(ApiCode.NOT_FOUND, ApiCode.INVALID_TRANSITION, ApiCode.PAYMENTS_OFFLINE),
)
async def cancel_payment(ctx: Ctx) -> PaymentView:
    """Cancel a pending attempt at its provider (a payment that completed first stands)."""
    payment_id, store = ctx.params["payment_id"], ctx.store
    gateway = ctx.request.app.get(GATEWAY)
    current = await store.transaction(lambda tx: payments.payment(tx, payment_id))
    if current.status != "pending" or gateway is None:
        raise ApiError(
            ApiCode.INVALID_TRANSITION,
            f"a {current.status} payment cannot be cancelled",
            payment_id=payment_id,
        )
    try:
        answer = await gateway.cancel(payment_id, current.tender)
    except GatewayOffline:
        raise ApiError(ApiCode.PAYMENTS_OFFLINE) from None
    except GatewayRefused as refused:
        if refused.code != "unknown_payment":
            raise ApiError(ApiCode.INVALID_TRANSITION, refused.message) from None
        answer = {"state": "cancelled"}  # the provider never had it: nothing to stop
    state = str(answer.get("state"))
    if state in ("cancelled", "failed", "expired"):
        await store.transaction(lambda tx: payments.end_attempt(tx, payment_id, state, None))
    return await store.transaction(lambda tx: payments.payment(tx, payment_id))


class ApplePayValidation(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The validation URL Apple Pay gave the guest's browser (``onvalidatemerchant``)."""

    validation_url: Annotated[str, Meta(min_length=9, max_length=2048, pattern=r"^https://")]


class ApplePaySession(msgspec.Struct, frozen=True):
    """Apple's merchant session, to hand to ``completeMerchantValidation`` as it is."""

    session: dict[str, Any]


@routes.route(
    "POST",
    "/v1/payments/applepay/session",
    summary="Start an Apple Pay merchant session for a guest's browser (through the cloud)",
    body=ApplePayValidation,
    response=ApplePaySession,
    permission=Permission.PAYMENT_TAKE,
    errors=(
        ApiCode.TENDER_UNAVAILABLE,
        ApiCode.PAYMENTS_OFFLINE,
        ApiCode.MERCHANT_VALIDATION_FAILED,
    ),
    idempotent=False,
)
async def applepay_session(ctx: Ctx, body: ApplePayValidation) -> ApplePaySession:
    """An Apple Pay merchant session; the merchant identity certificate stays in the cloud."""
    gateway = ctx.request.app.get(GATEWAY)
    if gateway is None:
        raise ApiError(ApiCode.TENDER_UNAVAILABLE, "Apple Pay needs the cloud", tender="apple_pay")
    try:
        return ApplePaySession(await gateway.applepay_session(body.validation_url))
    except GatewayOffline:
        raise ApiError(ApiCode.PAYMENTS_OFFLINE) from None
    except GatewayRefused as refused:
        if refused.code == "provider_not_configured":
            raise ApiError(
                ApiCode.TENDER_UNAVAILABLE, refused.message, tender="apple_pay"
            ) from None
        reason = str(refused.details.get("provider_code") or refused.code)
        raise ApiError(ApiCode.MERCHANT_VALIDATION_FAILED, refused.message, reason=reason) from None


class QrCode(msgspec.Struct, frozen=True):
    """A payment's page as a QR code for the guest's phone: SVG text and PNG bytes."""

    payment_id: str
    url: str
    svg: str
    png_base64: str


@routes.route(
    "GET",
    "/v1/payments/{payment_id}/qr",
    summary="The QR code the guest scans to pay by bank (SVG and PNG)",
    response=QrCode,
    permission=Permission.PAYMENT_TAKE,
    errors=(ApiCode.NOT_FOUND, ApiCode.INVALID_TRANSITION),
)
async def payment_qr(ctx: Ctx) -> QrCode:
    """The pay page of a pending bank payment, as a QR code."""
    payment_id, store = ctx.params["payment_id"], ctx.store
    current = await store.transaction(lambda tx: payments.payment(tx, payment_id))
    url = current.action_url
    gateway = ctx.request.app.get(GATEWAY)
    if url is None and gateway is not None and current.status == "pending":
        with contextlib.suppress(GatewayOffline, GatewayRefused):
            url = (await gateway.read(payment_id, current.tender)).get("action_url")
    if current.status != "pending" or not url:
        raise ApiError(
            ApiCode.INVALID_TRANSITION,
            f"a {current.status} payment has no page to pay on",
            payment_id=payment_id,
        )
    svg, png = qr_images(url)
    return QrCode(payment_id, url, svg, base64.b64encode(png).decode("ascii"))


def qr_images(url: str) -> tuple[str, bytes]:
    """``url`` as a QR code: SVG text and PNG bytes."""
    out = []
    for factory in (SvgPathImage, PyPNGImage):
        buffer = io.BytesIO()
        qrcode.make(url, image_factory=factory, border=2).save(buffer)
        out.append(buffer.getvalue())
    return out[0].decode("utf-8"), out[1]


@routes.route(
    "POST",
    "/v1/tills",
    summary="Open a till (cash drawer) with its float",
    body=OpenTill,
    response=TillSummary,
    status=201,
    permission=Permission.TILL_MANAGE,
    errors=(ApiCode.TILL_ALREADY_OPEN,),
)
async def open_till(ctx: Ctx, body: OpenTill) -> TillSummary:
    """Open a till."""
    who, till_id = _employee(ctx), new_id("till")
    return await ctx.mutate(lambda tx: tills.open_till(tx, body, who, till_id))


@routes.route(
    "GET",
    "/v1/tills",
    summary="Tills of a business day, or the open ones, each with its cash sheet",
    query=TillQuery,
    response=TillList,
    permission=Permission.TILL_MANAGE,
)
async def list_tills(ctx: Ctx) -> TillList:
    """Till sheets."""
    query: TillQuery = ctx.query
    return await ctx.store.transaction(
        lambda tx: tills.tills_of_day(tx, query.business_day, query.status)
    )


@routes.route(
    "GET",
    "/v1/tills/{till_id}",
    summary="A till's cash sheet: float, cash taken and refunded, paid in and out, expected",
    response=TillSummary,
    permission=Permission.TILL_MANAGE,
    errors=_FOUND,
)
async def get_till(ctx: Ctx) -> TillSummary:
    """One till's sheet."""
    till_id = ctx.params["till_id"]
    return await ctx.store.transaction(lambda tx: tills.summary(tx, till_id))


@routes.route(
    "POST",
    "/v1/tills/{till_id}/movements",
    summary="Pay cash into or out of an open till, with a reason",
    body=Movement,
    response=TillSummary,
    status=201,
    permission=Permission.TILL_MANAGE,
    errors=(ApiCode.NOT_FOUND, ApiCode.TILL_NOT_OPEN, ApiCode.INSUFFICIENT_CASH),
)
async def move_cash(ctx: Ctx, body: Movement) -> TillSummary:
    """A paid-in or paid-out."""
    till_id, who, movement_id = ctx.params["till_id"], _employee(ctx), new_id("mov")
    return await ctx.mutate(lambda tx: tills.move_cash(tx, till_id, body, who, movement_id))


@routes.route(
    "POST",
    "/v1/tills/{till_id}/close",
    summary="Close a till with the cash counted: expected, counted and the variance",
    body=CloseTill,
    response=TillSummary,
    permission=Permission.TILL_MANAGE,
    errors=(ApiCode.NOT_FOUND, ApiCode.TILL_NOT_OPEN),
)
async def close_till(ctx: Ctx, body: CloseTill) -> TillSummary:
    """Close a till."""
    till_id, who = ctx.params["till_id"], _employee(ctx)
    return await ctx.mutate(lambda tx: tills.close_till(tx, till_id, body, who))
