"""Pay by bank end to end: a real edge app and uplink, the real cloud over Postgres, and the
simulated bank, each on its own loopback port; the edge reaches the cloud through a proxy
that can go offline.

A tablet starts a bank payment; the edge records the attempt, pushes it, and has the cloud
ask the bank; the guest approves on the bank's page; the bank's signed webhook reaches the
cloud, which records it on the payment's row; the row reaches the edge by sync, and the edge
settles the check. Declines, expiry by the bank's clock, a cancel followed by a late
completion (refunded, never kept twice), an outage, and an attempt the provider took while
the edge was not listening (recovered exactly once) are each followed to the end.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from cloud.app import create_app as create_cloud_app
from cloud.auth import STORE
from cloud.config import PaymentSettings as CloudPaymentSettings
from cloud.payments import PROVIDERS, PaymentProviders
from cloud.pgtemp import free_port
from cloud.providers.simbank import SIGNATURE_HEADER, SimBank, SimBankProvider, SimClock, sign
from cloud.providers.stripe_card import StripeCardProvider
from edge import payments
from edge.app import WATCHER_KEY
from edge.config import CloudSettings, PaymentSettings
from edge.payments import NewPayment, PaymentPolicy

from .api_harness import Edge, Tablet, running_edge, serving
from .harness import OWNER, Proxy, cloud_config, running_cloud, wait_until
from .localstripe_server import TEST_API_KEY, running_localstripe
from .test_api_orders import add_line, code, open_order, till_for
from .test_live import connect, receive

BANK_KEY, HOOK_SECRET = "sk_sim_test", "whsec_sim_test"
CARD_HOOK_SECRET = "whsec_card_test"
#: an API version from before ``allowed_payment_method_types``: the one localstripe speaks
LOCALSTRIPE_API = "2025-03-31.basil"


@dataclasses.dataclass
class World:
    edge: Edge
    tablet: Tablet
    bank: SimBank
    bank_url: str
    proxy: Proxy
    cloud_url: str
    http: aiohttp.ClientSession
    stripe_url: str | None = None
    site: str = ""

    def card_provider(self) -> StripeCardProvider:
        """A client of the same Stripe (what a card reader, or a test, talks to)."""
        assert self.stripe_url is not None
        return StripeCardProvider(
            TEST_API_KEY, "x", api_base=self.stripe_url, stripe_version=LOCALSTRIPE_API,
            session=self.http,
        )  # fmt: skip

    async def order(self, *items: str) -> str:
        order = await open_order(self.edge, self.tablet)
        for item in items:
            got, answer = await add_line(self.edge, self.tablet, order["id"], item_id=item)
            assert got == 201, answer
        return str(order["id"])

    async def pay(self, order_id: str, **payment: Any) -> tuple[int, Any]:
        got, answer, _ = await self.edge.call(
            "POST", f"/v1/orders/{order_id}/payments", self.tablet.headers("sam"), json=payment
        )
        return got, answer

    async def sheet(self, order_id: str) -> dict[str, Any]:
        got, answer, _ = await self.edge.call(
            "GET", f"/v1/orders/{order_id}/checkout", self.tablet.headers("sam")
        )
        assert got == 200, answer
        return answer  # type: ignore[no-any-return]

    async def guest(self, payment: dict[str, Any], choice: str) -> None:
        """The guest opens the pay page on their phone and approves or declines."""
        async with self.http.get(payment["action_url"]) as resp:
            assert resp.status == 200 and "£" in await resp.text()
        async with self.http.post(f"{payment['action_url']}/{choice}") as resp:
            assert resp.status == 200, await resp.text()

    async def settled(
        self, order_id: str, check: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any]:
        """Wait until the edge's checkout sheet passes ``check``; returns it."""
        found: dict[str, Any] = {}

        async def ready() -> bool:
            found.update(await self.sheet(order_id))
            return check(found)

        await wait_until(ready, 20, "the payment to settle at the edge")
        return found

    def edge_rows(self, sql: str) -> list[Any]:
        return self.edge.sql(sql)


@asynccontextmanager
async def world(
    tmp_path: Path, dsn: str, stripe_url: str | None = None, **bank_options: Any
) -> AsyncIterator[World]:
    providers = PaymentProviders()
    async with (
        running_cloud(cloud_config(dsn), providers) as cloud,
        aiohttp.ClientSession() as http,
    ):
        if stripe_url is not None:
            providers.card = StripeCardProvider(
                TEST_API_KEY,
                CARD_HOOK_SECRET,
                api_base=stripe_url,
                session=http,
                stripe_version=LOCALSTRIPE_API,
                max_network_retries=0,
                descriptions=False,
            )
        bank = SimBank(
            secret_key=BANK_KEY,
            webhook_secret=HOOK_SECRET,
            webhook_url=f"{cloud.url}/webhooks/simbank",
            retry_delays_s=(0.05, 0.1, 0.2),
            **bank_options,
        )
        async with serving(bank.app) as bank_url:
            bank.public_url = bank_url
            # The bank signs its webhooks by its own clock (which a test moves on to expire a
            # payment); the cloud checks them against the same clock.
            providers.bank = SimBankProvider(bank_url, BANK_KEY, HOOK_SECRET, http, bank.clock)
            site = await cloud.add_site("Harbour")
            node, token = await cloud.add_device(site, "edge")
            proxy = Proxy(cloud.port)
            await proxy.start()
            try:
                settings = CloudSettings(url=proxy.url, token=token)
                # The edge's own poll is left to the tests that call it: nothing here
                # settles by accident of timing.
                async with running_edge(
                    tmp_path, site_id=site, node_id=node, cloud=settings,
                    payments=PaymentSettings(poll_s=3600),
                ) as edge:  # fmt: skip
                    tablet = await till_for(edge)
                    yield World(
                        edge, tablet, bank, bank_url, proxy, cloud.url, http, stripe_url, site
                    )
            finally:
                await proxy.stop()


def run(tmp_path: Path, dsn: str, body: Callable[[World], Awaitable[None]], **options: Any) -> None:
    async def main() -> None:
        async with world(tmp_path, dsn, **options) as w:
            await body(w)

    asyncio.run(main())


def test_a_check_paid_by_bank_settles_at_the_edge_once(tmp_path: Path, pg_database: str) -> None:
    async def body(w: World) -> None:
        oid = await w.order("steak", "soup")  # 2650
        # The till follows the payment live, as the bank moves it.
        live, _ = await connect(
            w.edge, w.tablet.device_token, ["payments"], session=w.tablet.access["sam"]
        )
        got, sheet = await w.pay(oid, tender="bank", amount_pence=2650, tip_pence=200)
        assert got == 201, sheet
        [started] = sheet["payments"]
        assert started["status"] == "pending" and started["provider_state"] == "pending"
        assert started["action_url"].startswith(w.bank_url + "/pay/")
        assert started["charged_pence"] == 2850
        assert sheet["balance_pence"] == 2650  # nothing is paid until the bank says so
        # The till shows the QR code of the bank's page.
        got, qr, _ = await w.edge.call(
            "GET", f"/v1/payments/{started['id']}/qr", w.tablet.headers("sam")
        )
        assert got == 200 and qr["url"] == started["action_url"]
        assert qr["svg"].startswith("<?xml") and "<svg" in qr["svg"]
        assert base64.b64decode(qr["png_base64"])[:8] == b"\x89PNG\r\n\x1a\n"
        # While it is pending its part of the check is held: no second payment for it.
        got, refused = await w.pay(oid, tender="bank", amount_pence=1)
        assert (got, code(refused)) == (409, "overpayment")

        await w.guest(started, "approve")
        done = await w.settled(oid, lambda s: s["status"] == "paid")
        seen: list[tuple[object, object]] = []
        deadline = time.monotonic() + 10
        while ("succeeded", "succeeded") not in seen:
            message = await receive(live, deadline)
            if message["type"] == "event":
                assert message["topic"] == "payments"
                row = json.loads(json.dumps(message["data"]))["row"]
                seen.append((row["status"], row["provider_state"]))
        assert seen[0] == ("pending", None)  # recorded, then the provider's answers arrive
        await live.close()
        assert done["balance_pence"] == 0 and done["paid_pence"] == 2650
        [paid] = done["payments"]
        assert (paid["status"], paid["provider_state"], paid["tip_pence"]) == (
            "succeeded", "succeeded", 200,
        )  # fmt: skip
        # The bank sends the same event again: the cloud takes it once, nothing changes.
        await w.bank.idle()
        [event_id] = [e for e, ev in w.bank.events.items() if ev["type"] == "payment.succeeded"]
        outbox = w.edge_rows("SELECT count(*) FROM payments")
        async with w.http.post(
            f"{w.bank_url}/_control/events/{event_id}/redeliver",
            headers={"Authorization": f"Bearer {BANK_KEY}"},
        ) as resp:
            assert resp.status in (200, 202)
        await w.bank.idle()
        assert [a.status for a in w.bank.delivery_log if a.event_id == event_id] == [200, 200]
        assert w.edge_rows("SELECT count(*) FROM payments") == outbox
        # The same event posted again is answered as a duplicate; a forged one is refused.
        raw = json.dumps(w.bank.events[event_id]).encode()
        now = int(time.time())
        for body, signature, status, answer in (
            (raw, sign(HOOK_SECRET, raw, now), 200, {"received": True, "duplicate": True}),
            (raw, sign("not-the-secret", raw, now), 400, None),
            (raw.replace(b"succeeded", b"failed"), sign(HOOK_SECRET, raw, now), 400, None),
        ):
            async with w.http.post(
                f"{w.cloud_url}/webhooks/simbank", data=body, headers={SIGNATURE_HEADER: signature}
            ) as resp:
                got_body = await resp.json()
                assert resp.status == status, got_body
                if answer is not None:
                    assert got_body == answer
                else:
                    assert got_body["error"]["code"] == "invalid_signature"
        got, closed, _ = await w.edge.call(
            "POST", f"/v1/orders/{oid}/close", w.tablet.headers("sam")
        )
        assert got == 200 and closed["status"] == "closed"
        # The soup was cold: £4.50 goes back to the guest's bank account.
        got, after, _ = await w.edge.call(
            "POST", f"/v1/payments/{paid['id']}/refunds", w.tablet.headers("sam"),
            json={"amount_pence": 450, "reason": "cold soup"},
        )  # fmt: skip
        assert got == 201, after
        assert [(r["status"], r["amount_pence"]) for r in after["refunds"]] == [("succeeded", 450)]
        [ref] = [p for p in w.bank.payments.values() if p.reference == paid["id"]]
        assert ref.refunded_pence == 450

    run(tmp_path, pg_database, body)


def test_a_declined_or_expired_bank_payment_frees_the_check_for_cash(
    tmp_path: Path, pg_database: str
) -> None:
    clock = SimClock()

    async def body(w: World) -> None:
        oid = await w.order("steak")  # 2200
        got, sheet = await w.pay(oid, tender="bank", amount_pence=2200)
        assert got == 201
        await w.guest(sheet["payments"][0], "decline")
        done = await w.settled(oid, lambda s: s["payments"][0]["status"] == "failed")
        assert done["balance_pence"] == 2200 and done["status"] == "open"
        assert done["payments"][0]["failure_code"] == "declined"
        # The guest tries again and walks away: the bank's QR expires after 15 minutes.
        got, sheet = await w.pay(oid, tender="bank", amount_pence=2200)
        assert got == 201
        clock.advance(15 * 60_000 + 1)
        w.bank.sweep()
        done = await w.settled(oid, lambda s: s["payments"][1]["status"] == "expired")
        # The tablet was told, so it can offer card or cash.
        events = w.edge_rows("SELECT data FROM events WHERE topic = 'payments' ORDER BY seq")
        kinds = [(json.loads(d)["kind"], json.loads(d)["state"]) for (d,) in events]
        assert kinds == [("fallback", "failed"), ("fallback", "expired")]
        till = (await w.edge.call("POST", "/v1/tills", w.tablet.headers("bo"),
                                  json={"name": "Bar", "float_pence": 0}))[1]["id"]  # fmt: skip
        got, paid = await w.pay(oid, tender="cash", amount_pence=2200, till_id=till)
        assert got == 201 and paid["status"] == "paid"

    run(tmp_path, pg_database, body, clock=clock)


def test_a_bank_payment_completing_after_the_till_gave_up_is_refunded(
    tmp_path: Path, pg_database: str
) -> None:
    async def body(w: World) -> None:
        oid = await w.order("steak")  # 2200
        got, sheet = await w.pay(oid, tender="bank", amount_pence=2200)
        pid = sheet["payments"][0]["id"]
        got, cancelled, _ = await w.edge.call(
            "POST", f"/v1/payments/{pid}/cancel", w.tablet.headers("sam")
        )
        assert got == 200 and cancelled["status"] == "cancelled"
        till = (await w.edge.call("POST", "/v1/tills", w.tablet.headers("bo"),
                                  json={"name": "Bar", "float_pence": 0}))[1]["id"]  # fmt: skip
        got, paid = await w.pay(oid, tender="cash", amount_pence=2200, till_id=till)
        assert got == 201 and paid["status"] == "paid"
        # The guest's bank app finishes anyway: the money arrives after the cash.
        provider_ref = next(iter(w.bank.payments))
        async with w.http.post(
            f"{w.bank_url}/_control/payments/{provider_ref}/complete_late",
            headers={"Authorization": f"Bearer {BANK_KEY}"},
        ) as resp:
            assert resp.status == 200, await resp.text()
        done = await w.settled(
            oid, lambda s: bool(s["refunds"]) and s["refunds"][0]["status"] == "succeeded"
        )
        [refund] = done["refunds"]
        assert (refund["payment_id"], refund["amount_pence"], refund["requested_by"]) == (
            pid, 2200, "system",
        )  # fmt: skip
        assert done["paid_pence"] - done["refunded_pence"] == 2200  # kept once, not twice
        assert done["balance_pence"] == 0 and done["refund_due_pence"] == 0
        assert w.bank.payments[provider_ref].refunded_pence == 2200
        alerts = w.edge_rows("SELECT data FROM events WHERE topic = 'payments'")
        assert [json.loads(d)["kind"] for (d,) in alerts] == ["late_payment_refunded"]
        assert json.loads(alerts[0][0])["alert"] is True

    run(tmp_path, pg_database, body)


def test_with_the_cloud_out_of_reach_bank_is_refused_and_cash_works(
    tmp_path: Path, pg_database: str
) -> None:
    async def body(w: World) -> None:
        oid = await w.order("soup")
        await w.proxy.stop()
        await wait_until(lambda: not w.edge.app[WATCHER_KEY].gateway.online(), 20, "offline")
        got, refused = await w.pay(oid, tender="bank", amount_pence=450)
        assert (got, code(refused)) == (503, "payments_offline")
        assert w.edge_rows("SELECT count(*) FROM payments WHERE status = 'pending'") == [(0,)]
        till = (await w.edge.call("POST", "/v1/tills", w.tablet.headers("bo"),
                                  json={"name": "Bar", "float_pence": 0}))[1]["id"]  # fmt: skip
        got, paid = await w.pay(oid, tender="cash", amount_pence=450, till_id=till)
        assert got == 201 and paid["status"] == "paid"
        await w.proxy.start()

    run(tmp_path, pg_database, body)


def test_an_attempt_the_bank_took_while_the_edge_was_not_listening_is_recovered_once(
    tmp_path: Path, pg_database: str
) -> None:
    """The edge recorded and pushed the attempt, the bank created the payment, and the edge
    stopped before it heard back (so the cloud never mapped it): the guest pays anyway, the
    webhook finds no attempt, and the edge's poll recovers it by its id, exactly once."""

    async def body(w: World) -> None:
        oid = await w.order("steak")
        store, policy = w.edge.store, PaymentPolicy()
        attempt = NewPayment(tender="bank", amount_pence=2200)
        pid = "pay_recovered01"
        await store.transaction(
            lambda tx: payments.take_payment(tx, oid, attempt, "sam", pid, policy, providers=True)
        )
        await wait_until(lambda: store.cursors().acked_through >= store.cursors().last_seq)
        provider = SimBankProvider(w.bank_url, BANK_KEY, HOOK_SECRET, w.http)
        taken = await provider.create(pid, 2200, "GBP", description="Check 1")
        again = await provider.create(pid, 2200, "GBP", description="Check 1")  # a retry
        assert again.provider_ref == taken.provider_ref and len(w.bank.payments) == 1
        await w.guest({"action_url": taken.action_url}, "approve")
        await w.bank.idle()
        assert w.edge_rows(f"SELECT status FROM payments WHERE id = '{pid}'") == [("pending",)]
        watcher = w.edge.app[WATCHER_KEY]
        await watcher.poll_once()
        await watcher.poll_once()
        done = await w.settled(oid, lambda s: s["status"] == "paid")
        assert [(p["id"], p["status"]) for p in done["payments"]] == [(pid, "succeeded")]
        assert done["paid_pence"] == 2200 and done["refunds"] == []

    run(tmp_path, pg_database, body)


# -- cards, through Stripe (localstripe) ------------------------------------------------------


def stripe_signature(body: bytes, secret: str) -> str:
    """A ``Stripe-Signature`` header, by Stripe's documented scheme."""
    t = int(time.time())
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


@pytest.fixture(scope="module")
def stripe_url() -> Iterator[str]:
    with running_localstripe() as url:
        yield url


async def card_method(w: World, number: str) -> str:
    """A payment method for a test card number, as a card reader hands one over (the edge
    and the cloud never see card numbers)."""
    method = await w.card_provider().client.v1.payment_methods.create_async(
        {"type": "card", "card": {"number": number, "exp_month": 12, "exp_year": 2030,
                                  "cvc": "123"}}
    )  # fmt: skip
    return str(method.id)


def test_a_card_payment_is_taken_and_partly_refunded(
    tmp_path: Path, pg_database: str, stripe_url: str
) -> None:
    async def body(w: World) -> None:
        oid = await w.order("steak", "ipa")  # 2750
        got, sheet = await w.pay(
            oid, tender="card", amount_pence=2750, tip_pence=275, payment_method="pm_card_visa"
        )
        assert got == 201, sheet
        [card] = sheet["payments"]
        assert card["provider_state"] == "succeeded" and card["charged_pence"] == 3025
        assert card["provider_fee_pence"] == 80 + 30 and card["platform_fee_pence"] == 28
        done = await w.settled(oid, lambda s: s["status"] == "paid")
        assert done["payments"][0]["status"] == "succeeded"
        got, after, _ = await w.edge.call(
            "POST", f"/v1/payments/{card['id']}/refunds", w.tablet.headers("sam"),
            json={"amount_pence": 550, "reason": "IPA was flat"},
        )  # fmt: skip
        assert got == 201, after
        [refund] = after["refunds"]
        assert (refund["status"], refund["amount_pence"]) == ("succeeded", 550)
        provider = w.card_provider()
        ref = await provider.find(card["id"])
        assert ref is not None and ref.refunded_pence == 550
        # The guest would rather have cash back for the rest of the round: from the till.
        got, till, _ = await w.edge.call(
            "POST", "/v1/tills", w.tablet.headers("bo"), json={"name": "Bar", "float_pence": 5000}
        )
        refunds = f"/v1/payments/{card['id']}/refunds"
        for ask, status in (
            ({"amount_pence": 300, "reason": "round", "in_cash": True}, 422),  # which till?
            ({"amount_pence": 300, "reason": "round", "in_cash": True, "till_id": till["id"]}, 201),
        ):
            got, after, _ = await w.edge.call("POST", refunds, w.tablet.headers("sam"), json=ask)
            assert got == status, after
        assert [(r["tender"], r["status"], r["amount_pence"]) for r in after["refunds"]] == [
            ("card", "succeeded", 550), ("cash", "succeeded", 300),
        ]  # fmt: skip
        assert after["payments"][0]["refunded_pence"] == 850
        got, drawer, _ = await w.edge.call("GET", f"/v1/tills/{till['id']}", w.tablet.headers("bo"))
        assert (drawer["cash_refunded_pence"], drawer["expected_pence"]) == (300, 4700)
        # The owner sees the platform's fee revenue for the site and the day, in the cloud.
        day = w.edge_rows(f"SELECT business_day FROM payments WHERE id = '{card['id']}'")[0][0]
        expected = {
            "business_day": day, "payments": 1, "charged_pence": 3025, "tips_pence": 275,
            "provider_fee_pence": 110, "platform_fee_pence": 28, "refunded_pence": 850,
        }  # fmt: skip

        async def in_cloud() -> bool:
            async with w.http.get(
                f"{w.cloud_url}/v1/sites/{w.site}/takings?from={day}&to={day}",
                headers={"Authorization": f"Bearer {OWNER}"},
            ) as resp:
                assert resp.status == 200, await resp.text()
                return (await resp.json())["days"] == [expected]

        await wait_until(in_cloud, 20, "the day's takings in the cloud")

    run(tmp_path, pg_database, body, stripe_url=stripe_url)


def test_a_declined_card_is_refused_and_three_d_secure_settles_by_a_signed_webhook(
    tmp_path: Path, pg_database: str, stripe_url: str
) -> None:
    async def body(w: World) -> None:
        oid = await w.order("steak")  # 2200
        got, refused = await w.pay(oid, tender="card", amount_pence=2200)  # no card given
        assert (got, code(refused)) == (422, "invalid_request")
        declined = await card_method(w, "4000000000000341")
        got, refused = await w.pay(oid, tender="card", amount_pence=2200, payment_method=declined)
        assert (got, code(refused)) == (402, "payment_declined")
        assert refused["error"]["details"]["reason"] == "card_declined"
        assert w.edge_rows("SELECT status, failure_code FROM payments") == [
            ("failed", "card_declined")
        ]
        # A card that asks the guest to authenticate: pending until the bank says yes.
        secure = await card_method(w, "4000002500003155")
        got, sheet = await w.pay(oid, tender="card", amount_pence=2200, payment_method=secure)
        assert got == 201, sheet
        attempt = sheet["payments"][1]
        assert (attempt["status"], attempt["provider_state"]) == ("pending", "requires_action")
        provider = w.card_provider()
        found = await provider.find(attempt["id"])
        assert found is not None
        intent = await provider.client.v1.payment_intents.retrieve_async(found.provider_ref)
        await provider.client.raw_request_async(
            "post", f"/v1/payment_intents/{found.provider_ref}/_authenticate",
            client_secret=intent.client_secret, success="true",
        )  # fmt: skip
        # Stripe tells the cloud: a signed payment_intent.succeeded event (forged ones refused).
        paid = await provider.client.v1.payment_intents.retrieve_async(found.provider_ref)
        event = {
            "id": "evt_3ds_paid", "object": "event", "type": "payment_intent.succeeded",
            "created": int(time.time()), "api_version": LOCALSTRIPE_API, "livemode": False,
            "data": {"object": paid.to_dict()},
        }  # fmt: skip
        raw = json.dumps(event).encode()
        url = f"{w.cloud_url}/webhooks/stripe"
        for secret, status in (("whsec_wrong", 400), (CARD_HOOK_SECRET, 200)):
            signed = {"Stripe-Signature": stripe_signature(raw, secret)}
            async with w.http.post(url, data=raw, headers=signed) as resp:
                assert resp.status == status, await resp.text()
        done = await w.settled(oid, lambda s: s["status"] == "paid")
        assert [p["status"] for p in done["payments"]] == ["failed", "succeeded"]

    run(tmp_path, pg_database, body, stripe_url=stripe_url)


def test_the_cloud_runs_the_simulated_bank_by_default(pg_database: str) -> None:
    """With no providers given, the cloud starts the simulated bank from its settings, on a
    port of its own, with the bank's webhooks coming back to this cloud."""

    async def body() -> None:
        port = free_port()
        settings = dataclasses.replace(
            cloud_config(pg_database), port=port, payments=CloudPaymentSettings(simbank_port=0)
        )
        app = create_cloud_app(settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            bank = app[PROVIDERS].bank
            assert isinstance(bank, SimBankProvider) and app[PROVIDERS].card is None
            taken = await bank.create("pay_default_bank", 1234, "GBP", description="Check 7")
            assert taken.action_url is not None
            async with aiohttp.ClientSession() as http:
                async with http.get(taken.action_url) as page:
                    assert page.status == 200 and "£12.34" in await page.text()
                async with http.post(f"{taken.action_url}/approve") as done:
                    assert done.status == 200

            async def delivered() -> bool:
                async with app[STORE].pool.acquire() as conn:
                    return bool(await conn.fetchval("SELECT count(*) FROM webhook_events"))

            await wait_until(delivered, 10, "the bank's webhook to reach the cloud")
        finally:
            await runner.cleanup()

    asyncio.run(body())


def test_the_owner_changes_a_sites_fees_from_the_cloud(tmp_path: Path, pg_database: str) -> None:
    async def body(w: World) -> None:
        oid = await w.order("steak", "ipa")  # 2750
        before = {t["tender"]: t for t in (await w.sheet(oid))["tenders"]}
        assert before["card"]["fees_pence"] == 80 + 30 + 28  # 2.9% + 30p, 1% platform
        url = f"{w.cloud_url}/v1/sites/{w.site}/settings/payments"
        owner = {"Authorization": f"Bearer {OWNER}"}
        for bad, why in (
            ({"card_percent": 2.9}, "card_percent must be a str"),  # a float cannot hold 2.9
            ({"card_percent": "abc"}, "percent"),
            ({"surcharge": "1"}, "not a site payment setting: surcharge"),
            ({"poll_s": 1.0}, "not a site payment setting: poll_s"),  # the box's own
            ({"pass_through": True}, "pass_through_banned"),  # unlawful in the UK
        ):
            async with w.http.put(url, json=bad, headers=owner) as resp:
                answer = await resp.json()
                assert resp.status == 400 and why in answer["error"]["message"], answer
        wanted = {"card_percent": "1.5", "card_fixed_pence": 20, "tip_presets": ["10", "15"]}
        async with w.http.put(url, json=wanted, headers=owner) as resp:
            assert resp.status == 200, await resp.text()
        async with w.http.get(url, headers=owner) as resp:
            assert (await resp.json())["payments"] == wanted

        async def applied() -> bool:
            sheet = await w.sheet(oid)
            card = next(t for t in sheet["tenders"] if t["tender"] == "card")
            return bool(card["fees_pence"] == 41 + 20 + 28)  # 1.5% rounded half up, + 20p

        await wait_until(applied, 20, "the owner's fees at the edge")
        sheet = await w.sheet(oid)
        assert [t["percent"] for t in sheet["tip_options"]] == ["10", "15"]
        # back to the edge's own settings
        async with w.http.put(url, json={}, headers=owner) as resp:
            assert resp.status == 200

        async def restored() -> bool:
            sheet = await w.sheet(oid)
            card = next(t for t in sheet["tenders"] if t["tender"] == "card")
            return bool(card["fees_pence"] == 80 + 30 + 28)

        await wait_until(restored, 20, "the edge's own fees again")

    run(tmp_path, pg_database, body)


def test_an_attempt_the_provider_never_had_is_given_up_and_frees_the_check(
    tmp_path: Path, pg_database: str
) -> None:
    """The edge recorded an attempt and stopped before it asked for the money: the provider
    never had it, so after ``abandon_after_s`` the poll gives it up and the balance is free."""

    async def body(w: World) -> None:
        oid = await w.order("soup")
        store = w.edge.store
        attempt = NewPayment(tender="bank", amount_pence=450)
        await store.transaction(
            lambda tx: payments.take_payment(
                tx, oid, attempt, "sam", "pay_never_sent", PaymentPolicy(), providers=True
            )
        )
        await wait_until(lambda: store.cursors().acked_through >= store.cursors().last_seq)
        watcher = w.edge.app[WATCHER_KEY]
        await watcher.poll_once()  # young: left pending
        assert (await w.sheet(oid))["payments"][0]["status"] == "pending"
        watcher.abandon_after_s = 0
        await watcher.poll_once()
        done = await w.settled(oid, lambda s: s["payments"][0]["status"] == "failed")
        assert done["payments"][0]["failure_code"] == "abandoned"
        assert done["balance_pence"] == 450 and w.bank.payments == {}

    run(tmp_path, pg_database, body)
