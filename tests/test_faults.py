"""Faults end to end: killed edges, dropped connections, duplicated and reordered batches,
and skewed clocks, between real edges (SQLite + uplink) and the real cloud (HTTP + Postgres).

Double application shows as a wrong stock total (stock changes are counter deltas), loss as
a missing row or a checksum mismatch.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge.state import status_from_file
from edge.store import wall_clock_ms
from sync_protocol import wire

from .harness import (
    Edge,
    Fleet,
    edge_settings,
    fleet,
    sqlite_exec,
    wait_until,
    write_locked,
)

ITEMS = ("burger", "chips", "cola")
START_STOCK = 1000


async def open_site(f: Fleet, *, start: bool = True, **edge: Any) -> tuple[str, Edge]:
    """A site with one edge that has a menu and stock, synced."""
    site = await f.cloud.add_site("Harbour")
    e = await f.add_edge(site, start=start, **edge)
    await e.write_many(
        [("menu_items", i, "insert", {"name": i.title(), "price_pence": 300}) for i in ITEMS]
        + [("stock_levels", i, "insert", {"on_hand": START_STOCK}) for i in ITEMS]
    )
    await f.drain([e])
    return site, e


class Till:
    """Rings up sales on an edge (an order, its lines, a stock delta per line) and counts."""

    def __init__(self, edge: Edge, prefix: str = "") -> None:
        self.edge = edge
        self.prefix = prefix or edge.name
        self.sold = dict.fromkeys(ITEMS, 0)
        self.orders = 0

    async def sell(self, count: int = 1, lines: int = 2) -> None:
        """Ring up ``count`` orders of ``lines`` lines, one transaction each."""
        for _ in range(count):
            self.orders += 1
            order = f"{self.prefix}-o{self.orders}"
            writes: list[Any] = [
                ("orders", order, "insert", {"check_number": self.orders, "table_name": "T1"})
            ]
            for k in range(lines):
                item = ITEMS[(self.orders + k) % len(ITEMS)]
                self.sold[item] += 1
                writes.append(
                    (
                        "order_lines",
                        f"{order}-l{k}",
                        "insert",
                        {"order_id": order, "item_id": item, "quantity": 1},
                    )
                )
                writes.append(("stock_levels", item, "update", {"on_hand": -1}))
            await self.edge.write_many(writes)


async def restock(f: Fleet, site: str, amount: int, times: int = 1) -> dict[str, int]:
    """Dashboard restocks of every item; returns what was added per item."""
    for _ in range(times):
        await f.cloud.write(
            site, *[("stock_levels", i, "update", {"on_hand": amount}) for i in ITEMS]
        )
    return dict.fromkeys(ITEMS, amount * times)


async def assert_exact(f: Fleet, site: str, edges: list[Edge], *deltas: dict[str, int]) -> None:
    """Everything drained: stock totals exact everywhere, checksums equal, watermarks full."""
    want = {i: START_STOCK + sum(d.get(i, 0) for d in deltas) for i in ITEMS}
    cloud = {i: r["on_hand"] for i, r in (await f.cloud.rows(site, "stock_levels")).items()}
    assert cloud == want, "a stock delta was lost or applied twice at the cloud"
    for edge in edges:
        local = {i: r["on_hand"] for i, r in (await edge.rows("stock_levels")).items()}
        assert local == want, f"{edge.name}: stock differs from the cloud"
    await f.assert_converged(edges)
    nodes = await f.cloud.nodes(site)
    for edge in edges:
        assert nodes[edge.node]["watermark"] == edge.store.cursors().last_seq


def sold(till: Till) -> dict[str, int]:
    """A till's sales as negative deltas."""
    return {i: -n for i, n in till.sold.items()}


# -- killed at each step of a push ----------------------------------------------------------


@pytest.mark.parametrize("kill", ["cancel_uplink", "reopen_store"])
@pytest.mark.parametrize("point", ["before_send", "after_commit_ack_lost"])
def test_edge_killed_during_a_push(tmp_path: Path, pg_database: str, point: str, kill: str) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, edge = await open_site(f)
            till = Till(edge)
            watermark_before = (await f.cloud.nodes(site))[edge.node]["watermark"]
            action = "hold_request" if point == "before_send" else "hold_response"
            fault = edge.proxy.arm("/v1/sync/push", action)
            await till.sell(20)
            await asyncio.wait_for(fault.fired.wait(), 10)
            await till.sell(5)  # the tablets keep selling while the push hangs
            added = await restock(f, site, 7)
            watermark = (await f.cloud.nodes(site))[edge.node]["watermark"]
            if point == "before_send":
                assert watermark == watermark_before  # the cloud never saw the batch
            else:
                assert watermark > watermark_before  # committed; the edge never heard
                assert edge.store.cursors().acked_through == watermark_before

            last_seq = edge.store.cursors().last_seq
            if kill == "cancel_uplink":
                await edge.stop()
                assert edge.store.cursors().last_seq == last_seq
                await edge.start()
            else:
                await edge.crash()
                on_file = status_from_file(edge.path, wall_clock_ms())
                assert on_file.last_seq == last_seq  # nothing lost with the process
                assert on_file.outbox_depth == last_seq - on_file.acked_through > 0
                await edge.open()
                await edge.start()
            await till.sell(5)
            await f.drain([edge])
            await assert_exact(f, site, [edge], sold(till), added)
            assert len(await f.cloud.rows(site, "orders")) == till.orders

    asyncio.run(body())


# -- killed in the middle of applying a pull page -------------------------------------------

#: a trigger that burns CPU on every inserted menu item, so a page takes a while to apply
SLOW_TRIGGER = """CREATE TRIGGER slow_page AFTER INSERT ON menu_items BEGIN
    SELECT count(*) FROM (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c
                          WHERE x < 150000) SELECT x FROM c);
END"""

#: a trigger that fails the page's transaction part-way, as a power cut would
CRASH_TRIGGER = """CREATE TRIGGER crash_mid_page BEFORE INSERT ON menu_items
    WHEN NEW.id = 'new-15' BEGIN SELECT RAISE(ABORT, 'power cut mid-page'); END"""

NEW_ITEMS = [f"new-{n}" for n in range(1, 31)]


@pytest.mark.parametrize("kill", ["cancel_uplink", "reopen_store"])
def test_edge_killed_while_applying_a_pull_page(
    tmp_path: Path, pg_database: str, kill: str
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, edge = await open_site(f)
            till = Till(edge)
            await till.sell(10)
            await f.drain([edge])
            cursor_before = edge.store.cursors().pull_cursor
            sqlite_exec(edge.path, SLOW_TRIGGER if kill == "cancel_uplink" else CRASH_TRIGGER)
            # One dashboard transaction: a page of 30 new items and a restock.
            await f.cloud.write(
                site,
                *[
                    ("menu_items", pk, "insert", {"name": pk, "price_pence": 100})
                    for pk in NEW_ITEMS
                ],
                *[("stock_levels", i, "update", {"on_hand": 11}) for i in ITEMS],
            )
            added = dict.fromkeys(ITEMS, 11)

            if kill == "cancel_uplink":
                await wait_until(lambda: write_locked(edge.path), what="the page's transaction")
                sale = asyncio.create_task(till.sell(1))  # queued behind the page's transaction
                await edge.stop()  # the pull task is cancelled while the page is being applied
                assert write_locked(edge.path), "the page was not being applied any more"
                await edge.start()  # and restarted before that transaction has committed
                await sale
                await asyncio.to_thread(sqlite_exec, edge.path, "DROP TRIGGER slow_page")
            else:
                await wait_until(
                    lambda: (edge.uplink.status().last_error or _NoError).code == "store_error",
                    what="the page to fail part-way",
                )
                await edge.crash()
                on_file = status_from_file(edge.path, wall_clock_ms())
                assert on_file.pull_cursor == cursor_before  # the page left no trace
                sqlite_exec(edge.path, "DROP TRIGGER crash_mid_page")
                await edge.open()
                assert not set(NEW_ITEMS) & set(await edge.rows("menu_items"))
                await edge.start()

            # Whatever the cursor says is exactly what the rows hold: all of the page or none.
            have = set(await edge.rows("menu_items"))
            page_in = edge.store.cursors().pull_cursor > cursor_before
            assert (set(NEW_ITEMS) <= have) if page_in else not (set(NEW_ITEMS) & have)
            await till.sell(3)
            await f.drain([edge])
            assert set(NEW_ITEMS) <= set(await edge.rows("menu_items"))
            await assert_exact(f, site, [edge], sold(till), added)

    asyncio.run(body())


class _NoError:
    code = ""


# -- the connection drops mid-batch ---------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "action", "after_bytes"),
    [
        ("/v1/sync/push", "cut_request", 60),  # inside the request headers
        ("/v1/sync/push", "cut_request", 600),  # inside the frame
        ("/v1/sync/push", "cut_response", 40),  # the cloud committed; the ack is cut short
        ("/v1/sync/push", "cut_response", 200),
        ("/v1/sync/push", "drop_response", 0),
        ("/v1/sync/pull", "cut_response", 400),  # inside a page
    ],
)
def test_connection_drops_mid_batch(
    tmp_path: Path, pg_database: str, path: str, action: str, after_bytes: int
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, edge = await open_site(f)
            await edge.stop()
            till = Till(edge)
            await till.sell(40, lines=3)  # one push batch of 280 changes
            added = await restock(f, site, 3, times=10)
            await f.cloud.write(
                site, *[("menu_items", pk, "insert", {"name": pk * 5}) for pk in NEW_ITEMS]
            )
            fault = edge.proxy.arm(path, action, after_bytes)
            await edge.start()
            await asyncio.wait_for(fault.fired.wait(), 10)
            await f.drain([edge])
            error_seen = edge.uplink.status()
            assert error_seen.online
            await assert_exact(f, site, [edge], sold(till), added)
            assert set(NEW_ITEMS) <= set(await edge.rows("menu_items"))

    asyncio.run(body())


@pytest.mark.parametrize("action", ["cut_request", "cut_response", "drop_response"])
def test_a_fault_in_the_middle_of_a_sliding_window_loses_and_repeats_nothing(
    tmp_path: Path, pg_database: str, action: str
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, edge = await open_site(f, settings=edge_settings(batch_max_changes=20))
            await edge.stop()
            till = Till(edge)
            await till.sell(60, lines=3)  # several windows of 20-change batches
            # The sixth push is one sent as an earlier answer came back, with others in flight.
            fault = edge.proxy.arm("/v1/sync/push", action, after_bytes=60, skip=5)
            await edge.start()
            await asyncio.wait_for(fault.fired.wait(), 10)
            await f.drain([edge])
            await assert_exact(f, site, [edge], sold(till))
            pushes = edge.proxy.requests.count("POST /v1/sync/push")
            assert pushes > 3 * 3, pushes  # it did slide through more than one window

    asyncio.run(body())


# -- duplicated, reordered and replayed frames ----------------------------------------------


def test_duplicate_reordered_and_replayed_frames_change_nothing_twice(
    tmp_path: Path, pg_database: str
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, edge = await open_site(f, start=False)
            till = Till(edge)
            await till.sell(10)
            acked = edge.store.cursors().acked_through
            changes = await edge.store.outbox_after(acked, 1000)
            assert len(changes) == 50
            batch1 = wire.encode_push(site, edge.node, changes[:20])
            batch2 = wire.encode_push(site, edge.node, changes[20:])
            both = wire.encode_push(site, edge.node, changes)
            # The test is the edge's transport here: like the uplink, it records before sending.
            await edge.store.mark_sent(changes[-1].seq)

            async def snapshot() -> tuple[Any, ...]:
                node = (await f.cloud.nodes(site))[edge.node]
                return await f.cloud.head(site), await f.cloud.checksums(site), node["watermark"]

            async def push(frame: bytes) -> tuple[int, Any]:
                status, data = await f.cloud.push_raw(edge.token, frame)
                return status, wire.decode_ack(data) if status == 200 else wire.decode_error(data)

            start = await snapshot()
            status, (code, _, details) = await push(batch2)  # batch 2 overtakes batch 1
            assert (status, code, details["expected"]) == (409, "sequence_gap", acked + 1)
            assert await snapshot() == start

            status, ack = await push(batch1)
            assert status == 200 and ack.acked_through == acked + 20
            assert ack.outcomes.get("duplicate") == 0
            after1 = await snapshot()
            status, again = await push(batch1)  # the same frame twice
            assert status == 200 and again.outcomes["duplicate"] == 20
            assert again.acked_through == acked + 20 and again.segments == ack.segments
            assert await snapshot() == after1

            status, ack2 = await push(batch2)  # now in order: recovered
            assert status == 200 and ack2.acked_through == acked + 50
            after2 = await snapshot()
            assert after2 != after1
            for old, size in ((batch1, 20), (batch2, 30), (both, 50), (batch1, 20)):
                status, replay = await push(old)  # replays after newer frames
                assert status == 200 and replay.acked_through == acked + 50
                assert replay.outcomes["duplicate"] == size
                assert sum(v for k, v in replay.outcomes.items() if k != "duplicate") == 0
                assert await snapshot() == after2

            # The edge never heard any of those acks: it sends everything again, harmlessly.
            assert edge.store.cursors().acked_through == acked
            await f.drain([edge])
            assert await snapshot() == after2
            await assert_exact(f, site, [edge], sold(till))

    asyncio.run(body())


# -- an edge whose clock is an hour off -----------------------------------------------------

HOUR_MS = 3_600_000


@pytest.mark.parametrize("offset_ms", [-HOUR_MS, HOUR_MS])
def test_an_edge_an_hour_off_converges_and_shows_its_skew(
    tmp_path: Path, pg_database: str, offset_ms: int
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, steady = await open_site(f)
            skewed = await f.add_edge(site, "skewed", clock_offset_ms=offset_ms, start=True)
            await f.drain()
            tills = [Till(steady), Till(skewed)]
            for round_ in range(3):
                for till in tills:
                    await till.sell(5)
                await skewed.write("menu_items", "burger", "update", {"name": f"S{round_}"})
                await steady.write("menu_items", "chips", "update", {"price_pence": 350 + round_})
                await f.cloud.write(site, ("menu_items", "cola", "update", {"name": f"C{round_}"}))
            added = await restock(f, site, 4, times=2)
            await f.drain()
            await assert_exact(f, site, [steady, skewed], *map(sold, tills), added)

            status = await skewed.status()
            assert abs(status["clock_skew_ms"] - offset_ms) < 5_000, status["clock_skew_ms"]
            assert abs((await steady.status())["clock_skew_ms"]) < 5_000
            assert status["outbox_depth"] == 0 and status["oldest_unsynced_age_ms"] == 0
            clock = (await f.cloud.owner("GET", "/v1/status"))["clock"]
            if offset_ms > 0:  # the cloud would not let a clock an hour fast drag its own
                assert clock["refused"] > 0
                assert clock["hlc"] >> 16 < wall_clock_ms() + 60_000

            # Offline for ten minutes (by the edge's own clock): its status says so.
            await skewed.offline()
            await tills[1].sell(1)
            skewed.clock.offset_ms += 600_000
            age = (await skewed.status())["oldest_unsynced_age_ms"]
            assert 600_000 <= age < 660_000, age
            await skewed.online()
            await f.drain()
            await assert_exact(f, site, [steady, skewed], *map(sold, tills), added)

    asyncio.run(body())


def test_an_edit_made_after_seeing_a_cloud_edit_wins_even_with_a_slow_clock(
    tmp_path: Path, pg_database: str
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path, {"orders": "smart_merge"}) as f:
            site = await f.cloud.add_site("Harbour")
            steady = await f.add_edge(site, "steady")
            slow = await f.add_edge(site, "slow", clock_offset_ms=-HOUR_MS)
            # Control: before it has seen anything, the slow edge's edit is stamped an hour
            # back, so a concurrent edit made later by the steady edge wins the tie-break.
            await slow.write("orders", "o2", "update", {"notes": "slow, unaware"})
            for pk in ("o1", "o2"):
                await steady.write("orders", pk, "insert", {"check_number": 1, "notes": "-"})
            await steady.write("orders", "o2", "update", {"notes": "steady"})
            await steady.sync()

            # The steady edge edits o1 offline; the dashboard edits it after that; the slow
            # edge sees the dashboard's edit and only then edits o1 itself.
            await steady.write("orders", "o1", "update", {"notes": "steady, earlier"})
            await f.cloud.write(site, ("orders", "o1", "update", {"notes": "dashboard"}))
            await slow.sync()
            assert (await slow.rows("orders"))["o1"]["notes"] == "dashboard"
            await slow.write("orders", "o1", "update", {"notes": "slow, after seeing it"})
            await slow.sync()
            await steady.sync()  # its earlier edit is concurrent with the slow edge's
            await f.drain()

            notes = {pk: r["notes"] for pk, r in (await f.cloud.rows(site, "orders")).items()}
            assert notes == {"o1": "slow, after seeing it", "o2": "steady"}
            for edge in (steady, slow):
                assert {pk: r["notes"] for pk, r in (await edge.rows("orders")).items()} == notes
            await f.assert_converged()
            assert abs((await slow.status())["clock_skew_ms"] + HOUR_MS) < 5_000

    asyncio.run(body())


# -- an edge restored from an old copy of its file ------------------------------------------


def restore(source: Path, target: Path) -> None:
    """Copy a closed SQLite file over another, dropping the target's WAL files."""
    for suffix in ("-wal", "-shm"):
        Path(f"{target}{suffix}").unlink(missing_ok=True)
    target.write_bytes(source.read_bytes())


@pytest.mark.parametrize("new_sales", [1, 12])
def test_an_edge_restored_from_an_old_copy_never_loses_changes_silently(
    tmp_path: Path, pg_database: str, new_sales: int
) -> None:
    """Restored from yesterday's copy, the edge gets its own later changes back from the
    cloud, and its new changes, which reuse sequence numbers the cloud already holds, are
    never taken for duplicates: pushing stops, visibly, with every new change kept."""

    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, edge = await open_site(f)
            till = Till(edge)
            await till.sell(2)
            await f.drain([edge])
            await edge.crash()
            backup = tmp_path / "backup.sqlite"
            await asyncio.to_thread(restore, edge.path, backup)  # closed: WAL checkpointed
            await edge.restart()
            await till.sell(4)  # 20 more changes, synced, then the box dies
            await f.drain([edge])
            await edge.crash()
            await asyncio.to_thread(restore, backup, edge.path)
            await edge.open()
            await edge.start()
            await f.drain([edge])  # nothing to push yet; pulls its lost orders back
            assert len(await edge.rows("orders")) == till.orders == 6

            later = Till(edge, prefix="after-restore")
            await edge.stop()  # the new sales go out together, in one push
            await later.sell(new_sales)
            await edge.start()
            new = {f"after-restore-o{n}" for n in range(1, new_sales + 1)}

            def stopped() -> bool:
                status = edge.uplink.status()
                return status.stuck is not None or not status.running

            await wait_until(stopped, what="pushing to stop")
            status = await edge.status()
            assert status["last_error"]["code"] == "cloud_ahead_of_node"
            assert status["outbox_depth"] == new_sales * 5
            assert not new & set(await f.cloud.rows(site, "orders")), "taken for duplicates"

    asyncio.run(body())
