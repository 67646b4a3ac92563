"""Card and bank payments through the cloud: the edge asks, the provider answers, sync tells.

How it works. An edge box never holds a provider's secret keys. To take a card, Apple Pay or
pay-by-bank payment it has already recorded as a ``pending`` attempt, it calls these device
endpoints (msgpack, under ``/v1/sync/``, so the credential names its site):

* ``POST /v1/sync/payments`` creates the provider's payment, the attempt id as the
  idempotency key: a retry, or a recovery after the edge crashed between the provider's
  answer and its own record, gets the same provider payment, never a second charge. For a
  card it also confirms the payment with the payment method the reader gave (a decline is
  ``402 payment_refused``; 3-D Secure leaves it ``requires_action`` with the page to open);
* ``GET /v1/sync/payments/{id}?tender=`` reads it again from the provider (the edge's
  backstop when a webhook is late), finding it by the attempt id if the cloud never
  learned its reference;
* ``POST /v1/sync/payments/{id}/cancel`` and ``POST /v1/sync/refunds``;
* ``POST /v1/sync/applepay/session`` starts an Apple Pay merchant session (``cloud.applepay``:
  the merchant identity certificate never leaves the cloud).

Webhooks arrive at ``POST /webhooks/{provider}`` (no credential: the provider's signature is
the credential). A verified event is taken once: its id goes into ``webhook_events`` and a
redelivery changes nothing.

Whatever the source (an answer, a poll, a webhook), the provider's view of a payment is
recorded the same way: a cloud write of the ``payments`` row's provider columns
(``provider_ref``, ``provider_state``, ``action_url``, ``expires_at_ms``,
``provider_failure``), which reaches the edge through sync, where the till acts on it. The
cloud never writes the till's columns (``status`` and the amounts), so the two sides never
race on one column; only when they do is the row parked for a person (``manual``). A write
that would change nothing is skipped, so repeated polls do not grow the feed.

``provider_payments`` maps each provider reference to its site and attempt (tenancy: a
webhook is applied to the site that created the payment, and nowhere else).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
from aiohttp import web

from shared.fees import Tender
from shared.payment_settings import PaymentSettings, with_overrides
from sync_protocol.changes import Op

from .applepay import ApplePayCode, ApplePayError, MerchantValidator
from .auth import SITE_ID, STORE
from .errors import CloudCode, CloudError
from .providers.base import PaymentProvider, ProviderError, ProviderPayment, ProviderRefund
from .store import CloudStore

log = logging.getLogger(__name__)

routes = web.RouteTableDef()


@dataclass
class PaymentProviders:
    """The providers this cloud takes payments with, and how long webhook handling takes."""

    bank: PaymentProvider | None = None
    card: PaymentProvider | None = None
    #: Apple Pay on the web: starts merchant sessions with the merchant identity certificate
    applepay: MerchantValidator | None = None
    #: seconds each verified webhook took to handle, newest last (for the benchmark)
    webhook_seconds: list[float] = field(default_factory=list)

    def for_tender(self, tender: str) -> PaymentProvider:
        """The provider that takes ``tender``, or ``provider_not_configured``."""
        provider = self.bank if tender == Tender.BANK else None
        if tender in (Tender.CARD, Tender.APPLE_PAY):
            provider = self.card
        if provider is None:
            raise CloudError(
                CloudCode.PROVIDER_NOT_CONFIGURED, f"no provider takes {tender} payments here"
            )
        return provider

    def by_name(self, name: str) -> PaymentProvider:
        """The provider called ``name`` (a webhook's path), or ``not_found``."""
        for provider in (self.bank, self.card):
            if provider is not None and provider.name == name:
                return provider
        raise CloudError(CloudCode.NOT_FOUND, f"no payment provider {name!r}")


PROVIDERS = web.AppKey("payment_providers", PaymentProviders)

_PAYMENT_COLUMNS = (
    "provider_ref",
    "provider_state",
    "action_url",
    "expires_at_ms",
    "provider_failure",
)
_REFUND_COLUMNS = ("provider_ref", "provider_state")


def _answer(value: object) -> web.Response:
    return web.Response(body=msgpack.packb(value), content_type="application/x-msgpack")


async def _request(request: web.Request) -> dict[str, Any]:
    try:
        body = msgpack.unpackb(await request.read(), raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CloudError(CloudCode.BAD_REQUEST, f"the body is not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise CloudError(CloudCode.BAD_REQUEST, "the body must be a map")
    return body


def _text(body: Mapping[str, Any], name: str, limit: int = 128) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise CloudError(CloudCode.BAD_REQUEST, f"{name} must be a string of 1-{limit} characters")
    return value


def _pence(body: Mapping[str, Any], name: str) -> int:
    value = body.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 100_000_000:
        raise CloudError(
            CloudCode.BAD_REQUEST, f"{name} must be a whole number of pence, 1 or more"
        )
    return value


def _refused(error: ProviderError) -> CloudError:
    if error.retryable:
        return CloudError(CloudCode.PROVIDER_UNAVAILABLE, error.message, provider_code=error.code)
    return CloudError(CloudCode.PAYMENT_REFUSED, error.message, provider_code=error.code)


def payment_view(payment: ProviderPayment) -> dict[str, Any]:
    """What the edge is told of a provider payment."""
    return {
        "payment_id": payment.payment_id,
        "provider_ref": payment.provider_ref,
        "state": str(payment.state),
        "action_url": payment.action_url,
        "expires_at_ms": payment.expires_at_ms,
        "failure_code": payment.failure_code,
        "amount_pence": payment.amount_pence,
        "refunded_pence": payment.refunded_pence,
    }


async def remember(
    store: CloudStore, provider: str, ref: str, site_id: str, payment_id: str, kind: str
) -> None:
    """Map a provider reference to its site and attempt (once)."""
    async with store.pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO provider_payments (provider, provider_ref, site_id, payment_id, kind)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            provider,
            ref,
            site_id,
            payment_id,
            kind,
        )


async def _mapped(store: CloudStore, provider: str, ref: str) -> tuple[str, str, str] | None:
    async with store.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT site_id, payment_id, kind FROM provider_payments"
            " WHERE provider = $1 AND provider_ref = $2",
            provider,
            ref,
        )
    return None if row is None else (row["site_id"], row["payment_id"], row["kind"])


async def _ref_of(store: CloudStore, site_id: str, payment_id: str, kind: str) -> str | None:
    async with store.pool.acquire() as conn:
        return await conn.fetchval(  # type: ignore[no-any-return]
            "SELECT provider_ref FROM provider_payments"
            " WHERE site_id = $1 AND payment_id = $2 AND kind = $3",
            site_id,
            payment_id,
            kind,
        )


async def record(
    store: CloudStore, site_id: str, table: str, pk: str, values: Mapping[str, Any]
) -> bool:
    """Write the provider's view of a payment or refund row, unless the row already says it."""
    async with store.pool.acquire() as conn:
        current = await conn.fetchrow(
            f'SELECT {", ".join(values)} FROM "{table}" WHERE site_id = $1 AND id = $2',
            site_id,
            pk,
        )
    if current is None:
        # Only rows an edge has synced are written: a write here first would race the edge's
        # insert on every column (see the module's docstring). The edge pushes an attempt
        # before it asks for the money, so a webhook finds its row.
        log.warning("no %s row %s at site %s yet: not recorded", table, pk, site_id)
        return False
    if all(current[k] == v for k, v in values.items()):
        return False
    await store.write(site_id, [(table, pk, Op.UPDATE, dict(values))])
    return True


def _payment_values(payment: ProviderPayment) -> dict[str, Any]:
    return {
        "provider_ref": payment.provider_ref,
        "provider_state": str(payment.state),
        "action_url": payment.action_url,
        "expires_at_ms": payment.expires_at_ms,
        "provider_failure": payment.failure_code,
    }


async def record_payment(
    store: CloudStore, site_id: str, provider: PaymentProvider, payment: ProviderPayment
) -> None:
    """Remember and record a provider payment for the site's attempt."""
    await remember(
        store, provider.name, payment.provider_ref, site_id, payment.payment_id, "payment"
    )
    await record(store, site_id, "payments", payment.payment_id, _payment_values(payment))


async def record_refund(
    store: CloudStore, site_id: str, provider: PaymentProvider, refund: ProviderRefund
) -> None:
    """Remember and record a provider refund for the site's refund."""
    await remember(store, provider.name, refund.provider_ref, site_id, refund.refund_id, "refund")
    values = {"provider_ref": refund.provider_ref, "provider_state": refund.state}
    await record(store, site_id, "refunds", refund.refund_id, values)


@routes.post("/v1/sync/payments")
async def create_payment(request: web.Request) -> web.Response:
    """Create the provider's payment for an edge's pending attempt (idempotent by its id)."""
    body = await _request(request)
    store, providers, site_id = request.app[STORE], request.app[PROVIDERS], request[SITE_ID]
    payment_id, currency = _text(body, "payment_id"), _text(body, "currency", 3)
    tender, amount = await _attempt(store, site_id, payment_id)
    capture = body.get("capture", "automatic")
    if capture not in ("automatic", "manual"):
        raise CloudError(CloudCode.BAD_REQUEST, "capture is automatic or manual")
    description = body.get("description") or ""
    if not isinstance(description, str) or len(description) > 200:
        raise CloudError(CloudCode.BAD_REQUEST, "description is a string of up to 200 characters")
    method = body.get("payment_method")
    if method is not None and (not isinstance(method, str) or not 0 < len(method) <= 255):
        raise CloudError(CloudCode.BAD_REQUEST, "payment_method is a string")
    provider = providers.for_tender(tender)
    try:
        payment = await provider.create(
            payment_id, amount, currency, description=description, capture=capture
        )
        await record_payment(store, site_id, provider, payment)
        confirm = getattr(provider, "confirm", None)
        if method is not None and confirm is not None:
            payment = await confirm(payment.provider_ref, method)
    except ProviderError as error:
        raise _refused(error) from None
    await record_payment(store, site_id, provider, payment)
    return _answer(payment_view(payment))


async def _attempt(store: CloudStore, site_id: str, payment_id: str) -> tuple[str, int]:
    """The tender and amount of an attempt the edge has synced, still waiting for money."""
    async with store.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT tender, charged_pence, status FROM payments"
            " WHERE site_id = $1 AND id = $2 AND NOT _deleted",
            site_id,
            payment_id,
        )
    if row is None:
        raise CloudError(
            CloudCode.PAYMENT_NOT_SYNCED,
            f"payment {payment_id} has not reached the cloud: push it first",
        )
    if row["status"] != "pending" or not isinstance(row["charged_pence"], int):
        raise CloudError(
            CloudCode.PAYMENT_REFUSED, f"payment {payment_id} is {row['status']}, not pending"
        )
    return str(row["tender"]), int(row["charged_pence"])


async def _find(
    request: web.Request, payment_id: str, tender: str
) -> tuple[PaymentProvider, ProviderPayment]:
    store, site_id = request.app[STORE], request[SITE_ID]
    provider = request.app[PROVIDERS].for_tender(tender)
    ref = await _ref_of(store, site_id, payment_id, "payment")
    try:
        payment = await provider.get(ref) if ref else await provider.find(payment_id)
    except ProviderError as error:
        raise _refused(error) from None
    if payment is None or payment.payment_id != payment_id:
        raise CloudError(CloudCode.UNKNOWN_PAYMENT, f"the provider has no payment {payment_id}")
    return provider, payment


@routes.get("/v1/sync/payments/{payment_id}")
async def read_payment(request: web.Request) -> web.Response:
    """The provider's payment for an attempt, read afresh and recorded."""
    payment_id, tender = request.match_info["payment_id"], request.query.get("tender", "")
    provider, payment = await _find(request, payment_id, tender)
    await record_payment(request.app[STORE], request[SITE_ID], provider, payment)
    return _answer(payment_view(payment))


@routes.post("/v1/sync/payments/{payment_id}/cancel")
async def cancel_payment(request: web.Request) -> web.Response:
    """Cancel an attempt that has not completed."""
    payment_id = request.match_info["payment_id"]
    tender = _text(await _request(request), "tender")
    provider, payment = await _find(request, payment_id, tender)
    try:
        payment = await provider.cancel(payment.provider_ref)
    except ProviderError as error:
        raise _refused(error) from None
    await record_payment(request.app[STORE], request[SITE_ID], provider, payment)
    return _answer(payment_view(payment))


@routes.post("/v1/sync/refunds")
async def create_refund(request: web.Request) -> web.Response:
    """Refund part of a provider payment (idempotent by the refund's id)."""
    body = await _request(request)
    refund_id, payment_id = _text(body, "refund_id"), _text(body, "payment_id")
    amount, tender = _pence(body, "amount_pence"), _text(body, "tender")
    provider, payment = await _find(request, payment_id, tender)
    try:
        refund = await provider.refund(payment.provider_ref, refund_id, amount)
    except ProviderError as error:
        raise _refused(error) from None
    await record_refund(request.app[STORE], request[SITE_ID], provider, refund)
    return _answer(
        {
            "refund_id": refund.refund_id,
            "provider_ref": refund.provider_ref,
            "state": refund.state,
            "amount_pence": refund.amount_pence,
        }
    )


@routes.post("/webhooks/{provider}")
async def webhook(request: web.Request) -> web.Response:
    """A provider's notification: verified, taken once, recorded on its site's row."""
    started = time.perf_counter()
    store, providers = request.app[STORE], request.app[PROVIDERS]
    provider = providers.by_name(request.match_info["provider"])
    body = await request.read()
    try:
        event = provider.verify_webhook(body, request.headers)
    except ProviderError as error:
        raise CloudError(
            CloudCode.INVALID_SIGNATURE, error.message, provider_code=error.code
        ) from None
    subject = event.payment or event.refund
    async with store.pool.acquire() as conn:
        # One round trip: take the event (once) and find whose payment it is.
        taken = await conn.fetchrow(
            "WITH fresh AS (INSERT INTO webhook_events (provider, event_id) VALUES ($1, $2)"
            " ON CONFLICT DO NOTHING RETURNING 1)"
            " SELECT EXISTS (SELECT 1 FROM fresh) AS fresh, m.site_id, m.payment_id, m.kind"
            " FROM (VALUES (1)) AS one LEFT JOIN provider_payments m"
            " ON m.provider = $1 AND m.provider_ref = $3",
            provider.name,
            event.event_id,
            subject.provider_ref if subject is not None else "",
        )
    if not taken["fresh"]:
        return web.json_response({"received": True, "duplicate": True})
    known = (taken["site_id"], taken["payment_id"], taken["kind"]) if taken["site_id"] else None
    try:
        await _apply_event(store, provider, event.payment, event.refund, known)
    except BaseException:
        # Not recorded: forget the event so the provider's redelivery is taken.
        async with store.pool.acquire() as conn:
            await conn.execute(
                "DELETE FROM webhook_events WHERE provider = $1 AND event_id = $2",
                provider.name,
                event.event_id,
            )
        raise
    providers.webhook_seconds.append(time.perf_counter() - started)
    del providers.webhook_seconds[:-10_000]
    return web.json_response({"received": True})


async def _apply_event(
    store: CloudStore,
    provider: PaymentProvider,
    payment: ProviderPayment | None,
    refund: ProviderRefund | None,
    known: tuple[str, str, str] | None,
) -> None:
    """Record an event's payment and refund; ``known``: the first one's mapping, found."""
    if payment is not None:
        mapped = known
        if mapped is None:
            log.warning("%s webhook for unknown payment %s", provider.name, payment.provider_ref)
            return
        site_id, payment_id, _ = mapped
        if payment_id == payment.payment_id:
            await record(store, site_id, "payments", payment_id, _payment_values(payment))
    if refund is not None:
        mapped = (
            known if payment is None else await _mapped(store, provider.name, refund.provider_ref)
        )
        if mapped is not None:
            values = {"provider_ref": refund.provider_ref, "provider_state": refund.state}
            await record(store, mapped[0], "refunds", mapped[1], values)


_TAKINGS_SQL = """
SELECT p.business_day, count(*) AS payments, sum(p.charged_pence) AS charged_pence,
       sum(p.tip_pence) AS tips_pence, sum(p.provider_fee_pence) AS provider_fee_pence,
       sum(p.platform_fee_pence) AS platform_fee_pence,
       coalesce((SELECT sum(r.amount_pence) FROM refunds r
                 WHERE r.site_id = $1 AND r.business_day = p.business_day
                   AND r.status = 'succeeded' AND NOT r._deleted), 0) AS refunded_pence
FROM payments p
WHERE p.site_id = $1 AND p.status = 'succeeded' AND NOT p._deleted
  AND p.business_day BETWEEN $2 AND $3
GROUP BY p.business_day ORDER BY p.business_day
"""


@routes.get("/v1/sites/{site}/takings")
async def site_takings(request: web.Request) -> web.Response:
    """A site's takings per business day (``from``/``to``, ISO dates): what was charged and
    refunded, tips, provider fees, and the platform's fee revenue."""
    site_id = request.match_info["site"]
    store = request.app[STORE]
    await store.head(site_id)  # SITE_NOT_FOUND when unknown
    first, last = request.query.get("from", ""), request.query.get("to", "")
    for day in (first, last):
        if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", day):
            raise CloudError(CloudCode.BAD_REQUEST, "from and to are ISO dates (YYYY-MM-DD)")
    async with store.pool.acquire() as conn:
        rows = await conn.fetch(_TAKINGS_SQL, site_id, first, last)
    days = [{k: (int(v) if k != "business_day" else v) for k, v in row.items()} for row in rows]
    return web.json_response({"site_id": site_id, "days": days})


@routes.post("/v1/sync/applepay/session")
async def applepay_session(request: web.Request) -> web.Response:
    """Start an Apple Pay merchant session for the validation URL a guest's browser was given
    (the server side of ``onvalidatemerchant``): Apple's opaque session object."""
    url = _text(await _request(request), "validation_url", 2048)
    validator = request.app[PROVIDERS].applepay
    if validator is None:
        raise CloudError(CloudCode.PROVIDER_NOT_CONFIGURED, "Apple Pay is not set up here")
    try:
        session = await validator.start_session(url)
    except ApplePayError as error:
        code = (
            CloudCode.BAD_REQUEST
            if error.code is ApplePayCode.VALIDATION_URL_REFUSED
            else CloudCode.PAYMENT_REFUSED
        )
        raise CloudError(code, error.message, provider_code=str(error.code)) from None
    return _answer({"session": session})


@routes.put("/v1/sites/{site}/settings/payments")
async def put_payment_settings(request: web.Request) -> web.Response:
    """Set the site's payment settings the owner changes from here (fee rates, pass-through,
    tips, the refund threshold): the whole set replaces the last one, ``{}`` goes back to the
    edge's own. Checked before anything is written; the edge applies them once synced."""
    site_id = request.match_info["site"]
    store = request.app[STORE]
    await store.head(site_id)  # SITE_NOT_FOUND when unknown
    try:
        overrides = await request.json()
    except ValueError:
        raise CloudError(CloudCode.BAD_REQUEST, "the body is not JSON") from None
    if not isinstance(overrides, dict):
        raise CloudError(CloudCode.BAD_REQUEST, "the body is an object of settings")
    try:
        with_overrides(PaymentSettings(), overrides)
    except (ValueError, TypeError) as error:
        raise CloudError(CloudCode.BAD_REQUEST, str(error)) from None
    value = json.dumps(overrides, sort_keys=True, separators=(",", ":"))
    rev = await store.write(site_id, [("site_settings", "payments", Op.UPDATE, {"value": value})])
    return web.json_response({"site_id": site_id, "payments": overrides, "rev": rev})


@routes.get("/v1/sites/{site}/settings/payments")
async def get_payment_settings(request: web.Request) -> web.Response:
    """The site's payment settings set from here (``{}``: none, the edge's own apply)."""
    site_id = request.match_info["site"]
    store = request.app[STORE]
    await store.head(site_id)
    rows, _ = await store.rows_page(site_id, "site_settings", "", 100)
    value = (rows.get("payments") or {}).get("value")
    return web.json_response({"site_id": site_id, "payments": json.loads(str(value or "{}"))})
