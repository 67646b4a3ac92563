"""The Stripe card provider against localstripe (a stateful fake of Stripe) and a recording server.

How it works. One localstripe runs for the module (``tests.localstripe_server``); each test
runs its own event loop (``asyncio.run``, as everywhere in this suite) with its own
``StripeCardProvider`` pointed at it, and uses fresh payment ids, so tests share the fake
without seeing each other's payments. Test cards that localstripe knows are turned into
payment methods through its API (it takes raw card numbers, as Stripe's test mode can).

Where localstripe cannot show a behaviour, a small aiohttp server stands in for Stripe,
records what the adapter sent and answers what the test queued, shaped like Stripe's real
answers: the idempotency keys and metadata (localstripe ignores keys), the
``allowed_payment_method_types`` parameter (localstripe knows only its predecessor, so the
localstripe tests pin an API version from before it), ``amount_received`` and
``amount_captured`` after a partial capture, a 3-D Secure redirect address, decline codes,
and Stripe's error answers.

Webhook signatures are computed here, by the documented scheme (``t=<unix seconds>,
v1=<hex HMAC-SHA256(secret, f"{t}.{body}")>``), over event bodies localstripe produced;
one test also takes a delivery localstripe signs and posts itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import pytest
import stripe
from aiohttp import web

from cloud.providers.base import ProviderError
from cloud.providers.stripe_card import StripeCardProvider
from shared.payment_states import PaymentState
from tests.api_harness import serving
from tests.localstripe_server import TEST_API_KEY, localstripe, running_localstripe

T = TypeVar("T")

WEBHOOK_SECRET = "whsec_fynlo_test_secret"
#: an API version from before ``allowed_payment_method_types``: the one localstripe speaks
LOCALSTRIPE_API = "2025-03-31.basil"

VISA = "pm_card_visa"
CARD_3DS = "4000002500003155"  # asks for 3-D Secure, then pays
CARD_3DS_REQUIRED = "4000002760003184"  # asks for 3-D Secure on every payment
CARD_3DS_THEN_DECLINED = "4000008260003178"  # asks for 3-D Secure, then is declined
CARD_DECLINED = "4000000000000341"  # declined when charged


@pytest.fixture(scope="module")
def stripe_url() -> Iterator[str]:
    """The base address of one localstripe for the module."""
    with running_localstripe() as url:
        yield url


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


def provider(base_url: str, **options: Any) -> StripeCardProvider:
    options.setdefault("stripe_version", LOCALSTRIPE_API)
    options.setdefault("max_network_retries", 0)
    return StripeCardProvider(TEST_API_KEY, WEBHOOK_SECRET, api_base=base_url, **options)


def new_id(prefix: str = "pay") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


async def card(p: StripeCardProvider, number: str) -> str:
    """A payment method for a test card number (what a terminal would hand over)."""
    method = await p.client.v1.payment_methods.create_async(
        {
            "type": "card",
            "card": {"number": number, "exp_month": 12, "exp_year": 2030, "cvc": "123"},
        }
    )
    return method.id


async def authenticate(p: StripeCardProvider, ref: str, *, success: bool) -> None:
    """The guest's answer on the 3-D Secure page (localstripe's own endpoint for it)."""
    intent = await p.client.v1.payment_intents.retrieve_async(ref)
    await p.client.raw_request_async(
        "post",
        f"/v1/payment_intents/{ref}/_authenticate",
        client_secret=intent.client_secret,
        success="true" if success else "false",
    )


async def refused(call: Awaitable[object]) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await call
    return caught.value


def sign(body: bytes, secret: str = WEBHOOK_SECRET, at: int | None = None) -> str:
    """A ``Stripe-Signature`` header for ``body``, by Stripe's documented scheme."""
    t = int(time.time()) if at is None else at
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


# -- payments against localstripe ------------------------------------------------------------


def test_card_payment_is_taken(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            payment_id = new_id()
            created = await p.create(payment_id, 1250, "GBP", capture="automatic")
            assert created.state is PaymentState.PENDING
            assert (created.payment_id, created.amount_pence, created.currency) == (
                payment_id,
                1250,
                "GBP",
            )
            assert created.provider_ref.startswith("pi_") and created.captured_pence == 0

            paid = await p.confirm(created.provider_ref, VISA)
            assert paid.state is PaymentState.SUCCEEDED
            assert (paid.captured_pence, paid.refunded_pence) == (1250, 0)
            assert await p.get(created.provider_ref) == paid
            # a confirm repeated after a lost answer is told the outcome, not refused
            assert await p.confirm(created.provider_ref, VISA) == paid

    run(scenario)


def test_manual_capture_holds_then_takes_all_or_part(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            held = await p.create(new_id(), 2000, "GBP", capture="manual")
            authorized = await p.confirm(held.provider_ref, VISA)
            assert authorized.state is PaymentState.AUTHORIZED
            assert authorized.captured_pence == 0
            taken = await p.capture(held.provider_ref)
            assert taken.state is PaymentState.SUCCEEDED and taken.captured_pence == 2000

            part = await p.create(new_id(), 2000, "GBP", capture="manual")
            await p.confirm(part.provider_ref, VISA)
            partial = await p.capture(part.provider_ref, 1500)
            assert partial.state is PaymentState.SUCCEEDED
            # what was kept: localstripe reports the released 500 as a refund of a full capture
            assert partial.captured_pence - partial.refunded_pence == 1500
            too_much = await refused(p.refund(part.provider_ref, new_id("ref"), 1501))
            assert too_much.code == "refund_exceeds_payment"
            refund = await p.refund(part.provider_ref, new_id("ref"), 1500)
            assert refund.amount_pence == 1500 and refund.state == "succeeded"

    run(scenario)


def test_cancel_before_completion(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            pending = await p.create(new_id(), 900, "GBP")
            cancelled = await p.cancel(pending.provider_ref)
            assert cancelled.state is PaymentState.CANCELLED
            assert (await p.get(pending.provider_ref)).state is PaymentState.CANCELLED
            # a confirm arriving after the till gave up is told so, and nothing is charged
            late = await p.confirm(pending.provider_ref, VISA)
            assert late.state is PaymentState.CANCELLED and late.captured_pence == 0

            held = await p.create(new_id(), 900, "GBP", capture="manual")
            await p.confirm(held.provider_ref, VISA)
            released = await p.cancel(held.provider_ref)
            assert released.state is PaymentState.CANCELLED and released.captured_pence == 0

            taken = await p.create(new_id(), 900, "GBP")
            await p.confirm(taken.provider_ref, VISA)
            error = await refused(p.cancel(taken.provider_ref))
            assert not error.retryable and error.code != "provider_unavailable"
            assert (await p.get(taken.provider_ref)).state is PaymentState.SUCCEEDED

    run(scenario)


def test_three_d_secure_passed(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            created = await p.create(new_id(), 3000, "GBP")
            waiting = await p.confirm(created.provider_ref, await card(p, CARD_3DS))
            assert waiting.state is PaymentState.REQUIRES_ACTION
            assert waiting.action_url is None  # localstripe gives no page address
            await authenticate(p, created.provider_ref, success=True)
            paid = await p.get(created.provider_ref)
            assert paid.state is PaymentState.SUCCEEDED and paid.captured_pence == 3000

    run(scenario)


def test_three_d_secure_failed_is_final(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            created = await p.create(new_id(), 3000, "GBP")
            waiting = await p.confirm(created.provider_ref, await card(p, CARD_3DS_REQUIRED))
            assert waiting.state is PaymentState.REQUIRES_ACTION
            await authenticate(p, created.provider_ref, success=False)
            failed = await p.get(created.provider_ref)
            assert failed.state is PaymentState.FAILED
            assert failed.failure_code == "payment_intent_authentication_failure"
            # a failed attempt is never paid later: the till starts a new one
            again = await refused(p.confirm(created.provider_ref, VISA))
            assert again.code == "payment_failed"
            assert (await p.get(created.provider_ref)).state is PaymentState.FAILED

    run(scenario)


def test_three_d_secure_passed_then_declined(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            created = await p.create(new_id(), 3000, "GBP")
            method = await card(p, CARD_3DS_THEN_DECLINED)
            assert (await p.confirm(created.provider_ref, method)).state is (
                PaymentState.REQUIRES_ACTION
            )
            with pytest.raises(stripe.CardError):  # the bank's answer to the guest's page
                await authenticate(p, created.provider_ref, success=True)
            failed = await p.get(created.provider_ref)
            assert (failed.state, failed.failure_code) == (PaymentState.FAILED, "card_declined")

    run(scenario)


def test_declined_card(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            created = await p.create(new_id(), 1500, "GBP")
            error = await refused(p.confirm(created.provider_ref, await card(p, CARD_DECLINED)))
            assert error.code == "card_declined" and not error.retryable
            assert (
                "card_declined" in error.message
            )  # the decline code (localstripe has no finer one)
            assert CARD_DECLINED not in str(error) and TEST_API_KEY not in str(error)
            failed = await p.get(created.provider_ref)
            assert (failed.state, failed.failure_code) == (PaymentState.FAILED, "card_declined")
            assert failed.captured_pence == 0

    run(scenario)


def test_refunds_part_then_rest_never_more(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            created = await p.create(new_id(), 1000, "GBP")
            ref = created.provider_ref
            not_yet = await refused(p.refund(ref, new_id("ref"), 100))
            assert not_yet.code == "payment_not_succeeded"
            await p.confirm(ref, VISA)

            first_id = new_id("ref")
            first = await p.refund(ref, first_id, 300)
            assert (first.refund_id, first.payment_ref, first.amount_pence, first.state) == (
                first_id,
                ref,
                300,
                "succeeded",
            )
            assert first.provider_ref.startswith("re_")
            assert (await p.get(ref)).refunded_pence == 300
            # the same refund id again is the same refund, not a second one
            assert await p.refund(ref, first_id, 300) == first
            assert (await p.get(ref)).refunded_pence == 300

            over = await refused(p.refund(ref, new_id("ref"), 701))
            assert over.code == "refund_exceeds_payment" and not over.retryable
            assert (await p.get(ref)).refunded_pence == 300
            rest = await p.refund(ref, new_id("ref"), 700)
            assert rest.amount_pence == 700
            after = await p.get(ref)
            assert (after.state, after.captured_pence, after.refunded_pence) == (
                PaymentState.SUCCEEDED,
                1000,
                1000,
            )
            assert (await refused(p.refund(ref, new_id("ref"), 1))).code == "refund_exceeds_payment"
            assert await p.refund(ref, first_id, 300) == first  # a late retry, after the rest
            assert (await refused(p.refund(ref, new_id("ref"), 0))).code == "invalid_amount"

    run(scenario)


def test_find_by_our_payment_id(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            made = [await p.create(new_id(), 100 + n, "GBP") for n in range(5)]
            for payment in made:
                found = await p.find(payment.payment_id)
                assert found is not None and found.provider_ref == payment.provider_ref
            assert await p.find(new_id()) is None
        # across pages of the list
        async with provider(stripe_url, find_page_size=2) as p:
            for payment in made:
                found = await p.find(payment.payment_id)
                assert found is not None and found.provider_ref == payment.provider_ref
        # never further than the scan limit (localstripe lists oldest first)
        async with provider(stripe_url, find_page_size=1, find_scan_limit=1) as p:
            assert await p.find(made[-1].payment_id) is None

    run(scenario)


def test_unknown_payment_and_unreachable_stripe(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            missing = await refused(p.get("pi_doesnotexist"))
            assert missing.code == "resource_missing" and not missing.retryable
            assert (await refused(p.create(new_id(), 0, "GBP"))).code == "invalid_amount"
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with provider(closed) as p:
            down = await refused(p.create(new_id(), 100, "GBP"))
            assert down.code == "provider_unavailable" and down.retryable
            assert TEST_API_KEY not in str(down)

    run(scenario)


def test_localstripe_helper_starts_empty_and_stops() -> None:
    async def scenario() -> None:
        async with localstripe() as url:
            async with provider(url) as p:
                listed = await p.client.v1.payment_intents.list_async({"limit": 1})
                assert listed.data == []  # nothing from an earlier run
                assert (await p.create(new_id(), 100, "GBP")).state is PaymentState.PENDING
        async with provider(url) as p:
            assert (await refused(p.create(new_id(), 100, "GBP"))).code == "provider_unavailable"

    run(scenario)


# -- webhooks ----------------------------------------------------------------------------------


async def paid_event(p: StripeCardProvider) -> tuple[str, str, dict[str, Any]]:
    """A payment taken in localstripe: (its id, its reference, localstripe's succeeded event)."""
    payment_id = new_id()
    created = await p.create(payment_id, 4200, "GBP")
    await p.confirm(created.provider_ref, VISA)
    events = await p.client.v1.events.list_async({"type": "payment_intent.succeeded", "limit": 100})
    while True:
        for event in events.data:
            if event.data.object["id"] == created.provider_ref:
                return payment_id, created.provider_ref, event.to_dict()
        assert events.has_more, "localstripe made no payment_intent.succeeded event"
        events = await p.client.v1.events.list_async(
            {"type": "payment_intent.succeeded", "limit": 100, "starting_after": events.data[-1].id}
        )


def test_webhook_signature_is_checked(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            payment_id, ref, event = await paid_event(p)
            body = json.dumps(event).encode()

            verified = p.verify_webhook(body, {"Stripe-Signature": sign(body)})
            assert (verified.event_id, verified.kind) == (event["id"], "payment_intent.succeeded")
            assert verified.created_ms == event["created"] * 1000
            assert verified.payment is not None and verified.refund is None
            assert (verified.payment.provider_ref, verified.payment.payment_id) == (ref, payment_id)
            assert verified.payment.state is PaymentState.SUCCEEDED
            assert verified.raw["id"] == event["id"]
            # header names are not case-sensitive; a signature 250 s old is within tolerance
            lower = p.verify_webhook(body, {"stripe-signature": sign(body)})
            assert lower.event_id == event["id"]
            recent = sign(body, at=int(time.time()) - 250)
            assert p.verify_webhook(body, {"Stripe-Signature": recent}).event_id == event["id"]

            tampered = body.replace(b"4200", b"4201")
            assert tampered != body
            bad = [
                (tampered, sign(body)),  # the body changed after signing
                (body, sign(body, secret="whsec_someone_else")),
                (body, sign(body, at=int(time.time()) - 301)),  # too old: a replay
                (body, sign(body).replace("v1=", "v0=")),
                (body, "t=notatime,v1=00"),
                (body, ""),
            ]
            for candidate, header in bad:
                with pytest.raises(ProviderError) as caught:
                    p.verify_webhook(candidate, {"Stripe-Signature": header})
                assert caught.value.code == "invalid_signature"
                assert WEBHOOK_SECRET not in str(caught.value)
            with pytest.raises(ProviderError) as caught:
                p.verify_webhook(body, {})
            assert caught.value.code == "invalid_signature"

        # a shorter tolerance, and a provider that has the wrong secret
        async with provider(stripe_url, signature_tolerance_s=60) as strict:
            with pytest.raises(ProviderError):
                strict.verify_webhook(body, {"Stripe-Signature": recent})
        other = StripeCardProvider(TEST_API_KEY, "whsec_other", api_base=stripe_url)
        async with other:
            with pytest.raises(ProviderError) as caught:
                other.verify_webhook(body, {"Stripe-Signature": sign(body)})
            assert caught.value.code == "invalid_signature"

    run(scenario)


def test_webhook_refund_events(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            created = await p.create(new_id(), 800, "GBP")
            await p.confirm(created.provider_ref, VISA)
            refund_id = new_id("ref")
            refund = await p.refund(created.provider_ref, refund_id, 250)
            refund_object = (
                await p.client.v1.refunds.retrieve_async(refund.provider_ref)
            ).to_dict()
            stored = await p.client.v1.payment_intents.retrieve_async(created.provider_ref)
            charge_object = (
                await p.client.v1.charges.retrieve_async(stored.to_dict()["latest_charge"]["id"])
            ).to_dict()

            for kind, obj in (
                ("refund.created", refund_object),
                ("charge.refunded", charge_object),
            ):
                body = json.dumps(
                    {
                        "id": new_id("evt"),
                        "object": "event",
                        "type": kind,
                        "created": int(time.time()),
                        "data": {"object": obj},
                    }
                ).encode()
                event = p.verify_webhook(body, {"Stripe-Signature": sign(body)})
                assert event.kind == kind and event.payment is None
                assert event.refund is not None
                assert (
                    event.refund.provider_ref,
                    event.refund.refund_id,
                    event.refund.payment_ref,
                    event.refund.amount_pence,
                    event.refund.state,
                ) == (refund.provider_ref, refund_id, created.provider_ref, 250, "succeeded")

    run(scenario)


def test_webhook_delivered_by_localstripe(stripe_url: str) -> None:
    async def scenario() -> None:
        async with provider(stripe_url) as p:
            received: asyncio.Queue[Any] = asyncio.Queue()

            async def webhook(request: web.Request) -> web.Response:
                body = await request.read()
                try:
                    received.put_nowait(p.verify_webhook(body, request.headers))
                except ProviderError as error:
                    received.put_nowait(error)
                return web.Response()

            app = web.Application()
            app.router.add_post("/webhooks/stripe", webhook)
            async with serving(app) as url, aiohttp.ClientSession() as http:
                config = {
                    "url": f"{url}/webhooks/stripe",
                    "secret": WEBHOOK_SECRET,
                    "events": ["payment_intent.succeeded"],
                }
                async with http.post(f"{stripe_url}/_config/webhooks/fynlo", json=config) as answer:
                    assert answer.status == 200
                payment_id = new_id()
                created = await p.create(payment_id, 650, "GBP")
                await p.confirm(created.provider_ref, VISA)
                async with asyncio.timeout(10):
                    while True:
                        item = await received.get()
                        assert not isinstance(item, ProviderError), item
                        if item.payment is not None and item.payment.payment_id == payment_id:
                            break
            assert item.kind == "payment_intent.succeeded"
            assert item.payment.provider_ref == created.provider_ref
            assert item.payment.state is PaymentState.SUCCEEDED

    run(scenario)


# -- what the adapter sends, and Stripe's real answers (a recording stand-in) ---------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]  #: names in lower case
    params: dict[str, str]  #: the form body of a POST, the query of a GET


class StandIn:
    """Answers the queued (status, body) pairs in turn and records every request."""

    def __init__(self) -> None:
        self.answers: list[tuple[int, object]] = []
        self.seen: list[Seen] = []

    async def handle(self, request: web.Request) -> web.Response:
        form = await request.post() if request.method == "POST" else request.query
        self.seen.append(
            Seen(
                request.method,
                request.path,
                {k.lower(): v for k, v in request.headers.items()},
                {k: str(v) for k, v in form.items()},
            )
        )
        status, body = self.answers.pop(0)
        if isinstance(body, bytes):
            return web.Response(status=status, body=body, content_type="application/json")
        return web.json_response(body, status=status)


@asynccontextmanager
async def stand_in(**options: Any) -> AsyncIterator[tuple[StandIn, StripeCardProvider]]:
    fake = StandIn()
    app = web.Application()
    app.router.add_route("*", "/{path:.*}", fake.handle)
    options.setdefault("max_network_retries", 0)
    async with serving(app) as url:
        async with StripeCardProvider(TEST_API_KEY, WEBHOOK_SECRET, api_base=url, **options) as p:
            yield fake, p


def intent(status: str, **fields: Any) -> dict[str, Any]:
    """A PaymentIntent as Stripe answers it (only the fields the adapter reads)."""
    return {
        "id": "pi_3Real",
        "object": "payment_intent",
        "amount": 2000,
        "currency": "gbp",
        "status": status,
        "metadata": {"payment_id": "pay-1"},
        "amount_received": 0,
        "last_payment_error": None,
        "next_action": None,
        "latest_charge": None,
        **fields,
    }


def charge(**fields: Any) -> dict[str, Any]:
    return {
        "id": "ch_3Real",
        "object": "charge",
        "amount": 2000,
        "amount_captured": 2000,
        "amount_refunded": 0,
        "captured": True,
        "status": "succeeded",
        "payment_intent": "pi_3Real",
        **fields,
    }


def error(code: str | None, message: str, kind: str = "invalid_request_error", **more: Any) -> Any:
    return {"error": {"type": kind, "code": code, "message": message, **more}}


def test_create_sends_our_payment_id_as_idempotency_key_and_metadata() -> None:
    async def scenario() -> None:
        async with stand_in() as (fake, p):
            fake.answers.append((200, intent("requires_payment_method")))
            payment = await p.create("pay-1", 2000, "GBP", description="Table 4", capture="manual")
            assert payment.payment_id == "pay-1" and payment.state is PaymentState.PENDING
            sent = fake.seen[0]
            assert (sent.method, sent.path) == ("POST", "/v1/payment_intents")
            assert sent.headers["idempotency-key"] == "pay-1"
            assert sent.headers["authorization"] == f"Bearer {TEST_API_KEY}"
            assert sent.headers["stripe-version"] == stripe.api_version
            assert sent.params == {
                "amount": "2000",
                "currency": "gbp",
                "capture_method": "manual",
                "allowed_payment_method_types[0]": "card",
                "metadata[payment_id]": "pay-1",
                "description": "Table 4",
                "expand[0]": "latest_charge",
            }
        # pinned to an API version from before allowed_payment_method_types
        async with stand_in(stripe_version=LOCALSTRIPE_API) as (fake, p):
            fake.answers.append((200, intent("requires_payment_method")))
            await p.create("pay-1", 2000, "GBP")
            params = fake.seen[0].params
            assert params["payment_method_types[0]"] == "card"
            assert "allowed_payment_method_types[0]" not in params and "description" not in params
            assert params["capture_method"] == "automatic"
            assert fake.seen[0].headers["stripe-version"] == LOCALSTRIPE_API

    run(scenario)


def test_a_retried_create_sends_the_same_key() -> None:
    async def scenario() -> None:
        async with stand_in(max_network_retries=1) as (fake, p):
            fake.answers += [
                (500, error(None, "boom", "api_error")),
                (200, intent("requires_payment_method")),
            ]
            assert (await p.create("pay-1", 2000, "GBP")).provider_ref == "pi_3Real"
            assert [s.headers["idempotency-key"] for s in fake.seen] == ["pay-1", "pay-1"]
            assert fake.seen[0].params == fake.seen[1].params

    run(scenario)


def test_refund_sends_our_refund_id_as_idempotency_key_and_metadata() -> None:
    async def scenario() -> None:
        async with stand_in() as (fake, p):
            taken = intent("succeeded", amount_received=2000, latest_charge=charge())
            refund = {
                "id": "re_3Real",
                "object": "refund",
                "amount": 500,
                "status": "pending",
                "payment_intent": "pi_3Real",
                "metadata": {"refund_id": "ref-1", "payment_id": "pay-1"},
            }
            fake.answers += [
                (200, taken),
                (200, {"object": "list", "data": [], "has_more": False, "url": "/v1/refunds"}),
                (200, refund),
            ]
            answer = await p.refund("pi_3Real", "ref-1", 500)
            assert (answer.provider_ref, answer.refund_id, answer.state) == (
                "re_3Real",
                "ref-1",
                "pending",
            )
            read, listed, created = fake.seen
            assert (read.method, read.path) == ("GET", "/v1/payment_intents/pi_3Real")
            assert (listed.method, listed.path) == ("GET", "/v1/refunds")
            assert listed.params["payment_intent"] == "pi_3Real"
            assert (created.method, created.path) == ("POST", "/v1/refunds")
            assert created.headers["idempotency-key"] == "ref-1"
            assert created.params == {
                "payment_intent": "pi_3Real",
                "amount": "500",
                "metadata[refund_id]": "ref-1",
                "metadata[payment_id]": "pay-1",
            }

    run(scenario)


def test_statuses_and_amounts_as_stripe_reports_them() -> None:
    async def scenario() -> None:
        async with stand_in() as (fake, p):
            # a hold of 2000 captured at 1500 (Stripe counts the released 500 as refunded),
            # then 200 refunded
            partial = charge(amount_captured=1500, amount_refunded=700)
            redirect = {
                "type": "redirect_to_url",
                "redirect_to_url": {
                    "url": "https://hooks.stripe.com/3d_secure_2/x",
                    "return_url": None,
                },
            }
            declined = {"code": "card_declined", "decline_code": "insufficient_funds"}
            cases: list[tuple[dict[str, Any], tuple[Any, ...]]] = [
                (intent("requires_payment_method"), (PaymentState.PENDING, None, None, 0, 0)),
                (intent("requires_confirmation"), (PaymentState.PENDING, None, None, 0, 0)),
                (intent("processing"), (PaymentState.PENDING, None, None, 0, 0)),
                (
                    intent("requires_action", next_action=redirect),
                    (
                        PaymentState.REQUIRES_ACTION,
                        "https://hooks.stripe.com/3d_secure_2/x",
                        None,
                        0,
                        0,
                    ),
                ),
                (
                    intent("requires_payment_method", last_payment_error=declined),
                    (PaymentState.FAILED, None, "insufficient_funds", 0, 0),
                ),
                (
                    intent(
                        "requires_capture", latest_charge=charge(captured=False, amount_captured=0)
                    ),
                    (PaymentState.AUTHORIZED, None, None, 0, 0),
                ),
                (
                    intent("succeeded", amount_received=1500, latest_charge=partial),
                    (PaymentState.SUCCEEDED, None, None, 1500, 200),
                ),
                (
                    intent(
                        "succeeded",
                        amount_received=2000,
                        latest_charge=charge(amount_refunded=2000),
                    ),
                    (PaymentState.SUCCEEDED, None, None, 2000, 2000),
                ),
                (intent("canceled"), (PaymentState.CANCELLED, None, None, 0, 0)),
            ]
            for answer, expected in cases:
                fake.answers.append((200, answer))
                got = await p.get("pi_3Real")
                shown = (
                    got.state,
                    got.action_url,
                    got.failure_code,
                    got.captured_pence,
                    got.refunded_pence,
                )
                assert shown == expected, answer["status"]
            fake.answers.append((200, intent("some_new_status")))
            assert (await refused(p.get("pi_3Real"))).code == "provider_unavailable"
            # a refund is checked against what is left: 1500 taken, 200 given back
            fake.answers += [
                (200, intent("succeeded", amount_received=1500, latest_charge=partial)),
                (200, {"object": "list", "data": [], "has_more": False, "url": "/v1/refunds"}),
            ]
            assert (
                await refused(p.refund("pi_3Real", "ref-2", 1301))
            ).code == "refund_exceeds_payment"
            assert [s.method for s in fake.seen[-2:]] == ["GET", "GET"]  # nothing was created

    run(scenario)


def test_stripe_errors_become_provider_errors() -> None:
    async def scenario() -> None:
        async with stand_in() as (fake, p):
            leaky = "No such payment_method for card 4242424242424242 (key sk_test_abcdef123)"
            cases: list[tuple[int, object, str, bool]] = [
                (
                    402,
                    error(
                        "card_declined",
                        "Your card has insufficient funds.",
                        "card_error",
                        decline_code="insufficient_funds",
                    ),
                    "card_declined",
                    False,
                ),
                (
                    400,
                    error("payment_intent_unexpected_state", leaky),
                    "payment_intent_unexpected_state",
                    False,
                ),
                (404, error(None, "Not Found"), "resource_missing", False),
                (
                    400,
                    error(
                        None,
                        "Keys for idempotent requests can only be used with the same parameters",
                        "idempotency_error",
                    ),
                    "idempotency_key_reused",
                    False,
                ),
                (
                    401,
                    error(None, f"Invalid API Key provided: {TEST_API_KEY}"),
                    "unauthorized",
                    False,
                ),
                (
                    429,
                    error("rate_limit", "Too many requests", "invalid_request_error"),
                    "provider_unavailable",
                    True,
                ),
                (
                    503,
                    error(None, "Service unavailable", "api_error"),
                    "provider_unavailable",
                    True,
                ),
                (200, b"<html>not json</html>", "provider_unavailable", True),
            ]
            for status, body, code, retryable in cases:
                fake.answers.append((status, body))
                got = await refused(p.get("pi_3Real"))
                assert (got.code, got.retryable) == (code, retryable), (status, body)
                for secret in ("4242424242424242", "sk_test_abcdef123", TEST_API_KEY):
                    assert secret not in str(got), got
                if code == "card_declined":
                    assert "insufficient_funds" in got.message

    run(scenario)
