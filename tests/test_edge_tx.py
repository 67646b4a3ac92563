"""Domain transactions on the edge store (``EdgeStore.transaction``) and its live events."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edge.store import EdgeStore
from edge.tx import Event, Tx
from shared.registry import default_registry
from sync_protocol.changes import FeedEntry, Op, RowState, Version
from sync_protocol.errors import ErrorCode, SyncError
from sync_protocol.hlc import pack
from sync_protocol.wire import PullPage, PushAck

T = TypeVar("T")
T0 = 1_700_000_000_000
LIVE = ("orders", "menu_items")


def run(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    return asyncio.run(fn(*args))


async def open_store(path: Path) -> EdgeStore:
    return await EdgeStore.open(
        path / "edge.sqlite", default_registry(), "site-1", "edge-1", live_tables=LIVE
    )


def raw(path: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path / "edge.sqlite")
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _ticker(i: int) -> Callable[[Tx], None]:
    return lambda tx: tx.emit("tick", {"i": i})


class Collector:
    """A subscriber that keeps every published event."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def __call__(self, events: list[Event]) -> None:
        self.events.extend(events)


def test_a_transaction_reads_its_own_writes_and_commits_all_of_it(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.transaction(
                lambda tx: tx.execute("CREATE TABLE IF NOT EXISTS notes (id TEXT, body TEXT)")
            )

            def open_order(tx: Tx) -> int:
                tx.write("orders", "o1", Op.INSERT, {"table_name": "T4", "covers": 2})
                tx.write("orders", "o1", Op.UPDATE, {"covers": 3})
                seen = tx.get("orders", "o1")
                assert seen is not None and seen["covers"] == 3
                tx.execute("INSERT INTO notes VALUES (?, ?)", ("o1", "birthday"))
                tx.emit("custom", {"order": "o1"})
                return len(tx.query("SELECT * FROM notes"))

            assert await store.transaction(open_order) == 1
            assert (await store.get("orders", "o1") or {})["covers"] == 3
            assert [c.seq for c in await store.outbox_after(0, 10)] == [1, 2]
            assert store.changed.is_set()  # the uplink hears of it

    run(body)


def test_a_new_row_is_inserted_unread_and_an_existing_id_is_refused_not_merged(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("orders", "o1", Op.INSERT, {"table_name": "T1", "covers": 2})
            statements: list[str] = []

            def add(tx: Tx, pk: str) -> None:
                tx._conn.set_trace_callback(statements.append)
                try:
                    tx.write("orders", pk, Op.INSERT, {"table_name": "T9"}, new=True)
                finally:
                    tx._conn.set_trace_callback(None)

            await store.transaction(lambda tx: add(tx, "o2"))
            assert not [s for s in statements if s.startswith("SELECT")]  # not read first
            assert (await store.get("orders", "o2") or {})["table_name"] == "T9"
            with pytest.raises(sqlite3.IntegrityError):  # o1 exists: nothing merged into it
                await store.transaction(lambda tx: add(tx, "o1"))
            assert (await store.get("orders", "o1") or {})["table_name"] == "T1"
            assert [c.pk for c in await store.outbox_after(0, 10)] == ["o1", "o2"]
            with pytest.raises(ValueError):
                await store.transaction(
                    lambda tx: tx.write("orders", "o1", Op.UPDATE, {"covers": 1}, new=True)
                )

    run(body)


def test_a_small_transaction_runs_on_the_loop_and_a_heavy_one_on_the_writer_thread(
    tmp_path: Path,
) -> None:
    """Both commit on the writer thread (its fsync never holds the event loop)."""

    async def body() -> None:
        async with await open_store(tmp_path) as store:
            loop_thread = threading.get_ident()
            commits: list[int] = []
            store._writer.set_trace_callback(
                lambda sql: commits.append(threading.get_ident()) if sql == "COMMIT" else None
            )

            def write(pk: str) -> Callable[[Tx], int]:
                def fn(tx: Tx) -> int:
                    tx.write("orders", pk, Op.INSERT, {"table_name": "T1"})
                    return threading.get_ident()

                return fn

            assert await store.transaction(write("o1")) == loop_thread
            assert len(commits) == 1 and commits[0] != loop_thread
            writer_thread = commits[0]
            assert await store.transaction(write("o2"), heavy=True) == writer_thread
            assert commits == [writer_thread, writer_thread]
            assert sorted(await store.rows("orders")) == ["o1", "o2"]
            # write_many: a few rows on the loop, an import's worth on the writer thread
            inserts: set[int] = set()
            store._writer.set_trace_callback(
                lambda sql: inserts.add(threading.get_ident()) if sql.startswith("INSERT") else None
            )
            await store.write_many(
                [("orders", f"s{i}", Op.INSERT, {"covers": i}) for i in range(5)]
            )
            assert inserts == {loop_thread}
            inserts.clear()
            await store.write_many(
                [("orders", f"b{i}", Op.INSERT, {"covers": i}) for i in range(101)]
            )
            assert inserts == {writer_thread}
            assert len(await store.rows("orders")) == 2 + 5 + 101
            # a pulled page that only confirms this node's write runs on the loop; one with
            # rows to write (however few: their triggers, their size) on the writer thread
            writes: set[int] = set()
            store._writer.set_trace_callback(
                lambda sql: (
                    writes.add(threading.get_ident())
                    if "menu_items" in sql or "UPDATE outbox" in sql
                    else None
                )
            )

            def page(first: int, rows: int) -> PullPage:
                states = [
                    RowState(f"m{first + i}", {"name": "Soup", "price_pence": 450},
                             Version(first + i, pack(T0), "cloud"), {}, False)
                    for i in range(rows)
                ]  # fmt: skip
                entries = [FeedEntry(s.version.rev, "menu_items", s) for s in states]
                segments = ((1, 1, first + rows),)  # this node's o1, confirmed
                return PullPage(first - 1, first + rows, first + rows, False, 0, T0, pack(T0),
                                entries, segments)  # fmt: skip

            await store.apply_page(page(1, 0))
            assert writes == {loop_thread}
            writes.clear()
            await store.apply_page(page(2, 1))
            assert writes == {writer_thread}
            assert len(await store.rows("menu_items")) == 1

    run(body)


class CommitLevels:
    """The ``synchronous`` level of each ``COMMIT`` on a connection, replayed from its trace."""

    def __init__(self, level: str) -> None:
        self.level = level
        self.commits: list[str] = []

    def __call__(self, sql: str) -> None:
        if sql.startswith("PRAGMA synchronous = "):
            self.level = sql.rsplit(" ", 1)[1]
        elif sql == "COMMIT":
            self.commits.append(self.level)

    def take(self) -> list[str]:
        seen, self.commits = self.commits, []
        return seen


def test_writes_are_fsynced_and_only_bookkeeping_the_cloud_can_redo_is_not(
    tmp_path: Path,
) -> None:
    """A tablet's write and "about to send" commit at FULL; an ack and a pulled page that
    only confirms alone commit at NORMAL (a power cut may lose them, and they are redone from
    the cloud); queued with a write, they share its fsynced commit. A page with rows, which
    tablets hear of at once, is fsynced."""

    def ack(through: int) -> PushAck:
        return PushAck(
            through, through, {"applied": 1}, T0, pack(T0), ((through, through, through),)
        )

    def page(cursor: int, seq: int) -> PullPage:
        return PullPage(cursor, cursor + 1, cursor + 1, False, 0, T0, pack(T0), [],
                        ((seq, seq, cursor + 1),))  # fmt: skip

    async def body() -> None:
        async with await open_store(tmp_path) as store:
            levels = CommitLevels("FULL")
            store._writer.set_trace_callback(levels)
            await store.write("orders", "o1", Op.INSERT, {"table_name": "T1"})
            await store.mark_sent(1)
            assert levels.take() == ["FULL", "FULL"]
            await store.record_ack(ack(1))
            await store.apply_page(page(0, 1))
            assert levels.take() == ["NORMAL", "NORMAL"]
            assert store.cursors().acked_through == 1 and store.cursors().pull_cursor == 1
            await store.write("orders", "o2", Op.INSERT, {"table_name": "T2"})
            assert levels.take() == ["FULL"]
            # queued together, an ack and a tablet's write share one commit, fsynced
            await store.mark_sent(2)
            levels.take()
            await asyncio.gather(
                store.record_ack(ack(2)),
                store.write("orders", "o3", Op.INSERT, {"table_name": "T3"}),
            )
            assert levels.take() == ["FULL"]
            assert store.cursors().acked_through == 2 and store.cursors().last_seq == 3
            # a page with a row for the tablets (and its live event) commits at FULL
            state = RowState("m1", {"name": "Soup", "price_pence": 450},
                             Version(2, pack(T0), "cloud"), {}, False)  # fmt: skip
            await store.apply_page(
                PullPage(1, 2, 2, False, 0, T0, pack(T0), [FeedEntry(2, "menu_items", state)])
            )
            assert levels.take() == ["FULL"]
        # what the bookkeeping wrote is on disk for the next process
        async with await open_store(tmp_path) as store:
            cursors = store.cursors()
            assert (cursors.acked_through, cursors.pull_cursor, cursors.last_seq) == (2, 2, 3)
        # a store opened below FULL never raises the level for bookkeeping
        for level in ("NORMAL", "OFF"):
            path = tmp_path / level
            path.mkdir()
            store = await EdgeStore.open(
                path / "edge.sqlite", default_registry(), "site-1", "edge-1", synchronous=level
            )
            async with store:
                levels = CommitLevels(level)
                store._writer.set_trace_callback(levels)
                await store.write("orders", "o1", Op.INSERT, {"table_name": "T1"})
                await store.mark_sent(1)
                await store.record_ack(ack(1))
                assert levels.take() == [level] * 3

    run(body)


def test_a_write_lock_held_elsewhere_never_blocks_the_event_loop(tmp_path: Path) -> None:
    """Another connection (a backup, an operator's shell) holds the write lock: the write
    waits for it on the writer thread while the loop keeps serving, then commits."""

    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("orders", "o1", Op.INSERT, {"table_name": "T1"})
            other = sqlite3.connect(tmp_path / "edge.sqlite", isolation_level=None)
            gaps: list[float] = []

            async def tick() -> None:
                loop = asyncio.get_running_loop()
                while True:
                    before = loop.time()
                    await asyncio.sleep(0.005)
                    gaps.append(loop.time() - before)

            ticker = asyncio.create_task(tick())
            try:
                other.execute("BEGIN IMMEDIATE")
                write = asyncio.create_task(
                    store.write("orders", "o2", Op.INSERT, {"table_name": "T2"})
                )
                await asyncio.sleep(0.5)
                assert not write.done()  # waiting for the lock...
                assert len(gaps) > 20 and max(gaps) < 0.25  # ...but not on the event loop
                other.execute("ROLLBACK")
                await asyncio.wait_for(write, 5)
            finally:
                ticker.cancel()
                other.close()
            assert sorted(await store.rows("orders")) == ["o1", "o2"]
            await store.write("orders", "o3", Op.INSERT, {"table_name": "T3"})  # back on the loop

    run(body)


def test_a_failing_transaction_keeps_nothing_and_publishes_nothing(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            seen = Collector()
            store.subscribe(seen)

            def half_done(tx: Tx) -> None:
                tx.write("orders", "o1", Op.INSERT, {"table_name": "T1"})
                tx.emit("custom", {"n": 1})
                tx.write("orders", "o2", Op.INSERT, {"status": "eaten"})  # refused

            with pytest.raises(SyncError) as refused:
                await store.transaction(half_done)
            assert refused.value.code is ErrorCode.INVALID_CHANGE
            assert await store.rows("orders") == {}
            assert await store.outbox_after(0, 10) == []
            assert seen.events == [] and await store.events_after(0) == []
            assert store.cursors().last_seq == 0

    run(body)


def test_events_are_published_after_commit_in_order_and_can_be_read_back(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            seen = Collector()
            unsubscribe = store.subscribe(seen)
            published_at_commit: list[bool] = []

            def check(events: list[Event]) -> None:
                # Published only once committed: another connection already sees them.
                count = raw(tmp_path, "SELECT count(*) FROM events")[0][0]
                published_at_commit.append(count >= events[-1].seq)

            store.subscribe(check)
            await asyncio.gather(*(store.transaction(_ticker(i)) for i in range(20)))
            assert [json.loads(e.data)["i"] for e in seen.events] == list(range(20))
            assert [e.seq for e in seen.events] == sorted(e.seq for e in seen.events)
            assert all(published_at_commit)
            assert await store.events_after(0) == seen.events
            assert await store.events_after(seen.events[9].seq) == seen.events[10:]
            assert await store.event_bounds() == (seen.events[0].seq, seen.events[-1].seq)
            unsubscribe()
            await store.transaction(lambda tx: tx.emit("tick", {"i": 20}))
            assert len(seen.events) == 20

    run(body)


def test_live_tables_publish_row_events_from_tablets_and_from_the_cloud(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            seen = Collector()
            store.subscribe(seen)
            await store.write("orders", "o1", Op.INSERT, {"table_name": "T1"})
            await store.write("stock_levels", "s1", Op.INSERT, {"on_hand": 1})  # not live
            # The cloud 86s an item and deletes another.
            state = RowState(
                "m1",
                {"name": "Soup", "price_pence": 450, "available": False},
                Version(1, pack(T0), "cloud"),
                {},
                False,
            )
            gone = RowState("m2", {}, Version(2, pack(T0), "cloud"), {}, True)
            await store.apply_page(
                PullPage(
                    0,
                    2,
                    2,
                    False,
                    0,
                    T0,
                    pack(T0),
                    [FeedEntry(1, "menu_items", state), FeedEntry(2, "menu_items", gone)],
                    (),
                )
            )
            data = [json.loads(e.data) for e in seen.events]
            assert [e.topic for e in seen.events] == ["row", "row", "row"]
            assert [(d["table"], d["id"]) for d in data] == [
                ("orders", "o1"),
                ("menu_items", "m1"),
                ("menu_items", "m2"),
            ]
            assert data[0]["row"]["table_name"] == "T1"
            assert data[1]["row"]["available"] in (False, 0)
            assert data[2]["row"] is None

    run(body)
