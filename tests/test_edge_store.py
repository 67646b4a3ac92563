"""The edge store on real SQLite files: writes and their log, pages, cursors, status."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest
from aiohttp import web

from edge import __main__ as edge_cli
from edge import store as edge_store
from edge.app import SlowAccessLog
from edge.errors import EdgeError, EdgeErrorCode
from edge.migrations import MIGRATIONS
from edge.store import EdgeStore, status_from_file
from shared.registry import MENU_ITEMS, STOCK_LEVELS, TABLES, default_registry
from sync_protocol.changes import FeedEntry, Op, RowState, Value, Version
from sync_protocol.checksum import table_checksum
from sync_protocol.errors import ErrorCode, SyncError
from sync_protocol.hlc import pack
from sync_protocol.schema import Column, ColumnType, Registry, TableSpec
from sync_protocol.wire import PullPage, PushAck

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
SITE, NODE = "site-1", "edge-1"
T0 = 1_700_000_000_000


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self) -> None:
        self.ms = T0

    def __call__(self) -> int:
        return self.ms


def run(fn: Callable[..., Coroutine[Any, Any, T]], *args: Any) -> T:
    """Run one async test body."""
    return asyncio.run(fn(*args))


async def open_store(
    path: Path, clock: Clock | None = None, registry: Registry | None = None, node: str = NODE
) -> EdgeStore:
    """Open the store file under ``path``."""
    return await EdgeStore.open(
        path / "edge.sqlite",
        registry or default_registry(),
        SITE,
        node,
        now_ms=clock or Clock(),
    )


def entry(
    rev: int,
    table: str,
    pk: str,
    values: dict[str, Value],
    *,
    origin: str = "cloud",
    deleted: bool = False,
    fv: dict[str, Version] | None = None,
) -> FeedEntry:
    """A feed entry whose row was last written at ``rev`` by ``origin``."""
    state = RowState(pk, values, Version(rev, pack(T0 + rev), origin), fv or {}, deleted)
    return FeedEntry(rev, table, state)


def page(
    cursor: int,
    next_rev: int,
    entries: Sequence[FeedEntry],
    conflicts: int = 0,
    segments: tuple[tuple[int, int, int], ...] = (),
) -> PullPage:
    """A complete (not ``more``) page from ``cursor`` to ``next_rev``."""
    return PullPage(
        cursor, next_rev, next_rev, False, conflicts, T0, pack(T0), list(entries), segments
    )


def ack(acked_through: int, head: int, segments: tuple[tuple[int, int, int], ...] = ()) -> PushAck:
    """The cloud's answer to a push (``segments``: (first_seq, last_seq, first_rev))."""
    return PushAck(acked_through, head, {"applied": 1}, T0, pack(T0), segments)


STOCK: dict[str, Value] = {"on_hand": 10, "par_level": None, "unit": "each"}
ITEM: dict[str, Value] = {
    "category_id": "c1",
    "name": "Soup",
    "price_pence": 450,
    "currency": "GBP",
    "station": "kitchen",
    "available": True,
    "modifier_group_ids": None,
    "position": 0,
}


def raw(path: Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on the file directly (a second, independent connection)."""
    conn = sqlite3.connect(path / "edge.sqlite", isolation_level=None)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


# -- local writes -------------------------------------------------------------------------


def test_write_changes_row_and_logs_change(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            first = await store.write("stock_levels", "soup", Op.INSERT, {"on_hand": 10})
            second = await store.write("stock_levels", "soup", Op.UPDATE, {"on_hand": -3})
            assert await store.get("stock_levels", "soup") == {**STOCK, "on_hand": 7}
            assert (first.seq, second.seq) == (1, 2)
            assert first.origin == NODE and first.base == 0 and first.old is None
            assert second.old == {"on_hand": 10} and second.fields == {"on_hand": -3}
            assert second.hlc > first.hlc
            assert await store.outbox_after(0, 10) == [first, second]
            assert await store.outbox_after(1, 10) == [second]

    run(body)


def test_domain_columns_merge_locally(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("orders", "o1", Op.INSERT, {"check_number": 1, "status": "fired"})
            await store.write("orders", "o1", Op.UPDATE, {"status": "open"})
            assert (await store.get("orders", "o1") or {})["status"] == "fired"
            line: dict[str, Value] = {"order_id": "o1", "name": "Soup", "quantity": 1}
            await store.write("order_lines", "l1", Op.INSERT, line)
            await store.write("order_lines", "l1", Op.UPDATE, {"voided": True})
            await store.write("order_lines", "l1", Op.UPDATE, {"voided": False})
            assert (await store.get("order_lines", "l1") or {})["voided"] is True

    run(body)


def test_bools_come_back_as_bools_and_checksum_matches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(edge_store, "SCAN_PAGE", 1)  # summed a row at a time

    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("menu_items", "i1", Op.INSERT, ITEM)
            await store.write("menu_items", "i2", Op.INSERT, {**ITEM, "available": False})
            assert raw(tmp_path, "SELECT available FROM menu_items ORDER BY id") == [(1,), (0,)]
            rows = await store.rows("menu_items")
            assert rows["i1"]["available"] is True and rows["i2"]["available"] is False
            names = [c.name for c in MENU_ITEMS.columns]
            expected = table_checksum([("i1", ITEM), ("i2", {**ITEM, "available": False})], names)
            assert await store.checksum("menu_items") == expected

    run(body)


def test_a_checksum_being_summed_hides_no_write_from_the_readers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sum reads on its own connection: the uplink and the live hub, reading beside it,
    see a write committed while it runs (it sums the snapshot it started with)."""
    monkeypatch.setattr(edge_store, "SCAN_PAGE", 1)
    started, release = threading.Event(), threading.Event()
    summed = edge_store.table_checksum

    def held_at_first_page(rows: Any, columns: Any) -> Any:
        started.set()
        release.wait(10)
        return summed(rows, columns)

    monkeypatch.setattr(edge_store, "table_checksum", held_at_first_page)

    async def body() -> None:
        async with await open_store(tmp_path) as store:
            for pk in ("i1", "i2", "i3"):
                await store.write("menu_items", pk, Op.INSERT, ITEM)
            summing = asyncio.ensure_future(store.checksum("menu_items"))
            assert await asyncio.to_thread(started.wait, 10)
            await store.write("menu_items", "late", Op.INSERT, ITEM)
            assert "late" in await store.rows("menu_items")
            assert [c.pk for c in await store.outbox_after(3, 10)] == ["late"]
            release.set()
            assert (await summing).count == 3

    run(body)


def test_failed_transaction_leaves_neither_row_nor_change(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "a", Op.INSERT, {"on_hand": 1})
            # The disk "fails" while the change is logged: after the row was written.
            raw(
                tmp_path,
                "CREATE TRIGGER crash BEFORE INSERT ON outbox WHEN NEW.pk = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END",
            )
            with pytest.raises(sqlite3.Error, match="simulated failure"):
                await store.write("stock_levels", "boom", Op.INSERT, {"on_hand": 5})
            with pytest.raises(sqlite3.Error, match="simulated failure"):
                await store.write_many(
                    [
                        ("stock_levels", "b", Op.INSERT, {"on_hand": 2}),
                        ("stock_levels", "boom", Op.INSERT, {"on_hand": 5}),
                    ]
                )
            assert set(await store.rows("stock_levels")) == {"a"}
            assert [c.pk for c in await store.outbox_after(0, 10)] == ["a"]
            after = await store.write("stock_levels", "c", Op.INSERT, {"on_hand": 3})
            assert after.seq == 2
        assert raw(tmp_path, "SELECT seq FROM outbox") == [(1,), (2,)]

    run(body)


@pytest.mark.parametrize(
    ("write", "code"),
    [
        (("no_such_table", "x", Op.INSERT, {"a": 1}), ErrorCode.UNKNOWN_TABLE),
        (("stock_levels", "x", Op.INSERT, {"colour": "red"}), ErrorCode.UNKNOWN_FIELD),
        (("stock_levels", "x", Op.INSERT, {"on_hand": "ten"}), ErrorCode.INVALID_CHANGE),
        (("stock_levels", "x", Op.INSERT, {"on_hand": True}), ErrorCode.INVALID_CHANGE),
        (("orders", "x", Op.INSERT, {"status": "eaten"}), ErrorCode.INVALID_CHANGE),
        (("order_lines", "l1", Op.UPDATE, {"quantity": 2}), ErrorCode.ADD_ONLY),
        (("order_lines", "l1", Op.DELETE, {}), ErrorCode.ADD_ONLY),
        (("stock_levels", "", Op.INSERT, {"on_hand": 1}), ErrorCode.INVALID_CHANGE),
        (("stock_levels", "x", 9, {"on_hand": 1}), ErrorCode.INVALID_CHANGE),
        (("stock_levels", "x", Op.DELETE, {"on_hand": 1}), ErrorCode.INVALID_CHANGE),
        (("stock_levels", "x", Op.UPDATE, {}), ErrorCode.INVALID_CHANGE),
    ],
)
def test_refused_write_changes_nothing(
    tmp_path: Path, write: tuple[str, str, int, dict[str, Value]], code: ErrorCode
) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("order_lines", "l1", Op.INSERT, {"order_id": "o", "quantity": 1})
            before = {t.name: await store.rows(t.name) for t in TABLES}
            with pytest.raises(SyncError) as refused:
                await store.write(*write)
            assert refused.value.code is code
            with pytest.raises(SyncError):  # and a batch containing it is refused whole
                await store.write_many([("stock_levels", "ok", Op.INSERT, {"on_hand": 0}), write])
            assert {t.name: await store.rows(t.name) for t in TABLES} == before
            assert store.cursors().last_seq == 1
            nxt = await store.write("stock_levels", "ok", Op.INSERT, {"on_hand": 1})
            assert nxt.seq == 2  # no gap where the refusals were

    run(body)


def test_write_many_is_atomic_and_sees_its_own_rows(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            changes = await store.write_many(
                [
                    ("stock_levels", "s", Op.INSERT, {"on_hand": 5}),
                    ("stock_levels", "s", Op.UPDATE, {"on_hand": 2}),
                    ("menu_categories", "m", Op.INSERT, {"name": "Mains"}),
                ]
            )
            assert [c.seq for c in changes] == [1, 2, 3]
            assert changes[1].old == {"on_hand": 5}
            assert (await store.get("stock_levels", "s") or {})["on_hand"] == 7

    run(body)


def test_changed_event_is_set_after_a_write(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            assert not store.changed.is_set()
            waiter = asyncio.create_task(store.changed.wait())
            await store.write("stock_levels", "s", Op.INSERT, {"on_hand": 0})
            await asyncio.wait_for(waiter, 1)

    run(body)


def test_cancelled_write_leaves_store_consistent(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            for delay in range(8):  # cancel at a different await each time
                task = asyncio.create_task(
                    store.write("stock_levels", f"s{delay}", Op.INSERT, {"on_hand": 1})
                )
                for _ in range(delay):
                    await asyncio.sleep(0)
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            done = await store.write("stock_levels", "last", Op.INSERT, {"on_hand": 1})
            logged = await store.outbox_after(0, 100)
            rows = await store.rows("stock_levels")
            assert [c.seq for c in logged] == list(range(1, done.seq + 1))
            assert {c.pk for c in logged} == set(rows)

    run(body)


def test_writes_queued_together_commit_together_and_a_failing_one_alone(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "first", Op.INSERT, {"on_hand": 1})
            raw(
                tmp_path,
                "CREATE TRIGGER crash BEFORE INSERT ON outbox WHEN NEW.pk = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END",
            )
            pks = [f"s{i}" for i in range(40)]
            pks.insert(20, "boom")
            refused = pks.index("boom")
            # All queued at once: they run as groups behind whatever the writer is doing.
            outcomes = await asyncio.gather(
                *(store.write("stock_levels", pk, Op.INSERT, {"on_hand": 1}) for pk in pks),
                return_exceptions=True,
            )
            failed = outcomes.pop(refused)
            assert isinstance(failed, sqlite3.Error) and "simulated failure" in str(failed)
            assert all(not isinstance(o, BaseException) for o in outcomes)
            seqs = [c.seq for c in outcomes if not isinstance(c, BaseException)]
            assert seqs == list(range(2, 42))  # in order, no gap where "boom" was undone
            rows = await store.rows("stock_levels")
            assert set(rows) == {"first", *pks} - {"boom"}
            logged = await store.outbox_after(0, 100)
            assert [(c.seq, c.pk) for c in logged] == [(1, "first")] + [
                (seq, pk) for seq, pk in zip(seqs, [p for p in pks if p != "boom"], strict=True)
            ]
            assert store.cursors().last_seq == 41
        # What callers were told is what is on disk.
        assert raw(tmp_path, "SELECT count(*), max(seq) FROM outbox") == [(41, 41)]

    run(body)


def test_close_lets_queued_writes_finish_and_refuses_new_ones(tmp_path: Path) -> None:
    async def body() -> None:
        store = await open_store(tmp_path)
        writes = [
            asyncio.ensure_future(store.write("stock_levels", f"s{i}", Op.INSERT, {"on_hand": i}))
            for i in range(30)
        ]
        await asyncio.sleep(0)  # queued, not yet done
        await store.close()
        assert all(w.done() and not w.exception() for w in writes)
        with pytest.raises(EdgeError) as closed:
            await store.write("stock_levels", "late", Op.INSERT, {"on_hand": 1})
        assert closed.value.code is EdgeErrorCode.STORE_CLOSED
        assert raw(tmp_path, "SELECT count(*) FROM stock_levels") == [(30,)]

    run(body)


def test_seq_and_cursors_persist_across_reopen(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "s", Op.INSERT, {"on_hand": 1})
            await store.write("stock_levels", "s", Op.UPDATE, {"on_hand": 1})
            await store.apply_page(page(0, 4, [entry(4, "menu_categories", "m", {"name": "A"})]))
        async with await open_store(tmp_path) as store:
            c = store.cursors()
            assert (c.last_seq, c.pull_cursor) == (2, 4)
            change = await store.write("stock_levels", "s", Op.UPDATE, {"on_hand": 1})
            assert (change.seq, change.base) == (3, 4)
            assert change.hlc > (await store.outbox_after(1, 1))[0].hlc
        assert raw(tmp_path, "SELECT version FROM schema_migrations") == [
            (m.version,) for m in MIGRATIONS
        ]

    run(body)


def test_database_of_another_node_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path):
            pass
        with pytest.raises(EdgeError) as refused:
            await open_store(tmp_path, node="edge-2")
        assert refused.value.code is EdgeErrorCode.IDENTITY_MISMATCH

    run(body)


def test_new_registry_columns_and_tables_are_added(tmp_path: Path) -> None:
    extra = TableSpec("gift_cards", (Column("name", ColumnType.TEXT),))
    stock = STOCK_LEVELS
    grown = TableSpec(stock.name, (*stock.columns, Column("bin", ColumnType.TEXT)))

    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "s", Op.INSERT, {"on_hand": 1})
        registry = Registry([*(t for t in TABLES if t is not STOCK_LEVELS), grown, extra])
        async with await open_store(tmp_path, registry=registry) as store:
            await store.write("stock_levels", "s", Op.UPDATE, {"bin": "A3"})
            await store.write("gift_cards", "t1", Op.INSERT, {"name": "Bar"})
            assert await store.get("stock_levels", "s") == {**STOCK, "on_hand": 1, "bin": "A3"}
            assert await store.get("gift_cards", "t1") == {"name": "Bar"}

    run(body)


# -- pull pages ---------------------------------------------------------------------------


def test_page_rebases_pending_counter_delta(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "soup", Op.INSERT, {"on_hand": 10})  # seq 1
            await store.mark_sent(1)
            await store.record_ack(ack(1, head=1, segments=((1, 1, 1),)))
            await store.write("stock_levels", "soup", Op.UPDATE, {"on_hand": -2})  # seq 2
            # The cloud applied seq 1 at rev 1, then another till sold 5 (rev 2).
            await store.apply_page(page(0, 2, [entry(2, "stock_levels", "soup", {"on_hand": 5})]))
            assert (await store.get("stock_levels", "soup") or {})["on_hand"] == 3
            assert store.cursors().reflected_through == 1
            assert [c.seq for c in await store.outbox_after(0, 10)] == [2]
            # seq 2 is pushed and acknowledged at head 3; the cloud's row now has it.
            await store.mark_sent(2)
            await store.record_ack(ack(2, head=3, segments=((2, 2, 3),)))
            await store.apply_page(page(2, 3, [entry(3, "stock_levels", "soup", {"on_hand": 3})]))
            assert (await store.get("stock_levels", "soup") or {})["on_hand"] == 3
            assert await store.outbox_after(0, 10) == []
            assert raw(tmp_path, "SELECT seq_through, head FROM ack_marks") == [(2, 3)]

    run(body)


def test_pending_edit_stays_visible_until_reflected_then_cloud_wins(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.apply_page(page(0, 1, [entry(1, "menu_items", "i1", ITEM)]))
            await store.write("menu_items", "i1", Op.UPDATE, {"name": "Soup of the day"})
            # Someone changes the price in the dashboard: the unsent rename stays visible.
            others = {c: Version(1, pack(T0 + 1), "cloud") for c in ITEM if c != "price_pence"}
            repriced = entry(2, "menu_items", "i1", {**ITEM, "price_pence": 500}, fv=others)
            await store.apply_page(page(1, 2, [repriced]))
            row = await store.get("menu_items", "i1") or {}
            assert (row["name"], row["price_pence"]) == ("Soup of the day", 500)
            # The rename is pushed; the cloud keeps a later dashboard rename instead.
            await store.mark_sent(1)
            await store.record_ack(ack(1, head=3))
            cloud_row = {**ITEM, "price_pence": 500, "name": "Chef's soup"}
            await store.apply_page(page(2, 4, [entry(4, "menu_items", "i1", cloud_row)]))
            assert await store.get("menu_items", "i1") == cloud_row
            assert await store.outbox_after(0, 10) == []

    run(body)


def test_page_seen_before_its_ack_does_not_apply_a_delta_twice(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "soup", Op.INSERT, {"on_hand": 10})
            await store.mark_sent(1)
            await store.record_ack(ack(1, head=1, segments=((1, 1, 1),)))
            await store.apply_page(page(0, 1, [entry(1, "stock_levels", "soup", {"on_hand": 10})]))
            await store.write("stock_levels", "soup", Op.UPDATE, {"on_hand": -1})  # seq 2
            await store.mark_sent(2)  # in flight: the cloud applies it at rev 2 ...
            await store.apply_page(  # ... and the feed shows it (and says so) before the ack
                page(
                    1,
                    2,
                    [entry(2, "stock_levels", "soup", {"on_hand": 9}, origin=NODE)],
                    segments=((2, 2, 2),),
                )
            )
            assert (await store.get("stock_levels", "soup") or {})["on_hand"] == 9
            await store.record_ack(ack(2, head=2, segments=((2, 2, 2),)))
            assert (await store.get("stock_levels", "soup") or {})["on_hand"] == 9
            assert await store.outbox_after(0, 10) == []

    run(body)


def test_page_ending_inside_an_acked_batch_does_not_apply_a_delta_twice(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            for pk in ("a", "b", "c"):
                await store.write("stock_levels", pk, Op.INSERT, {"on_hand": 10})
            await store.mark_sent(3)
            await store.record_ack(ack(3, head=3, segments=((1, 3, 1),)))  # at revs 1, 2, 3
            await store.apply_page(
                PullPage(0, 2, 3, True, 0, T0, pack(T0), [
                    entry(1, "stock_levels", "a", {"on_hand": 10}, origin=NODE),
                    entry(2, "stock_levels", "b", {"on_hand": 10}, origin=NODE),
                ])
            )  # fmt: skip
            await store.write("stock_levels", "a", Op.UPDATE, {"on_hand": 1})  # seq 4, unsent
            await store.apply_page(
                page(2, 3, [entry(3, "stock_levels", "c", {"on_hand": 10}, origin=NODE)])
            )
            rows = await store.rows("stock_levels")
            assert {pk: r["on_hand"] for pk, r in rows.items()} == {"a": 11, "b": 10, "c": 10}

    run(body)


def test_known_revisions_decide_what_a_state_contains(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.apply_page(page(0, 10, []))
            await store.write("stock_levels", "a", Op.INSERT, {"on_hand": 10})  # seq 1
            await store.write("stock_levels", "b", Op.INSERT, {"on_hand": 10})  # seq 2
            await store.write("stock_levels", "a", Op.UPDATE, {"on_hand": -4})  # seq 3
            await store.mark_sent(3)
            # Applied at revs 11, 12, 13; the ack (head 13) arrives before any page.
            await store.record_ack(ack(3, head=13, segments=((1, 3, 11),)))
            assert raw(tmp_path, "SELECT seq, rev FROM outbox") == [(1, 11), (2, 12), (3, 13)]
            # A page ends inside the batch: a's state at rev 11 lacks seq 3, which is re-applied.
            await store.apply_page(
                PullPage(10, 12, 13, True, 0, T0, pack(T0), [
                    entry(11, "stock_levels", "a", {"on_hand": 10}, origin=NODE),
                    entry(12, "stock_levels", "b", {"on_hand": 10}, origin=NODE),
                ])
            )  # fmt: skip
            rows = await store.rows("stock_levels")
            assert {pk: r["on_hand"] for pk, r in rows.items()} == {"a": 6, "b": 10}
            assert store.cursors().reflected_through == 2
            assert [c.seq for c in await store.outbox_after(0, 10)] == [3]
            await store.apply_page(
                page(12, 13, [entry(13, "stock_levels", "a", {"on_hand": 6}, origin=NODE)])
            )
            assert (await store.get("stock_levels", "a") or {})["on_hand"] == 6
            assert await store.outbox_after(0, 10) == []

    run(body)


def test_deleted_state_deletes_the_row(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.apply_page(page(0, 1, [entry(1, "menu_categories", "m", {"name": "A"})]))
            await store.apply_page(
                page(1, 2, [entry(2, "menu_categories", "m", {"name": "A"}, deleted=True)])
            )
            assert await store.get("menu_categories", "m") is None

    run(body)


def test_later_entry_for_a_row_in_one_page_wins(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.apply_page(
                page(0, 2, [
                    entry(1, "menu_categories", "m", {"name": "A"}),
                    entry(2, "menu_categories", "m", {"name": "B"}),
                ])
            )  # fmt: skip
            assert (await store.get("menu_categories", "m") or {})["name"] == "B"

    run(body)


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (entry(2, "no_such_table", "x", {}), ErrorCode.UNKNOWN_TABLE),
        (entry(2, "menu_categories", "x", {"colour": "red"}), ErrorCode.UNKNOWN_FIELD),
        (entry(2, "menu_categories", "x", {"position": "top"}), ErrorCode.INVALID_CHANGE),
    ],
)
def test_page_with_a_bad_entry_is_refused_whole(
    tmp_path: Path, bad: FeedEntry, code: ErrorCode
) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            good = entry(1, "menu_categories", "m", {"name": "A"})
            with pytest.raises(SyncError) as refused:
                await store.apply_page(page(0, 2, [good, bad]))
            assert refused.value.code is code
            assert await store.rows("menu_categories") == {}
            assert store.cursors().pull_cursor == 0

    run(body)


def test_exists_version_in_a_state_is_accepted(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            fv = {"_exists": Version(1, pack(T0), "cloud")}
            await store.apply_page(
                page(0, 2, [entry(2, "menu_categories", "m", {"name": "A"}, fv=fv)])
            )
            assert (await store.get("menu_categories", "m") or {})["name"] == "A"

    run(body)


def test_page_that_does_not_continue_the_cursor_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.apply_page(page(0, 5, []))
            with pytest.raises(SyncError) as refused:
                await store.apply_page(page(3, 6, [entry(6, "menu_categories", "m", {})]))
            assert refused.value.code is ErrorCode.INVALID_CURSOR
            assert store.cursors().pull_cursor == 5

    run(body)


def test_rows_and_cursor_commit_together(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.apply_page(page(0, 7, [entry(7, "menu_categories", "m", {"name": "A"})]))
            raw(
                tmp_path,
                "CREATE TRIGGER crash BEFORE INSERT ON menu_categories WHEN NEW.id = 'boom' "
                "BEGIN SELECT RAISE(ABORT, 'simulated failure'); END",
            )
            failing = page(7, 9, [
                entry(8, "menu_categories", "n", {"name": "B"}),
                entry(9, "menu_categories", "boom", {"name": "C"}),
            ])  # fmt: skip
            with pytest.raises(sqlite3.Error):
                await store.apply_page(failing)
        async with await open_store(tmp_path) as store:
            assert store.cursors().pull_cursor == 7
            assert set(await store.rows("menu_categories")) == {"m"}

    run(body)


def test_ack_beyond_what_this_node_wrote_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "s", Op.INSERT, {"on_hand": 0})
            with pytest.raises(EdgeError) as refused:
                await store.record_ack(ack(5, head=9))
            assert refused.value.code is EdgeErrorCode.CLOUD_AHEAD
            assert store.cursors().acked_through == 0

    run(body)


def test_rewind_refuses_when_changes_were_pruned(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            for pk in "abc":
                await store.write("stock_levels", pk, Op.INSERT, {"on_hand": 0})
            await store.record_ack(ack(3, head=3))
            await store.apply_page(page(0, 3, []))
            assert store.cursors().reflected_through == 3
            with pytest.raises(EdgeError) as refused:
                await store.rewind_acked(1)
            assert refused.value.code is EdgeErrorCode.CHANGES_LOST
            await store.write("stock_levels", "d", Op.INSERT, {"on_hand": 0})
            await store.record_ack(ack(4, head=5))
            await store.rewind_acked(3)  # the cloud lost seq 4: it will be sent again
            c = store.cursors()
            assert (c.acked_through, c.sent_through) == (3, 3)
            assert [x.seq for x in await store.outbox_after(c.acked_through, 10)] == [4]

    run(body)


# -- status and conflicts -----------------------------------------------------------------


def test_status_numbers(tmp_path: Path) -> None:
    clock = Clock()

    async def body() -> None:
        async with await open_store(tmp_path, clock) as store:
            status = await store.status()
            assert (status.outbox_depth, status.oldest_unsynced_age_ms) == (0, 0)
            assert status.last_push_ok_ms is None and status.last_pull_ok_ms is None
            for pk in ("a", "b", "c"):
                await store.write("stock_levels", pk, Op.INSERT, {"on_hand": 0})
                clock.ms += 1000
            await store.record_ack(ack(1, head=4))
            clock.ms += 500
            await store.apply_page(page(0, 6, [], conflicts=2))
            status = await store.status()
            assert status.outbox_depth == 2
            assert status.oldest_unsynced_age_ms == 2500  # seq 2, written at T0 + 1 s
            assert (status.acked_through, status.pull_cursor, status.open_conflicts) == (1, 6, 2)
            assert status.last_push_ok_ms == T0 + 3000
            assert status.last_pull_ok_ms == T0 + 3500
        offline = status_from_file(tmp_path / "edge.sqlite", clock.ms)
        assert offline == status

    run(body)


def test_conflicts_mirror_is_replaced_whole(tmp_path: Path) -> None:
    async def body() -> None:
        conflict = {
            "id": 7,
            "table": "menu_items",
            "pk": "i1",
            "columns": ["name"],
            "local": {"name": "A"},
            "remote": {"name": "B"},
            "blob": b"\x00\x01",
        }
        async with await open_store(tmp_path) as store:
            await store.replace_conflicts([conflict, {**conflict, "id": 8}])
            assert [c["id"] for c in await store.conflicts()] == [7, 8]
            assert store.cursors() is not None and (await store.status()).open_conflicts == 2
            await store.replace_conflicts([{**conflict, "id": 9}])
        async with await open_store(tmp_path) as store:
            assert await store.conflicts() == [{**conflict, "id": 9}]

    run(body)


def test_status_command_reads_the_file_when_the_edge_is_not_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "s", Op.INSERT, {"on_hand": 1})

    run(body)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = tmp_path / "edge.toml"
    config.write_text(
        f'db_path = "{tmp_path / "edge.sqlite"}"\nport = {port}\nsite_id = "{SITE}"\n',
        encoding="utf-8",
    )
    assert edge_cli.main(["status", "--config", str(config), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"].startswith("edge not running")
    assert (out["outbox_depth"], out["last_seq"], out["online"]) == (1, 1, False)
    assert edge_cli.main(["status", "--config", str(config)]) == 0
    assert "1 unsynced" in capsys.readouterr().out


def test_the_running_edge_leaves_its_start_up_heap_out_of_garbage_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fynlo-edge run`` freezes what start-up made (the store open, the caches loaded), so
    the collector's full passes under load walk only what requests made since."""
    config = tmp_path / "edge.toml"
    config.write_text(
        f'db_path = "{tmp_path / "edge.sqlite"}"\nsite_id = "{SITE}"\nnode_id = "edge-1"\n'
        "[mdns]\nenabled = false\n",
        encoding="utf-8",
    )
    served: list[web.Application] = []
    options: list[dict[str, Any]] = []
    monkeypatch.setattr(web, "run_app", lambda app, **kw: served.append(app) or options.append(kw))
    for name in ("_srcfile", "logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, name, getattr(logging, name))  # main() tunes logging
    assert edge_cli.main(["run", "--config", str(config)]) == 0
    [app] = served
    assert options[0]["access_log_class"] is SlowAccessLog  # the default access log

    async def start_up() -> tuple[int, int]:
        runner = web.AppRunner(app)
        before = gc.get_freeze_count()
        await runner.setup()  # the app's whole start-up, as run_app does it
        try:
            return before, gc.get_freeze_count()
        finally:
            await runner.cleanup()

    try:
        before, after = asyncio.run(start_up())
    finally:
        gc.unfreeze()
    assert before == 0 and after > 0


def test_an_in_flight_change_stays_visible_until_a_page_says_it_is_in(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path) as store:
            await store.write("stock_levels", "soup", Op.INSERT, {"on_hand": 10})  # seq 1
            await store.mark_sent(1)
            await store.record_ack(ack(1, head=1, segments=((1, 1, 1),)))
            await store.write("stock_levels", "soup", Op.UPDATE, {"on_hand": -1})  # seq 2
            await store.mark_sent(2)  # in flight; meanwhile the owner sold 3 elsewhere (rev 2)
            await store.apply_page(page(0, 2, [entry(2, "stock_levels", "soup", {"on_hand": 7})]))
            assert (await store.get("stock_levels", "soup") or {})["on_hand"] == 6
            # the push lands at rev 3; the page says so, and its state holds the delta once
            await store.apply_page(
                page(
                    2,
                    3,
                    [entry(3, "stock_levels", "soup", {"on_hand": 6}, origin=NODE)],
                    segments=((2, 2, 3),),
                )
            )
            assert (await store.get("stock_levels", "soup") or {})["on_hand"] == 6
            await store.record_ack(ack(2, head=3, segments=((2, 2, 3),)))
            assert await store.outbox_after(0, 10) == []

    run(body)


def test_order_reads_use_their_indexes(tmp_path: Path) -> None:
    async def body() -> None:
        async with await open_store(tmp_path):
            pass
        plans = {
            "SELECT * FROM order_lines WHERE order_id = 'o1'": "order_lines_by_order",
            "SELECT * FROM orders WHERE business_day = '2026-11-26'": "orders_by_day",
            "SELECT * FROM tickets WHERE station = 'bar' AND bumped = 0": "tickets_by_station",
        }
        for sql, index in plans.items():
            plan = " ".join(str(row[-1]) for row in raw(tmp_path, f"EXPLAIN QUERY PLAN {sql}"))
            assert index in plan, (sql, plan)

    run(body)


def test_the_audit_chain_head_is_found_through_the_primary_key(tmp_path: Path) -> None:
    from edge.api.audit import node_range

    async def body() -> None:
        async with await open_store(tmp_path):
            pass
        sql = "SELECT position FROM audit_log WHERE id >= ? AND id < ? ORDER BY id DESC LIMIT 1"
        plan = " ".join(
            str(r[-1]) for r in raw(tmp_path, f"EXPLAIN QUERY PLAN {sql}", node_range("n"))
        )
        assert "SCAN" not in plan and "SEARCH audit_log" in plan, plan

    run(body)


def test_a_write_past_the_size_cap_is_refused_whole_and_the_store_goes_on(
    tmp_path: Path,
) -> None:
    """A full database (here: the ``max_db_bytes`` cap, SQLite's own SQLITE_FULL) refuses the
    write with ``storage_full``, keeps nothing of it, and takes writes again once there is
    room (reopened with a larger cap), with no gap in the outbox's sequence."""
    db = tmp_path / "edge.sqlite"
    note = "x" * 2000  # a few rows per page: the cap is reached in a few dozen writes

    async def fill(store: EdgeStore) -> tuple[int, EdgeError]:
        for n in range(1000):
            try:
                await store.write_many(
                    [("order_lines", f"l{n}-{k}", Op.INSERT, {"notes": note}) for k in range(4)]
                )
            except EdgeError as exc:
                return n, exc
        raise AssertionError("the cap was never reached")

    async def body() -> None:
        store = await EdgeStore.open(db, default_registry(), SITE, NODE, max_db_bytes=384 * 1024)
        async with store:
            written, refused = await fill(store)
            assert refused.code is EdgeErrorCode.STORAGE_FULL, refused
            assert refused.details["sqlite"] == "SQLITE_FULL"
            assert store.cursors().last_seq == 4 * written
            # Reads still answer, and a second refusal is as clean as the first.
            first = await store.get("order_lines", "l0-0")
            assert first is not None and first["notes"] == note
            with pytest.raises(EdgeError) as again:  # the same writes again: still no room
                await store.write_many(
                    [("order_lines", f"late-{k}", Op.INSERT, {"notes": note}) for k in range(4)]
                )
            assert again.value.code is EdgeErrorCode.STORAGE_FULL
        assert raw(tmp_path, "SELECT count(*) FROM order_lines") == [(4 * written,)]
        assert raw(tmp_path, "SELECT count(*), max(seq) FROM outbox") == [
            (4 * written, 4 * written)
        ]
        async with await EdgeStore.open(db, default_registry(), SITE, NODE) as store:
            change = await store.write("order_lines", "late", Op.INSERT, {"notes": note})
            assert change.seq == 4 * written + 1

    run(body)


def test_writes_grouped_with_one_that_fills_the_disk_are_each_kept_or_refused_whole(
    tmp_path: Path,
) -> None:
    """Concurrent writes share a commit; when one of them fills the database SQLite undoes
    the whole transaction, so each caller hears ``storage_full`` or success, and exactly the
    successes are in the file, with gap-free sequence numbers."""
    note = "y" * 1500

    async def body() -> None:
        store = await EdgeStore.open(
            tmp_path / "edge.sqlite", default_registry(), SITE, NODE, max_db_bytes=192 * 1024
        )
        async with store:
            for round_ in range(40):
                results = await asyncio.gather(
                    *(
                        store.write("order_lines", f"r{round_}-{k}", Op.INSERT, {"notes": note})
                        for k in range(12)
                    ),
                    return_exceptions=True,
                )
                refused = [r for r in results if isinstance(r, BaseException)]
                assert all(
                    isinstance(r, EdgeError) and r.code is EdgeErrorCode.STORAGE_FULL
                    for r in refused
                ), refused
                if refused:
                    break
            else:
                raise AssertionError("the cap was never reached")
            seq = store.cursors().last_seq
        rows = {pk for (pk,) in raw(tmp_path, "SELECT id FROM order_lines")}
        logged = raw(tmp_path, "SELECT seq, pk FROM outbox ORDER BY seq")
        assert [s for s, _ in logged] == list(range(1, seq + 1))  # no gap, nothing extra
        assert {pk for _, pk in logged} == rows  # every kept row has its change, and only those
        last = {pk for pk in rows if pk.startswith(f"r{round_}-")}
        successes = {
            f"r{round_}-{k}" for k, r in enumerate(results) if not isinstance(r, BaseException)
        }
        assert last == successes

    run(body)


def test_a_process_that_never_closes_its_store_still_exits(tmp_path: Path) -> None:
    # The store is still referenced when the interpreter shuts down (a global, as after an
    # error that skipped the cleanup): the process must exit, with what it wrote kept.
    script = textwrap.dedent(
        f"""
        import asyncio
        from edge.store import EdgeStore
        from shared.registry import default_registry

        async def main():
            global store
            store = await EdgeStore.open(
                {str(tmp_path / "edge.sqlite")!r}, default_registry(), "site-1", "edge-1"
            )
            await store.write("menu_categories", "c1", 1, {{"name": "Mains", "position": 1}})
            await store.query("SELECT 1")  # the reader's thread is running

        asyncio.run(main())
        print("left", flush=True)
        """
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
    except subprocess.TimeoutExpired:
        raise AssertionError("the process hung at exit with its store open") from None
    assert done.returncode == 0 and done.stdout == "left\n", done.stderr
    assert raw(tmp_path, "SELECT name FROM menu_categories") == [("Mains",)]
