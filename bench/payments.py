"""Payments benchmark: checkout by card and by bank, end to end through the edge and the cloud.

Run ``.venv/bin/python bench/payments.py`` (``--checkouts N`` per tender, default 200).

Set-up, all on loopback in this process: a throwaway Postgres; the real cloud app over it,
with the simulated bank and Stripe (localstripe, a stateful fake Stripe server in a child
process) as its providers; the real edge app (SQLite file, uplink to the cloud) with a
paired tablet. Each checkout is one open order with two lines, paid whole.

What is measured, one checkout at a time (latency, not throughput):

- card: from the tablet's ``POST /v1/orders/{id}/payments`` (a card payment method, as a
  reader hands it over) to the payment recorded ``succeeded`` at the edge: the edge records
  the attempt and pushes it, the cloud creates and confirms the PaymentIntent, records the
  provider's answer, and the edge settles it when that reaches it by sync;
- bank: from the same request (pay by bank) through the guest approving on the bank's pay
  page (at once) to the payment recorded ``succeeded`` at the edge: the bank's signed webhook
  reaches the cloud, which records it, and the edge settles it by sync;
- webhook: the cloud's handling of each bank webhook (signature, dedupe, the row write).

Baselines from the same run: the providers called directly (localstripe create + confirm;
the bank's create + approve), cash checkout through the same edge route, and the bank's
signature check alone. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud.app import create_app as create_cloud_app  # noqa: E402
from cloud.config import CloudConfig, PaymentSettings  # noqa: E402
from cloud.payments import PaymentProviders  # noqa: E402
from cloud.pgtemp import TemporaryPostgres  # noqa: E402
from cloud.providers.simbank import SIGNATURE_HEADER, SimBank, SimBankProvider, sign  # noqa: E402
from cloud.providers.stripe_card import StripeCardProvider  # noqa: E402
from edge.api.auth import pair_device, start_session  # noqa: E402
from edge.app import STORE_KEY, create_app  # noqa: E402
from edge.config import CloudSettings, EdgeConfig, MdnsSettings  # noqa: E402
from edge.store import EdgeStore  # noqa: E402
from edge.tx import Event  # noqa: E402
from sync_protocol.changes import Op  # noqa: E402
from tests.api_harness import serving  # noqa: E402
from tests.localstripe_server import TEST_API_KEY, running_localstripe  # noqa: E402

ADMIN, BANK_KEY, HOOK = "bench-admin", "sk_bench", "whsec_bench"
LOCALSTRIPE_API = "2025-03-31.basil"  # the API version localstripe speaks


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def figures(name: str, seconds: list[float]) -> dict[str, float]:
    ms = [s * 1000 for s in seconds]
    out = {"p50_ms": round(statistics.median(ms), 2), "p99_ms": round(percentile(ms, 0.99), 2)}
    print(f"  {name:<50} p50 {out['p50_ms']:8.2f} ms   p99 {out['p99_ms']:8.2f} ms   (n={len(ms)})")
    return out


class Settled:
    """Futures resolved when the edge records a payment ``succeeded`` (its row events)."""

    def __init__(self, store: EdgeStore) -> None:
        self.waiting: dict[str, asyncio.Future[float]] = {}
        store.subscribe(self._on_events)

    def _on_events(self, events: list[Event]) -> None:
        now = time.perf_counter()
        for event in events:
            if event.topic != "row" or '"payments"' not in event.data[:40]:
                continue
            data = json.loads(event.data)
            row = data.get("row") or {}
            future = self.waiting.get(data["id"])
            if row.get("status") == "succeeded" and future is not None and not future.done():
                future.set_result(now)

    def expect(self, payment_id: str) -> asyncio.Future[float]:
        future = self.waiting[payment_id] = asyncio.get_running_loop().create_future()
        return future


async def bench(checkouts: int) -> dict[str, Any]:
    pg = TemporaryPostgres(fast=True)
    await asyncio.to_thread(pg.start)
    workdir = Path(tempfile.mkdtemp(prefix="fynlo-bench-payments-"))
    providers = PaymentProviders()
    config = CloudConfig(
        port=0, dsn=pg.dsn, admin_token=ADMIN, payments=PaymentSettings(bank="off")
    )
    try:
        with running_localstripe() as stripe_url:
            async with (
                aiohttp.ClientSession() as http,
                serving(create_cloud_app(config, providers=providers)) as cloud_url,
            ):
                bank = SimBank(secret_key=BANK_KEY, webhook_secret=HOOK,
                               webhook_url=f"{cloud_url}/webhooks/simbank")  # fmt: skip
                async with serving(bank.app) as bank_url:
                    bank.public_url = bank_url
                    providers.bank = SimBankProvider(bank_url, BANK_KEY, HOOK, http)
                    providers.card = StripeCardProvider(
                        TEST_API_KEY, "whsec_card", api_base=stripe_url, session=http,
                        stripe_version=LOCALSTRIPE_API, max_network_retries=0,
                        descriptions=False,
                    )  # fmt: skip
                    return await run_phases(
                        http, cloud_url, bank, bank_url, providers, workdir, checkouts
                    )
    finally:
        await asyncio.to_thread(pg.stop)


async def run_phases(
    http: aiohttp.ClientSession,
    cloud_url: str,
    bank: SimBank,
    bank_url: str,
    providers: PaymentProviders,
    workdir: Path,
    checkouts: int,
) -> dict[str, Any]:
    owner = {"Authorization": f"Bearer {ADMIN}"}
    async with http.post(f"{cloud_url}/v1/sites", json={"name": "Bench"}, headers=owner) as r:
        site = (await r.json())["site_id"]
    async with http.post(
        f"{cloud_url}/v1/sites/{site}/devices", json={"name": "edge"}, headers=owner
    ) as r:
        device = await r.json()
    settings = EdgeConfig(
        db_path=str(workdir / "edge.sqlite"), site_id=site, node_id=device["node_id"],
        mdns=MdnsSettings(enabled=False), access_log="off",
        cloud=CloudSettings(url=cloud_url, token=device["token"]),
    )  # fmt: skip
    app = create_app(settings)
    async with serving(app) as edge_url:
        store = app[STORE_KEY]
        headers = await seed(store)
        settled = Settled(store)

        async def checkout(tender: str, extra: dict[str, Any]) -> tuple[float, float]:
            async with http.post(f"{edge_url}/v1/orders", json={"table_name": "T1", "covers": 2},
                                 headers=headers) as r:  # fmt: skip
                order = await r.json()
                assert r.status == 201, order
            for item in ("steak", "ipa"):
                async with http.post(f"{edge_url}/v1/orders/{order['id']}/lines",
                                     json={"item_id": item}, headers=headers) as r:  # fmt: skip
                    assert r.status == 201, await r.text()
            start = time.perf_counter()
            async with http.post(
                f"{edge_url}/v1/orders/{order['id']}/payments", headers=headers,
                json={"tender": tender, "amount_pence": 2750, **extra},
            ) as r:  # fmt: skip
                sheet = await r.json()
                assert r.status == 201, sheet
            payment = sheet["payments"][-1]
            if tender == "cash":
                return start, time.perf_counter()
            done = settled.expect(payment["id"])
            if payment["status"] == "succeeded":
                return start, time.perf_counter()
            if tender == "bank":
                async with http.post(f"{payment['action_url']}/approve") as r:
                    assert r.status == 200
            return start, await asyncio.wait_for(done, 30)

        async with http.post(f"{edge_url}/v1/tills", json={"name": "Bar", "float_pence": 0},
                             headers=headers) as r:  # fmt: skip
            till = (await r.json())["id"]

        results: dict[str, Any] = {}
        print(f"payments benchmark: {checkouts} checkouts per tender, one at a time", flush=True)
        print("end to end (tablet request -> payment recorded at the edge):")
        for name, tender, extra in (
            ("cash (edge only, baseline)", "cash", {"till_id": till}),
            ("card: edge -> cloud -> Stripe, settled", "card", {"payment_method": "pm_card_visa"}),
            ("bank: edge -> cloud -> bank -> webhook, settled", "bank", {}),
        ):
            await measure(checkout, tender, extra, 5)  # warm up
            samples = await measure(checkout, tender, extra, checkouts)
            results[tender] = figures(name, samples)
        await bank.idle()
        webhooks = list(providers.webhook_seconds[-checkouts:])  # the bank checkouts' own
        # the baselines' payments are unknown to the cloud: their webhooks are only logged
        logging.getLogger("cloud.payments").setLevel(logging.ERROR)

        print("baselines (the providers alone):")
        card_direct = await timed(checkouts, lambda i: card_direct_once(providers, i))
        results["card_provider"] = figures("Stripe create + confirm, called directly", card_direct)
        bank_direct = await timed(checkouts, lambda i: bank_direct_once(providers, http, i))
        results["bank_provider"] = figures("bank create + approve, called directly", bank_direct)
        results["webhook"] = figures("webhook handling at the cloud (bank checkouts)", webhooks)
        body = json.dumps(next(iter(bank.events.values()))).encode()
        verify = []
        for _ in range(checkouts):
            header = {SIGNATURE_HEADER: sign(HOOK, body, int(time.time()))}
            t0 = time.perf_counter()
            providers.bank.verify_webhook(body, header)  # type: ignore[union-attr]
            verify.append(time.perf_counter() - t0)
        results["webhook_verify"] = figures("webhook signature check alone", verify)
        await bank.idle()
    return results


async def measure(
    checkout: Callable[[str, dict[str, Any]], Awaitable[tuple[float, float]]],
    tender: str,
    extra: dict[str, Any],
    n: int,
) -> list[float]:
    out = []
    for _ in range(n):
        start, end = await checkout(tender, extra)
        out.append(end - start)
    return out


async def timed(n: int, once: Callable[[int], Awaitable[None]]) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        await once(i)
        out.append(time.perf_counter() - t0)
    return out


async def card_direct_once(providers: PaymentProviders, i: int) -> None:
    card = providers.card
    assert isinstance(card, StripeCardProvider)
    created = await card.create(f"direct-card-{i}", 2750, "GBP")
    await card.confirm(created.provider_ref, "pm_card_visa")


async def bank_direct_once(
    providers: PaymentProviders, http: aiohttp.ClientSession, i: int
) -> None:
    bank = providers.bank
    assert bank is not None
    created = await bank.create(f"direct-bank-{i}", 2750, "GBP")
    async with http.post(f"{created.action_url}/approve") as r:
        assert r.status == 200


async def seed(store: EdgeStore) -> dict[str, str]:
    """A server, a menu and a paired tablet; returns the tablet's request headers."""
    await store.write_many(
        [
            ("employees", "sam", Op.INSERT, {"name": "Sam", "role_id": "manager"}),
            ("menu_items", "steak", Op.INSERT, {"name": "Steak", "price_pence": 2200}),
            ("menu_items", "ipa", Op.INSERT, {"name": "IPA", "price_pence": 550}),
        ]
    )
    device_id, token = await store.transaction(lambda tx: pair_device(tx, "till", "tablet", None))
    _, access, _, _ = await store.transaction(lambda tx: start_session(tx, "sam", device_id))
    return {"X-Fynlo-Device": token, "Authorization": f"Bearer {access}"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkouts", type=int, default=200, help="checkouts per tender")
    ns = parser.parse_args()
    results = asyncio.run(bench(ns.checkouts))
    summary = {
        "card_checkout_p50_ms": results["card"]["p50_ms"],
        "card_checkout_p99_ms": results["card"]["p99_ms"],
        "bank_checkout_p50_ms": results["bank"]["p50_ms"],
        "bank_checkout_p99_ms": results["bank"]["p99_ms"],
        "webhook_p50_ms": results["webhook"]["p50_ms"],
        "webhook_p99_ms": results["webhook"]["p99_ms"],
        "cash_checkout_p99_ms": results["cash"]["p99_ms"],
        "card_provider_direct_p99_ms": results["card_provider"]["p99_ms"],
        "bank_provider_direct_p99_ms": results["bank_provider"]["p99_ms"],
        "webhook_verify_p99_ms": results["webhook_verify"]["p99_ms"],
        "targets": {"checkout_p99_ms": 300, "webhook_p99_ms": 20},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
