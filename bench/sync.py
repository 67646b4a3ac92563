"""Sync benchmark: the real edge store and uplink against the real cloud service and Postgres.

Run ``.venv/bin/python bench/sync.py`` (``--quick`` for a smoke run, ``--help`` for options).
Everything is measured on this machine with the production components; nothing is simulated.

Set-up. A throwaway *durable* Postgres (``TemporaryPostgres(fast=False)``: fsync,
synchronous_commit and full_page_writes on) unless ``--dsn`` names one; the cloud service in
its own process (``python -m cloud run``, configured by ``FYNLO_CLOUD_*`` variables, ready
when ``/healthz`` answers), so the edge and the cloud run on separate cores as in production
(here Postgres shares them; in production it has its own machine); a site and a device
registered through the owners' HTTP API. Edge stores are real SQLite files in a temporary
directory, opened with the default ``synchronous`` (FULL).

What is measured.

(c, offline) local write: ``store.write`` latency of single-row writes (three order-line
    inserts to one stock-counter decrement) on a fresh store with no uplink, back to back.
(a) catch-up: a fresh store takes N order-line inserts while offline (``write_many`` in
    chunks; timed separately, not part of the figure). Then the uplink starts and the clock
    runs until the cloud has committed the last change: the node's ledger watermark in
    Postgres reaches N (checked on each feed NOTIFY). Also shown: when the edge learnt it
    (``acked_through == last_seq``), and how long the edge then needs to pull its own N rows
    back from the feed. The rows are counted in Postgres at the end.
    ceiling: the same N rows (read back from the cloud's ``order_lines``) loaded into a fresh
    table of the same shape by COPY into a temporary staging table plus one
    ``INSERT … SELECT … ON CONFLICT (site_id, id) DO UPDATE``, in one durable transaction.
    Catch-up is reported as a fraction of that rate.
(b) live: with the uplink online and idle, ``--rate`` single-row writes per second for
    ``--live-seconds`` (same mix as above). For each write, the latency from just before
    ``store.write`` is called to the row being visible in Postgres. A separate connection
    LISTENs on the cloud's feed channel; each notification triggers one query for which
    pending rows are visible (order lines by ``id = ANY``; a counter decrement once
    ``on_hand`` has reached the value it implies), stamped with the notification's arrival
    time (a row whose write started after that notification waits for the next one). A
    stamp is off by at most one check query either way (their times are reported), plus any
    delay of the edge's event loop in running the notification callback (its lag is
    reported too: the watcher shares the loop with the edge, as a tablet's request would).
(c, online) local write: the ``store.write`` latencies of (b), with the uplink running.

Other work on the machine competes for the same cores, so each phase also reports the
core-seconds used by the benchmark's processes (this one, the cloud, the throwaway Postgres)
and by everything else (with ``--dsn``, a local Postgres counts as "else").

Everything started is removed at exit (cloud process, Postgres, temporary files), also on
Ctrl-C, SIGTERM or error. The last line of output is one JSON object with the figures, the
machine, the targets and whether each is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg

from cloud.listen import CHANNEL
from cloud.pgtemp import TemporaryPostgres, free_port
from edge.config import SyncSettings
from edge.store import EdgeStore
from edge.uplink import Uplink
from shared.registry import default_registry
from sync_protocol.changes import Op, Value

Write = tuple[str, str, Op, dict[str, Value]]
N = TypeVar("N", int, float)

TARGETS: dict[str, float] = {
    "catchup_changes_per_s": 25_000,
    "catchup_fraction": 0.30,
    "live_p99_ms": 50,
    "local_write_p99_ms": 5,
}
STOCK_ITEMS = tuple(f"stk-{k:02d}" for k in range(20))
STOCK_START = 1_000_000
MENU = (
    ("itm-margherita", "Margherita", 950),
    ("itm-fries", "Fries", 350),
    ("itm-lager", "Lager (pint)", 520),
    ("itm-tiramisu", "Tiramisu", 675),
    ("itm-burger", "Cheeseburger", 1250),
)
SETUP_CHUNK = 1000
READY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class BenchError(RuntimeError):
    """The benchmark could not run or its result failed verification."""


def now() -> float:
    """The benchmark's clock (monotonic seconds)."""
    return time.perf_counter()


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """What to run."""

    changes: int
    live_seconds: float
    rate: float
    offline_writes: int
    dsn: str | None

    @property
    def live_writes(self) -> int:
        """How many writes the live phase makes."""
        return max(1, round(self.live_seconds * self.rate))


def parse_options(argv: Sequence[str] | None) -> Options:
    """Options from the command line (``--quick`` changes the defaults, not explicit values)."""
    parser = argparse.ArgumentParser(
        prog="bench/sync.py", description="Measure edge→cloud sync on this machine."
    )
    parser.add_argument("--changes", type=int, help="changes in the catch-up (default 100000)")
    parser.add_argument("--live-seconds", type=float, help="length of the live phase (default 20)")
    parser.add_argument("--rate", type=float, default=100.0, help="live writes per second")
    parser.add_argument(
        "--offline-writes", type=int, help="writes of the offline local-write run (default 2000)"
    )
    parser.add_argument(
        "--dsn",
        help="use this Postgres instead of a throwaway one (the bench site's data is left in it)",
    )
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    ns = parser.parse_args(argv)
    quick = ns.quick
    options = Options(
        changes=_pick(ns.changes, 5_000 if quick else 100_000),
        live_seconds=_pick(ns.live_seconds, 3.0 if quick else 20.0),
        rate=ns.rate,
        offline_writes=_pick(ns.offline_writes, 300 if quick else 2_000),
        dsn=ns.dsn,
    )
    if options.changes < 1 or options.rate <= 0 or options.live_seconds <= 0:
        parser.error("--changes, --rate and --live-seconds must be positive")
    if options.offline_writes < 1:
        parser.error("--offline-writes must be positive")
    return options


def _pick(given: N | None, default: N) -> N:
    return default if given is None else given


# -- the workload ----------------------------------------------------------------------------


def order_line(pk: str, i: int, at_ms: int) -> Write:
    """An order-line insert with every column a till would fill."""
    item_id, name, price = MENU[i % len(MENU)]
    fields: dict[str, Value] = {
        "order_id": f"ord-{i // 4:07d}",
        "item_id": item_id,
        "name": name,
        "quantity": 1 + i % 3,
        "unit_price_pence": price,
        "modifiers": "[]" if i % 5 else '["no onions"]',
        "notes": "",
        "course": 1 + i % 3,
        "seat": 1 + i % 4,
        "added_by": "server-7",
        "added_at_ms": at_ms,
        "voided": False,
    }
    return ("order_lines", pk, Op.INSERT, fields)


def stock_rows() -> list[Write]:
    """The stock rows the single-row mix decrements."""
    return [
        ("stock_levels", pk, Op.INSERT, {"on_hand": STOCK_START, "par_level": 50, "unit": "each"})
        for pk in STOCK_ITEMS
    ]


@dataclass(frozen=True, slots=True)
class Expect:
    """What makes a write visible in Postgres: a line's id, or a counter reaching a value."""

    table: str
    pk: str
    on_hand: int | None = None


class Mix:
    """Single-row writes: three order-line inserts to one stock-counter decrement."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.on_hand = dict.fromkeys(STOCK_ITEMS, STOCK_START)
        self.count = 0

    def next(self) -> tuple[Write, Expect]:
        """The next write and how to recognise it in Postgres."""
        i, self.count = self.count, self.count + 1
        if i % 4 == 3:
            pk = STOCK_ITEMS[(i // 4) % len(STOCK_ITEMS)]
            self.on_hand[pk] -= 1
            write: Write = ("stock_levels", pk, Op.UPDATE, {"on_hand": -1})
            return write, Expect("stock_levels", pk, self.on_hand[pk])
        pk = f"{self.prefix}-{i:07d}"
        return order_line(pk, i, time.time_ns() // 1_000_000), Expect("order_lines", pk)


# -- statistics ------------------------------------------------------------------------------


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, as milliseconds."""
    if not samples_s:
        raise BenchError("no samples")
    return {
        "p50": round(percentile(samples_s, 50) * 1000, 2),
        "p99": round(percentile(samples_s, 99) * 1000, 2),
        "max": round(max(samples_s) * 1000, 2),
        "n": len(samples_s),
    }


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


# -- who used the CPU -----------------------------------------------------------------------


_PROC = Path("/proc/stat")
_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _machine_busy_s() -> float:
    """CPU seconds this machine has spent busy since boot (Linux ``/proc/stat``)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, _PROC.read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) * _TICK_S


def _process_cpu_s(pid: int) -> float:
    """CPU seconds one process has used (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry.name))
    return out


class CpuMeter:
    """Core-seconds used during a phase by the whole machine and by the benchmark's processes.

    Ours are this process, the cloud process and, when the benchmark started it, the throwaway
    Postgres (postmaster and its children). The rest is other work on the machine, which
    competes for the same cores and makes the figures worse than they would be on a quiet one.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self._start = (0.0, 0.0, 0.0)

    def _sample(self) -> tuple[float, float, float]:
        if not _PROC.exists():  # not Linux: wall time only
            return now(), 0.0, 0.0
        return now(), _machine_busy_s(), sum(_process_cpu_s(pid) for pid in self._pids())

    def start(self) -> None:
        """Begin a phase."""
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        """The phase's wall time and core-seconds: machine, ours, others."""
        (t0, machine0, ours0), (t1, machine1, ours1) = self._start, self._sample()
        machine, ours = machine1 - machine0, ours1 - ours0
        if not _PROC.exists():
            return {"wall_s": round(t1 - t0, 2)}
        return {
            "wall_s": round(t1 - t0, 2),
            "machine_cpu_s": round(machine, 2),
            "bench_cpu_s": round(ours, 2),
            "other_cpu_s": round(max(0.0, machine - ours), 2),
        }


def bench_pids(cloud_pid: int, pg_data: Path | None) -> Callable[[], list[int]]:
    """The processes of the benchmark, found afresh at each call (backends come and go)."""

    def pids() -> list[int]:
        found = [os.getpid(), cloud_pid]
        if pg_data is not None:
            try:
                postmaster = int((pg_data / "postmaster.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return found
            found += [postmaster, *_children(postmaster)]
        return found

    return pids


# -- phases ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Results:
    """Every figure the run produced."""

    changes: int = 0
    setup_s: float = 0.0
    catchup_s: float = 0.0
    catchup_acked_s: float = 0.0
    pull_settle_s: float = 0.0
    ceiling_s: float = 0.0
    live_rate: float = 0.0
    live_ms: dict[str, float] = field(default_factory=dict)
    live_check_ms: dict[str, float] = field(default_factory=dict)
    loop_lag_ms: dict[str, float] = field(default_factory=dict)
    local_online_ms: dict[str, float] = field(default_factory=dict)
    local_offline_ms: dict[str, float] = field(default_factory=dict)
    postgres: str = ""
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)


async def offline_local_writes(path: Path, device: Device, count: int) -> dict[str, float]:
    """(c) ``store.write`` latency on a fresh store with no uplink, back to back."""
    async with await EdgeStore.open(
        path, default_registry(), device.site_id, device.node_id
    ) as store:
        await store.write_many(stock_rows())
        mix, latencies = Mix("ol"), []
        for _ in range(count):
            write, _expect = mix.next()
            started = now()
            await store.write(*write)
            latencies.append(now() - started)
    return summary_ms(latencies)


async def fill_outbox(store: EdgeStore, count: int) -> float:
    """Write ``count`` order-line inserts while offline; returns how long it took."""
    began, at_ms = now(), time.time_ns() // 1_000_000
    for first in range(0, count, SETUP_CHUNK):
        last = min(count, first + SETUP_CHUNK)
        await store.write_many([order_line(f"cl-{i:07d}", i, at_ms) for i in range(first, last)])
    return now() - began


async def report_progress(uplink: Uplink, total: int, began: float) -> None:
    """Print acked/total and rates every second until cancelled."""
    last_acked, last_at = 0, began
    while True:
        await asyncio.sleep(1.0)
        cursors, status, at = uplink.store.cursors(), uplink.status(), now()
        acked = cursors.acked_through
        rate, avg = (acked - last_acked) / (at - last_at), acked / (at - began)
        error = status.last_error
        print(
            f"  {at - began:6.1f}s  acked {acked:>7}/{total} ({100 * acked / total:5.1f}%)"
            f"  {rate:>8.0f}/s now  {avg:>8.0f}/s avg"
            f"  | pull cursor {cursors.pull_cursor} head {cursors.cloud_head}"
            f" ({status.catchup.pull_rate:.0f}/s)"
            + (f"  | last error {error.code}: {error.message}" if error else ""),
            flush=True,
        )
        last_acked, last_at = acked, at


async def catch_up(
    store: EdgeStore, uplink: Uplink, watch: FeedWatch, conn: asyncpg.Connection, device: Device,
    results: Results,
) -> None:  # fmt: skip
    """(a) Start the uplink on a full outbox and time until Postgres holds every change."""
    total = store.cursors().last_seq
    timeout_s = max(120.0, total / 500)
    began = now()
    await uplink.start()
    progress = asyncio.create_task(report_progress(uplink, total, began))
    try:
        committed = await wait_committed(watch, conn, device, total, timeout_s)
        acked = await poll_until(
            lambda: store.cursors().acked_through >= total, timeout_s, "the edge's ack"
        )
        head = int(
            await conn.fetchval("SELECT feed_head FROM sites WHERE site_id = $1", device.site_id)
        )
        settled = await poll_until(
            lambda: store.cursors().pull_cursor >= head, timeout_s, "the pull to settle"
        )
    except BenchError as exc:
        raise BenchError(f"{exc} (the uplink's last error: {uplink.status().last_error})") from None
    finally:
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
    results.catchup_s, results.catchup_acked_s = committed - began, acked - began
    results.pull_settle_s = settled - began
    stored = await conn.fetchval(
        "SELECT count(*) FROM order_lines WHERE site_id = $1", device.site_id
    )
    if stored != total:
        raise BenchError(f"Postgres holds {stored} order lines of the site, expected {total}")


async def copy_upsert_ceiling(conn: asyncpg.Connection, site_id: str) -> tuple[float, int]:
    """The site's order lines into a fresh table by COPY + one upsert, in one transaction."""
    columns = [
        r[0]
        for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'order_lines'"
            " ORDER BY ordinal_position"
        )
    ]
    quoted = ", ".join(f'"{c}"' for c in columns)
    rows = [
        tuple(r)
        for r in await conn.fetch(f"SELECT {quoted} FROM order_lines WHERE site_id = $1", site_id)
    ]
    target, staging = f"bench_ceiling_{secrets.token_hex(4)}", "bench_staging"
    updates = ", ".join(f'"{c}" = EXCLUDED."{c}"' for c in columns if c not in ("site_id", "id"))
    await conn.execute(f"CREATE TABLE {target} (LIKE order_lines INCLUDING ALL)")
    try:
        began = now()
        async with conn.transaction():
            await conn.execute(
                f"CREATE TEMP TABLE {staging} (LIKE order_lines INCLUDING DEFAULTS) ON COMMIT DROP"
            )
            await conn.copy_records_to_table(staging, records=rows, columns=columns)
            await conn.execute(
                f"INSERT INTO {target} ({quoted}) SELECT {quoted} FROM {staging}"
                f" ON CONFLICT (site_id, id) DO UPDATE SET {updates}"
            )
        elapsed = now() - began
        loaded = await conn.fetchval(f"SELECT count(*) FROM {target}")
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {target}")
    if loaded != len(rows):
        raise BenchError(f"the ceiling table holds {loaded} rows, expected {len(rows)}")
    return elapsed, len(rows)


async def paced_writes(
    store: EdgeStore, visibility: Visibility, count: int, rate: float
) -> tuple[list[float], float]:
    """Write ``count`` single rows at ``rate`` per second; local latencies and achieved rate."""
    mix, latencies = Mix("ll"), []
    began = now()
    for i in range(count):
        delay = began + i / rate - now()
        if delay > 0:
            await asyncio.sleep(delay)
        write, expect = mix.next()
        started = now()
        visibility.expect(expect, started)
        await store.write(*write)
        latencies.append(now() - started)
        if (i + 1) % max(1, round(5 * rate)) == 0:
            print(f"  {i + 1:>6}/{count} written, {visibility.pending} not visible yet", flush=True)
    return latencies, count / (now() - began)


async def watch_loop_lag(lags: list[float], every_s: float = 0.01) -> None:
    """Record how late the event loop wakes a sleeper (how long edge work holds the loop)."""
    while True:
        due = now() + every_s
        await asyncio.sleep(every_s)
        lags.append(now() - due)


async def follow(watch: FeedWatch, visibility: Visibility, writing: asyncio.Task[Any]) -> None:
    """Check visibility at every notification until writing is done and nothing is pending."""
    while not (writing.done() and visibility.pending == 0):
        await visibility.check(await watch.next(timeout_s=0.25))


async def live(
    store: EdgeStore, watch: FeedWatch, conn: asyncpg.Connection, device: Device,
    options: Options, results: Results,
) -> None:  # fmt: skip
    """(b) Steady single-row writes with the uplink online; write → visible in Postgres."""
    await store.write_many(stock_rows())
    await wait_committed(watch, conn, device, store.cursors().last_seq, SETTLE_TIMEOUT_S)
    visibility = Visibility(conn, device.site_id)
    writing = asyncio.create_task(
        paced_writes(store, visibility, options.live_writes, options.rate)
    )
    following = asyncio.create_task(follow(watch, visibility, writing))
    lags: list[float] = []
    monitor = asyncio.create_task(watch_loop_lag(lags))
    try:
        latencies, results.live_rate = await writing
        await asyncio.wait_for(following, SETTLE_TIMEOUT_S)
    except TimeoutError:
        raise BenchError(f"{visibility.pending} live writes never became visible") from None
    finally:
        for task in (writing, following, monitor):
            task.cancel()
        await asyncio.gather(writing, following, monitor, return_exceptions=True)
    results.live_ms = summary_ms(visibility.latencies)
    results.local_online_ms = summary_ms(latencies)
    results.live_check_ms = summary_ms(visibility.check_times)
    results.loop_lag_ms = summary_ms(lags)


# -- the run ---------------------------------------------------------------------------------


async def run(options: Options, dsn: str, workdir: Path, pg_data: Path | None) -> Results:
    """Start the cloud, then run every phase; everything started here is stopped here."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    results = Results(changes=options.changes, loadavg=os.getloadavg())
    async with AsyncExitStack() as stack:
        cloud = await CloudProcess.start(dsn, workdir)
        stack.push_async_callback(cloud.stop)
        stack.push_async_exit(_show_cloud_log_on_error(cloud))
        device = await cloud.register()
        print(f"cloud up at {cloud.url}; site {device.site_id}, node {device.node_id}", flush=True)
        conn = await asyncpg.connect(dsn)
        stack.push_async_callback(conn.close)
        results.postgres = str(await conn.fetchval("SHOW server_version"))
        watch = await FeedWatch.open(dsn, device.site_id)
        stack.push_async_callback(watch.close)

        print(f"(c) offline local writes: {options.offline_writes} on a fresh store", flush=True)
        results.local_offline_ms = await offline_local_writes(
            workdir / "offline.sqlite", device, options.offline_writes
        )

        store = await EdgeStore.open(
            workdir / "edge.sqlite", default_registry(), device.site_id, device.node_id
        )
        stack.push_async_callback(store.close)
        results.setup_s = await fill_outbox(store, options.changes)
        print(
            f"(a) outbox filled offline: {options.changes} changes in {results.setup_s:.1f}s"
            f" ({options.changes / results.setup_s:.0f}/s, not timed); uplink starting",
            flush=True,
        )
        uplink = Uplink(store, cloud.url, device.token, SyncSettings())
        stack.push_async_callback(uplink.stop)
        cpu = CpuMeter(bench_pids(cloud.proc.pid, pg_data))
        cpu.start()
        await catch_up(store, uplink, watch, conn, device, results)
        results.cpu["catchup_and_pull"] = cpu.stop()
        print(f"    ceiling: COPY + upsert of the same {options.changes} rows", flush=True)
        results.ceiling_s, _ = await copy_upsert_ceiling(conn, device.site_id)

        print(
            f"(b) live: {options.live_writes} writes at {options.rate:g}/s with the uplink online",
            flush=True,
        )
        cpu.start()
        await live(store, watch, conn, device, options, results)
        results.cpu["live"] = cpu.stop()
    return results


def _show_cloud_log_on_error(
    cloud: CloudProcess,
) -> Callable[[type[BaseException] | None, BaseException | None, object], Awaitable[bool]]:
    async def show(kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and not isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            print(f"--- tail of the cloud's log ---\n{cloud.tail()}", file=sys.stderr)
        return False

    return show


def code_version() -> dict[str, Any]:
    """The git commit measured, and whether the work tree had changes (None: not a checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
    }


# -- reporting -------------------------------------------------------------------------------


def report(options: Options, r: Results) -> dict[str, Any]:
    """The JSON summary."""
    catchup_rate = r.changes / r.catchup_s
    ceiling_rate = r.changes / r.ceiling_s
    fraction = catchup_rate / ceiling_rate
    local_p50 = max(r.local_online_ms["p50"], r.local_offline_ms["p50"])
    local_p99 = max(r.local_online_ms["p99"], r.local_offline_ms["p99"])
    figures = {
        "catchup_changes_per_s": round(catchup_rate),
        "catchup_fraction": round(fraction, 3),
        "live_p99_ms": r.live_ms["p99"],
        "local_write_p99_ms": local_p99,
    }
    return {
        "changes": r.changes,
        "catchup_changes_per_s": round(catchup_rate),
        "catchup_s": round(r.catchup_s, 3),
        "catchup_acked_s": round(r.catchup_acked_s, 3),
        "catchup_pull_settled_s": round(r.pull_settle_s, 3),
        "outbox_fill_s": round(r.setup_s, 3),
        "copy_upsert_rows_per_s": round(ceiling_rate),
        "copy_upsert_s": round(r.ceiling_s, 3),
        "catchup_fraction_of_copy_upsert": round(fraction, 3),
        "live_writes": options.live_writes,
        "live_rate_per_s": round(r.live_rate, 1),
        "live_ms": r.live_ms,
        "live_p50_ms": r.live_ms["p50"],
        "live_p99_ms": r.live_ms["p99"],
        "live_max_ms": r.live_ms["max"],
        "live_check_query_ms": r.live_check_ms,
        "live_edge_loop_lag_ms": r.loop_lag_ms,
        "local_write_p50_ms": local_p50,
        "local_write_p99_ms": local_p99,
        "local_write_online": r.local_online_ms,
        "local_write_offline": r.local_offline_ms,
        "cpu": r.cpu,
        "code": code_version(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "sqlite": sqlite3.sqlite_version,
            "postgres": r.postgres,
            "loadavg_at_start": r.loadavg,
            "postgres_mode": "--dsn" if options.dsn else "throwaway, durable (fast=False)",
            "edge_synchronous": "FULL",
        },
        "targets": TARGETS,
        "targets_met": {
            name: (figures[name] >= goal if name.startswith("catchup") else figures[name] <= goal)
            for name, goal in TARGETS.items()
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    """A short human-readable table of the results."""
    s, met = summary, summary["targets_met"]
    on, off = s["local_write_online"], s["local_write_offline"]

    def target(name: str) -> str:
        return f"target {TARGETS[name]:g}: " + ("met" if met[name] else "NOT met")

    def spread(ms: dict[str, float]) -> str:
        return f"p50 {ms['p50']} ms  p99 {ms['p99']} ms  max {ms['max']} ms"

    catchup = f"{s['catchup_changes_per_s']:,} changes/s ({s['changes']:,} in {s['catchup_s']}s)"
    rows = [
        ("catch-up, outbox → Postgres", catchup, target("catchup_changes_per_s")),
        ("  edge has the ack", f"{s['catchup_acked_s']}s", ""),
        ("  edge pulled its rows back", f"{s['catchup_pull_settled_s']}s", ""),
        ("COPY + upsert ceiling", f"{s['copy_upsert_rows_per_s']:,} rows/s", ""),
        (
            "catch-up / ceiling",
            f"{s['catchup_fraction_of_copy_upsert']}",
            target("catchup_fraction"),
        ),
        ("live write → visible", spread(s["live_ms"]), target("live_p99_ms")),
        ("  visibility check query", spread(s["live_check_query_ms"]), ""),
        ("  edge event-loop lag", spread(s["live_edge_loop_lag_ms"]), ""),
        ("local write, online", spread(on), ""),
        ("local write, offline", spread(off), ""),
        (
            "local write, worse of both",
            f"p99 {s['local_write_p99_ms']} ms",
            target("local_write_p99_ms"),
        ),
    ]
    for phase, use in s["cpu"].items():
        if "other_cpu_s" not in use:
            continue
        cores = (s["machine"]["cpu_count"] or 1) * use["wall_s"]
        rows.append(
            (
                f"CPU during {phase}",
                f"bench {use['bench_cpu_s']} core-s, other processes {use['other_cpu_s']}"
                f" (of {cores:.0f} in {use['wall_s']}s)",
                "busy machine: figures pessimistic" if use["other_cpu_s"] > 0.1 * cores else "",
            )
        )
    width = max(len(name) for name, _, _ in rows)
    print()
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<48} {note}".rstrip())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a table, then the JSON summary as the last line."""
    options = parse_options(argv)
    try:
        with ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fynlo-bench-")))
            dsn, pg_data = options.dsn, None
            if dsn is None:
                print("starting a throwaway durable Postgres…", flush=True)
                server = stack.enter_context(TemporaryPostgres(fast=False))
                dsn, pg_data = server.dsn, server.data_dir
            results = asyncio.run(run(options, dsn, workdir, pg_data))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = report(options, results)
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
