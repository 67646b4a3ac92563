"""Simbank: a simulated pay-by-bank (open banking) provider, and the adapter the cloud uses.

It is the default provider for demos and tests, and it works the way the real UK pay-by-bank
providers do: the till creates a payment, shows the bank's pay page as a QR code, the guest
approves (or declines) it in their bank app, and the bank sends a signed webhook.

The bank (``SimBank``, served by ``simbank_app`` or ``python -m cloud.providers.simbank``)
keeps everything in memory. Its API wants ``Authorization: Bearer <secret key>``; the pay
page is the guest's phone and needs none.

- ``POST /v1/payments``: create (``Idempotency-Key`` required); 201, or 200 when the key was
  seen before with the same body
- ``GET /v1/payments/{id}``: read one
- ``GET /v1/payments?reference=R``: ``{"data": [...]}``, the payments made for our id ``R``
- ``POST /v1/payments/{id}/cancel``: cancel a pending payment
- ``POST /v1/payments/{id}/refunds``: refund a succeeded one (``Idempotency-Key`` required)
- ``GET /pay/{id}``: the guest's pay page (Approve / Decline buttons)
- ``POST /pay/{id}/approve``, ``POST /pay/{id}/decline``: the guest's answer
- ``POST /_control/payments/{id}/complete_late``: the guest's bank completes a cancelled or
  expired payment after all (money arriving after the till gave up)
- ``POST /_control/clock`` ``{"advance_ms": N}``: move the bank's clock forward, then sweep
- ``POST /_control/events/{id}/redeliver``: send a webhook event again

Statuses follow the "bank" moves of ``shared.payment_states.TRANSITIONS`` (the bank checks
every move against that table)::

    pending --approve--> succeeded      pending --decline--> failed
    pending --cancel---> cancelled      pending --time-----> expired
    cancelled | expired --complete_late--> succeeded

A payment lives ``expiry_ms`` (15 minutes) by the bank's clock: it is expired as soon as
``now >= expires_at_ms``, which every read and action checks first, and ``SimBank.sweep()``
(also run every ``sweep_interval_s`` when set) expires the ones nobody looks at. Refunds
leave a payment ``succeeded`` and add to its ``refunded_pence``, never beyond its amount.

Idempotency: an ``Idempotency-Key`` names one creation. The same key with the same body
(amount, currency, reference, description; or, for a refund, the same payment and amount)
answers 200 with the payment or refund as it is *now* and ``Idempotent-Replayed: true``; the
same key with a different body is refused (422 ``idempotency_key_reused``). The adapter uses
our payment id as both the key and the ``reference``, and our refund id as the refund's key
(echoed back as the refund's ``reference``).

Webhooks: every status change and every refund is an event ``{id: "evt_...", type, created_ms,
data}`` (``type`` is ``payment.succeeded|failed|cancelled|expired`` or ``refund.succeeded``;
``data`` is the payment or refund object) POSTed to the webhook URL in the background, never
holding up the API answer. A delivery is retried after each of ``retry_delays_s`` while the
receiver answers non-2xx or cannot be reached; a redelivery carries the same event id and
body. Events are independent: their order of arrival is not guaranteed. Each attempt is
signed with ``Simbank-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(webhook secret,
f"{t}." + raw body)>``; the receiver recomputes it over the raw bytes, compares in constant
time, and refuses a ``t`` further than its tolerance (300 s) from its own clock.

Errors are ``{"error": {"code": ..., "message": ...}}`` with a stable code: 400
``invalid_json``, ``missing_idempotency_key``; 401 ``unauthorized``; 404 ``payment_not_found``,
``event_not_found``; 409 ``payment_not_pending``, ``payment_not_succeeded``,
``refund_exceeds_payment``, ``payment_not_cancelled_or_expired``, ``clock_not_adjustable``;
422 ``invalid_amount``, ``unsupported_currency``, ``invalid_reference``,
``invalid_description``, ``invalid_advance``, ``idempotency_key_reused``.

The adapter (``SimBankProvider``) is the ``PaymentProvider`` for this bank: a 4xx answer is a
``ProviderError`` with the bank's code; no answer, a timeout, a 5xx or a garbled answer is
``ProviderError("provider_unavailable", retryable=True)``; ``create`` refuses a manual capture
(``capture_not_supported``: a bank payment cannot be held). ``verify_webhook`` refuses a
missing, malformed or wrong signature (``invalid_signature``), a ``t`` out of tolerance
(``stale_signature``) and a signed body that is not an event (``invalid_payload``).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import html
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler

from cloud.providers.base import ProviderError, ProviderPayment, ProviderRefund, WebhookEvent
from shared.payment_states import PaymentState, can_move, late_completion

log = logging.getLogger(__name__)

P = PaymentState

SIGNATURE_HEADER = "Simbank-Signature"
DEFAULT_EXPIRY_MS = 15 * 60_000
#: seconds to wait before each retry of a webhook delivery that failed
DEFAULT_RETRY_DELAYS_S: tuple[float, ...] = (1.0, 5.0, 30.0)
CURRENCIES = frozenset({"GBP"})
MAX_TEXT = 255  #: longest reference or idempotency key
MAX_DESCRIPTION = 500


def wall_clock_ms() -> int:
    """Now, in milliseconds since the epoch."""
    return time.time_ns() // 1_000_000


class SimClock:
    """The bank's clock: wall time (or a fixed start) plus however far it was moved forward.

    Tests start it at a fixed instant and move it by hand; a demo bank follows wall time and
    is moved forward through ``POST /_control/clock``. Either way it is the same object.
    """

    def __init__(self, start_ms: int | None = None) -> None:
        self._start_ms = start_ms
        self._offset_ms = 0

    def now_ms(self) -> int:
        """Now, by this clock (epoch milliseconds)."""
        base = wall_clock_ms() if self._start_ms is None else self._start_ms
        return base + self._offset_ms

    def __call__(self) -> int:
        return self.now_ms()

    def advance(self, ms: int) -> int:
        """Move the clock ``ms`` forward (never back); returns the new now."""
        if ms < 0:
            raise ValueError("the clock only moves forward")
        self._offset_ms += ms
        return self.now_ms()


def sign(secret: str, body: bytes, t: int) -> str:
    """The ``Simbank-Signature`` header value for ``body`` sent at unix second ``t``."""
    return f"t={t},v1={_hmac_hex(secret, t, body)}"


def _hmac_hex(secret: str, t: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()


# -- the bank's records ---------------------------------------------------------------------


@dataclass
class _Payment:
    id: str
    reference: str
    amount_pence: int
    currency: str
    description: str
    pay_url: str
    created_ms: int
    expires_at_ms: int
    status: PaymentState = P.PENDING
    refunded_pence: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reference": self.reference,
            "status": self.status.value,
            "amount_pence": self.amount_pence,
            "currency": self.currency,
            "description": self.description,
            "pay_url": self.pay_url,
            "expires_at_ms": self.expires_at_ms,
            "created_ms": self.created_ms,
            "refunded_pence": self.refunded_pence,
        }


@dataclass
class _Refund:
    id: str
    payment_id: str
    reference: str  #: the idempotency key it was created with (the caller's refund id)
    amount_pence: int
    created_ms: int
    status: Literal["succeeded"] = "succeeded"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "payment_id": self.payment_id,
            "reference": self.reference,
            "amount_pence": self.amount_pence,
            "status": self.status,
            "created_ms": self.created_ms,
        }


@dataclass(frozen=True)
class DeliveryAttempt:
    """One try at delivering a webhook event: the receiver's status, or why there was none."""

    event_id: str
    attempt: int  #: 1 for the first try of a delivery (a redelivery starts again at 1)
    status: int | None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the receiver accepted it (a 2xx answer)."""
        return self.status is not None and 200 <= self.status < 300


class _Refusal(Exception):
    """A request the bank refuses: answered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


# -- request checks -------------------------------------------------------------------------


def _idempotency_key(request: web.Request) -> str:
    key = request.headers.get("Idempotency-Key", "").strip()
    if not key or len(key) > MAX_TEXT:
        raise _Refusal(400, "missing_idempotency_key", "an Idempotency-Key header is required")
    return key


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError):
        raise _Refusal(400, "invalid_json", "the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise _Refusal(400, "invalid_json", "the body must be a JSON object")
    return body


def _amount(body: Mapping[str, Any]) -> int:
    amount = body.get("amount_pence")
    if type(amount) is not int or amount <= 0:
        raise _Refusal(422, "invalid_amount", "amount_pence must be a whole number above 0")
    return amount


def _create_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """The payment a create request describes (also what an idempotency key is bound to)."""
    amount = _amount(body)
    currency = body.get("currency")
    if not isinstance(currency, str) or currency not in CURRENCIES:
        raise _Refusal(422, "unsupported_currency", f"currency must be one of {sorted(CURRENCIES)}")
    reference = body.get("reference")
    if not isinstance(reference, str) or not reference or len(reference) > MAX_TEXT:
        raise _Refusal(422, "invalid_reference", "reference must be a non-empty string")
    description = body.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION:
        raise _Refusal(422, "invalid_description", "description must be a short string")
    return {
        "amount_pence": amount,
        "currency": currency,
        "reference": reference,
        "description": description,
    }


# -- the guest's pay page -------------------------------------------------------------------

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 28rem; margin: 2rem auto; padding: 0 1rem;
  color: #1b1b1f; }}
.bank {{ font-weight: 700; color: #0b5; letter-spacing: .05em; }}
.amount {{ font-size: 2.5rem; font-weight: 700; margin: .5rem 0; }}
.muted {{ color: #666; font-size: .9rem; }}
form {{ display: inline-block; margin: 1rem .5rem 0 0; }}
button {{ font-size: 1.1rem; padding: .7rem 1.6rem; border-radius: .5rem; border: 0; }}
.approve {{ background: #0b5; color: #fff; }}
.decline {{ background: #eee; color: #1b1b1f; }}
</style></head>
<body><p class="bank">SIMBANK</p>
{content}
</body></html>
"""

_OUTCOMES = {
    P.SUCCEEDED: "Payment approved. You can close this page.",
    P.FAILED: "Payment declined. No money has left your account.",
    P.CANCELLED: "This payment was cancelled by the merchant.",
    P.EXPIRED: "This payment link has expired.",
    P.PENDING: "This payment is waiting for your approval.",
}


def pounds(pence: int) -> str:
    """``1250`` -> ``"£12.50"``."""
    return f"£{pence // 100:,}.{pence % 100:02d}"


def _page(title: str, content: str, status: int = 200) -> web.Response:
    text = _PAGE.format(title=html.escape(title), content=content)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8")


def _summary(payment: _Payment) -> str:
    merchant = html.escape(payment.description or "Payment")
    return (
        f'<h1 class="merchant">{merchant}</h1>\n'
        f'<p class="amount">{html.escape(pounds(payment.amount_pence))}</p>\n'
        f'<p class="muted">Reference {html.escape(payment.reference)}</p>\n'
    )


def _pay_page(payment: _Payment) -> web.Response:
    content = _summary(payment)
    if payment.status is P.PENDING:
        base = f"/pay/{quote(payment.id, safe='')}"
        content += (
            f'<form method="post" action="{html.escape(base)}/approve">'
            '<button class="approve" type="submit">Approve</button></form>\n'
            f'<form method="post" action="{html.escape(base)}/decline">'
            '<button class="decline" type="submit">Decline</button></form>\n'
        )
    else:
        content += f'<p class="outcome">{html.escape(_OUTCOMES[payment.status])}</p>\n'
    return _page("Pay with Simbank", content)


def _not_found_page() -> web.Response:
    return _page("Payment not found", "<p>This payment does not exist.</p>", status=404)


# -- the bank -------------------------------------------------------------------------------


class SimBank:
    """The simulated bank: payments, refunds, the pay page and webhooks, all in memory."""

    def __init__(
        self,
        *,
        secret_key: str,
        webhook_secret: str,
        webhook_url: str | None,
        clock: Callable[[], int] | None = None,
        expiry_ms: int = DEFAULT_EXPIRY_MS,
        retry_delays_s: Sequence[float] = DEFAULT_RETRY_DELAYS_S,
        delivery_timeout_s: float = 5.0,
        public_url: str | None = None,
        sweep_interval_s: float | None = None,
    ) -> None:
        self.secret_key = secret_key
        self.webhook_secret = webhook_secret
        self.webhook_url = webhook_url
        self.clock: Callable[[], int] = clock if clock is not None else SimClock()
        self.expiry_ms = expiry_ms
        self.retry_delays_s = tuple(retry_delays_s)
        self.delivery_timeout_s = delivery_timeout_s
        self.public_url = public_url.rstrip("/") if public_url else None
        self.sweep_interval_s = sweep_interval_s
        self.payments: dict[str, _Payment] = {}
        self.refunds: dict[str, _Refund] = {}
        #: every event ever sent, by id (what a redelivery sends again)
        self.events: dict[str, dict[str, Any]] = {}
        self.delivery_log: list[DeliveryAttempt] = []
        self._create_keys: dict[str, tuple[dict[str, Any], str]] = {}
        self._refund_keys: dict[str, str] = {}
        self._deliveries: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self.app = self._build_app()

    # -- the app

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware])
        app[SIMBANK_KEY] = self
        app.router.add_post("/v1/payments", self._create)
        app.router.add_get("/v1/payments", self._list)
        app.router.add_get("/v1/payments/{id}", self._get)
        app.router.add_post("/v1/payments/{id}/cancel", self._cancel)
        app.router.add_post("/v1/payments/{id}/refunds", self._refund)
        app.router.add_get("/pay/{id}", self._pay_page)
        app.router.add_post("/pay/{id}/approve", self._approve)
        app.router.add_post("/pay/{id}/decline", self._decline)
        app.router.add_post("/_control/payments/{id}/complete_late", self._complete_late)
        app.router.add_post("/_control/clock", self._advance_clock)
        app.router.add_post("/_control/events/{id}/redeliver", self._redeliver)
        app.on_startup.append(self._on_startup)
        app.on_cleanup.append(self._on_cleanup)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith(("/v1/", "/_control/")) and not self._authorized(request):
            return _error(401, "unauthorized", "a valid Authorization: Bearer key is required")
        try:
            return await handler(request)
        except _Refusal as refusal:
            return _error(refusal.status, refusal.code, refusal.message)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), self.secret_key.encode()
        )

    async def _on_startup(self, app: web.Application) -> None:
        if self.sweep_interval_s is not None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _on_cleanup(self, app: web.Application) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop sweeping and delivering (deliveries still in flight are dropped)."""
        tasks = [*self._deliveries, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._sweeper = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- state

    def now_ms(self) -> int:
        """Now, by the bank's clock."""
        return self.clock()

    def _move(self, payment: _Payment, target: PaymentState) -> None:
        """Move ``payment`` to ``target`` (a move the bank table allows) and notify."""
        if not can_move("bank", payment.status, target):
            raise RuntimeError(f"a bank payment cannot go {payment.status} -> {target}")
        payment.status = target
        self._emit(f"payment.{target.value}", payment.to_json())

    def _expire_if_due(self, payment: _Payment) -> None:
        if payment.status is P.PENDING and self.now_ms() >= payment.expires_at_ms:
            self._move(payment, P.EXPIRED)

    def _payment(self, payment_id: str) -> _Payment:
        """The payment, expired first if its time is up; 404 when there is none."""
        payment = self.payments.get(payment_id)
        if payment is None:
            raise _Refusal(404, "payment_not_found", f"no payment {payment_id}")
        self._expire_if_due(payment)
        return payment

    def sweep(self) -> list[str]:
        """Expire every pending payment whose time is up (notifying each); their ids."""
        now = self.now_ms()
        due = [
            p for p in self.payments.values() if p.status is P.PENDING and now >= p.expires_at_ms
        ]
        for payment in due:
            self._move(payment, P.EXPIRED)
        return [payment.id for payment in due]

    async def _sweep_forever(self) -> None:
        assert self.sweep_interval_s is not None
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.sweep()

    # -- the API

    async def _create(self, request: web.Request) -> web.Response:
        key = _idempotency_key(request)
        fields = _create_fields(await _json_object(request))
        seen = self._create_keys.get(key)
        if seen is not None:
            bound, payment_id = seen
            if bound != fields:
                raise _Refusal(
                    422, "idempotency_key_reused", "this Idempotency-Key was used for another body"
                )
            return _replayed(self._payment(payment_id).to_json())
        now = self.now_ms()
        payment_id = _new_id("pay")
        payment = _Payment(
            id=payment_id,
            pay_url=f"{self.public_url or request.url.origin()}/pay/{payment_id}",
            created_ms=now,
            expires_at_ms=now + self.expiry_ms,
            **fields,
        )
        self.payments[payment_id] = payment
        self._create_keys[key] = (fields, payment_id)
        return web.json_response(payment.to_json(), status=201)

    async def _list(self, request: web.Request) -> web.Response:
        reference = request.query.get("reference")
        found = [
            self._payment(p.id).to_json()
            for p in list(self.payments.values())
            if reference is None or p.reference == reference
        ]
        return web.json_response({"data": found})

    async def _get(self, request: web.Request) -> web.Response:
        return web.json_response(self._payment(request.match_info["id"]).to_json())

    async def _cancel(self, request: web.Request) -> web.Response:
        payment = self._payment(request.match_info["id"])
        if payment.status is not P.PENDING:
            raise _Refusal(409, "payment_not_pending", f"the payment is {payment.status}")
        self._move(payment, P.CANCELLED)
        return web.json_response(payment.to_json())

    async def _refund(self, request: web.Request) -> web.Response:
        key = _idempotency_key(request)
        amount = _amount(await _json_object(request))
        payment_id = request.match_info["id"]
        seen = self._refund_keys.get(key)
        if seen is not None:
            refund = self.refunds[seen]
            if (refund.payment_id, refund.amount_pence) != (payment_id, amount):
                raise _Refusal(
                    422,
                    "idempotency_key_reused",
                    "this Idempotency-Key was used for another refund",
                )
            return _replayed(refund.to_json())
        payment = self._payment(payment_id)
        if payment.status is not P.SUCCEEDED:
            raise _Refusal(409, "payment_not_succeeded", f"the payment is {payment.status}")
        left = payment.amount_pence - payment.refunded_pence
        if amount > left:
            raise _Refusal(409, "refund_exceeds_payment", f"only {left} pence is left to refund")
        refund = _Refund(_new_id("re"), payment.id, key, amount, self.now_ms())
        self.refunds[refund.id] = refund
        self._refund_keys[key] = refund.id
        payment.refunded_pence += amount
        self._emit("refund.succeeded", refund.to_json())
        return web.json_response(refund.to_json(), status=201)

    # -- the guest's pay page

    async def _pay_page(self, request: web.Request) -> web.Response:
        payment = self.payments.get(request.match_info["id"])
        if payment is None:
            return _not_found_page()
        self._expire_if_due(payment)
        return _pay_page(payment)

    async def _approve(self, request: web.Request) -> web.Response:
        return self._guest_answer(request.match_info["id"], P.SUCCEEDED)

    async def _decline(self, request: web.Request) -> web.Response:
        return self._guest_answer(request.match_info["id"], P.FAILED)

    def _guest_answer(self, payment_id: str, target: PaymentState) -> web.Response:
        payment = self.payments.get(payment_id)
        if payment is None:
            return _not_found_page()
        self._expire_if_due(payment)
        if payment.status is not P.PENDING:
            content = _summary(payment) + (
                '<p class="outcome">This payment can no longer be changed. '
                f"{html.escape(_OUTCOMES[payment.status])}</p>\n"
            )
            return _page("Payment already finished", content, status=409)
        self._move(payment, target)
        return _pay_page(payment)

    # -- control (demos and tests)

    async def _complete_late(self, request: web.Request) -> web.Response:
        payment = self._payment(request.match_info["id"])
        if not late_completion(payment.status, P.SUCCEEDED):
            raise _Refusal(
                409, "payment_not_cancelled_or_expired", f"the payment is {payment.status}"
            )
        self._move(payment, P.SUCCEEDED)
        return web.json_response(payment.to_json())

    async def _advance_clock(self, request: web.Request) -> web.Response:
        advance = (await _json_object(request)).get("advance_ms")
        if type(advance) is not int or advance < 0:
            raise _Refusal(422, "invalid_advance", "advance_ms must be a whole number >= 0")
        if not isinstance(self.clock, SimClock):
            raise _Refusal(409, "clock_not_adjustable", "this bank runs on an outside clock")
        now = self.clock.advance(advance)
        return web.json_response({"now_ms": now, "expired": self.sweep()})

    async def _redeliver(self, request: web.Request) -> web.Response:
        event_id = request.match_info["id"]
        if event_id not in self.events:
            raise _Refusal(404, "event_not_found", f"no event {event_id}")
        self.redeliver(event_id)
        return web.json_response(self.events[event_id], status=202)

    # -- webhooks

    def _emit(self, kind: str, data: dict[str, Any]) -> None:
        event_id = _new_id("evt")
        event = {"id": event_id, "type": kind, "created_ms": self.now_ms(), "data": data}
        self.events[event_id] = event
        self._schedule(event)

    def redeliver(self, event_id: str) -> None:
        """Send event ``event_id`` again (same id, same body), in the background."""
        self._schedule(self.events[event_id])

    def _schedule(self, event: dict[str, Any]) -> None:
        if self.webhook_url is None:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(self.webhook_url, event))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def idle(self) -> None:
        """Wait until every webhook delivery started so far (and any it retries) is done."""
        while self._deliveries:
            await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def _deliver(self, url: str, event: dict[str, Any]) -> None:
        body = json.dumps(event, separators=(",", ":")).encode()
        for attempt, delay in enumerate((0.0, *self.retry_delays_s), start=1):
            if delay:
                await asyncio.sleep(delay)
            outcome = await self._post_once(url, event["id"], attempt, body)
            self.delivery_log.append(outcome)
            if outcome.ok:
                return
        log.warning("simbank: webhook %s not delivered to %s", event["id"], url)

    async def _post_once(
        self, url: str, event_id: str, attempt: int, body: bytes
    ) -> DeliveryAttempt:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.webhook_secret, body, self.now_ms() // 1000),
        }
        timeout = aiohttp.ClientTimeout(total=self.delivery_timeout_s)
        try:
            async with self._session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                await resp.read()
                return DeliveryAttempt(event_id, attempt, resp.status)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return DeliveryAttempt(event_id, attempt, None, repr(exc))


def _replayed(obj: dict[str, Any]) -> web.Response:
    return web.json_response(obj, status=200, headers={"Idempotent-Replayed": "true"})


SIMBANK_KEY = web.AppKey("simbank", SimBank)


def simbank_app(
    *,
    secret_key: str,
    webhook_secret: str,
    webhook_url: str | None,
    clock: Callable[[], int] | None = None,
    expiry_ms: int = DEFAULT_EXPIRY_MS,
    **options: Any,
) -> web.Application:
    """The bank as an app (``app[SIMBANK_KEY]`` is the ``SimBank``); see ``SimBank`` options."""
    bank = SimBank(
        secret_key=secret_key,
        webhook_secret=webhook_secret,
        webhook_url=webhook_url,
        clock=clock,
        expiry_ms=expiry_ms,
        **options,
    )
    return bank.app


# -- the adapter ----------------------------------------------------------------------------

_STATES = {
    "pending": P.PENDING,
    "succeeded": P.SUCCEEDED,
    "failed": P.FAILED,
    "cancelled": P.CANCELLED,
    "expired": P.EXPIRED,
}


def _unavailable(message: str) -> ProviderError:
    return ProviderError("provider_unavailable", message, retryable=True)


def _to_payment(obj: Mapping[str, Any]) -> ProviderPayment:
    try:
        state = _STATES[obj["status"]]
        amount = int(obj["amount_pence"])
        return ProviderPayment(
            provider_ref=str(obj["id"]),
            payment_id=str(obj["reference"]),
            state=state,
            amount_pence=amount,
            currency=str(obj["currency"]),
            action_url=obj.get("pay_url"),
            expires_at_ms=obj.get("expires_at_ms"),
            failure_code="declined" if state is P.FAILED else None,
            captured_pence=amount if state is P.SUCCEEDED else 0,
            refunded_pence=int(obj.get("refunded_pence", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _unavailable(f"the bank sent a payment we cannot read: {exc!r}") from exc


def _to_refund(obj: Mapping[str, Any]) -> ProviderRefund:
    try:
        status = obj["status"]
        if status not in ("pending", "succeeded", "failed"):
            raise ValueError(status)
        return ProviderRefund(
            provider_ref=str(obj["id"]),
            refund_id=str(obj["reference"]),
            payment_ref=str(obj["payment_id"]),
            amount_pence=int(obj["amount_pence"]),
            state=status,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise _unavailable(f"the bank sent a refund we cannot read: {exc!r}") from exc


def _header(headers: Mapping[str, str], name: str) -> str | None:
    wanted = name.lower()
    for key, value in headers.items():
        if key.lower() == wanted:
            return value
    return None


def _parse_signature(header: str) -> tuple[int, list[str]]:
    """``t=...,v1=...`` -> (t, every v1); ``ProviderError("invalid_signature")`` if malformed."""
    t: int | None = None
    v1: list[str] = []
    for part in header.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep:
            raise ProviderError("invalid_signature", "malformed signature header")
        if key == "t":
            if not value.isascii() or not value.isdigit() or t is not None:
                raise ProviderError("invalid_signature", "malformed signature timestamp")
            t = int(value)
        elif key == "v1":
            v1.append(value)
    if t is None or not v1:
        raise ProviderError("invalid_signature", "the signature header lacks t or v1")
    return t, v1


class SimBankProvider:
    """``PaymentProvider`` for Simbank (pay by bank: a pay page shown as a QR code)."""

    name = "simbank"
    kind: Literal["bank", "card"] = "bank"

    def __init__(
        self,
        base_url: str,
        secret_key: str,
        webhook_secret: str,
        session: aiohttp.ClientSession,
        clock: Callable[[], int] = wall_clock_ms,
        signature_tolerance_s: int = 300,
        *,
        timeout_s: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._secret_key = secret_key
        self._webhook_secret = webhook_secret
        self.session = session
        self.clock = clock
        self.signature_tolerance_s = signature_tolerance_s
        self.timeout_s = timeout_s

    async def create(
        self,
        payment_id: str,
        amount_pence: int,
        currency: str,
        *,
        description: str = "",
        capture: Literal["automatic", "manual"] = "automatic",
    ) -> ProviderPayment:
        """Create (or, for a payment id seen before, return) the bank's payment."""
        if capture != "automatic":
            raise ProviderError("capture_not_supported", "a bank payment cannot be held")
        body = {
            "amount_pence": amount_pence,
            "currency": currency,
            "reference": payment_id,
            "description": description,
        }
        return _to_payment(await self._call("POST", "/v1/payments", body, key=payment_id))

    async def get(self, provider_ref: str) -> ProviderPayment:
        """The payment as the bank holds it now."""
        return _to_payment(await self._call("GET", f"/v1/payments/{_seg(provider_ref)}"))

    async def find(self, payment_id: str) -> ProviderPayment | None:
        """The bank's payment for our attempt id (the first one made for it), if any."""
        answer = await self._call("GET", "/v1/payments", params={"reference": payment_id})
        data = answer.get("data")
        if not isinstance(data, list):
            raise _unavailable("the bank sent a list we cannot read")
        return _to_payment(data[0]) if data else None

    async def cancel(self, provider_ref: str) -> ProviderPayment:
        """Cancel a payment the guest has not finished (``payment_not_pending`` otherwise)."""
        path = f"/v1/payments/{_seg(provider_ref)}/cancel"
        return _to_payment(await self._call("POST", path, {}))

    async def refund(self, provider_ref: str, refund_id: str, amount_pence: int) -> ProviderRefund:
        """Give back part or all of a succeeded payment (``refund_id`` is the idempotency key)."""
        path = f"/v1/payments/{_seg(provider_ref)}/refunds"
        return _to_refund(
            await self._call("POST", path, {"amount_pence": amount_pence}, key=refund_id)
        )

    def verify_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """The event in a delivery: signature checked over the raw body, then its age."""
        header = _header(headers, SIGNATURE_HEADER)
        if header is None:
            raise ProviderError("invalid_signature", f"no {SIGNATURE_HEADER} header")
        t, candidates = _parse_signature(header)
        expected = _hmac_hex(self._webhook_secret, t, body).encode()
        if not any(hmac.compare_digest(expected, c.encode()) for c in candidates):
            raise ProviderError("invalid_signature", "the signature does not match the body")
        if abs(self.clock() // 1000 - t) > self.signature_tolerance_s:
            raise ProviderError("stale_signature", "the signature is too old (or from the future)")
        return _to_event(body)

    async def _call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        key: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self._secret_key}"}
        if key is not None:
            headers["Idempotency-Key"] = key
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            async with self.session.request(
                method,
                self.base_url + path,
                json=body,
                headers=headers,
                params=params,
                timeout=timeout,
            ) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _unavailable(f"the bank cannot be reached: {exc!r}") from exc
        return _answer(status, raw)


def _seg(value: str) -> str:
    return quote(value, safe="")


def _answer(status: int, raw: bytes) -> dict[str, Any]:
    """The JSON object of a bank answer, or the ``ProviderError`` it stands for."""
    if status >= 500:
        raise _unavailable(f"the bank answered {status}")
    try:
        parsed = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        parsed = None
    if status >= 400:
        error = parsed.get("error") if isinstance(parsed, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        message = error.get("message", "") if isinstance(error, dict) else ""
        raise ProviderError(
            str(code or f"http_{status}"), str(message or f"HTTP {status}"), retryable=status == 429
        )
    if not isinstance(parsed, dict):
        raise _unavailable("the bank sent an answer we cannot read")
    return parsed


def _to_event(body: bytes) -> WebhookEvent:
    try:
        event = json.loads(body)
        if not isinstance(event, dict) or not isinstance(event.get("data"), dict):
            raise ValueError("not an event")
        kind, data = str(event["type"]), event["data"]
        return WebhookEvent(
            event_id=str(event["id"]),
            kind=kind,
            payment=_to_payment(data) if kind.startswith("payment.") else None,
            refund=_to_refund(data) if kind.startswith("refund.") else None,
            created_ms=int(event.get("created_ms", 0)),
            raw=event,
        )
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, ProviderError) as exc:
        raise ProviderError("invalid_payload", f"a signed event we cannot read: {exc!r}") from exc


# -- running it for a demo ------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m cloud.providers.simbank",
        description="Run the simulated pay-by-bank provider (Simbank) for a demo.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8499)
    parser.add_argument("--secret-key", required=True, help="the API's Bearer key")
    parser.add_argument("--webhook-secret", required=True, help="signs the webhooks")
    parser.add_argument("--webhook-url", default=None, help="where webhooks go (none: not sent)")
    parser.add_argument(
        "--public-url", default=None, help="base of pay links, e.g. http://192.168.1.20:8499"
    )
    parser.add_argument("--expiry-minutes", type=float, default=DEFAULT_EXPIRY_MS / 60_000)
    parser.add_argument("--sweep-interval", type=float, default=5.0, help="seconds between sweeps")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Serve a Simbank until interrupted (its clock follows wall time and can be advanced)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    bank = SimBank(
        secret_key=args.secret_key,
        webhook_secret=args.webhook_secret,
        webhook_url=args.webhook_url,
        clock=SimClock(),
        expiry_ms=int(args.expiry_minutes * 60_000),
        public_url=args.public_url,
        sweep_interval_s=args.sweep_interval,
    )
    web.run_app(bank.app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
