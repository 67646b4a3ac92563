"""The cloud in its own process, device registration, and watching Postgres."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from cloud.listen import CHANNEL
from cloud.pgtemp import free_port

from .common import READY_TIMEOUT_S, STOP_TIMEOUT_S, BenchError, Expect, now

# -- the cloud in its own process -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Device:
    """A registered edge node."""

    site_id: str
    node_id: str
    token: str


class CloudProcess:
    """``python -m cloud run`` in a new session (Ctrl-C reaches only us; we stop it in order)."""

    def __init__(self, proc: asyncio.subprocess.Process, url: str, token: str, log: Path):
        self.proc = proc
        self.url = url
        self.admin_token = token
        self.log = log

    @classmethod
    async def start(cls, dsn: str, workdir: Path) -> CloudProcess:
        """Start the service on a free port and wait until ``/healthz`` answers."""
        port, token = free_port(), secrets.token_urlsafe(24)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FYNLO_CLOUD_")}
        env |= {
            "FYNLO_CLOUD_DSN": dsn,
            "FYNLO_CLOUD_PAYMENTS_BANK": "off",
            "FYNLO_CLOUD_HOST": "127.0.0.1",
            "FYNLO_CLOUD_PORT": str(port),
            "FYNLO_CLOUD_ADMIN_TOKEN": token,
        }
        log = workdir / "cloud.log"
        with log.open("wb") as out:  # the child keeps its own descriptor
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cloud", "run",
                cwd=workdir,  # no cloud.toml there: built-in defaults plus the variables above
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        cloud = cls(proc, f"http://127.0.0.1:{port}", token, log)
        try:
            await cloud._wait_ready()
        except BaseException:
            await cloud.stop()
            raise
        return cloud

    async def _wait_ready(self) -> None:
        deadline = now() + READY_TIMEOUT_S
        async with aiohttp.ClientSession() as http:
            while now() < deadline:
                if self.proc.returncode is not None:
                    raise BenchError(f"the cloud exited ({self.proc.returncode}):\n{self.tail()}")
                try:
                    async with http.get(self.url + "/healthz") as resp:
                        if resp.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise BenchError(f"the cloud was not ready after {READY_TIMEOUT_S}s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        """The end of the cloud's log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        """SIGTERM (aiohttp shuts down gracefully), SIGKILL if that takes too long."""
        if self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    async def register(self) -> Device:
        """A fresh site and one device on it, through the owners' HTTP API."""
        headers = {"Authorization": f"Bearer {self.admin_token}"}
        site_id = f"bench-{secrets.token_hex(4)}"
        async with aiohttp.ClientSession(headers=headers) as http:
            site = await _post_json(
                http, f"{self.url}/v1/sites", {"name": "Bench", "site_id": site_id}
            )
            device = await _post_json(
                http, f"{self.url}/v1/sites/{site['site_id']}/devices", {"name": "bench-till"}
            )
        return Device(str(device["site_id"]), str(device["node_id"]), str(device["token"]))


async def _post_json(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, json=body) as resp:
        answer: dict[str, Any] = await resp.json()
        if resp.status != 200:
            raise BenchError(f"POST {url}: {resp.status} {answer}")
        return answer


# -- watching Postgres -----------------------------------------------------------------------


class FeedWatch:
    """A LISTEN on the cloud's feed channel: when did the site's feed last grow."""

    def __init__(self, conn: asyncpg.Connection, site_id: str) -> None:
        self.conn = conn
        self.site_id = site_id
        self.notified_at = 0.0
        self._event = asyncio.Event()

    @classmethod
    async def open(cls, dsn: str, site_id: str) -> FeedWatch:
        """Connect and start listening."""
        watch = cls(await asyncpg.connect(dsn), site_id)
        await watch.conn.add_listener(CHANNEL, watch._notified)
        return watch

    def _notified(self, conn: object, pid: int, channel: str, payload: object) -> None:
        if payload == self.site_id:
            self.notified_at = now()
            self._event.set()

    async def next(self, timeout_s: float) -> float:
        """Wait for a notification; its arrival time, or now if ``timeout_s`` passed first."""
        try:
            await asyncio.wait_for(self._event.wait(), timeout_s)
        except TimeoutError:
            return now()
        self._event.clear()
        return self.notified_at

    async def close(self) -> None:
        """Stop listening."""
        await self.conn.close()


_VISIBLE_SQL = (
    "SELECT 'order_lines', id, NULL::bigint FROM order_lines"
    " WHERE site_id = $1 AND id = ANY($2::text[])"
    " UNION ALL"
    " SELECT 'stock_levels', id, on_hand FROM stock_levels"
    " WHERE site_id = $1 AND id = ANY($3::text[])"
)


class Visibility:
    """Which written rows are visible in Postgres yet, and after how long."""

    def __init__(self, conn: asyncpg.Connection, site_id: str) -> None:
        self.conn = conn
        self.site_id = site_id
        self.lines: dict[str, float] = {}  #: pk -> when its write started
        self.stock: dict[str, list[tuple[int, float]]] = {}  #: pk -> [(on_hand, started)]
        self.latencies: list[float] = []
        self.check_times: list[float] = []

    @property
    def pending(self) -> int:
        """Writes not yet seen in Postgres."""
        return len(self.lines) + sum(len(v) for v in self.stock.values())

    def expect(self, expect: Expect, started: float) -> None:
        """Track a write that started at ``started``."""
        if expect.table == "order_lines":
            self.lines[expect.pk] = started
        else:
            self.stock.setdefault(expect.pk, []).append((expect.on_hand or 0, started))

    async def check(self, notified_at: float) -> None:
        """Find which pending writes are visible; stamp those started before ``notified_at``."""
        if not self.pending:
            return
        began = now()
        rows = await self.conn.fetch(
            _VISIBLE_SQL, self.site_id, list(self.lines), [k for k, v in self.stock.items() if v]
        )
        self.check_times.append(now() - began)
        for table, pk, on_hand in rows:
            if table == "order_lines":
                started = self.lines.get(pk)
                if started is not None and started < notified_at:
                    del self.lines[pk]
                    self.latencies.append(notified_at - started)
            else:
                self._stamp_stock(pk, on_hand, notified_at)

    def _stamp_stock(self, pk: str, on_hand: int, notified_at: float) -> None:
        keep = []
        for expected, started in self.stock.get(pk, []):
            if on_hand <= expected and started < notified_at:
                self.latencies.append(notified_at - started)
            else:
                keep.append((expected, started))
        self.stock[pk] = keep


async def ledger(conn: asyncpg.Connection, device: Device) -> int:
    """The node's dedupe watermark in Postgres (moves in the transaction with the rows)."""
    value = await conn.fetchval(
        "SELECT last_seq FROM ledger WHERE site_id = $1 AND origin = $2",
        device.site_id,
        device.node_id,
    )
    return int(value or 0)


async def wait_committed(
    watch: FeedWatch, conn: asyncpg.Connection, device: Device, through: int, timeout_s: float
) -> float:
    """When Postgres first held the node's changes up to ``through`` (a notification's time)."""
    deadline = now() + timeout_s
    while True:
        at = await watch.next(timeout_s=1.0)
        if await ledger(conn, device) >= through:
            return at
        if now() > deadline:
            raise BenchError(f"the cloud did not commit seq {through} within {timeout_s:.0f}s")


async def poll_until(check: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll the edge's in-memory ``check`` every 5 ms until true; returns when it became true."""
    deadline = now() + timeout_s
    while not check():
        if now() > deadline:
            raise BenchError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        await asyncio.sleep(0.005)
    return now()
