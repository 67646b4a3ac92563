"""The phases of the sync benchmark (local write, catch-up, ceiling, live) and the run."""

from __future__ import annotations

import asyncio
import gc
import os
import secrets
import signal
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncpg
from probe import sized, spin  # bench/probe.py: bench/ is on the path when run

from edge.config import SyncSettings
from edge.store import EdgeStore
from edge.uplink import Uplink
from shared.registry import default_registry

from .common import (
    SETTLE_TIMEOUT_S,
    SETUP_CHUNK,
    BenchError,
    CatchUpRound,
    Mix,
    Options,
    Results,
    now,
    order_line,
    stock_rows,
)
from .cpu import CpuMeter, bench_pids
from .report import summary_ms
from .services import CloudProcess, Device, FeedWatch, Visibility, poll_until, wait_committed

# -- phases ----------------------------------------------------------------------------------


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


async def paced_local_writes(
    path: Path, device: Device, count: int, rate: float
) -> dict[str, float]:
    """``store.write`` latency at ``rate`` per second with no uplink: what pacing alone costs.

    Between paced writes the threads involved go idle, and waking them (and the fsync's
    completion) costs more than back to back; this separates that from the uplink's share.
    """
    async with await EdgeStore.open(
        path, default_registry(), device.site_id, device.node_id
    ) as store:
        await store.write_many(stock_rows())
        mix = Mix("pl")

        async def write_one(i: int) -> float:
            write, started = mix.next()[0], now()
            await store.write(*write)
            return now() - started

        latencies, _ = await paced(count, rate, write_one)
    return summary_ms(latencies)


def bare_sqlite_floor(path: Path, count: int, rate: float) -> dict[str, float]:
    """The machine's floor: one-row commits on a bare sqlite3 connection at ``rate``.

    Same pragmas as the store (WAL, synchronous FULL), one thread, no event loop, no outbox:
    no write through the store can be faster than this on this machine.
    """
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("CREATE TABLE floor (id TEXT PRIMARY KEY, qty INTEGER, at_ms INTEGER)")

        def commit_one(i: int) -> None:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO floor VALUES (?, ?, ?)", (f"f-{i:07d}", i, i))
            conn.execute("COMMIT")

        return summary_ms(paced_on_thread(count, rate, commit_one))
    finally:
        conn.close()


def paced_cpu_floor(count: int, rate: float, work_s: float) -> dict[str, float]:
    """The machine's floor for paced CPU work: a fixed piece of pure-Python arithmetic that
    takes about ``work_s`` back to back, run ``count`` times at ``rate``, one thread.

    On a virtual machine a core that has been idle between paced calls can run the next few
    milliseconds of work several times slower (the host's scheduling and power states): this
    shows how much of the paced figures' tail is that, with no I/O and no threads involved.
    """
    n = sized(work_s)
    return summary_ms(paced_on_thread(count, rate, lambda _: spin(n)))


def paced_on_thread(count: int, rate: float, work: Callable[[int], object]) -> list[float]:
    """Call ``work(i)`` ``count`` times at ``rate`` per second on this thread (sleeping in
    between, no event loop); how long each call took (s)."""
    latencies, began = [], now()
    for i in range(count):
        delay = began + i / rate - now()
        if delay > 0:
            time.sleep(delay)
        started = now()
        work(i)
        latencies.append(now() - started)
    return latencies


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
    done: CatchUpRound,
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
    done.catchup_s, done.catchup_acked_s = committed - began, acked - began
    done.pull_settle_s = settled - began
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
    mix = Mix("ll")

    async def write_one(i: int) -> float:
        write, expect = mix.next()
        started = now()
        visibility.expect(expect, started)
        await store.write(*write)
        took = now() - started
        if (i + 1) % max(1, round(5 * rate)) == 0:
            print(f"  {i + 1:>6}/{count} written, {visibility.pending} not visible yet", flush=True)
        return took

    return await paced(count, rate, write_one)


async def paced(
    count: int, rate: float, write_one: Callable[[int], Awaitable[float]]
) -> tuple[list[float], float]:
    """Call ``write_one(i)`` ``count`` times at ``rate`` per second; the latencies it returns
    (s) and the rate achieved."""
    latencies, began = [], now()
    for i in range(count):
        delay = began + i / rate - now()
        if delay > 0:
            await asyncio.sleep(delay)
        latencies.append(await write_one(i))
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

        settle_heap()
        print(f"(c) offline local writes: {options.offline_writes} on a fresh store", flush=True)
        results.local_offline_ms = await offline_local_writes(
            workdir / "offline.sqlite", device, options.offline_writes
        )

        baseline = min(options.offline_writes, 1000)
        print(
            f"(c) baselines: {baseline} paced writes at {options.rate:g}/s, store without uplink"
            " and bare sqlite3",
            flush=True,
        )
        results.local_paced_ms = await paced_local_writes(
            workdir / "paced.sqlite", device, baseline, options.rate
        )
        results.sqlite_floor_ms = await asyncio.to_thread(
            bare_sqlite_floor, workdir / "floor.sqlite", baseline, options.rate
        )
        results.cpu_floor_ms = await asyncio.to_thread(
            paced_cpu_floor, baseline, options.rate, results.local_offline_ms["p50"] / 1000
        )

        cpu = CpuMeter(bench_pids(cloud.proc.pid, pg_data))
        for number in range(1, options.rounds + 1):
            if number > 1:  # each round: a new site, a fresh store, the same workload
                device = await cloud.register()
                watch = await FeedWatch.open(dsn, device.site_id)
                stack.push_async_callback(watch.close)
            store = await EdgeStore.open(
                workdir / f"edge-{number}.sqlite",
                default_registry(),
                device.site_id,
                device.node_id,
            )
            stack.push_async_callback(store.close)
            done = CatchUpRound(setup_s=await fill_outbox(store, options.changes))
            print(
                f"(a) round {number}/{options.rounds}: outbox filled offline:"
                f" {options.changes} changes in {done.setup_s:.1f}s"
                f" ({options.changes / done.setup_s:.0f}/s, not timed); uplink starting",
                flush=True,
            )
            uplink = Uplink(store, cloud.url, device.token, SyncSettings())
            stack.push_async_callback(uplink.stop)
            cpu.start()
            await catch_up(store, uplink, watch, conn, device, done)
            done.cpu = cpu.stop()
            print(f"    ceiling: COPY + upsert of the same {options.changes} rows", flush=True)
            done.ceiling_s, _ = await copy_upsert_ceiling(conn, device.site_id)
            print(
                f"    catch-up {options.changes / done.catchup_s:,.0f}/s,"
                f" ceiling {options.changes / done.ceiling_s:,.0f}/s,"
                f" fraction {done.fraction():.3f}",
                flush=True,
            )
            results.rounds.append(done)
            if number < options.rounds:  # the last round's store and uplink go live in (b)
                await uplink.stop()
                await store.close()
        results.cpu["catchup_and_pull"] = results.median_round().cpu
        # The rounds grew the tables from nothing in seconds; autovacuum would vacuum them and
        # refresh their statistics within a minute, in the middle of (b). Do it now, so that
        # (b) measures a steady state: no vacuum running, and no query (the cloud's or the
        # watcher's) on a plan made for an empty table.
        await conn.execute("VACUUM (ANALYZE)")
        settle_heap()

        print(
            f"(b) live: {options.live_writes} writes at {options.rate:g}/s with the uplink online",
            flush=True,
        )
        cpu.start()
        await live(store, watch, conn, device, options, results)
        results.cpu["live"] = cpu.stop()
    return results


def settle_heap() -> None:
    """Leave what this process holds so far out of later garbage collections, as
    ``fynlo-edge run`` does at start-up. The store runs in this process, next to the
    benchmark's own data (the rounds' rows, every latency so far); a full collection walks
    all of it, and held the store for 25-75 ms in the middle of the measured phases."""
    gc.collect()
    gc.freeze()


def _show_cloud_log_on_error(
    cloud: CloudProcess,
) -> Callable[[type[BaseException] | None, BaseException | None, object], Awaitable[bool]]:
    async def show(kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is not None and not isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            print(f"--- tail of the cloud's log ---\n{cloud.tail()}", file=sys.stderr)
        return False

    return show
