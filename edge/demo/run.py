"""``fynlo-demo``: a cloud and an edge on this machine, syncing under load, with live status.

How it works. The cloud is a child process (``python -m cloud run``: the edge never imports
the cloud) in a session of its own, configured by ``FYNLO_CLOUD_*`` variables: a free port, a
generated owner token and no DSN, so it runs (and at exit deletes) a throwaway Postgres. The
demo registers a site and a device and seeds a menu and stock through the owner API, runs the
real edge app (``create_app``: store, uplink, status endpoint) on a fresh SQLite file, and
starts the load: tablets writing orders, an owner editing prices in the cloud, a cashier
paying the oldest open check every second (by bank through the cloud's simulated bank while
the link is up, in cash while it is down), and an outage
(``--offline-at``/``--online-at`` stop and restart the uplink). At the end the load stops,
the uplink drains both ways, the per-table checksums of edge and cloud are compared, the edge
closes and the cloud is terminated. Exit status 0 means every checksum matched.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import itertools
import logging
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from shared import eventloop
from shared.config import ConfigError
from sync_protocol.changes import Op, Value

from .. import payments, tills
from ..api.auth import new_id
from ..api.payment_routes import GATEWAY
from ..app import STORE_KEY, UPLINK_KEY, create_app, status_body
from ..config import DEFAULT_PATH, CloudSettings, EdgeConfig, load_edge_config
from ..errors import ApiError
from ..payment_gateway import CloudPayments, GatewayOffline, GatewayRefused, ask_provider
from ..payments import NewPayment, PaymentPolicy
from ..store import EdgeStore, Write, wall_clock_ms
from ..uplink import Uplink
from .cloud_process import (
    DELIVERY,
    MENU,
    PAR_LEVEL,
    STOCK_START,
    CloudProcess,
    Owner,
    change,
    deliveries,
    free_port,
    seed,
)
from .common import (
    CLOUD_START_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    EXIT_INTERRUPTED,
    HOST,
    OWNER_EVERY_S,
    PAY_EVERY_S,
    SEED_TIMEOUT_S,
    SITE_ID,
    TABLETS,
    DemoError,
    Sums,
)
from .console import Console, Result, status_line, summary

log = logging.getLogger(__name__)


# -- options ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """The command line, checked."""

    seconds: float | None
    rate: float
    offline_at: float | None
    online_at: float | None
    data: Path | None
    stock: int = STOCK_START


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {text!r}")
    return value


def parse_options(argv: list[str] | None = None) -> Options:
    """Parse and check the command line (exits 2 with a message when it is wrong)."""
    parser = argparse.ArgumentParser(
        prog="fynlo-demo",
        description="A local cloud (throwaway Postgres) and an edge (SQLite) syncing under "
        "simulated load, with a live status line.",
    )
    add = parser.add_argument
    add("--seconds", type=_seconds, metavar="N", help="stop after N seconds (default: Ctrl-C)")
    add("--rate", type=float, default=2.0, help="orders a second, all tablets (default: 2)")
    add("--offline-at", type=_seconds, metavar="S", help="stop the uplink S seconds in")
    add("--online-at", type=_seconds, metavar="S", help="restart it S seconds in (default: end)")
    add("--data", type=Path, metavar="DIR", help="keep the database and logs in DIR")
    add(
        "--stock",
        type=int,
        default=STOCK_START,
        metavar="N",
        help=f"opening portions of each item (default: {STOCK_START}); the owner books a "
        f"delivery of {DELIVERY} for any the cloud sees below {PAR_LEVEL}",
    )
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 1000:
        parser.error("--rate must be above 0 and at most 1000")
    if not 0 <= args.stock <= 1_000_000:
        parser.error("--stock must be from 0 to 1000000")
    if args.online_at is not None and args.offline_at is None:
        parser.error("--online-at needs --offline-at")
    if args.online_at is not None and args.online_at <= args.offline_at:
        parser.error("--online-at must be later than --offline-at")
    return Options(args.seconds, args.rate, args.offline_at, args.online_at, args.data, args.stock)


# -- the run ----------------------------------------------------------------------------------


class Demo:
    """One run: set up, load, drain, compare. The caller starts and stops the cloud."""

    def __init__(
        self, options: Options, console: Console, cloud: CloudProcess, workdir: Path
    ) -> None:
        self.options, self.console, self.cloud, self.workdir = options, console, cloud, workdir
        self.result = Result()
        self.stopping = asyncio.Event()
        self._rng = random.Random()
        self._t0: float | None = None
        self._checks = 0
        self._tasks: set[asyncio.Task[None]] = set()  #: running background tasks
        self._spawn_cashier: Callable[[], None] = lambda: None

    def stop(self, reason: str, error: str | None = None) -> None:
        """Stop the load; the first reason given is the one reported."""
        if not self.stopping.is_set():
            self.result.reason, self.result.error = reason, error
            self.stopping.set()

    def elapsed(self) -> float:
        """Seconds since the load started."""
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def event(self, text: str) -> None:
        """Print a timestamped event line."""
        self.console.line(f"t={self.elapsed():3.0f}s  {text}")

    def _spawn(self, name: str, body: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(body, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.add(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)
            self.stop("an error", f"{task.get_name()}: {exc!r}")

    async def _sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; returns True (at once) when the demo is stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def _until(
        self, ready: Callable[[], Awaitable[bool]], timeout_s: float, every_s: float = 0.02
    ) -> float | None:
        """Poll ``ready`` until it holds; returns the seconds it took, or None on timeout."""
        started = time.monotonic()
        while not await ready():
            if time.monotonic() - started > timeout_s:
                return None
            await asyncio.sleep(every_s)
        return time.monotonic() - started

    async def _cancel(self, keep_status: bool = False) -> None:
        """Cancel the background tasks (not the status ticker, if asked) and wait for them."""
        tasks = [t for t in self._tasks if not (keep_status and t.get_name() == "status")]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- set-up ------------------------------------------------------------------------------

    async def run(self, edge_config: EdgeConfig) -> Result:
        """Run until stopped; returns what the summary reports."""
        async with aiohttp.ClientSession() as http:
            owner = Owner(http, self.cloud.url, self.cloud.token)
            await self._wait_for_cloud(http)
            await owner.call("POST", "/v1/sites", {"name": "Demo Bistro", "site_id": SITE_ID})
            device = await owner.call("POST", f"/v1/sites/{SITE_ID}/devices", {"name": "till"})
            seed_rev = await owner.write(*seed(self.options.stock))
            self.console.line(
                f"site {SITE_ID!r} and edge node {device['node_id']} registered; "
                f"menu ({len(MENU)} items) and stock seeded in the cloud"
            )
            config = dataclasses.replace(
                edge_config,
                db_path=str(self.workdir / "edge.sqlite"),
                host=HOST,
                port=free_port(edge_config.port),  # known before mDNS announces it
                site_id=SITE_ID,
                node_id="",
                cloud=CloudSettings(url=self.cloud.url, token=device["token"]),
                mdns=dataclasses.replace(edge_config.mdns, name="Demo Bistro", interfaces=()),
            )
            runner = web.AppRunner(create_app(config), access_log=None)
            await runner.setup()  # opens the store, starts the uplink, announces the edge
            try:
                port = config.port
                try:
                    await web.TCPSite(runner, HOST, port).start()
                except OSError as exc:
                    raise DemoError(f"the edge cannot listen on {HOST}:{port}: {exc}") from None
                store, uplink = runner.app[STORE_KEY], runner.app[UPLINK_KEY]
                self.console.line(
                    f"edge: {config.db_path}, status at http://{HOST}:{port}/v1/sync/status"
                )
                await self._wait_for_seed(store, uplink, seed_rev)
                self._spawn_cashier = lambda: self._spawn(
                    "cashier", self._cashier(store, runner.app.get(GATEWAY), uplink, http)
                )
                await self._load(owner, store, uplink)
                await self._finish(owner, store, uplink)
            finally:
                await self._cancel()
                await runner.cleanup()  # stops the uplink, then closes the store
        return self.result

    async def _wait_for_cloud(self, http: aiohttp.ClientSession) -> None:
        self.console.line(f"starting the cloud: python -m cloud run (port {self.cloud.port})")

        async def healthy() -> bool:
            if self.stopping.is_set():
                raise DemoError("interrupted while the cloud was starting")
            if (code := self.cloud.exit_code()) is not None:
                raise DemoError(
                    f"the cloud exited with status {code} before it was ready; its stderr "
                    f"ends with:\n{self.cloud.stderr_tail()}"
                )
            try:
                timeout = aiohttp.ClientTimeout(total=2)
                async with http.get(self.cloud.url + "/healthz", timeout=timeout) as resp:
                    return resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        took = await self._until(healthy, CLOUD_START_TIMEOUT_S, every_s=0.1)
        if took is None:
            raise DemoError(
                f"the cloud did not answer /healthz within {CLOUD_START_TIMEOUT_S:.0f} s; its "
                f"stderr ends with:\n{self.cloud.stderr_tail()}"
            )
        self.console.line(
            f"cloud up in {took:.1f} s at {self.cloud.url} (owner token {self.cloud.token})"
        )

    async def _wait_for_seed(self, store: EdgeStore, uplink: Uplink, seed_rev: int) -> None:
        async def pulled() -> bool:
            return store.cursors().pull_cursor >= seed_rev

        took = await self._until(pulled, SEED_TIMEOUT_S)
        if took is None:
            error = uplink.status().last_error
            why = f" (last error: {error.code}: {error.message})" if error else ""
            raise DemoError(f"the edge did not pull the menu in {SEED_TIMEOUT_S:.0f} s{why}")
        self.console.line(f"edge pulled the menu and stock in {took * 1000:.0f} ms")

    # -- load --------------------------------------------------------------------------------

    async def _load(self, owner: Owner, store: EdgeStore, uplink: Uplink) -> None:
        opts = self.options
        plan = [
            f"{TABLETS} tablets, {opts.rate:g} orders/s",
            f"owner edits every {OWNER_EVERY_S:g} s",
        ]
        if opts.offline_at is not None:
            until = "the end" if opts.online_at is None else f"t={opts.online_at:g}s"
            plan.append(f"link down from t={opts.offline_at:g}s to {until}")
        plan.append("Ctrl-C stops" if opts.seconds is None else f"stop at t={opts.seconds:g}s")
        self.console.line("running: " + "; ".join(plan))
        self._t0 = time.monotonic()
        for n in range(1, TABLETS + 1):
            self._spawn(f"tablet-{n}", self._tablet(store, f"tablet-{n}"))
        self._spawn("owner", self._owner(owner, store))
        self._spawn_cashier()
        self._spawn("outage", self._outage(uplink))
        self._spawn("status", self._ticker(owner, store, uplink))
        if opts.seconds is not None and not await self._sleep(opts.seconds):
            self.stop(f"--seconds {opts.seconds:g}")
        await self.stopping.wait()
        self.result.ran_s = self.elapsed()
        await self._cancel(keep_status=True)

    async def _tablet(self, store: EdgeStore, name: str) -> None:
        rng = random.Random(self._rng.random())
        mean_gap = TABLETS / self.options.rate
        while not await self._sleep(rng.uniform(0.5, 1.5) * mean_gap):
            await self._order(store, rng, name)

    async def _order(self, store: EdgeStore, rng: random.Random, tablet: str) -> None:
        """Write one order, its lines and their stock deltas in one transaction."""
        menu, stock = await store.rows("menu_items"), await store.rows("stock_levels")
        now, order_id = wall_clock_ms(), f"ord-{uuid.uuid4().hex[:12]}"
        writes: list[Write] = []
        for seat in range(1, rng.randint(1, 3) + 1):
            item_id, quantity = rng.choice(sorted(menu)), rng.choice((1, 1, 1, 2))
            if int(stock.get(item_id, {}).get("on_hand") or 0) < quantity:
                continue  # 86'd: none left to sell
            line: dict[str, Value] = {
                "order_id": order_id, "item_id": item_id, "name": menu[item_id]["name"],
                "quantity": quantity, "unit_price_pence": menu[item_id]["price_pence"],
                "modifiers": "[]", "course": 1, "seat": seat, "added_by": tablet,
                "added_at_ms": now, "voided": False,
            }  # fmt: skip
            writes.append(("order_lines", f"{order_id}-{seat}", Op.INSERT, line))
            writes.append(("stock_levels", item_id, Op.UPDATE, {"on_hand": -quantity}))
        if not writes:
            return
        self._checks += 1
        header: dict[str, Value] = {
            "check_number": self._checks, "business_day": date.today().isoformat(),
            "opened_at_ms": now, "currency": "GBP", "table_name": f"T{rng.randint(1, 20)}",
            "covers": rng.randint(1, 6), "server_id": tablet, "status": "open",
        }  # fmt: skip
        done = await store.write_many([("orders", order_id, Op.INSERT, header), *writes])
        self.result.orders += 1
        self.result.lines += len(writes) // 2
        self.result.changes += len(done)

    async def _owner(self, owner: Owner, store: EdgeStore) -> None:
        prices = {item: price for item, _, _, price, _ in MENU}
        names = {item: name for item, _, name, _, _ in MENU}
        for turn in itertools.count():
            if await self._sleep(OWNER_EVERY_S):
                return
            item_id = MENU[turn % len(MENU)][0]
            old = prices[item_id]
            prices[item_id] = new = max(100, old + self._rng.choice((-20, -10, 10, 20, 30)))
            rev = await owner.write(change("menu_items", item_id, "update", price_pence=new))
            self.result.owner_edits += 1
            self.event(f"owner: {names[item_id]} {old}p -> {new}p in the cloud (rev {rev})")
            self._spawn("price", self._watch_price(store, rev, names[item_id], new))
            await self._restock(owner, names)

    async def _cashier(
        self,
        store: EdgeStore,
        gateway: CloudPayments | None,
        uplink: Uplink,
        http: aiohttp.ClientSession,
    ) -> None:
        """Settle the oldest open check every ``PAY_EVERY_S``: by bank while the cloud is
        reachable (the guest approves on the simulated bank's page at once; the bank's
        webhook reaches the cloud, and the edge settles the check when the payment's row
        comes back by sync), in cash into the till otherwise."""
        policy = PaymentPolicy()
        till = await store.transaction(
            lambda tx: tills.open_till(
                tx, tills.OpenTill("Front", 10_000), "cashier", new_id("till")
            )
        )
        while not await self._sleep(PAY_EVERY_S):
            await self._pay_oldest(store, gateway, http, till.id, policy)

    async def _pay_oldest(
        self,
        store: EdgeStore,
        gateway: CloudPayments | None,
        http: aiohttp.ClientSession,
        till_id: str,
        policy: PaymentPolicy,
    ) -> None:
        rows = await store.query(
            "SELECT id, check_number FROM orders WHERE status = 'open'"
            " ORDER BY opened_at_ms LIMIT 1"
        )
        if not rows:
            return
        order_id, number = rows[0]
        sheet = await store.transaction(lambda tx: payments.checkout(tx, order_id, policy))
        due = sheet.balance_pence - sum(
            p.amount_pence for p in sheet.payments if p.status == "pending"
        )
        if due <= 0:
            return
        amount = f"£{due / 100:.2f}"
        if gateway is not None and gateway.online():
            took = await self._pay_by_bank(store, gateway, http, order_id, due, policy)
            if took is not None:
                self.result.paid_by_bank += 1
                self.event(
                    f"cashier: check {number} {amount} paid by bank (QR); settled at the "
                    f"edge {took * 1000:.0f} ms after the guest approved"
                )
                return
            why = "the bank payment did not complete"
        else:
            why = "link down: card and bank are refused, cash goes on"
        new = NewPayment(tender="cash", amount_pence=due, till_id=till_id)
        await store.transaction(
            lambda tx: payments.take_payment(tx, order_id, new, "cashier", new_id("pay"), policy)
        )
        self.result.paid_in_cash += 1
        self.event(f"cashier: check {number} {amount} paid in cash ({why})")

    async def _pay_by_bank(
        self,
        store: EdgeStore,
        gateway: CloudPayments,
        http: aiohttp.ClientSession,
        order_id: str,
        due: int,
        policy: PaymentPolicy,
    ) -> float | None:
        """One bank payment; the seconds from the guest's approval to the check paid at the
        edge, or None when it did not complete (the attempt is then given up)."""
        payment_id = new_id("pay")
        new = NewPayment(tender="bank", amount_pence=due)
        await store.transaction(
            lambda tx: payments.take_payment(
                tx, order_id, new, "cashier", payment_id, policy, providers=True
            )
        )
        try:
            answer = await ask_provider(store, gateway, order_id, payment_id)
            async with http.post(f"{answer['action_url']}/approve") as page:
                approved = page.status == 200
        except (ApiError, aiohttp.ClientError, KeyError, TimeoutError):
            approved = False
        if approved:
            started = time.monotonic()

            async def settled() -> bool:
                row = await store.get("payments", payment_id)
                return row is not None and row.get("status") == "succeeded"

            took = await self._until(settled, 30.0)
            if took is not None:
                return time.monotonic() - started
        with contextlib.suppress(ApiError, GatewayOffline, GatewayRefused):
            await gateway.cancel(payment_id, "bank")
        await store.transaction(
            lambda tx: payments.end_attempt(tx, payment_id, "cancelled", "not_completed")
        )
        return None

    async def _restock(self, owner: Owner, names: dict[str, str]) -> None:
        """Book a delivery in the cloud for every item the cloud sees below its par level."""
        stock = await owner.rows("stock_levels")
        booked = deliveries(stock)
        if not booked:
            return
        rev = await owner.write(*booked)
        self.result.deliveries += len(booked)
        items = ", ".join(
            f"{names.get(c['id'], c['id'])} ({stock[c['id']]['on_hand']} left)" for c in booked
        )
        self.event(f"owner: deliveries booked in the cloud (rev {rev}): {items}")

    async def _watch_price(self, store: EdgeStore, rev: int, name: str, price: int) -> None:
        """Report when the owner's edit (feed revision ``rev``) has reached the edge: its pull
        cursor passed it, so the edit is applied there, even if a later one replaced it
        (watching for the price itself would wait for ever, or match a later edit back to
        the same price). Cancelled at the end."""

        async def arrived() -> bool:
            return store.cursors().pull_cursor >= rev

        took = await self._until(arrived, float("inf"), every_s=0.01)
        ms = (took or 0) * 1000
        self.event(f"edge: {name} {price}p arrived here, {ms:.0f} ms after the edit")

    async def _outage(self, uplink: Uplink) -> None:
        opts = self.options
        if opts.offline_at is None or await self._sleep(opts.offline_at):
            return
        await uplink.stop()
        self.event("link DOWN (uplink stopped): the tablets keep selling into the outbox")
        if opts.online_at is None or await self._sleep(opts.online_at - opts.offline_at):
            return
        await uplink.start()
        self.event("link UP (uplink started): the backlog drains")

    async def _ticker(self, owner: Owner, store: EdgeStore, uplink: Uplink) -> None:
        """One status line a second, until cancelled after the final drain."""
        tick = time.monotonic()
        while True:
            if (code := self.cloud.exit_code()) is not None:
                self.stop("an error", f"the cloud exited ({code}):\n{self.cloud.stderr_tail()}")
            await self._show_status(owner, store, uplink)
            tick += 1.0
            await asyncio.sleep(max(0.0, tick - time.monotonic()))

    async def _show_status(self, owner: Owner, store: EdgeStore, uplink: Uplink) -> None:
        try:
            head: int | None = await owner.feed_head()
        except (DemoError, aiohttp.ClientError, TimeoutError):
            head = None
        body = status_body(await store.status(wall_clock_ms()), uplink.status())
        self.console.status(status_line(self.elapsed(), body, head))

    # -- the end -----------------------------------------------------------------------------

    async def _finish(self, owner: Owner, store: EdgeStore, uplink: Uplink) -> None:
        """Drain both ways, then compare every table's checksum."""
        result = self.result
        if result.error is None:
            if not uplink.status().running:
                await uplink.start()
                self.event("link UP for the final drain")
            self.event(f"stopping ({result.reason}): load stopped, draining both ways")
            result.drained = await self._drain(owner, store)
        await self._cancel()
        await self._show_status(owner, store, uplink)  # where the drain left it
        self.console.end_status()
        cursors = store.cursors()
        result.last_seq, result.acked_through = cursors.last_seq, cursors.acked_through
        result.pulled = uplink.status().catchup.pulled
        result.conflicts = (await store.status(wall_clock_ms())).open_conflicts
        try:
            result.checksums = await self._checksums(owner, store)
        except (DemoError, aiohttp.ClientError, TimeoutError) as exc:
            result.error = result.error or f"cannot read the cloud's checksums: {exc!r}"

    async def _drain(self, owner: Owner, store: EdgeStore) -> bool:
        """Wait until the cloud holds every edge change and the edge every feed entry."""

        async def drained() -> bool:
            c = store.cursors()
            try:
                if c.acked_through == c.last_seq and c.pull_cursor >= await owner.feed_head():
                    sums = await self._checksums(owner, store)
                    return all(edge == cloud for edge, cloud in sums.values())
            except (DemoError, aiohttp.ClientError, TimeoutError) as exc:
                log.warning("drain: cannot read the cloud: %r", exc)
            return False

        return await self._until(drained, DRAIN_TIMEOUT_S, every_s=0.05) is not None

    @staticmethod
    async def _checksums(owner: Owner, store: EdgeStore) -> Sums:
        cloud = await owner.checksums()
        out: Sums = {}
        for table in store.registry.names():
            edge = await store.checksum(table)
            out[table] = ((edge.count, edge.total), cloud.get(table, (0, 0)))
        return out


# -- entry point ------------------------------------------------------------------------------


def _workdir(data: Path | None) -> tuple[Path, bool]:
    """The directory for the edge database and logs, and whether to keep it."""
    if data is None:
        return Path(tempfile.mkdtemp(prefix="fynlo-demo-")), False
    data.mkdir(parents=True, exist_ok=True)
    if (data / "edge.sqlite").exists():
        raise DemoError(
            f"{data / 'edge.sqlite'} exists, from an earlier demo whose cloud is gone; "
            "give an empty or new --data directory"
        )
    return data, True


async def _run(demo: Demo, edge_config: EdgeConfig) -> Result:
    loop = asyncio.get_running_loop()
    main_task = asyncio.current_task()
    assert main_task is not None

    def on_signal(name: str) -> None:
        if not demo.stopping.is_set():
            demo.stop(name)
            return
        demo.console.line(f"{name} again: stopping now, without the drain")
        for sig in (signal.SIGINT, signal.SIGTERM):  # the clean-up must not be cut short
            loop.add_signal_handler(sig, lambda: None)
        main_task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_signal, "Ctrl-C")
    loop.add_signal_handler(signal.SIGTERM, on_signal, "SIGTERM")
    try:
        return await demo.run(edge_config)
    except (DemoError, aiohttp.ClientError, TimeoutError) as exc:
        demo.result.error = demo.result.error or str(exc) or repr(exc)
    except asyncio.CancelledError:
        demo.result.error = demo.result.error or "stopped before the checksums were compared"
    return demo.result


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fynlo-demo``."""
    options = parse_options(argv)
    try:
        base = load_edge_config(DEFAULT_PATH if Path(DEFAULT_PATH).exists() else None)
        workdir, keep = _workdir(options.data)
    except (ConfigError, DemoError, OSError) as exc:
        print(f"fynlo-demo: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        filename=workdir / "demo.log",
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    console = Console(sys.stdout)
    console.line("fynlo demo: a cloud on a throwaway Postgres and an edge on SQLite, syncing")
    cloud = CloudProcess(workdir)
    demo = Demo(options, console, cloud, workdir)
    result, cloud_exit = demo.result, None
    try:
        cloud.start()
        result = eventloop.run(_run(demo, base))
    except KeyboardInterrupt:  # before the signal handlers were installed
        result.reason, result.error = "Ctrl-C", result.error or "interrupted"
    except OSError as exc:
        result.error = f"cannot start the cloud: {exc}"
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the cloud stop cleanly
        try:
            cloud_exit = cloud.stop()
        finally:
            signal.signal(signal.SIGINT, previous)
            logging.shutdown()
            if not keep:
                shutil.rmtree(workdir, ignore_errors=True)
    for line in summary(result, cloud_exit):
        console.line(line)
    if keep:
        console.line(f"  files kept in {workdir}: edge.sqlite, demo.log, cloud.out, cloud.err")
    if result.converged and result.error is None:
        return 0
    interrupted = result.reason in ("Ctrl-C", "SIGTERM") and not result.checksums
    return EXIT_INTERRUPTED if interrupted else 1
