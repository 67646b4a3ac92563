"""End to end: real edges (SQLite + uplink) and the real cloud (HTTP + Postgres), two sites.

Every test runs the cloud app on a fresh Postgres database and edges on SQLite files; the
edges reach the cloud through their own TCP proxy (``tests.harness``), which is how an edge
is taken offline.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from sync_protocol.schema import Strategy

from .harness import Edge, fleet, gather_all, wait_until

ITEMS = ("burger", "chips", "cola", "salad")
DAY = "2026-11-26"


def order_fields(number: int, **extra: Any) -> dict[str, Any]:
    """The fields of a new order."""
    return {
        "check_number": number,
        "business_day": DAY,
        "opened_at_ms": 1_700_000_000_000 + number,
        "table_name": f"T{number % 20}",
        "covers": 2,
        **extra,
    }


def line_fields(order: str, item: str, by: str) -> dict[str, Any]:
    """The fields of a new order line."""
    return {
        "order_id": order,
        "item_id": item,
        "name": item.title(),
        "quantity": 1,
        "unit_price_pence": 450,
        "added_by": by,
    }


async def seed_menu(edge: Edge, price: int, on_hand: int) -> None:
    """Menu items and stock rows for ``ITEMS`` (same ids at every site)."""
    await edge.write_many(
        [("menu_items", i, "insert", {"name": i.title(), "price_pence": price}) for i in ITEMS]
        + [("stock_levels", i, "insert", {"on_hand": on_hand, "par_level": 10}) for i in ITEMS]
    )


# -- (a) a long offline period, then catch-up -----------------------------------------------


def test_long_offline_period_then_catch_up(tmp_path: Path, pg_database: str) -> None:
    orders, lines_per_order = 120, 8

    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site_a = await f.cloud.add_site("Harbour")
            site_b = await f.cloud.add_site("Quay")
            a = await f.add_edge(site_a, "a", start=True)
            b = await f.add_edge(site_b, "b", start=True)
            await seed_menu(a, price=450, on_hand=5000)
            await seed_menu(b, price=999, on_hand=7)
            await b.write("orders", "o1", "insert", order_fields(1, notes="site B"))
            await f.drain()
            b_cloud_before = await f.cloud.checksums(site_b)
            b_edge_before = await b.checksums()
            assert b_cloud_before == {t: b_edge_before[t] for t in b_cloud_before}

            await a.offline()
            await wait_until(lambda: not a.uplink.status().online, what="a to notice")
            sold = dict.fromkeys(ITEMS, 0)
            depths: list[int] = []
            ages: list[int] = []
            written = 0
            for n in range(1, orders + 1):
                order = f"o{n}"
                writes: list[Any] = [("orders", order, "insert", order_fields(n))]
                for k in range(lines_per_order):
                    item = ITEMS[(n + k) % len(ITEMS)]
                    sold[item] += 1
                    writes.append(
                        ("order_lines", f"{order}-l{k}", "insert", line_fields(order, item, "a"))
                    )
                    writes.append(("stock_levels", item, "update", {"on_hand": -1}))
                writes.append(("orders", order, "update", {"status": "fired"}))
                written += len(await a.write_many(writes))
                if n % 30 == 0:
                    status = await a.status()
                    assert not status["online"] and status["outbox_depth"] == written
                    assert status["last_error"]["code"] == "network"
                    depths.append(status["outbox_depth"])
                    ages.append(status["oldest_unsynced_age_ms"])
            assert written > 2000
            assert depths == sorted(depths) and len(set(depths)) == len(depths)
            assert ages == sorted(ages) and ages[-1] > ages[0] >= 0 and ages[-1] > 0
            # The dashboard restocks site A meanwhile; site A's cloud rows have not moved.
            await f.cloud.write(
                site_a, *[("stock_levels", i, "update", {"on_hand": 50}) for i in ITEMS]
            )
            assert (await f.cloud.checksums(site_a))["order_lines"] == (0, 0)

            await a.online()
            await f.drain(timeout_s=60)
            status = await a.status()
            assert status["online"] and status["last_error"] is None
            assert status["outbox_depth"] == 0 and status["oldest_unsynced_age_ms"] == 0
            assert status["acked_through"] == status["last_seq"] == written + 2 * len(ITEMS)
            assert status["catchup"]["pushed"] >= written
            assert status["catchup"]["push_backlog"] == 0 == status["catchup"]["pull_backlog"]

            sums = await f.assert_converged([a])
            assert sums["orders"][0] == orders
            assert sums["order_lines"][0] == orders * lines_per_order
            stock = await f.cloud.rows(site_a, "stock_levels")
            assert {i: r["on_hand"] for i, r in stock.items()} == {
                i: 5000 + 50 - sold[i] for i in ITEMS
            }
            assert {i: r["on_hand"] for i, r in (await a.rows("stock_levels")).items()} == {
                i: r["on_hand"] for i, r in stock.items()
            }
            fired = {r["status"] for r in (await a.rows("orders")).values()}
            assert fired == {"fired"}

            # Site B: untouched by A's catch-up, and none of A's rows ever reached it.
            assert await f.cloud.checksums(site_b) == b_cloud_before
            assert await b.checksums() == b_edge_before
            assert set(await b.rows("orders")) == {"o1"}
            assert {r["price_pence"] for r in (await b.rows("menu_items")).values()} == {999}
            assert {r["price_pence"] for r in (await a.rows("menu_items")).values()} == {450}
            assert "o1" in await a.rows("orders")
            assert (await a.rows("orders"))["o1"].get("notes") is None  # A's own o1, not B's

    asyncio.run(body())


# -- (b) the same order edited at the edge and at the cloud, under each strategy -------------

BASE = {"table_name": "T1", "covers": 2, "notes": "-"}

#: strategy -> {order: (table_name, covers, notes)} after both sides' edits; o1's edge edit
#: is stamped after the cloud's, o2's before it
EXPECTED = {
    Strategy.SERVER_WINS: {"o1": ("C1", 4, "-"), "o2": ("C2", 4, "-")},
    Strategy.CLIENT_WINS: {"o1": ("E1", 4, "vip"), "o2": ("E2", 4, "vip")},
    Strategy.SMART_MERGE: {"o1": ("E1", 4, "vip"), "o2": ("C2", 4, "vip")},
    Strategy.MANUAL: {"o1": ("C1", 4, "vip"), "o2": ("C2", 4, "vip")},
}


async def concurrent_order_edits(f: Any, site: str, edge: Edge) -> None:
    """o1 and o2 edited on both sides while apart: disjoint columns plus ``table_name``.

    The edge's clock runs a minute slow, so its o2 edit is stamped with its last observed
    cloud timestamp + 1, before the cloud's edits (which come after two filler writes, each
    taking a cloud timestamp). Its clock is then moved two minutes ahead for the o1 edit,
    which is so stamped after the cloud's.
    """
    edge.clock.offset_ms = -60_000
    for n, pk in enumerate(("o1", "o2"), start=1):
        await edge.write("orders", pk, "insert", order_fields(n, **BASE))
    await f.drain()
    await edge.write("orders", "o2", "update", {"table_name": "E2", "notes": "vip"})
    await f.cloud.write(
        site,
        ("menu_categories", "filler1", "insert", {"name": "Mains"}),
        ("menu_categories", "filler2", "insert", {"name": "Sides"}),
        ("orders", "o1", "update", {"table_name": "C1", "covers": 4}),
        ("orders", "o2", "update", {"table_name": "C2", "covers": 4}),
    )
    edge.clock.offset_ms = 120_000
    await edge.write("orders", "o1", "update", {"table_name": "E1", "notes": "vip"})
    await f.drain()


@pytest.mark.parametrize("strategy", list(Strategy))
def test_same_order_edited_on_edge_and_cloud(
    tmp_path: Path, pg_database: str, strategy: Strategy
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path, {"orders": strategy.value}) as f:
            site = await f.cloud.add_site("Harbour")
            edge = await f.add_edge(site)
            assert edge.registry.get("orders").strategy is strategy
            await concurrent_order_edits(f, site, edge)

            cloud_rows = await f.cloud.rows(site, "orders")
            got = {pk: (r["table_name"], r["covers"], r["notes"]) for pk, r in cloud_rows.items()}
            assert got == EXPECTED[strategy]
            assert await edge.rows("orders") == cloud_rows
            await f.assert_converged()
            conflicts = await f.cloud.conflicts(site)
            if strategy is Strategy.MANUAL:
                assert sorted(
                    (c["pk"], c["columns"], c["local"], c["remote"]) for c in conflicts
                ) == [
                    ("o1", ["table_name"], {"table_name": "E1"}, {"table_name": "C1"}),
                    ("o2", ["table_name"], {"table_name": "E2"}, {"table_name": "C2"}),
                ]
            else:
                assert conflicts == []

    asyncio.run(body())


# -- (c) a manual conflict: listed, resolved through the API, and back at the edge -----------


def test_manual_conflict_is_listed_resolved_and_reaches_the_edge(
    tmp_path: Path, pg_database: str
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path, {"orders": "manual"}) as f:
            site = await f.cloud.add_site("Harbour")
            edge = await f.add_edge(site)
            await concurrent_order_edits(f, site, edge)

            owner_list = await f.cloud.conflicts(site)
            device_list = await f.cloud.device_conflicts(edge.token)
            assert [c["pk"] for c in owner_list] == ["o2", "o1"]  # oldest first
            assert device_list == owner_list
            mirrored = await edge.store.conflicts()
            assert sorted(c["id"] for c in mirrored) == sorted(c["id"] for c in owner_list)
            assert (await edge.status())["open_conflicts"] == 2
            by_pk = {c["pk"]: c for c in owner_list}
            assert by_pk["o1"]["change_origin"] == edge.node

            # A manager at the edge keeps the edge's value for o1 (device endpoint, msgpack).
            done = await f.cloud.device_resolve(edge.token, by_pk["o1"]["id"], "local")
            assert done["conflict"]["resolved_by"] == edge.node
            await edge.sync()
            assert (await edge.rows("orders"))["o1"]["table_name"] == "E1"
            assert [c["pk"] for c in await edge.store.conflicts()] == ["o2"]
            assert (await edge.status())["open_conflicts"] == 1

            # The owner types a value for o2 (owner endpoint, JSON).
            done = await f.cloud.resolve(site, by_pk["o2"]["id"], "values", {"table_name": "Booth"})
            assert done["conflict"]["resolution"] == {
                "choose": "values",
                "values": {"table_name": "Booth"},
            }
            await edge.sync()
            assert (await edge.rows("orders"))["o2"]["table_name"] == "Booth"
            assert await edge.store.conflicts() == []
            assert (await edge.status())["open_conflicts"] == 0
            assert await f.cloud.conflicts(site) == []
            assert len(await f.cloud.conflicts(site, include_resolved=True)) == 2
            await f.drain()
            assert await edge.rows("orders") == await f.cloud.rows(site, "orders")
            await f.assert_converged()

    asyncio.run(body())


# -- (d) two tablets' worth of lines on two edges of one site, plus the cloud -----------------


def test_concurrent_lines_on_two_edges_and_stock_deltas_add_up(
    tmp_path: Path, pg_database: str
) -> None:
    per_edge, restocks = 60, 20

    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site = await f.cloud.add_site("Harbour")
            a = await f.add_edge(site, "bar", start=True)
            b = await f.add_edge(site, "terrace", start=True)
            await seed_menu(a, price=450, on_hand=1000)
            await a.write("orders", "o1", "insert", order_fields(1))
            await f.drain()
            assert "o1" in await b.rows("orders")

            async def tablet(edge: Edge) -> None:
                for k in range(per_edge):
                    item = ITEMS[k % len(ITEMS)]
                    await edge.write_many(
                        [
                            (
                                "order_lines",
                                f"{edge.name}-l{k}",
                                "insert",
                                line_fields("o1", item, edge.name),
                            ),
                            ("stock_levels", item, "update", {"on_hand": -1}),
                        ]
                    )

            async def dashboard() -> None:
                for k in range(restocks):
                    item = ITEMS[k % len(ITEMS)]
                    await f.cloud.write(site, ("stock_levels", item, "update", {"on_hand": 5}))

            await gather_all(tablet(a), tablet(b), dashboard())
            await f.drain(timeout_s=60)

            want_lines = {f"{e}-l{k}" for e in ("bar", "terrace") for k in range(per_edge)}
            cloud_lines = await f.cloud.rows(site, "order_lines")
            assert set(cloud_lines) == want_lines
            assert {r["order_id"] for r in cloud_lines.values()} == {"o1"}
            assert await a.rows("order_lines") == cloud_lines == await b.rows("order_lines")
            each = per_edge // len(ITEMS)
            restocked = restocks // len(ITEMS) * 5
            want_stock = {i: 1000 - 2 * each + restocked for i in ITEMS}
            for stock in (
                await f.cloud.rows(site, "stock_levels"),
                await a.rows("stock_levels"),
                await b.rows("stock_levels"),
            ):
                assert {i: r["on_hand"] for i, r in stock.items()} == want_stock
            await f.assert_converged()

    asyncio.run(body())


def test_conflicts_mirror_follows_a_resolution_and_a_new_conflict_in_one_pull(
    tmp_path: Path, pg_database: str
) -> None:
    """One conflict is resolved and another parked between two pulls: the open count stays
    the same, but the edge's mirror must still show the new one and drop the old one."""

    async def body() -> None:
        async with fleet(pg_database, tmp_path, {"orders": "manual"}) as f:
            site = await f.cloud.add_site("Harbour")
            edge = await f.add_edge(site)
            for n, pk in enumerate(("o1", "o2"), start=1):
                await edge.write("orders", pk, "insert", order_fields(n, **BASE))
            await edge.sync()

            async def park(pk: str) -> None:
                await f.cloud.write(site, ("orders", pk, "update", {"table_name": f"C-{pk}"}))
                await edge.write("orders", pk, "update", {"table_name": f"E-{pk}"})

            await park("o1")
            await edge.sync()
            [first] = await f.cloud.conflicts(site)
            assert [c["id"] for c in await edge.store.conflicts()] == [first["id"]]

            await park("o2")  # parked at the next push...
            await f.cloud.resolve(site, first["id"], "local")  # ...as o1's is settled
            await edge.sync()
            [second] = await f.cloud.conflicts(site)
            assert second["pk"] == "o2"
            assert [c["id"] for c in await edge.store.conflicts()] == [second["id"]]
            assert (await edge.rows("orders"))["o1"]["table_name"] == "E-o1"
            await f.drain()
            await f.assert_converged()

    asyncio.run(body())


def test_a_full_edge_disk_pauses_the_pull_and_it_resumes_when_room_is_freed(
    tmp_path: Path, pg_database: str
) -> None:
    """The edge's database at its cap (a full disk) cannot take a pulled page: the uplink
    reports storage_full and retries, it neither stops nor crashes, and once room is freed
    the same rows arrive and both sides agree."""
    cap = 1024 * 1024

    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site = await f.cloud.add_site("Harbour")
            edge = await f.add_edge(site, "a", max_db_bytes=cap)
            raw = sqlite3.connect(edge.path, isolation_level=None)  # another process, uncapped
            try:
                raw.execute("CREATE TABLE ballast (b BLOB)")
                page_size = raw.execute("PRAGMA page_size").fetchone()[0]
                while raw.execute("PRAGMA page_count").fetchone()[0] * page_size < cap - 32768:
                    raw.execute("INSERT INTO ballast VALUES (zeroblob(8000))")
                items = [
                    ("menu_items", f"m{n}", "insert", {"name": f"Dish {n} " + "x" * 200})
                    for n in range(300)
                ]
                await f.cloud.write(site, *items)
                await edge.start()

                def full() -> bool:
                    error = edge.uplink.status().last_error
                    return error is not None and error.code == "storage_full"

                await wait_until(full, what="the pull to meet the full disk")
                await asyncio.sleep(0.5)  # a few retries later it is still there, still trying
                assert full() and edge.running and edge.uplink.status().stuck is None
                assert await edge.rows("menu_items") == {}
                raw.execute("DROP TABLE ballast")  # room again (free pages inside the file)
            finally:
                raw.close()
            await f.drain([edge])
            assert len(await edge.rows("menu_items")) == 300
            await f.assert_converged([edge])

    asyncio.run(body())


def test_a_database_locked_by_another_process_delays_the_push_and_loses_nothing(
    tmp_path: Path, pg_database: str
) -> None:
    """Another process holds the edge's write lock past the busy timeout (a backup tool, an
    operator's shell): recording a push fails with storage_busy; the uplink backs off instead
    of stopping, and once the lock is gone every change reaches the cloud exactly once."""

    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site = await f.cloud.add_site("Harbour")
            edge = await f.add_edge(site, "a")
            await edge.write_many(
                [("orders", f"o{n}", "insert", order_fields(n)) for n in range(1, 21)]
            )
            raw = sqlite3.connect(edge.path, isolation_level=None)
            try:
                raw.execute("BEGIN IMMEDIATE")  # the write lock, held
                await edge.start()

                def busy() -> bool:
                    error = edge.uplink.status().last_error
                    return error is not None and error.code == "storage_busy"

                await wait_until(busy, what="the push to meet the lock")
                assert edge.running and edge.uplink.status().stuck is None
            finally:
                raw.execute("ROLLBACK")
                raw.close()
            await f.drain([edge])
            assert sorted(await f.cloud.rows(site, "orders")) == sorted(
                f"o{n}" for n in range(1, 21)
            )
            await f.assert_converged([edge])

    asyncio.run(body())


# -- payments sync, and are never merged by a rule ------------------------------------------


def test_payments_sync_and_concurrent_changes_to_one_go_to_a_person(
    tmp_path: Path, pg_database: str
) -> None:
    async def body() -> None:
        # Even a fleet configured with smart_merge elsewhere keeps money manual.
        async with fleet(pg_database, tmp_path, {"orders": "smart_merge"}) as f:
            site = await f.cloud.add_site("Harbour")
            edge = await f.add_edge(site)
            await edge.write("orders", "o1", "insert", order_fields(1))
            payment = {
                "order_id": "o1", "business_day": DAY, "tender": "card", "amount_pence": 2500,
                "tip_pence": 250, "charged_pence": 2750, "status": "pending",
                "provider_ref": "pi_1",
            }  # fmt: skip
            await edge.write("payments", "pay_1", "insert", payment)
            await f.drain()
            assert (await f.cloud.rows(site, "payments"))["pay_1"]["charged_pence"] == 2750
            # Apart: the provider's webhook says it failed; the edge's poll saw it succeed.
            await f.cloud.write(site, ("payments", "pay_1", "update", {"status": "failed"}))
            await edge.write("payments", "pay_1", "update", {"status": "succeeded"})
            await f.drain()
            [parked] = [c for c in await f.cloud.conflicts(site) if c["table"] == "payments"]
            assert parked["pk"] == "pay_1" and parked["columns"] == ["status"]
            assert (parked["local"], parked["remote"]) == (
                {"status": "succeeded"}, {"status": "failed"},
            )  # fmt: skip
            assert (await f.cloud.rows(site, "payments"))["pay_1"]["status"] == "failed"
            await f.cloud.resolve(site, parked["id"], "local")
            await f.drain()
            assert (await edge.rows("payments"))["pay_1"]["status"] == "succeeded"
            await f.assert_converged()

    asyncio.run(body())
