"""Simbank, the simulated pay-by-bank provider, over real HTTP on loopback.

Every test serves the bank and a webhook receiver on 127.0.0.1 and drives the bank through
``SimBankProvider`` (as the cloud does), its raw API, and its pay page (as the guest does).
The receiver verifies each delivery with ``SimBankProvider.verify_webhook``. The bank and the
adapter share one ``SimClock`` started at a fixed instant, moved by hand for expiry.
"""

from __future__ import annotations

import asyncio
import html
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin

import aiohttp
import pytest
from aiohttp import web

from cloud.providers.base import PaymentProvider, ProviderError, WebhookEvent
from cloud.providers.simbank import (
    SIGNATURE_HEADER,
    SimBank,
    SimBankProvider,
    SimClock,
    sign,
    simbank_app,
)
from shared.payment_states import PaymentState, can_move, late_completion

from .api_harness import serving

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
SECRET = "sk_test_simbank"
WEBHOOK_SECRET = "whsec_test_simbank"
FIFTEEN_MIN_MS = 15 * 60_000
FAST_RETRIES = (0.01, 0.01, 0.01)


@dataclass
class Receiver:
    """The cloud's webhook endpoint: keeps what it verified, and what it refused."""

    events: list[WebhookEvent] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    deliveries: list[tuple[bytes, dict[str, str]]] = field(default_factory=list)
    fail_next: int = 0  #: answer 500 to this many deliveries before handling any
    gate: asyncio.Event | None = None  #: when set, each delivery waits for it
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  #: set by every delivery
    provider: SimBankProvider | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.deliveries.append((body, dict(request.headers)))
        self.arrived.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next > 0:
            self.fail_next -= 1
            return web.Response(status=500)
        assert self.provider is not None
        try:
            event = self.provider.verify_webhook(body, request.headers)
        except ProviderError as exc:
            self.refused.append(exc.code)
            return web.json_response({"error": exc.code}, status=400)
        self.events.append(event)
        return web.json_response({"ok": True})

    def kinds(self, provider_ref: str | None = None) -> list[str]:
        return [
            e.kind
            for e in self.events
            if provider_ref is None
            or (e.payment is not None and e.payment.provider_ref == provider_ref)
            or (e.refund is not None and e.refund.payment_ref == provider_ref)
        ]


@dataclass
class World:
    bank: SimBank
    clock: SimClock
    provider: SimBankProvider
    http: aiohttp.ClientSession
    url: str
    receiver: Receiver

    async def api(
        self,
        method: str,
        path: str,
        *,
        key: str | None = None,
        auth: str | None = f"Bearer {SECRET}",
        **kw: Any,
    ) -> tuple[int, Any, Any]:
        """One raw request to the bank: (status, JSON or text, headers)."""
        headers = {}
        if auth is not None:
            headers["Authorization"] = auth
        if key is not None:
            headers["Idempotency-Key"] = key
        async with self.http.request(method, self.url + path, headers=headers, **kw) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json(), resp.headers
            return resp.status, await resp.text(), resp.headers

    async def settled(self) -> Receiver:
        """The receiver, once every delivery started so far is done."""
        await self.bank.idle()
        return self.receiver


@asynccontextmanager
async def world(clock: Any = None, **bank_options: Any) -> AsyncIterator[World]:
    """A bank and a webhook receiver on loopback, and an adapter for the bank."""
    sim_clock = SimClock(T0_MS)
    receiver = Receiver()
    hooks = web.Application()
    hooks.router.add_post("/hooks", receiver.handle)
    options: dict[str, Any] = {"retry_delays_s": FAST_RETRIES, **bank_options}
    async with serving(hooks, access_log=None) as hooks_url, aiohttp.ClientSession() as http:
        options.setdefault("webhook_url", f"{hooks_url}/hooks")
        bank = SimBank(
            secret_key=SECRET,
            webhook_secret=WEBHOOK_SECRET,
            clock=sim_clock if clock is None else clock,
            **options,
        )
        async with serving(bank.app, access_log=None) as url:
            provider = SimBankProvider(url, SECRET, WEBHOOK_SECRET, http, sim_clock)
            receiver.provider = provider
            yield World(bank, sim_clock, provider, http, url, receiver)
            await bank.idle()


def run(test: Callable[[World], Coroutine[Any, Any, None]], **options: Any) -> None:
    async def main() -> None:
        async with world(**options) as w:
            await test(w)

    asyncio.run(main())


def refused(code: str) -> Any:
    return pytest.raises(ProviderError, match=f"^{code}:")


class Forms(HTMLParser):
    """The forms of a page: (method, action) pairs."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.forms: list[tuple[str, str]] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "form":
            found = dict(attrs)
            self.forms.append(((found.get("method") or "").lower(), found.get("action") or ""))


async def guest(w: World, pay_url: str, answer: str) -> tuple[int, str]:
    """The guest opens the pay page and presses ``answer`` ("approve" or "decline")."""
    async with w.http.get(pay_url) as resp:
        assert resp.status == 200
        page = await resp.text()
    actions = [action for method, action in Forms(page).forms if method == "post"]
    [action] = [a for a in actions if a.endswith(f"/{answer}")]
    async with w.http.post(urljoin(pay_url, action)) as resp:
        return resp.status, await resp.text()


async def paid(w: World, payment_id: str = "pay-1", amount: int = 1000) -> str:
    """A succeeded payment (approved on the pay page); its provider ref."""
    payment = await w.provider.create(payment_id, amount, "GBP", description="Table 4")
    assert payment.action_url is not None
    status, _ = await guest(w, payment.action_url, "approve")
    assert status == 200
    return payment.provider_ref


# -- creating and finding -------------------------------------------------------------------


def test_create_gives_a_pending_payment_with_a_pay_link() -> None:
    async def test(w: World) -> None:
        provider: PaymentProvider = w.provider
        assert (provider.name, provider.kind) == ("simbank", "bank")
        payment = await provider.create("pay-1", 1250, "GBP", description="Table 4")
        assert payment.state is PaymentState.PENDING
        assert (payment.payment_id, payment.amount_pence, payment.currency) == (
            "pay-1",
            1250,
            "GBP",
        )
        assert payment.action_url == f"{w.url}/pay/{payment.provider_ref}"
        assert payment.expires_at_ms == T0_MS + FIFTEEN_MIN_MS
        assert (payment.refunded_pence, payment.captured_pence, payment.failure_code) == (
            0,
            0,
            None,
        )
        status, body, _ = await w.api("GET", f"/v1/payments/{payment.provider_ref}")
        assert status == 200
        assert body["reference"] == "pay-1" and body["status"] == "pending"
        assert body["created_ms"] == T0_MS and body["pay_url"] == payment.action_url
        assert (await w.settled()).events == []  # creating is not a status change

    run(test)


def test_the_same_key_and_body_give_the_same_payment() -> None:
    async def test(w: World) -> None:
        first = await w.provider.create("pay-1", 1250, "GBP", description="Table 4")
        again = await w.provider.create("pay-1", 1250, "GBP", description="Table 4")
        assert again == first
        assert len(w.bank.payments) == 1
        body = {"amount_pence": 700, "currency": "GBP", "reference": "pay-2"}
        status, created, _ = await w.api("POST", "/v1/payments", key="k-2", json=body)
        status_again, replayed, headers = await w.api("POST", "/v1/payments", key="k-2", json=body)
        assert (status, status_again) == (201, 200)
        assert replayed["id"] == created["id"] and headers["Idempotent-Replayed"] == "true"
        assert len(w.bank.payments) == 2

    run(test)


def test_the_same_key_with_another_body_is_refused() -> None:
    async def test(w: World) -> None:
        first = await w.provider.create("pay-1", 1250, "GBP", description="Table 4")
        with refused("idempotency_key_reused") as caught:
            await w.provider.create("pay-1", 999, "GBP", description="Table 4")
        assert not caught.value.retryable
        with refused("idempotency_key_reused"):
            await w.provider.create("pay-1", 1250, "GBP", description="Table 5")
        assert list(w.bank.payments) == [first.provider_ref]
        assert w.bank.payments[first.provider_ref].amount_pence == 1250

    run(test)


def test_bad_create_requests_are_refused_with_stable_codes() -> None:
    async def test(w: World) -> None:
        good = {"amount_pence": 100, "currency": "GBP", "reference": "pay-1"}
        cases: list[tuple[str | None, Any, int, str]] = [
            (None, good, 400, "missing_idempotency_key"),
            ("k", None, 400, "invalid_json"),
            ("k", [good], 400, "invalid_json"),
            ("k", {**good, "amount_pence": 0}, 422, "invalid_amount"),
            ("k", {**good, "amount_pence": -5}, 422, "invalid_amount"),
            ("k", {**good, "amount_pence": "100"}, 422, "invalid_amount"),
            ("k", {**good, "amount_pence": 1.5}, 422, "invalid_amount"),
            ("k", {**good, "amount_pence": True}, 422, "invalid_amount"),
            ("k", {**good, "currency": "EUR"}, 422, "unsupported_currency"),
            ("k", {k: v for k, v in good.items() if k != "reference"}, 422, "invalid_reference"),
            ("k", {**good, "reference": ""}, 422, "invalid_reference"),
            ("k", {**good, "description": 5}, 422, "invalid_description"),
        ]
        for key, body, want_status, want_code in cases:
            kw: dict[str, Any] = {"data": b"{not json"} if body is None else {"json": body}
            status, answer, _ = await w.api("POST", "/v1/payments", key=key, **kw)
            assert (status, answer["error"]["code"]) == (want_status, want_code), (key, body)
        assert w.bank.payments == {}
        with refused("unsupported_currency"):
            await w.provider.create("pay-1", 100, "EUR")
        with refused("invalid_amount"):
            await w.provider.create("pay-1", 0, "GBP")
        with refused("capture_not_supported"):
            await w.provider.create("pay-1", 100, "GBP", capture="manual")
        assert w.bank.payments == {}

    run(test)


def test_find_looks_a_payment_up_by_our_id() -> None:
    async def test(w: World) -> None:
        one = await w.provider.create("pay-1", 100, "GBP")
        two = await w.provider.create("pay-2", 200, "GBP")
        assert await w.provider.find("pay-1") == one
        assert await w.provider.find("pay-2") == two
        assert await w.provider.find("pay-3") is None
        with refused("payment_not_found"):
            await w.provider.get("pay_nothing")

    run(test)


# -- the guest's pay page -------------------------------------------------------------------


def test_the_guest_approves_on_the_pay_page() -> None:
    async def test(w: World) -> None:
        description = 'Fish & Chips <b>"Table 4"</b>'
        payment = await w.provider.create("pay-1", 1250, "GBP", description=description)
        assert payment.action_url is not None
        async with w.http.get(payment.action_url) as resp:
            assert (resp.status, resp.content_type) == (200, "text/html")
            page = await resp.text()
        assert "£12.50" in page
        assert html.escape(description) in page and "<b>" not in page
        assert "http" not in page.replace(payment.action_url, "")  # no outside assets
        ref = payment.provider_ref
        assert sorted(Forms(page).forms) == [
            ("post", f"/pay/{ref}/approve"),
            ("post", f"/pay/{ref}/decline"),
        ]
        status, answer = await guest(w, payment.action_url, "approve")
        assert status == 200 and "approved" in answer
        now = await w.provider.get(ref)
        assert now.state is PaymentState.SUCCEEDED and now.captured_pence == 1250
        received = await w.settled()
        assert received.refused == []
        [event] = received.events
        assert event.kind == "payment.succeeded" and event.event_id.startswith("evt_")
        assert event.payment == now and event.created_ms == T0_MS

    run(test)


def test_the_guest_declines_on_the_pay_page() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 1250, "GBP")
        assert payment.action_url is not None
        status, answer = await guest(w, payment.action_url, "decline")
        assert status == 200 and "declined" in answer
        now = await w.provider.get(payment.provider_ref)
        assert (now.state, now.failure_code) == (PaymentState.FAILED, "declined")
        [event] = (await w.settled()).events
        assert event.kind == "payment.failed" and event.payment == now

    run(test)


def test_a_finished_payment_cannot_be_answered_again() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 1250, "GBP")
        page_url = payment.action_url
        assert page_url is not None
        assert (await guest(w, page_url, "approve"))[0] == 200
        async with w.http.get(page_url) as resp:
            page = await resp.text()
        assert resp.status == 200 and Forms(page).forms == [] and "approved" in page
        for answer in ("decline", "approve"):
            async with w.http.post(f"{page_url}/{answer}") as resp:
                assert resp.status == 409
                assert "can no longer be changed" in await resp.text()
        assert (await w.provider.get(payment.provider_ref)).state is PaymentState.SUCCEEDED
        async with w.http.get(f"{w.url}/pay/pay_nothing") as resp:
            assert resp.status == 404
        assert (await w.settled()).kinds() == ["payment.succeeded"]

    run(test)


# -- cancelling and expiring ----------------------------------------------------------------


def test_a_pending_payment_can_be_cancelled() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 1250, "GBP")
        cancelled = await w.provider.cancel(payment.provider_ref)
        assert cancelled.state is PaymentState.CANCELLED
        assert payment.action_url is not None
        async with w.http.post(f"{payment.action_url}/approve") as resp:
            assert resp.status == 409 and "cancelled by the merchant" in await resp.text()
        with refused("payment_not_pending"):
            await w.provider.cancel(payment.provider_ref)
        [event] = (await w.settled()).events
        assert event.kind == "payment.cancelled" and event.payment == cancelled

    run(test)


def test_a_succeeded_payment_cannot_be_cancelled() -> None:
    async def test(w: World) -> None:
        ref = await paid(w)
        with refused("payment_not_pending") as caught:
            await w.provider.cancel(ref)
        assert not caught.value.retryable
        assert (await w.provider.get(ref)).state is PaymentState.SUCCEEDED
        assert (await w.settled()).kinds() == ["payment.succeeded"]

    run(test)


def test_a_payment_expires_by_the_clock() -> None:
    async def test(w: World) -> None:
        read = await w.provider.create("pay-1", 100, "GBP")
        swept = await w.provider.create("pay-2", 200, "GBP")
        w.clock.advance(FIFTEEN_MIN_MS - 1)
        assert (await w.provider.get(read.provider_ref)).state is PaymentState.PENDING
        assert w.bank.sweep() == []
        w.clock.advance(1)
        assert (await w.provider.get(read.provider_ref)).state is PaymentState.EXPIRED
        assert (await w.settled()).kinds() == ["payment.expired"]  # the read expired it
        assert w.bank.sweep() == [swept.provider_ref]
        assert w.bank.sweep() == []
        received = await w.settled()
        assert received.kinds(read.provider_ref) == ["payment.expired"]
        assert received.kinds(swept.provider_ref) == ["payment.expired"]
        assert all(e.payment and e.payment.state is PaymentState.EXPIRED for e in received.events)
        assert received.refused == []  # signed at the bank's (moved) time, which we share
        assert read.action_url is not None
        async with w.http.get(read.action_url) as resp:
            page = await resp.text()
        assert Forms(page).forms == [] and "expired" in page
        async with w.http.post(f"{read.action_url}/approve") as resp:
            assert resp.status == 409
        with refused("payment_not_pending"):
            await w.provider.cancel(swept.provider_ref)

    run(test)


def test_an_expired_payment_is_expired_before_any_action() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 100, "GBP")
        w.clock.advance(FIFTEEN_MIN_MS)
        with refused("payment_not_pending"):
            await w.provider.cancel(payment.provider_ref)
        assert (await w.settled()).kinds() == ["payment.expired"]

    run(test)


def test_the_demo_clock_is_moved_through_the_control_endpoint() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 100, "GBP")
        status, body, _ = await w.api("POST", "/_control/clock", json={"advance_ms": 60_000})
        assert (status, body) == (200, {"now_ms": T0_MS + 60_000, "expired": []})
        status, body, _ = await w.api(
            "POST", "/_control/clock", json={"advance_ms": FIFTEEN_MIN_MS}
        )
        assert body["expired"] == [payment.provider_ref]
        assert w.clock.now_ms() == T0_MS + 60_000 + FIFTEEN_MIN_MS
        for bad in (-1, "5", None):
            status, body, _ = await w.api("POST", "/_control/clock", json={"advance_ms": bad})
            assert (status, body["error"]["code"]) == (422, "invalid_advance")
        assert (await w.settled()).kinds() == ["payment.expired"]

    run(test)


def test_an_outside_clock_cannot_be_moved() -> None:
    async def test(w: World) -> None:
        status, body, _ = await w.api("POST", "/_control/clock", json={"advance_ms": 1})
        assert (status, body["error"]["code"]) == (409, "clock_not_adjustable")

    run(test, clock=lambda: T0_MS)


# -- late completion ------------------------------------------------------------------------


async def complete_late(w: World, ref: str) -> tuple[int, Any]:
    status, body, _ = await w.api("POST", f"/_control/payments/{ref}/complete_late")
    return status, body


def test_a_cancelled_payment_completes_late() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 1250, "GBP")
        await w.provider.cancel(payment.provider_ref)
        status, body = await complete_late(w, payment.provider_ref)
        assert (status, body["status"]) == (200, "succeeded")
        now = await w.provider.get(payment.provider_ref)
        assert now.state is PaymentState.SUCCEEDED
        received = await w.settled()
        assert received.kinds() == ["payment.cancelled", "payment.succeeded"]
        before, after = (e.payment.state for e in received.events if e.payment)
        assert late_completion(before, after) and can_move("bank", before, after)
        refund = await w.provider.refund(payment.provider_ref, "refund-1", 1250)
        assert refund.state == "succeeded"  # the checkout gives one of the two payments back

    run(test)


def test_an_expired_payment_completes_late() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 1250, "GBP")
        w.clock.advance(FIFTEEN_MIN_MS)
        status, body = await complete_late(w, payment.provider_ref)
        assert (status, body["status"]) == (200, "succeeded")
        assert (await w.provider.get(payment.provider_ref)).state is PaymentState.SUCCEEDED
        received = await w.settled()
        assert received.kinds() == ["payment.expired", "payment.succeeded"]
        assert received.refused == []

    run(test)


def test_only_a_given_up_payment_completes_late() -> None:
    async def test(w: World) -> None:
        pending = await w.provider.create("pay-1", 100, "GBP")
        succeeded = await paid(w, "pay-2")
        declined = await w.provider.create("pay-3", 100, "GBP")
        assert declined.action_url is not None
        await guest(w, declined.action_url, "decline")
        for ref in (pending.provider_ref, succeeded, declined.provider_ref):
            status, body = await complete_late(w, ref)
            assert (status, body["error"]["code"]) == (409, "payment_not_cancelled_or_expired")
        assert (await complete_late(w, "pay_nothing"))[0] == 404
        assert (await w.provider.get(pending.provider_ref)).state is PaymentState.PENDING
        assert (await w.settled()).kinds() == ["payment.succeeded", "payment.failed"]

    run(test)


# -- refunds --------------------------------------------------------------------------------


def test_refunds_partial_then_full() -> None:
    async def test(w: World) -> None:
        ref = await paid(w, amount=1000)
        first = await w.provider.refund(ref, "refund-1", 300)
        assert (first.refund_id, first.payment_ref, first.amount_pence) == ("refund-1", ref, 300)
        assert first.state == "succeeded"
        assert (await w.provider.get(ref)).refunded_pence == 300
        second = await w.provider.refund(ref, "refund-2", 700)
        assert second.provider_ref != first.provider_ref
        now = await w.provider.get(ref)
        assert (now.state, now.refunded_pence) == (PaymentState.SUCCEEDED, 1000)
        with refused("refund_exceeds_payment"):
            await w.provider.refund(ref, "refund-3", 1)
        received = await w.settled()
        assert received.kinds(ref) == ["payment.succeeded", "refund.succeeded", "refund.succeeded"]
        assert [e.refund for e in received.events if e.refund] == [first, second]

    run(test)


def test_a_refund_over_what_is_left_is_refused() -> None:
    async def test(w: World) -> None:
        ref = await paid(w, amount=1000)
        with refused("refund_exceeds_payment") as caught:
            await w.provider.refund(ref, "refund-1", 1001)
        assert not caught.value.retryable
        await w.provider.refund(ref, "refund-2", 600)
        with refused("refund_exceeds_payment"):
            await w.provider.refund(ref, "refund-3", 401)
        assert (await w.provider.get(ref)).refunded_pence == 600
        status, body, _ = await w.api(
            "POST", f"/v1/payments/{ref}/refunds", key="refund-4", json={"amount_pence": 0}
        )
        assert (status, body["error"]["code"]) == (422, "invalid_amount")

    run(test)


def test_only_a_succeeded_payment_is_refunded() -> None:
    async def test(w: World) -> None:
        pending = await w.provider.create("pay-1", 1000, "GBP")
        with refused("payment_not_succeeded"):
            await w.provider.refund(pending.provider_ref, "refund-1", 100)
        await w.provider.cancel(pending.provider_ref)
        with refused("payment_not_succeeded"):
            await w.provider.refund(pending.provider_ref, "refund-2", 100)
        with refused("payment_not_found"):
            await w.provider.refund("pay_nothing", "refund-3", 100)
        assert w.bank.refunds == {}
        assert (await w.settled()).kinds() == ["payment.cancelled"]

    run(test)


def test_a_refund_is_idempotent_by_its_key() -> None:
    async def test(w: World) -> None:
        ref = await paid(w, amount=1000)
        first = await w.provider.refund(ref, "refund-1", 1000)
        again = await w.provider.refund(ref, "refund-1", 1000)  # not "exceeds": the same one
        assert again == first
        assert (await w.provider.get(ref)).refunded_pence == 1000
        with refused("idempotency_key_reused"):
            await w.provider.refund(ref, "refund-1", 500)
        other = await paid(w, "pay-2")
        with refused("idempotency_key_reused"):
            await w.provider.refund(other, "refund-1", 1000)
        assert len(w.bank.refunds) == 1
        assert (await w.settled()).kinds().count("refund.succeeded") == 1

    run(test)


# -- webhooks -------------------------------------------------------------------------------


def test_webhook_signatures_are_checked() -> None:
    async def test(w: World) -> None:
        await paid(w)
        [(body, headers)] = (await w.settled()).deliveries
        tampered = body.replace(b'"amount_pence":1000', b'"amount_pence":1')
        assert tampered != body
        verify = w.provider.verify_webhook
        event = verify(body, headers)
        assert verify(body, {k.lower(): v for k, v in headers.items()}) == event
        assert verify(body, headers).event_id == event.event_id  # a replay: the same event id
        now_s = w.clock.now_ms() // 1000

        def sig(value: str) -> dict[str, str]:
            return {SIGNATURE_HEADER: value}

        refusals: list[tuple[bytes, dict[str, str], str]] = [
            (body, {}, "invalid_signature"),
            (body, sig("garbage"), "invalid_signature"),
            (body, sig(f"t=abc,v1={'0' * 64}"), "invalid_signature"),
            (body, sig(f"v1={'0' * 64}"), "invalid_signature"),
            (body, sig(f"t={now_s},v1=\u00e9t\u00e9"), "invalid_signature"),
            (body, sig(f"t={now_s}"), "invalid_signature"),
            (body, sig(sign("whsec_someone_else", body, now_s)), "invalid_signature"),
            (tampered, headers, "invalid_signature"),
            (body, sig(sign(WEBHOOK_SECRET, body, now_s - 301)), "stale_signature"),
            (body, sig(sign(WEBHOOK_SECRET, body, now_s + 301)), "stale_signature"),
        ]
        for raw, given, code in refusals:
            with refused(code):
                verify(raw, given)
        assert verify(body, sig(sign(WEBHOOK_SECRET, body, now_s - 299))) == event
        junk = b'{"id": "evt_1"}'  # signed, but not an event
        with refused("invalid_payload"):
            verify(junk, sig(sign(WEBHOOK_SECRET, junk, now_s)))
        two = f"{sign(WEBHOOK_SECRET, body, now_s)},v1={'0' * 64}"  # any one v1 may match
        assert verify(body, sig(two)) == event
        async with w.http.post(str(w.bank.webhook_url), data=body, headers=sig("t=1,v1=00")) as r:
            assert r.status == 400
        assert w.receiver.refused == ["invalid_signature"]

    run(test)


def test_a_failed_delivery_is_retried_until_accepted() -> None:
    async def test(w: World) -> None:
        w.receiver.fail_next = 2
        ref = await paid(w)
        received = await w.settled()
        assert len(received.deliveries) == 3
        assert len({body for body, _ in received.deliveries}) == 1  # the same event each time
        [event] = received.events
        assert event.kind == "payment.succeeded" and event.payment is not None
        assert event.payment.provider_ref == ref
        assert [a.status for a in w.bank.delivery_log] == [500, 500, 200]
        assert [a.attempt for a in w.bank.delivery_log] == [1, 2, 3]

    run(test)


def test_an_event_is_sent_again_after_retries_run_out() -> None:
    async def test(w: World) -> None:
        w.receiver.fail_next = 100
        await paid(w)
        received = await w.settled()
        assert len(received.deliveries) == 1 + len(FAST_RETRIES) and received.events == []
        [event_id] = w.bank.events
        w.receiver.fail_next = 0
        w.bank.redeliver(event_id)
        status, body, _ = await w.api("POST", f"/_control/events/{event_id}/redeliver")
        assert (status, body["id"]) == (202, event_id)
        received = await w.settled()
        assert [e.event_id for e in received.events] == [event_id, event_id]
        status, body, _ = await w.api("POST", "/_control/events/evt_nothing/redeliver")
        assert (status, body["error"]["code"]) == (404, "event_not_found")

    run(test)


def test_a_slow_receiver_never_holds_up_the_bank() -> None:
    async def test(w: World) -> None:
        w.receiver.gate = asyncio.Event()
        payment = await w.provider.create("pay-1", 100, "GBP")
        cancelled = await asyncio.wait_for(w.provider.cancel(payment.provider_ref), 2)
        assert cancelled.state is PaymentState.CANCELLED
        await asyncio.wait_for(w.receiver.arrived.wait(), 2)  # in flight, held by the receiver
        assert w.receiver.events == []
        w.receiver.gate.set()
        assert (await w.settled()).kinds() == ["payment.cancelled"]

    run(test)


def test_an_unreachable_receiver_does_not_break_the_bank() -> None:
    async def test(w: World) -> None:
        ref = await paid(w)
        await w.bank.idle()
        assert (await w.provider.get(ref)).state is PaymentState.SUCCEEDED
        log = w.bank.delivery_log
        assert len(log) == 1 + len(FAST_RETRIES)
        assert all(a.status is None and a.error for a in log)

    run(test, webhook_url=f"{closed_url()}/hooks")


# -- access and outages ---------------------------------------------------------------------


def test_the_api_wants_the_secret_key() -> None:
    async def test(w: World) -> None:
        payment = await w.provider.create("pay-1", 100, "GBP")
        ref = payment.provider_ref
        calls = [
            ("GET", f"/v1/payments/{ref}"),
            ("GET", "/v1/payments?reference=pay-1"),
            ("POST", "/v1/payments"),
            ("POST", f"/v1/payments/{ref}/cancel"),
            ("POST", f"/v1/payments/{ref}/refunds"),
            ("POST", f"/_control/payments/{ref}/complete_late"),
            ("POST", "/_control/clock"),
        ]
        for auth in (None, "Bearer sk_wrong", f"Basic {SECRET}", "Bearer"):
            for method, path in calls:
                status, body, _ = await w.api(method, path, auth=auth, key="k", json={})
                assert (status, body["error"]["code"]) == (401, "unauthorized"), (auth, path)
        intruder = replace_secret(w.provider, "sk_wrong")
        with refused("unauthorized") as caught:
            await intruder.get(ref)
        assert not caught.value.retryable
        assert (await w.provider.get(ref)).state is PaymentState.PENDING
        assert w.clock.now_ms() == T0_MS
        async with w.http.get(f"{w.url}/pay/{ref}") as resp:  # the guest's page needs no key
            assert resp.status == 200

    run(test)


def replace_secret(provider: SimBankProvider, secret: str) -> SimBankProvider:
    return SimBankProvider(
        provider.base_url, secret, WEBHOOK_SECRET, provider.session, provider.clock
    )


def closed_url() -> str:
    """A loopback URL nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_bank_that_is_down_is_provider_unavailable() -> None:
    async def main() -> None:
        release = asyncio.Event()

        async def broken(request: web.Request) -> web.Response:
            return web.Response(status=503, text="down for maintenance")

        async def garbled(request: web.Request) -> web.Response:
            return web.Response(status=200, text="<html>a captive portal</html>")

        async def stuck(request: web.Request) -> web.Response:
            await release.wait()
            return web.Response(status=200)

        apps = []
        for handler in (broken, garbled, stuck):
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            apps.append(app)
        async with (
            aiohttp.ClientSession() as http,
            serving(apps[0], access_log=None) as broken_url,
            serving(apps[1], access_log=None) as garbled_url,
            serving(apps[2], access_log=None) as stuck_url,
        ):
            try:
                for url in (closed_url(), broken_url, garbled_url, stuck_url):
                    provider = SimBankProvider(url, SECRET, WEBHOOK_SECRET, http, timeout_s=0.1)
                    calls = [
                        provider.create("pay-1", 100, "GBP"),
                        provider.get("pay_x"),
                        provider.find("pay-1"),
                        provider.cancel("pay_x"),
                        provider.refund("pay_x", "refund-1", 100),
                    ]
                    for call in calls:
                        with refused("provider_unavailable") as caught:
                            await call
                        assert caught.value.retryable, url
            finally:
                release.set()

    asyncio.run(main())


def test_simbank_app_serves_a_bank() -> None:
    async def main() -> None:
        clock = SimClock(T0_MS)
        app = simbank_app(secret_key=SECRET, webhook_secret="w", webhook_url=None, clock=clock)
        async with serving(app, access_log=None) as url, aiohttp.ClientSession() as http:
            provider = SimBankProvider(url, SECRET, "w", http, clock)
            payment = await provider.create("pay-1", 100, "GBP")
            assert payment.expires_at_ms == T0_MS + FIFTEEN_MIN_MS
            assert (await provider.cancel(payment.provider_ref)).state is PaymentState.CANCELLED

    asyncio.run(main())


# -- the demo command -----------------------------------------------------------------------


def test_the_demo_command_serves_a_bank_with_a_movable_clock() -> None:
    port = int(closed_url().rsplit(":", 1)[1])
    args = ["--port", str(port), "--secret-key", SECRET, "--webhook-secret", "w"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.providers.simbank", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    async def main() -> None:
        url = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            provider = SimBankProvider(url, SECRET, "w", http)
            deadline = time.monotonic() + 15
            while True:
                try:
                    payment = await provider.create("pay-1", 100, "GBP")
                    break
                except ProviderError as exc:
                    assert exc.code == "provider_unavailable" and time.monotonic() < deadline
                    await asyncio.sleep(0.05)
            auth = {"Authorization": f"Bearer {SECRET}"}
            async with http.post(
                f"{url}/_control/clock", json={"advance_ms": FIFTEEN_MIN_MS}, headers=auth
            ) as resp:
                assert resp.status == 200
                assert (await resp.json())["expired"] == [payment.provider_ref]
            assert (await provider.get(payment.provider_ref)).state is PaymentState.EXPIRED

    try:
        asyncio.run(main())
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_clock_only_moves_forward() -> None:
    clock = SimClock(T0_MS)
    assert clock() == clock.now_ms() == T0_MS
    assert clock.advance(5) == T0_MS + 5
    with pytest.raises(ValueError):
        clock.advance(-1)
    following = SimClock()
    before = time.time_ns() // 1_000_000
    assert before <= following.advance(1000) - 1000 <= time.time_ns() // 1_000_000
