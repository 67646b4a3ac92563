"""The edge's way to card and bank money: the cloud's payment endpoints, and a watcher.

How it works. The edge holds no provider keys. ``CloudPayments`` calls the cloud's device
endpoints (``cloud.payments``) with the edge's own sync credential, msgpack both ways. A
call the cloud cannot be reached for (no network, a timeout, 502-504) is ``GatewayOffline``;
a refusal (a decline, an unknown payment) is ``GatewayRefused`` with the cloud's stable code.

Before it asks for money the edge makes sure the cloud holds the attempt: ``wait_pushed``
waits until the uplink has had the attempt's change acknowledged, a few milliseconds online.
Not acknowledged in ``push_timeout_s`` means the cloud is out of reach: the attempt is
marked failed and the till is told it is offline, so cash is taken instead.

``ask_provider`` is the one way an attempt recorded ``pending`` is taken (the tablet route
and the demo's cashier both call it); ``send_refund`` carries out a pending refund.

``PaymentWatcher`` (built by ``payment_watcher``) settles attempts as the provider's view of them arrives through sync
(``payments.provider_state``, written by the cloud from a webhook, a poll or an answer):
it subscribes to the store's row events and runs ``edge.payments.settle`` for each payment
whose provider state moved. As a backstop for a lost webhook it asks the cloud to read every
still-pending attempt again every ``poll_s`` seconds; an attempt the provider never heard of
(the edge stopped between recording it and asking for it) is given up after
``abandon_after_s``. A refund the settle starts (a bank payment completing after the till
fell back to card) is sent to the provider the same way. Each poll (and the start) also
settles any attempt whose till record still lags its provider's, and sends again every
refund still pending: the provider takes a refund once by its id, and one whose answer
already came by sync is just recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import msgpack

from . import payments
from .errors import ApiCode, ApiError
from .store import EdgeStore, wall_clock_ms
from .tx import Event

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-msgpack"


class GatewayOffline(Exception):
    """The cloud could not be reached: whether it took the money is not known yet."""


class GatewayRefused(Exception):
    """The cloud or the provider refused the call; ``code`` is stable."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class CloudPayments:
    """A client for the cloud's payment endpoints, with the edge's sync credential."""

    def __init__(
        self,
        url: str,
        token: str,
        timeout_s: float = 10.0,
        *,
        push_timeout_s: float = 3.0,
        online: Callable[[], bool] = lambda: True,
    ) -> None:
        self.url = url.rstrip("/")
        self.push_timeout_s = push_timeout_s
        #: whether the uplink is talking to the cloud now (no: refuse at once, take cash)
        self.online = online
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                timeout=self._timeout, headers={"Authorization": f"Bearer {self._token}"}
            )
        data = None if body is None else msgpack.packb(body)
        headers = {"Content-Type": CONTENT_TYPE} if data is not None else {}
        try:
            async with self._http.request(
                method, self.url + path, data=data, headers=headers
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise GatewayOffline(f"the cloud is out of reach: {exc!r}") from None
        if status in (502, 503, 504) and not raw:
            raise GatewayOffline(f"the cloud answered {status}")
        try:
            answer = msgpack.unpackb(raw, raw=False) if raw else {}
        except (ValueError, msgpack.UnpackException):
            raise GatewayOffline(f"the cloud answered {status} with an unreadable body") from None
        if status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            code = str(error.get("code", "error"))
            if code in ("provider_unavailable", "unavailable"):
                raise GatewayOffline(str(error.get("message", code)))
            raise GatewayRefused(
                status, code, str(error.get("message", "")), dict(error.get("details") or {})
            )
        return answer

    async def create(
        self, payment_id: str, currency: str, description: str, payment_method: str | None = None
    ) -> dict[str, Any]:
        """Ask the provider for the money of an attempt the cloud holds (a card: with the
        payment method the reader gave, confirmed at once)."""
        body = {"payment_id": payment_id, "currency": currency, "description": description}
        if payment_method is not None:
            body["payment_method"] = payment_method
        answer: dict[str, Any] = await self._call("POST", "/v1/sync/payments", body)
        return answer

    async def read(self, payment_id: str, tender: str) -> dict[str, Any]:
        """The provider's payment for an attempt, read afresh (and recorded by the cloud)."""
        answer: dict[str, Any] = await self._call(
            "GET", f"/v1/sync/payments/{payment_id}?tender={tender}"
        )
        return answer

    async def cancel(self, payment_id: str, tender: str) -> dict[str, Any]:
        """Cancel an attempt that has not completed."""
        answer: dict[str, Any] = await self._call(
            "POST", f"/v1/sync/payments/{payment_id}/cancel", {"tender": tender}
        )
        return answer

    async def refund(
        self, refund_id: str, payment_id: str, tender: str, amount_pence: int
    ) -> dict[str, Any]:
        """Give back ``amount_pence`` of a completed payment."""
        body = {
            "refund_id": refund_id,
            "payment_id": payment_id,
            "tender": tender,
            "amount_pence": amount_pence,
        }
        answer: dict[str, Any] = await self._call("POST", "/v1/sync/refunds", body)
        return answer

    async def applepay_session(self, validation_url: str) -> dict[str, Any]:
        """An Apple Pay merchant session for a guest's browser (the cloud holds the keys)."""
        answer = await self._call(
            "POST", "/v1/sync/applepay/session", {"validation_url": validation_url}
        )
        session: dict[str, Any] = answer.get("session", {})
        return session


async def wait_pushed(store: EdgeStore, seq: int, timeout_s: float) -> bool:
    """Whether the cloud acknowledged this node's change ``seq`` within ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while store.cursors().acked_through < seq:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.005)
    return True


class PaymentWatcher:
    """Settles attempts as the provider's view arrives, and polls the ones still pending."""

    def __init__(
        self,
        store: EdgeStore,
        gateway: CloudPayments,
        settle: Callable[[str], Awaitable[list[str]]],
        start_refund: Callable[[str], Awaitable[None]],
        abandon: Callable[[str], Awaitable[Any]],
        *,
        poll_s: float = 5.0,
        abandon_after_s: float = 120.0,
    ) -> None:
        self.store = store
        self.gateway = gateway
        self._settle = settle
        self._start_refund = start_refund
        self._abandon = abandon
        self.poll_s = poll_s
        self.abandon_after_s = abandon_after_s
        self._queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self) -> None:
        """Start watching (and settle whatever arrived while the edge was down)."""
        self._unsubscribe = self.store.subscribe(self._on_events)
        self._tasks = [
            asyncio.create_task(self._work(), name="fynlo-payments-settle"),
            asyncio.create_task(self._poll(), name="fynlo-payments-poll"),
        ]
        await self._unsettled()

    async def _unsettled(self) -> None:
        """Queue every attempt whose till record lags its provider's, and every refund not
        yet sent (what arrived while the edge was down, or a settle that failed)."""
        for row in await self.store.query(
            "SELECT id FROM payments WHERE provider_state IS NOT NULL"
            " AND provider_state != coalesce(status, '')"
        ):
            self._queue.put_nowait(("payment", row[0]))
        for row in await self.store.query("SELECT id FROM refunds WHERE status = 'pending'"):
            self._queue.put_nowait(("refund", row[0]))

    async def stop(self) -> None:
        """Stop watching."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            if event.topic != "row" or '"table":"payments"' not in event.data[:40]:
                continue
            data = json.loads(event.data)
            row = data.get("row") or {}
            if row.get("provider_state") and row.get("provider_state") != row.get("status"):
                self._queue.put_nowait(("payment", data["id"]))

    def refund_later(self, refund_id: str) -> None:
        """Send a refund the till recorded to the provider (from the worker)."""
        self._queue.put_nowait(("refund", refund_id))

    async def _work(self) -> None:
        while True:
            kind, pk = await self._queue.get()
            try:
                if kind == "payment":
                    for refund_id in await self._settle(pk):
                        self._queue.put_nowait(("refund", refund_id))
                elif kind == "refund":
                    await self._start_refund(pk)
                else:
                    await self._abandon(pk)
            except asyncio.CancelledError:
                raise
            except GatewayOffline:
                await asyncio.sleep(1.0)
                self._queue.put_nowait((kind, pk))  # offline: try again
            except Exception:
                log.exception("settling %s %s failed", kind, pk)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            with contextlib.suppress(Exception):
                await self.poll_once()

    async def poll_once(self) -> None:
        """Settle what lags, then ask the cloud to read every pending attempt again (its
        answer comes by sync)."""
        await self._unsettled()
        rows = await self.store.query(
            "SELECT id, tender, created_at_ms FROM payments WHERE status = 'pending'"
        )
        for payment_id, tender, created in rows:
            try:
                await self.gateway.read(payment_id, tender)
            except GatewayOffline:
                return
            except GatewayRefused as refused:
                age_s = (wall_clock_ms() - (created or 0)) / 1000
                if refused.code in ("unknown_payment", "payment_not_synced") and (
                    age_s > self.abandon_after_s
                ):
                    self._queue.put_nowait(("abandon", payment_id))


async def ask_provider(
    store: EdgeStore,
    gateway: CloudPayments,
    order_id: str,
    payment_id: str,
    payment_method: str | None = None,
) -> dict[str, Any]:
    """Have the cloud's provider take a pending attempt (once the cloud holds it); returns its
    answer. Gives the attempt up (``failed``, ``cancelled`` or ``expired``) when that cannot be
    done: ``503 payments_offline`` when the cloud is out of reach, ``402 payment_declined``."""

    async def give_up(state: str, code: str) -> None:
        await store.transaction(lambda tx: payments.end_attempt(tx, payment_id, state, code))

    if not await wait_pushed(store, store.cursors().last_seq, gateway.push_timeout_s):
        await give_up("failed", "offline")
        raise ApiError(ApiCode.PAYMENTS_OFFLINE)
    order = await store.get("orders", order_id) or {}
    currency = str(order.get("currency") or "GBP")
    description = f"Check {order.get('check_number')!s}"
    try:
        answer = await gateway.create(payment_id, currency, description, payment_method)
    except GatewayOffline:
        await give_up("failed", "offline")
        raise ApiError(ApiCode.PAYMENTS_OFFLINE) from None
    except GatewayRefused as refused:
        code = str(refused.details.get("provider_code") or refused.code)
        await give_up("failed", code)
        raise ApiError(ApiCode.PAYMENT_DECLINED, refused.message, reason=code) from None
    if answer.get("state") in ("failed", "cancelled", "expired"):
        await give_up(str(answer["state"]), str(answer.get("failure_code") or answer["state"]))
    return answer


async def send_refund(store: EdgeStore, gateway: CloudPayments, refund_id: str) -> None:
    """Have the provider carry out a pending refund and record what it did (``GatewayOffline``
    when the cloud is out of reach: it stays pending, to be sent again)."""
    refund = await store.get("refunds", refund_id)
    if refund is None or refund.get("status") != "pending":
        return
    known = refund.get("provider_state")
    if known in ("succeeded", "failed"):  # the provider's answer came by sync: record it
        await store.transaction(lambda tx: payments.finish_refund(tx, refund_id, str(known), None))
        return
    if not await wait_pushed(store, store.cursors().last_seq, gateway.push_timeout_s):
        raise GatewayOffline("the refund did not reach the cloud")
    try:
        answer = await gateway.refund(
            refund_id,
            str(refund["payment_id"]),
            str(refund["tender"]),
            int(refund["amount_pence"] or 0),
        )
        state, code = str(answer.get("state")), None
    except GatewayRefused as refused:
        state, code = "failed", str(refused.details.get("provider_code") or refused.code)
    await store.transaction(lambda tx: payments.finish_refund(tx, refund_id, state, code))


def payment_watcher(store: EdgeStore, gateway: CloudPayments, **options: Any) -> PaymentWatcher:
    """The watcher that settles this edge's card and bank payments."""

    async def settle(payment_id: str) -> list[str]:
        # One late-payment refund per payment at most, by its id: a retried settle cannot
        # start a second.
        refund_id = f"ref_late_{payment_id}"
        return await store.transaction(lambda tx: payments.settle(tx, payment_id, refund_id))

    async def abandon(payment_id: str) -> None:
        await store.transaction(
            lambda tx: payments.end_attempt(tx, payment_id, "failed", "abandoned")
        )

    async def refund(refund_id: str) -> None:
        await send_refund(store, gateway, refund_id)

    return PaymentWatcher(store, gateway, settle, refund, abandon, **options)
