"""The cloud store on a real Postgres: exactly-once ingest, refusals that apply nothing,
every strategy on a concurrent edit, the manual queue, tenancy, feed paging and checksums."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings

from cloud import rows as cloud_rows
from cloud import store as store_module
from cloud.errors import CloudCode, CloudError
from cloud.rows import pack_entry
from cloud.schema import MIGRATIONS
from cloud.store import ECHO_HOLD_S, CloudStore, IngestOrder
from shared.registry import DISCOUNT_COLUMNS, TABLES, default_registry
from sync_protocol import checksum, wire
from sync_protocol.changes import Change, FeedEntry, Op, RowState, Value, Version
from sync_protocol.errors import ErrorCode, RemoteProtocolError
from sync_protocol.hlc import HybridClock
from sync_protocol.merge import apply_change, rebase
from sync_protocol.schema import Author, Column, ColumnType, Registry, Strategy, TableSpec

from .model import ModelCloud, ModelEdge
from .scenarios import Step, Sync, plan, steps

T = TypeVar("T")
REGISTRY = default_registry()
FAR_FUTURE_HLC = 1 << 62


def run(dsn: str, body: Callable[[CloudStore], Awaitable[T]], registry: Registry = REGISTRY) -> T:
    """Open a store on ``dsn``, run ``body`` with it, close it."""

    async def main() -> T:
        async with opened(dsn, registry) as store:
            return await body(store)

    return asyncio.run(main())


@asynccontextmanager
async def opened(dsn: str, registry: Registry = REGISTRY) -> AsyncIterator[CloudStore]:
    """A store for the duration of a block."""
    store = await CloudStore.open(dsn, registry, pool_min=1, pool_max=4)
    try:
        yield store
    finally:
        await store.close()


def line(node: str, seq: int, pk: str, **overrides: Value) -> Change:
    """An order-line insert from ``node``."""
    fields: dict[str, Value] = {
        "order_id": "o1",
        "item_id": "fish",
        "name": "Fish and chips",
        "quantity": 1,
        "unit_price_pence": 1250,
        "added_at_ms": 1_700_000_000_000 + seq,
    }
    fields.update(overrides)
    return Change(node, seq, "order_lines", pk, Op.INSERT, fields, 0, 1000 + seq)


def change(
    node: str,
    seq: int,
    table: str,
    pk: str,
    op: Op,
    fields: dict[str, Value],
    base: int = 0,
    hlc: int | None = None,
    old: dict[str, Value] | None = None,
) -> Change:
    """Any change from ``node``."""
    return Change(node, seq, table, pk, op, fields, base, 1000 + seq if hlc is None else hlc, old)


async def push(store: CloudStore, site: str, node: str, changes: list[Change]) -> wire.PushAck:
    """Push changes through the wire format, as the HTTP endpoint does."""
    batch = wire.decode_push(wire.encode_push(site, node, changes))
    return await store.ingest(site, node, batch, hlc_now=5, server_ms=7)


async def new_site(store: CloudStore, name: str = "site") -> tuple[str, str]:
    """A site with one device: (site_id, node_id)."""
    site = await store.register_site(name)
    node, _ = await store.register_device(site, "edge")
    return site, node


async def snapshot(store: CloudStore, site: str) -> dict[str, Any]:
    """Everything ingest may touch for a site: rows, feed, ledger, conflicts, head."""
    out: dict[str, Any] = {}
    for spec in TABLES:
        out[spec.name] = await store.pool.fetch(
            f"SELECT * FROM {spec.name} WHERE site_id = $1 ORDER BY id", site
        )
    for table, order in (("feed", "rev"), ("ledger", "origin"), ("conflicts", "id")):
        out[table] = await store.pool.fetch(
            f"SELECT * FROM {table} WHERE site_id = $1 ORDER BY {order}", site
        )
    out["head"] = await store.head(site)
    return out


async def pull_all(store: CloudStore, site: str, node: str, cursor: int = 0) -> wire.PullPage:
    """One page with everything after ``cursor``."""
    return wire.decode_pull(await store.pull(site, node, cursor, 20_000))


# -- exactly once ----------------------------------------------------------------------------


def test_ingest_applies_and_is_exactly_once(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        changes = [line(node, i, f"l{i}") for i in range(1, 6)]
        ack = await push(store, site, node, changes)
        assert (ack.acked_through, ack.head) == (5, 5)
        assert ack.outcomes == {"applied": 5, "duplicate": 0}
        assert (ack.server_ms, ack.hlc) == (7, 5)
        assert ack.segments == ((1, 5, 1),)
        rows = await store.rows(site, "order_lines")
        assert sorted(rows) == [f"l{i}" for i in range(1, 6)]
        assert rows["l3"]["unit_price_pence"] == 1250 and rows["l3"]["voided"] is False
        before = await snapshot(store, site)

        again = await push(store, site, node, changes)
        assert again.acked_through == 5 and again.head == 5
        assert again.outcomes == {"duplicate": 5}
        assert again.segments == ((1, 5, 1),)  # where the resent changes took effect
        assert await snapshot(store, site) == before

    run(pg_database, body)


def test_overlapping_batch_applies_only_the_new_part(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        await push(store, site, node, [line(node, i, f"l{i}") for i in range(1, 4)])
        # seq 2-3 again, but claiming other values: the duplicates must not be re-applied
        overlap = [line(node, i, f"l{i}", quantity=9) for i in range(2, 4)]
        overlap += [line(node, i, f"l{i}") for i in range(4, 7)]
        ack = await push(store, site, node, overlap)
        assert ack.acked_through == 6 and ack.head == 6
        assert ack.outcomes == {"applied": 3, "duplicate": 2}
        assert ack.segments == ((1, 3, 1), (4, 6, 4))
        assert [ack.rev_of(s) for s in range(2, 7)] == [2, 3, 4, 5, 6]
        # another node's push takes revs in between; a resend still gets the right ones
        other, _ = await store.register_device(site, "second edge")
        await push(store, site, other, [line(other, 1, "x1")])
        ack = await push(store, site, node, [line(node, i, f"l{i}") for i in range(5, 9)])
        assert ack.segments == ((4, 6, 4), (7, 8, 8))
        assert [ack.rev_of(s) for s in range(5, 9)] == [5, 6, 8, 9]
        rows = await store.rows(site, "order_lines")
        assert len(rows) == 9 and rows["l2"]["quantity"] == 1

    run(pg_database, body)


def test_gap_is_refused_with_the_expected_seq_and_nothing_applied(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        await push(store, site, node, [line(node, 1, "l1"), line(node, 2, "l2")])
        before = await snapshot(store, site)
        with pytest.raises(RemoteProtocolError) as info:
            await push(store, site, node, [line(node, 4, "l4"), line(node, 5, "l5")])
        assert info.value.code is ErrorCode.SEQUENCE_GAP
        assert info.value.details["expected"] == 3
        assert await snapshot(store, site) == before

    run(pg_database, body)


CLOUD_ONLY = TableSpec(
    "price_lists", (Column("name", ColumnType.TEXT),), author=Author.CLOUD, doc="test only"
)
WITH_CLOUD_ONLY = Registry([*TABLES, CLOUD_ONLY])

BAD_CHANGES: dict[str, tuple[Callable[[str], Change], ErrorCode]] = {
    "unknown table": (
        lambda n: change(n, 2, "payroll", "p1", Op.INSERT, {"x": 1}),
        ErrorCode.UNKNOWN_TABLE,
    ),
    "unknown column": (lambda n: line(n, 2, "l2", colour="red"), ErrorCode.UNKNOWN_FIELD),
    "wrong type": (lambda n: line(n, 2, "l2", quantity="two"), ErrorCode.INVALID_CHANGE),
    "bool for an int": (lambda n: line(n, 2, "l2", quantity=True), ErrorCode.INVALID_CHANGE),
    "int out of range": (lambda n: line(n, 2, "l2", quantity=2**63), ErrorCode.INVALID_CHANGE),
    "unknown order status": (
        lambda n: change(n, 2, "orders", "o1", Op.INSERT, {"status": "eaten"}),
        ErrorCode.INVALID_CHANGE,
    ),
    "delete of an order line": (
        lambda n: change(n, 2, "order_lines", "l1", Op.DELETE, {}),
        ErrorCode.ADD_ONLY,
    ),
    "update of an immutable order column": (
        lambda n: change(n, 2, "orders", "o1", Op.UPDATE, {"check_number": 7}),
        ErrorCode.INVALID_CHANGE,
    ),
    "edit of an order line": (
        lambda n: change(n, 2, "order_lines", "l1", Op.UPDATE, {"quantity": 3}),
        ErrorCode.ADD_ONLY,
    ),
    "edge writing a cloud-only table": (
        lambda n: change(n, 2, "price_lists", "p1", Op.INSERT, {"name": "Lunch"}),
        ErrorCode.NOT_AUTHOR,
    ),
    "old holding a list": (
        lambda n: change(
            n,
            2,
            "orders",
            "o1",
            Op.UPDATE,
            {"notes": "x"},
            old={"notes": [1]},  # type: ignore[dict-item]
        ),
        ErrorCode.INVALID_CHANGE,
    ),
    "NUL in text": (lambda n: line(n, 2, "l2", name="fish\x00"), ErrorCode.INVALID_CHANGE),
    "insert without columns": (
        lambda n: change(n, 2, "menu_items", "m1", Op.INSERT, {}),
        ErrorCode.INVALID_CHANGE,
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CHANGES))
def test_an_invalid_change_refuses_the_whole_batch(pg_database: str, case: str) -> None:
    make, code = BAD_CHANGES[case]

    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        before = await snapshot(store, site)
        # a valid first change, then the bad one, then another valid one
        batch = [line(node, 1, "l1"), make(node), line(node, 3, "l3")]
        with pytest.raises(RemoteProtocolError) as info:
            await push(store, site, node, batch)
        assert info.value.code is code
        assert await snapshot(store, site) == before
        # and the node can still push a good batch from seq 1
        ack = await push(store, site, node, [line(node, 1, "l1")])
        assert ack.acked_through == 1

    run(pg_database, body, WITH_CLOUD_ONLY)


def test_the_batch_must_come_from_the_credentials_site_and_node(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        other, other_node = await new_site(store, "other")
        for claimed_site, claimed_node in ((other, node), (site, other_node)):
            batch = wire.decode_push(
                wire.encode_push(claimed_site, claimed_node, [line(claimed_node, 1, "l1")])
            )
            with pytest.raises(RemoteProtocolError) as info:
                await store.ingest(site, node, batch, 1, 1)
            assert info.value.code is ErrorCode.SITE_MISMATCH
        assert await store.head(site) == 0 and await store.head(other) == 0

    run(pg_database, body)


# -- strategies on a concurrent edit of an order ---------------------------------------------


ORDER: dict[str, Value] = {
    "check_number": 12,
    "business_day": "2024-05-01",
    "table_name": "T1",
    "covers": 2,
}


async def concurrent_order_edit(store: CloudStore, edge_hlc: int) -> tuple[str, str, wire.PushAck]:
    """Edge inserts o1 (rev 1); the cloud renames its table (rev 2); the edge, still at base
    1, renames it too and changes the covers."""
    site, node = await new_site(store)
    await push(store, site, node, [change(node, 1, "orders", "o1", Op.INSERT, dict(ORDER))])
    rev = await store.write(site, [("orders", "o1", Op.UPDATE, {"table_name": "T5"})])
    assert rev == 2
    edit = change(
        node,
        2,
        "orders",
        "o1",
        Op.UPDATE,
        {"table_name": "T9", "covers": 4},
        base=1,
        hlc=edge_hlc,
        old={"table_name": "T1", "covers": 2},
    )
    ack = await push(store, site, node, [edit])
    return site, node, ack


@pytest.mark.parametrize(
    ("strategy", "edge_hlc", "table_name", "covers", "outcome"),
    [
        ("server_wins", FAR_FUTURE_HLC, "T5", 2, "overridden"),
        ("client_wins", 1, "T9", 4, "merged"),
        ("smart_merge", 1, "T5", 4, "merged"),  # both renamed: the later HLC (cloud's) wins
        ("smart_merge", FAR_FUTURE_HLC, "T9", 4, "merged"),  # the edge's is later
        ("manual", FAR_FUTURE_HLC, "T5", 4, "parked"),
    ],
)
def test_strategies_on_a_concurrent_order_edit(
    pg_database: str, strategy: str, edge_hlc: int, table_name: str, covers: int, outcome: str
) -> None:
    async def body(store: CloudStore) -> None:
        site, node, ack = await concurrent_order_edit(store, edge_hlc)
        assert ack.outcomes == {outcome: 1, "duplicate": 0}
        row = (await store.rows(site, "orders"))["o1"]
        assert (row["table_name"], row["covers"]) == (table_name, covers)
        # whatever happened, the edit's row is in the feed at its rev (the edge re-syncs)
        page = await pull_all(store, site, node, cursor=2)
        assert [(e.rev, e.state.pk) for e in page.entries] == [(3, "o1")]
        assert dict(page.entries[0].state.values) == row

    run(pg_database, body, REGISTRY.with_strategies({"orders": strategy}))


def test_manual_parks_a_conflict_and_resolving_it_applies_the_choice(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node, _ = await concurrent_order_edit(store, FAR_FUTURE_HLC)
        [parked] = await store.conflicts(site)
        assert parked["table"] == "orders" and parked["pk"] == "o1"
        assert (parked["change_origin"], parked["change_seq"]) == (node, 2)
        assert parked["columns"] == ["table_name"]
        assert parked["base"] == {"table_name": "T1"}
        assert parked["local"] == {"table_name": "T9"}
        assert parked["remote"] == {"table_name": "T5"}
        assert wire.decode_pull(await store.pull(site, node, 3, 10)).conflicts == 1

        conflict, rev = await store.resolve_conflict(site, parked["id"], "local", by="manager")
        assert rev == 4 and conflict["resolved_by"] == "manager"
        assert conflict["resolved_at_ms"] is not None
        assert (await store.rows(site, "orders"))["o1"]["table_name"] == "T9"
        assert await store.conflicts(site) == []
        assert len(await store.conflicts(site, open_only=False)) == 1
        page = await pull_all(store, site, node, cursor=3)
        assert [(e.rev, e.state.pk, e.state.values["table_name"]) for e in page.entries] == [
            (4, "o1", "T9")
        ]
        assert page.conflicts == 0

        with pytest.raises(RemoteProtocolError) as info:
            await store.resolve_conflict(site, parked["id"], "remote")
        assert info.value.code is ErrorCode.CONFLICT_RESOLVED
        with pytest.raises(RemoteProtocolError) as info:
            await store.resolve_conflict(site, parked["id"] + 100, "remote")
        assert info.value.code is ErrorCode.CONFLICT_NOT_FOUND

    run(pg_database, body, REGISTRY.with_strategies({"orders": "manual"}))


def test_resolving_remote_keeps_the_row_and_republishes_it(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node, _ = await concurrent_order_edit(store, FAR_FUTURE_HLC)
        [parked] = await store.conflicts(site)
        before = await store.rows(site, "orders")
        _, rev = await store.resolve_conflict(site, parked["id"], "remote")
        assert rev == 4 and await store.rows(site, "orders") == before
        page = await pull_all(store, site, node, cursor=3)
        assert [(e.rev, e.state.pk) for e in page.entries] == [(4, "o1")]

    run(pg_database, body, REGISTRY.with_strategies({"orders": "manual"}))


def test_resolving_with_values_checks_them(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, _, _ = await concurrent_order_edit(store, FAR_FUTURE_HLC)
        [parked] = await store.conflicts(site)
        bad: list[tuple[str, dict[str, object], ErrorCode]] = [
            ("values", {"table_name": 5}, ErrorCode.INVALID_CHANGE),
            ("values", {"status": "paid"}, ErrorCode.INVALID_RESOLUTION),
            ("values", {"covers": 3}, ErrorCode.INVALID_RESOLUTION),  # not in the conflict
            ("values", {}, ErrorCode.INVALID_RESOLUTION),
            ("local", {"table_name": "T7"}, ErrorCode.INVALID_RESOLUTION),
            ("mine", {}, ErrorCode.INVALID_RESOLUTION),
        ]
        for choose, values, code in bad:
            with pytest.raises(RemoteProtocolError) as info:
                await store.resolve_conflict(site, parked["id"], choose, values)
            assert info.value.code is code, (choose, values)
        assert len(await store.conflicts(site)) == 1
        conflict, _ = await store.resolve_conflict(
            site, parked["id"], "values", {"table_name": "Bar 2"}
        )
        assert conflict["resolution"] == {"choose": "values", "values": {"table_name": "Bar 2"}}
        assert (await store.rows(site, "orders"))["o1"]["table_name"] == "Bar 2"

    run(pg_database, body, REGISTRY.with_strategies({"orders": "manual"}))


def test_a_parked_discount_is_decided_whole(pg_database: str) -> None:
    """Under ``manual``, concurrent discounts park the whole discount, even the columns they
    agree on; a person decides it as one, and the write keeps the group whole."""
    cloud_discount = (10, None, "vip", "mia", "mia")
    edge_discount = (None, 500, "vip", "sam", "mia")  # same reason and approver

    async def discounted(store: CloudStore, site: str, node: str, pk: str) -> dict[str, Any]:
        await push(store, site, node, [change(node, 1, "orders", pk, Op.INSERT, dict(ORDER))])
        fields = dict(zip(DISCOUNT_COLUMNS, cloud_discount, strict=True))
        await store.write(site, [("orders", pk, Op.UPDATE, fields)])
        fields = dict(zip(DISCOUNT_COLUMNS, edge_discount, strict=True))
        before = dict.fromkeys(DISCOUNT_COLUMNS)
        edit = change(node, 2, "orders", pk, Op.UPDATE, fields, 1, FAR_FUTURE_HLC, before)
        assert (await push(store, site, node, [edit])).outcomes["parked"] == 1
        [parked] = [c for c in await store.conflicts(site) if c["pk"] == pk]
        return parked

    def discount(row: dict[str, Value]) -> tuple[Value, ...]:
        return tuple(row[c] for c in DISCOUNT_COLUMNS)

    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        parked = await discounted(store, site, node, "o1")
        # the whole group is parked, the columns both sides agree on too
        assert set(parked["columns"]) == set(DISCOUNT_COLUMNS)
        chosen = {"discount_percent": 15, "discount_pence": None, "discounted_by": "ola"}
        for part in ({"discount_percent": 15}, chosen):
            with pytest.raises(RemoteProtocolError) as info:
                await store.resolve_conflict(site, parked["id"], "values", part)
            assert info.value.code is ErrorCode.INVALID_RESOLUTION
            assert "together" in info.value.message
        assert discount((await store.rows(site, "orders"))["o1"]) == cloud_discount
        whole = (15, None, "vip", "ola", "mia")
        chosen = dict(zip(DISCOUNT_COLUMNS, whole, strict=True))
        conflict, _ = await store.resolve_conflict(site, parked["id"], "values", chosen)
        assert discount((await store.rows(site, "orders"))["o1"]) == whole
        assert conflict["resolution"]["values"] == dict(zip(DISCOUNT_COLUMNS, whole, strict=True))
        # choosing the edge's side writes its whole discount
        other, node2 = await new_site(store, "other")
        parked = await discounted(store, other, node2, "o2")
        await store.resolve_conflict(other, parked["id"], "local")
        assert discount((await store.rows(other, "orders"))["o2"]) == edge_discount

    run(pg_database, body, REGISTRY.with_strategies({"orders": "manual"}))


def test_manual_delete_conflicts_resolve_to_a_delete_or_a_revival(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        insert = [
            change(node, i, "menu_items", f"m{i}", Op.INSERT, {"name": "Soup"}) for i in (1, 2)
        ]
        await push(store, site, node, insert)
        # m1: the cloud edits, the edge (base 2) deletes; m2: the cloud deletes, the edge edits
        await store.write(
            site,
            [
                ("menu_items", "m1", Op.UPDATE, {"price_pence": 450}),
                ("menu_items", "m2", Op.DELETE, {}),
            ],
        )
        ack = await push(
            store,
            site,
            node,
            [
                change(node, 3, "menu_items", "m1", Op.DELETE, {}, base=2),
                change(node, 4, "menu_items", "m2", Op.UPDATE, {"price_pence": 500}, base=2),
            ],
        )
        assert ack.outcomes == {"parked": 2, "duplicate": 0}
        assert sorted(await store.rows(site, "menu_items")) == ["m1"]
        by_pk = {c["pk"]: c for c in await store.conflicts(site)}
        assert by_pk["m1"]["local_deleted"] and not by_pk["m1"]["remote_deleted"]
        # the edit's columns land even on the deleted row; only its existence is parked
        assert by_pk["m2"]["remote_deleted"] and by_pk["m2"]["columns"] == []

        await store.resolve_conflict(site, by_pk["m1"]["id"], "local")
        await store.resolve_conflict(site, by_pk["m2"]["id"], "local")
        rows = await store.rows(site, "menu_items")
        assert sorted(rows) == ["m2"]
        assert rows["m2"]["price_pence"] == 500 and rows["m2"]["name"] == "Soup"

    run(pg_database, body, REGISTRY.with_strategies({"menu_items": "manual"}))


# -- domain merges ---------------------------------------------------------------------------


def test_concurrent_stock_deltas_add_up(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, a = await new_site(store)
        b, _ = await store.register_device(site, "second edge")
        await push(
            store, site, a, [change(a, 1, "stock_levels", "fish", Op.INSERT, {"on_hand": 10})]
        )
        await store.write(site, [("stock_levels", "fish", Op.UPDATE, {"on_hand": 5})])
        await push(
            store, site, b, [change(b, 1, "stock_levels", "fish", Op.UPDATE, {"on_hand": -3})]
        )
        await push(
            store, site, a, [change(a, 2, "stock_levels", "fish", Op.UPDATE, {"on_hand": -1})]
        )
        assert (await store.rows(site, "stock_levels"))["fish"]["on_hand"] == 11

    run(pg_database, body)


def test_order_status_only_moves_forward(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, a = await new_site(store)
        b, _ = await store.register_device(site, "second edge")
        await push(store, site, a, [change(a, 1, "orders", "o1", Op.INSERT, dict(ORDER))])
        await push(store, site, a, [change(a, 2, "orders", "o1", Op.UPDATE, {"status": "paid"}, 1)])
        await push(
            store,
            site,
            b,
            [change(b, 1, "orders", "o1", Op.UPDATE, {"status": "fired"}, 1, FAR_FUTURE_HLC)],
        )
        assert (await store.rows(site, "orders"))["o1"]["status"] == "paid"

    run(pg_database, body)


def test_two_edges_adding_lines_never_lose_one(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, a = await new_site(store)
        b, _ = await store.register_device(site, "second edge")
        await push(store, site, a, [line(a, 1, "a1"), line(a, 2, "a2")])
        await push(store, site, b, [line(b, 1, "b1")])
        void = change(b, 2, "order_lines", "a1", Op.UPDATE, {"voided": True, "void_reason": "x"})
        await push(store, site, b, [void])
        rows = await store.rows(site, "order_lines")
        assert sorted(rows) == ["a1", "a2", "b1"] and rows["a1"]["voided"] is True

    run(pg_database, body)


# -- tenancy ---------------------------------------------------------------------------------


def test_one_sites_data_is_never_visible_to_another(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site_a, node_a = await new_site(store, "a")
        site_b, node_b = await new_site(store, "b")
        await push(store, site_a, node_a, [line(node_a, 1, "l1"), line(node_a, 2, "l2")])
        await push(
            store, site_a, node_a, [change(node_a, 3, "orders", "o1", Op.INSERT, dict(ORDER))]
        )
        await store.write(site_a, [("orders", "o1", Op.UPDATE, {"table_name": "T5"})])
        edit = change(node_a, 4, "orders", "o1", Op.UPDATE, {"table_name": "T9"}, 3, 1 << 62)
        await push(store, site_a, node_a, [edit])
        [parked] = await store.conflicts(site_a)

        assert await store.head(site_b) == 0
        assert await store.rows(site_b, "order_lines") == {}
        assert await store.rows(site_b, "orders") == {}
        assert await store.conflicts(site_b, open_only=False) == []
        page = wire.decode_pull(await store.pull(site_b, node_b, 0, 100))
        assert (page.entries, page.head, page.conflicts) == ([], 0, 0)
        assert all(c == checksum.Checksum() for c in (await store.checksums(site_b)).values())
        with pytest.raises(RemoteProtocolError) as info:
            await store.resolve_conflict(site_b, parked["id"], "local")
        assert info.value.code is ErrorCode.CONFLICT_NOT_FOUND
        # the same keys at site B are B's own rows
        await push(store, site_b, node_b, [line(node_b, 1, "l1", quantity=7)])
        assert (await store.rows(site_a, "order_lines"))["l1"]["quantity"] == 1
        assert (await store.rows(site_b, "order_lines"))["l1"]["quantity"] == 7
        [status_b] = await store.status(site_b)
        assert status_b["feed_head"] == 1 and status_b["open_conflicts"] == 0

    run(pg_database, body, REGISTRY.with_strategies({"orders": "manual"}))


# -- feed ------------------------------------------------------------------------------------


def test_pull_pages_through_the_feed(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        await push(store, site, node, [line(node, i, f"l{i:02}") for i in range(1, 13)])
        cursor, seen, pages = 0, [], []
        while True:
            page = wire.decode_pull(await store.pull(site, node, cursor, 5))
            assert page.cursor == cursor and page.head == 12
            seen += [e.rev for e in page.entries]
            pages.append((len(page.entries), page.more, page.next))
            cursor = page.next
            if not page.more:
                break
        assert pages == [(5, True, 5), (5, True, 10), (2, False, 12)]
        assert seen == list(range(1, 13))
        at_head = wire.decode_pull(await store.pull(site, node, 12, 5))
        assert (at_head.entries, at_head.next, at_head.more) == ([], 12, False)
        for bad in (13, -1):
            with pytest.raises(RemoteProtocolError) as info:
                await store.pull(site, node, bad, 5)
            assert info.value.code is ErrorCode.INVALID_CURSOR
        [status] = await store.status(site)
        [device] = status["nodes"]
        assert device["pull_cursor"] == 12 and device["lag_revs"] == 0
        assert device["watermark"] == 12 and device["last_push_at_ms"] is not None

    run(pg_database, body)


def test_the_feed_holds_one_entry_per_touched_row_at_its_last_change(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        ack = await push(
            store,
            site,
            node,
            [
                change(node, 1, "menu_items", "m1", Op.INSERT, {"name": "Soup"}),
                change(node, 2, "menu_items", "m2", Op.INSERT, {"name": "Pie"}),
                change(node, 3, "menu_items", "m1", Op.UPDATE, {"price_pence": 450}),
            ],
        )
        assert ack.head == 3
        page = await pull_all(store, site, node)
        assert [(e.rev, e.state.pk) for e in page.entries] == [(2, "m2"), (3, "m1")]
        m1 = page.entries[1].state
        assert (m1.values["name"], m1.values["price_pence"], m1.version.rev) == ("Soup", 450, 3)
        assert page.next == 3 and not page.more

    run(pg_database, body)


@pytest.mark.parametrize("assume_new_min", [0, 10**9], ids=["assumed-new", "looked-up"])
def test_rows_new_to_the_cloud_are_stored_and_published_as_the_merge_rules_make_them(
    pg_database: str, assume_new_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ingest keeps rows nobody has written yet aside from the merges (the bulk of a
    catch-up) and may take rows only inserts touch to be new without looking: their rows,
    feed entries (to the byte), echo marks and outcomes must still be what ``apply_change``
    makes, also when the batch touches them again or one of them exists after all."""
    monkeypatch.setattr(store_module, "ASSUME_NEW_MIN", assume_new_min)

    async def body(store: CloudStore) -> None:
        store.clock = HybridClock(now_ms=lambda: 0)  # the model's logical clock stands in
        site, node = await new_site(store)
        model = ModelCloud(REGISTRY)
        echo: dict[int, tuple[str | None, int | None]] = {}

        async def both(changes: list[Change]) -> None:
            stored, first_rev = set(model.rows), model.head + 1
            kinds: Counter[str] = Counter()
            states = dict(model.rows)
            for rev, c in enumerate(changes, first_rev):
                key = (c.table, c.pk)
                outcome = apply_change(REGISTRY.get(c.table), states.get(key), c, rev)
                states[key] = outcome.state
                kinds[outcome.kind.value] += 1
                # a row this node's push created echoes it: it need not pull it back
                echo[rev] = (None, None) if key in stored else (node, c.seq)
            model.ingest(node, changes)
            ack = await push(store, site, node, changes)
            assert (ack.head, ack.acked_through) == (model.head, changes[-1].seq)
            assert {k: v for k, v in ack.outcomes.items() if v} == dict(kinds)

        await both(
            [
                change(node, 1, "menu_items", "m-old", Op.INSERT, {"name": "Soup"}),
                change(node, 2, "stock_levels", "s-old", Op.INSERT, {"on_hand": 10}),
                change(node, 3, "menu_items", "m-gone", Op.INSERT, {"name": "Flan"}),
                change(node, 4, "menu_items", "m-gone", Op.DELETE, {}),
            ]
        )
        model.write("menu_items", "m-old", Op.UPDATE, {"price_pence": 300})
        store.clock.last = model.clock - 1
        await store.write(site, [("menu_items", "m-old", Op.UPDATE, {"price_pence": 300})])
        echo[model.head] = (None, None)
        await both(
            [
                line(node, 5, "l1"),
                change(node, 6, "menu_items", "m1", Op.INSERT, {"name": "Pie", "price_pence": 4}),
                change(node, 7, "menu_items", "m1", Op.UPDATE, {"price_pence": 5}),
                change(node, 8, "menu_items", "m1", Op.DELETE, {}),
                change(node, 9, "menu_items", "m2", Op.INSERT, {"name": "Tart"}),
                change(node, 10, "menu_items", "m2", Op.INSERT, {"available": False}),
                change(node, 11, "menu_items", "m9", Op.DELETE, {}),
                change(node, 12, "stock_levels", "s-old", Op.UPDATE, {"on_hand": -3}),
                change(node, 13, "stock_levels", "s1", Op.INSERT, {"on_hand": 5, "unit": "kg"}),
                change(node, 14, "stock_levels", "s1", Op.UPDATE, {"on_hand": -2}),
                change(node, 15, "orders", "o1", Op.INSERT, {"check_number": 1, "status": "fired"}),
                change(node, 16, "menu_items", "m-old", Op.UPDATE, {"price_pence": 350}, base=0),
                change(node, 17, "menu_items", "m3", Op.UPDATE, {"name": "Cake"}),
                line(node, 18, "l2", voided=True, notes=None),
            ]
        )
        # inserts only, but two of the rows exist already (one of them deleted)
        await both(
            [
                line(node, 19, "l3"),
                change(node, 20, "menu_items", "m-gone", Op.INSERT, {"name": "Flan 2"}),
                change(node, 21, "menu_items", "m-old", Op.INSERT, {"station": "bar"}),
                line(node, 22, "l4"),
            ]
        )

        async with store.pool.acquire() as conn:
            for (table, pk), state in model.rows.items():
                assert (await store.io[table].load(conn, site, [pk]))[pk] == state
        feed = await store.pool.fetch(
            "SELECT rev, tbl, pk, entry, echo_of, echo_seq FROM feed WHERE site_id = $1"
            " ORDER BY rev",
            site,
        )
        assert [tuple(r) for r in feed] == [
            (rev, table, state.pk, wire.pack_entry(FeedEntry(rev, table, state)), *echo[rev])
            for rev, table, state in sorted(model.feed, key=lambda e: e[0])
        ]

    run(pg_database, body)


def test_checksums_match_a_recomputation_and_an_edge_replaying_the_feed(
    pg_database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cloud_rows, "CHECKSUM_PAGE", 3)  # 7 order lines: summed in 3 pages

    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        await push(store, site, node, [line(node, i, f"l{i}") for i in range(1, 8)])
        await push(
            store,
            site,
            node,
            [
                change(node, 8, "menu_items", "m1", Op.INSERT, {"name": "Soup", "price_pence": 4}),
                change(node, 9, "menu_items", "m2", Op.INSERT, {"name": "Pie"}),
                change(node, 10, "menu_items", "m2", Op.DELETE, {}),
                change(node, 11, "stock_levels", "fish", Op.INSERT, {"on_hand": 3}),
            ],
        )
        await store.write(site, [("menu_items", "m1", Op.UPDATE, {"available": False})])
        sums = await store.checksums(site)
        replica: dict[str, dict[str, dict[str, Value]]] = {s.name: {} for s in TABLES}
        for entry in (await pull_all(store, site, node)).entries:
            if entry.state.deleted:
                replica[entry.table].pop(entry.state.pk, None)
            else:
                replica[entry.table][entry.state.pk] = dict(entry.state.values)
        for spec in TABLES:
            names = [c.name for c in spec.columns]
            rows = await store.rows(site, spec.name)
            assert sums[spec.name] == checksum.table_checksum(rows.items(), names)
            assert sums[spec.name] == checksum.table_checksum(replica[spec.name].items(), names)
        assert sums["order_lines"].count == 7 and sums["menu_items"].count == 1

    run(pg_database, body)


def test_an_edge_predicts_the_clouds_answer_with_rebase(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        await push(store, site, node, [change(node, 1, "orders", "o1", Op.INSERT, dict(ORDER))])
        base = (await pull_all(store, site, node)).entries[0].state
        pending = [change(node, 2, "orders", "o1", Op.UPDATE, {"covers": 6, "notes": "vip"}, 1)]
        predicted = rebase(REGISTRY.get("orders"), base, pending)
        await push(store, site, node, pending)
        assert (await store.rows(site, "orders"))["o1"] == dict(predicted.values)

    run(pg_database, body)


def test_wait_for_feed_wakes_when_another_writer_commits(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await store.wait_for_feed(site, 0, 0.05) == 0  # times out, nothing new

        async with opened(pg_database) as other:  # a second worker: only NOTIFY can wake us
            waiter = asyncio.create_task(store.wait_for_feed(site, 0, 20))
            await asyncio.sleep(0)  # let the waiter take its future and read the head
            await push(other, site, node, [line(node, 1, "l1")])
            started = loop.time()
            assert await waiter == 1
            assert loop.time() - started < 2
        assert await store.wait_for_feed(site, 0, 20) == 1  # already past: no wait

    run(pg_database, body)


def test_a_held_pull_answers_its_own_echoes_late_and_other_news_at_once(
    pg_database: str,
) -> None:
    async def body(store: CloudStore) -> None:
        site, node = await new_site(store)
        other, _ = await store.register_device(site, "till-2")
        loop = asyncio.get_running_loop()
        # Only the puller's own change came back: the answer waits ECHO_HOLD_S, not 20 s.
        waiter = asyncio.create_task(store.wait_for_feed(site, 0, 20, node))
        await asyncio.sleep(0)
        await push(store, site, node, [line(node, 1, "l1")])
        started = loop.time()
        with pytest.raises(TimeoutError):  # held, although the head moved
            await asyncio.wait_for(asyncio.shield(waiter), ECHO_HOLD_S / 4)
        assert await waiter == 1
        assert ECHO_HOLD_S / 4 <= loop.time() - started < 5
        # Another device's change during the hold is news: answered at once.
        waiter = asyncio.create_task(store.wait_for_feed(site, 1, 20, node))
        await asyncio.sleep(0)
        await push(store, site, node, [line(node, 2, "l2")])
        await asyncio.sleep(0)
        assert not waiter.done()
        await push(store, site, other, [line(other, 1, "l3")])
        assert await asyncio.wait_for(waiter, ECHO_HOLD_S * 4) == 3

    run(pg_database, body)


def test_cloud_writes_are_validated_as_the_cloud(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site, _ = await new_site(store)
        with pytest.raises(RemoteProtocolError) as info:
            await store.write(site, [("order_lines", "l1", Op.INSERT, {"name": "x"})])
        assert info.value.code is ErrorCode.NOT_AUTHOR
        with pytest.raises(RemoteProtocolError) as info:
            await store.write(
                site,
                [
                    ("menu_items", "m1", Op.INSERT, {"name": "Soup"}),
                    ("menu_items", "m2", Op.INSERT, {"price_pence": "free"}),
                ],
            )
        assert info.value.code is ErrorCode.INVALID_CHANGE
        assert await store.head(site) == 0 and await store.rows(site, "menu_items") == {}
        assert await store.write(site, [("price_lists", "p1", Op.INSERT, {"name": "Lunch"})]) == 1

    run(pg_database, body, WITH_CLOUD_ONLY)


# -- credentials and schema ------------------------------------------------------------------


def test_device_credentials(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        site = await store.register_site("The Anchor", "anchor")
        node, token = await store.register_device(site, "till")
        assert await store.authenticate(token) == ("anchor", node)
        stored = await store.pool.fetchval("SELECT secret_hash FROM devices")
        assert token.split(".", 1)[1].encode() not in bytes(stored)
        for bad in ("", node, f"{node}.wrong", f"node_x.{token.split('.', 1)[1]}", "a.b.c"):
            with pytest.raises(RemoteProtocolError) as info:
                await store.authenticate(bad)
            assert info.value.code is ErrorCode.UNAUTHORIZED
        assert await store.revoke_device(site, node)
        with pytest.raises(RemoteProtocolError):
            await store.authenticate(token)

    run(pg_database, body)


def test_migrations_are_recorded_once_and_new_columns_are_added(pg_database: str) -> None:
    orders = REGISTRY.get("orders")
    grown = TableSpec(
        "orders", (*orders.columns, Column("tip_pence", ColumnType.INT)), orders.author
    )
    registry = Registry([grown if s.name == "orders" else s for s in TABLES])

    async def body() -> None:
        async with opened(pg_database):
            pass
        async with opened(pg_database, registry) as store:
            site, node = await new_site(store)
            write = change(node, 1, "orders", "o1", Op.INSERT, {"tip_pence": 150})
            await push(store, site, node, [write])
            assert (await store.rows(site, "orders"))["o1"]["tip_pence"] == 150
            versions = await store.pool.fetch("SELECT version FROM schema_migrations")
            assert [r["version"] for r in versions] == [m[0] for m in MIGRATIONS]

    asyncio.run(body())


def test_a_registry_table_may_not_shadow_the_clouds_own(pg_database: str) -> None:
    feed = TableSpec("feed", (Column("x", ColumnType.TEXT),))

    async def body() -> None:
        with pytest.raises(ValueError, match="clash"):
            await CloudStore.open(pg_database, Registry([feed]), pool_min=1, pool_max=1)

    asyncio.run(body())


def test_sites_are_unique(pg_database: str) -> None:
    async def body(store: CloudStore) -> None:
        await store.register_site("a", "same")
        with pytest.raises(CloudError) as info:
            await store.register_site("b", "same")
        assert info.value.code is CloudCode.SITE_EXISTS
        with pytest.raises(CloudError) as info:
            await store.register_device("nope", "till")
        assert info.value.code is CloudCode.SITE_NOT_FOUND
        with pytest.raises(CloudError):
            await store.register_site("c", "bad id with spaces")

    run(pg_database, body)


def test_stored_feed_entries_decode_to_the_states_they_were_made_from() -> None:
    states = [
        RowState("a", {"name": "x", "n": 1}, Version(3, 9, "n1"), {"name": Version(2, 8, "c")}),
        RowState("b", {"blob": b"\x00\x01", "n": None}, Version(4, 10, "cloud"), {}, True),
    ]
    entries = [FeedEntry(rev, "t", s) for rev, s in zip((3, 4), states, strict=True)]
    packed = [pack_entry(e.rev, e.table, e.state) for e in entries]
    assert packed == [wire.pack_entry(e) for e in entries]
    frame = wire.encode_pull(
        "s",
        "n",
        1,
        9,
        packed,
        next_cursor=4,
        more=False,
        conflicts=2,
        server_ms=5,
        hlc=6,
        segments=[(1, 2, 3)],
    )
    page = wire.decode_pull(frame)
    assert page.entries == entries and page.segments == ((1, 2, 3),)


# -- the store agrees with the pure reference model -------------------------------------------


async def _same_as_model(dsn: str, registry: Registry, scenario: list[Step]) -> None:
    async with opened(dsn, registry) as store:
        store.clock = HybridClock(now_ms=lambda: 0)  # the model's logical clock stands in
        site = await store.register_site("model")
        edges = {}
        for who in ("a", "b"):
            node, _ = await store.register_device(site, who)
            edges[who] = ModelEdge(node, registry)
        cloud = ModelCloud(registry)

        async def push_both(edge: ModelEdge) -> None:
            batch = [c for c in edge.outbox if c.seq > edge.acked_through][:3]
            if not batch:
                return
            edge.push(cloud, limit=3)
            ack = await push(store, site, edge.node, batch)
            lo, hi = batch[0].seq, batch[-1].seq
            want = [s for s in cloud.segments.get(edge.node, []) if s[1] >= lo and s[0] <= hi]
            assert list(ack.segments) == want
            assert ack.head == cloud.head

        for step in scenario:
            if isinstance(step, Sync):
                edge = edges[step.who]
                await push_both(edge) if step.step == "push" else edge.pull(cloud, limit=3)
            elif step.who == "cloud":
                planned = plan(step, (step.table, step.pk) in cloud.live())
                if planned:
                    cloud.write(step.table, step.pk, *planned)
                    store.clock.last = cloud.clock - 1  # so the store's write gets that HLC
                    await store.write(site, [(step.table, step.pk, *planned)])  # type: ignore[list-item]
            else:
                edge = edges[step.who]
                planned = plan(step, (step.table, step.pk) in edge.values)
                if planned:
                    edge.write(step.table, step.pk, *planned)
        for edge in edges.values():
            while edge.outbox and edge.acked_through < edge.seq:
                await push_both(edge)

        assert await store.head(site) == cloud.head
        page = await pull_all(store, site, "")
        assert [(e.rev, e.table, e.state) for e in page.entries] == sorted(
            cloud.feed, key=lambda e: e[0]
        )
        async with store.pool.acquire() as conn:
            for (table, pk), state in cloud.rows.items():
                assert (await store.io[table].load(conn, site, [pk]))[pk] == state
        stored = [
            (c["table"], c["pk"], c["change_origin"], c["change_seq"], tuple(c["columns"]))
            + (c["base"], c["local"], c["remote"], c["local_deleted"], c["remote_deleted"])
            for c in await store.conflicts(site, open_only=False)
        ]
        assert stored == [
            (c.table, c.pk, c.change_origin, c.change_seq, c.columns)
            + (c.base, c.local, c.remote, c.local_deleted, c.remote_deleted)
            for c in cloud.conflicts
        ]


@pytest.mark.parametrize("assume_new_min", [store_module.ASSUME_NEW_MIN, 0])
@pytest.mark.parametrize("strategy", list(Strategy))
def test_the_store_agrees_with_the_reference_model(
    pg_database: str, strategy: Strategy, assume_new_min: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with 0, every insert takes its row to be new and falls back when it is not
    monkeypatch.setattr(store_module, "ASSUME_NEW_MIN", assume_new_min)
    registry = REGISTRY.with_strategies({name: strategy for name in REGISTRY.names()})

    @settings(max_examples=20, deadline=None)
    @given(scenario=steps)
    def check(scenario: list[Step]) -> None:
        asyncio.run(_same_as_model(pg_database, registry, scenario))

    check()


def test_ingest_order_holds_a_later_batch_until_the_earlier_one_commits() -> None:
    async def body() -> None:
        order = IngestOrder(wait_s=5)
        key = ("site", "node")
        await order.applied(key, 0)
        later = asyncio.create_task(order.turn(key, 4))  # seqs 4.. while 1..3 are on the way
        await asyncio.sleep(0.01)
        assert not later.done()
        await order.applied(key, 3)
        await asyncio.wait_for(later, 1)
        await asyncio.wait_for(order.turn(key, 4), 0.01)  # its turn now: no wait
        impatient = IngestOrder(wait_s=0.05)
        await impatient.applied(key, 0)
        started = asyncio.get_running_loop().time()
        await impatient.turn(key, 10)  # a real gap: give up, the database refuses it
        assert asyncio.get_running_loop().time() - started >= 0.05

    asyncio.run(body())
