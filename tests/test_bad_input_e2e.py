"""Bad input end to end: refused whole over real HTTP, and an edge that keeps going.

Frames are built from a real edge's real outbox and sent with its real credential, then
spoilt one way each. Every refusal must carry its own status and code and leave the cloud
exactly as it was: rows (checksums), feed heads and the dedupe ledger of both sites. An
edge whose own push is refused keeps every change, shows the refusal, and still pulls.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from edge.store import wall_clock_ms
from shared.registry import default_registry
from sync_protocol import wire
from sync_protocol.changes import Change, Op
from sync_protocol.schema import Column, ColumnType, Merge, Registry, TableSpec

from .harness import SYNC_TYPE, Edge, Fleet, fleet, wait_until

MAX_FRAME = 64 * 1024
MAX_RECORDS = 400


def respin(frame: bytes, **outer: Any) -> bytes:
    """A frame with some outer fields replaced (the hash is not recomputed)."""
    fields = msgpack.unpackb(frame)
    fields.update(outer)
    packed: bytes = msgpack.packb(fields, use_bin_type=True)
    return packed


def changes_for(edge: Edge, first: int, count: int, **fields: Any) -> list[Change]:
    """``count`` valid order-line inserts from ``edge`` starting at ``first``."""
    return [
        Change(
            edge.node,
            seq,
            "order_lines",
            f"{edge.node}-x{seq}",
            Op.INSERT,
            {"order_id": "o1", "quantity": 1, **fields},
            0,
            seq,
        )
        for seq in range(first, first + count)
    ]


async def two_sites(f: Fleet) -> tuple[Edge, Edge]:
    """Two sites with an edge each, some data synced, and unsent changes in A's outbox."""
    edges = []
    for name in ("Harbour", "Quay"):
        site = await f.cloud.add_site(name)
        edge = await f.add_edge(site, name.lower())
        await edge.write("orders", "o1", "insert", {"check_number": 1, "table_name": name})
        await edge.write("stock_levels", "cola", "insert", {"on_hand": 24})
        edges.append(edge)
    await f.drain()
    a, b = edges
    await a.write("stock_levels", "cola", "update", {"on_hand": -2})
    await a.write("order_lines", "a-l1", "insert", {"order_id": "o1", "quantity": 2})
    return a, b


def test_every_bad_frame_is_refused_whole_with_its_own_code(
    tmp_path: Path, pg_database: str
) -> None:
    async def body() -> None:
        async with fleet(
            pg_database,
            tmp_path,
            max_frame_bytes=MAX_FRAME,
            max_records=MAX_RECORDS,
            pull_limit_default=100,
            pull_limit_max=MAX_RECORDS,
        ) as f:
            a, b = await two_sites(f)
            acked = a.store.cursors().acked_through
            pending = await a.store.outbox_after(acked, 100)
            assert len(pending) == 2
            good = wire.encode_push(a.site, a.node, pending)
            first = acked + 1
            payroll = Change(a.node, first + 2, "payroll", "p1", Op.INSERT, {"pay": 1}, 0, 1)
            cases: dict[str, tuple[Callable[[], bytes], int, str, str]] = {
                "malformed msgpack": (lambda: b"\xc1 not msgpack", 400, "malformed_batch", a.token),
                "truncated frame": (
                    lambda: good[: len(good) // 2],
                    400,
                    "malformed_batch",
                    a.token,
                ),
                "wrong protocol version": (
                    lambda: respin(good, v=2),
                    400,
                    "unsupported_version",
                    a.token,
                ),
                "hash mismatch": (
                    lambda: respin(good, sha256=hashlib.sha256(b"x").digest()),
                    400,
                    "hash_mismatch",
                    a.token,
                ),
                "unknown table": (
                    lambda: wire.encode_push(a.site, a.node, [*pending, payroll]),
                    422,
                    "unknown_table",
                    a.token,
                ),
                "oversized batch": (
                    lambda: wire.encode_push(
                        a.site, a.node, changes_for(a, first, 200, notes="n" * 400), "none"
                    ),
                    413,
                    "batch_too_large",
                    a.token,
                ),
                "too many changes": (
                    lambda: wire.encode_push(
                        a.site, a.node, changes_for(a, first, MAX_RECORDS + 1)
                    ),
                    413,
                    "batch_too_large",
                    a.token,
                ),
                "A's credential, B's frame": (
                    lambda: wire.encode_push(b.site, b.node, changes_for(b, 3, 2)),
                    403,
                    "site_mismatch",
                    a.token,
                ),
                "B's credential, A's frame": (lambda: good, 403, "site_mismatch", b.token),
                "no such device": (lambda: good, 401, "unauthorized", a.node + ".forged"),
            }

            async def snapshot() -> list[Any]:
                out: list[Any] = []
                for edge in (a, b):
                    nodes = await f.cloud.nodes(edge.site)
                    out += [
                        await f.cloud.head(edge.site),
                        await f.cloud.checksums(edge.site),
                        {n: s["watermark"] for n, s in nodes.items()},
                        await f.cloud.conflicts(edge.site, include_resolved=True),
                    ]
                return out

            before = await snapshot()
            for case, (make, want_status, want_code, token) in cases.items():
                frame = make()
                if case == "oversized batch":
                    assert len(frame) > MAX_FRAME
                status, data = await f.cloud.push_raw(token, frame)
                code, message, _ = wire.decode_error(data)
                assert (status, code) == (want_status, want_code), (case, message)
                assert message, case
                assert await snapshot() == before, f"{case}: something was applied"

            # A refused batch leaves no trace in the cloud's clock either, even when its
            # timestamps run minutes ahead (within what an accepted batch may move it).
            ahead_ms = wall_clock_ms() + 240_000
            future = Change(
                a.node, first, "payroll", "p1", Op.INSERT, {"pay": 1}, 0, ahead_ms << 16
            )
            status, _ = await f.cloud.push_raw(a.token, wire.encode_push(a.site, a.node, [future]))
            clock = (await f.cloud.owner("GET", "/v1/status"))["clock"]
            assert status == 422 and clock["hlc"] >> 16 < ahead_ms - 120_000, clock
            assert await snapshot() == before

            # The same changes, well framed, land; only site A moves.
            status, data = await f.cloud.push_raw(a.token, good)
            assert status == 200 and wire.decode_ack(data).acked_through == acked + 2
            after = await snapshot()
            assert after[4:] == before[4:] and after[:3] != before[:3]

    asyncio.run(body())


LOYALTY = TableSpec(
    "loyalty_cards",
    (Column("holder", ColumnType.TEXT), Column("points", ColumnType.INT, Merge.COUNTER)),
    doc="A table this edge has and the cloud does not (a newer edge build).",
)


def test_an_edge_whose_push_is_refused_keeps_its_outbox_and_still_pulls(
    tmp_path: Path, pg_database: str
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site = await f.cloud.add_site("Harbour")
            registry = Registry([*default_registry(), LOYALTY])
            edge = await f.add_edge(site, registry=registry, start=True)
            await edge.write("orders", "o1", "insert", {"check_number": 1, "table_name": "T1"})
            await f.drain()
            head = await f.cloud.head(site)
            cloud_sums = await f.cloud.checksums(site)

            await edge.stop()  # so that the three writes go in one batch
            refused = [
                await edge.write("stock_levels", "cola", "insert", {"on_hand": 24}),
                await edge.write("loyalty_cards", "card-1", "insert", {"holder": "Ann"}),
                await edge.write("orders", "o1", "update", {"notes": "window seat"}),
            ]
            await edge.start()

            def refusal() -> Any:
                error = edge.uplink.status().last_error
                return error is not None and error.code == "unknown_table"

            await wait_until(refusal, what="the cloud to refuse the push")
            status = await edge.status()
            assert status["last_error"]["channel"] == "push"
            assert status["last_error"]["http_status"] == 422
            assert status["online"] and status["stuck"] is None  # refused, not unreachable
            assert status["outbox_depth"] == 3 and status["oldest_unsynced_age_ms"] >= 0
            c = edge.store.cursors()
            # Nothing of the batch landed: the watermark is still the first write's. (Not
            # sent_through: the uplink retries the refused batch, marking it sent each time.)
            assert c.acked_through == refused[0].seq - 1
            assert await edge.store.outbox_after(c.acked_through, 10) == refused
            assert await f.cloud.head(site) == head
            assert await f.cloud.checksums(site) == cloud_sums

            # The dashboard keeps working and the edge keeps pulling, refusal or not.
            await f.cloud.write(site, ("menu_items", "pie", "insert", {"name": "Pie"}))
            new_head = await f.cloud.head(site)

            async def pulled() -> bool:
                return edge.store.cursors().pull_cursor == new_head and "pie" in await edge.rows(
                    "menu_items"
                )

            await wait_until(pulled, what="the dashboard's edit to reach the edge")
            await wait_until(refusal, what="the refusal to stay shown")
            status = await edge.status()
            assert status["last_error"]["code"] == "unknown_table"
            assert status["outbox_depth"] == 3
            assert await edge.store.outbox_after(edge.store.cursors().acked_through, 10) == refused
            assert (await edge.rows("orders"))["o1"]["notes"] == "window seat"  # still shown
            assert (await edge.rows("stock_levels"))["cola"]["on_hand"] == 24
            assert await f.cloud.rows(site, "stock_levels") == {}
            assert (await edge.store.status(wall_clock_ms())).outbox_depth == 3

    asyncio.run(body())


def test_owner_writes_and_pulls_that_are_bad_are_refused_too(
    tmp_path: Path, pg_database: str
) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            a, b = await two_sites(f)
            before = (await f.cloud.head(a.site), await f.cloud.checksums(a.site))
            cases = [
                (
                    {
                        "changes": [
                            {"table": "payroll", "id": "p", "op": "insert", "fields": {"x": 1}}
                        ]
                    },
                    422,
                    "unknown_table",
                ),
                (
                    {
                        "changes": [
                            {
                                "table": "order_lines",
                                "id": "l",
                                "op": "insert",
                                "fields": {"quantity": 1},
                            }
                        ]
                    },
                    403,
                    "table_not_authored_here",
                ),
                (
                    {
                        "changes": [
                            {
                                "table": "orders",
                                "id": "o1",
                                "op": "update",
                                "fields": {"covers": "two"},
                            }
                        ]
                    },
                    422,
                    "invalid_change",
                ),
                (
                    {
                        "changes": [
                            {
                                "table": "menu_items",
                                "id": "m",
                                "op": "insert",
                                "fields": {"name": "ok"},
                            },
                            {
                                "table": "menu_items",
                                "id": "m2",
                                "op": "insert",
                                "fields": {"colour": "red"},
                            },
                        ]
                    },
                    422,
                    "unknown_field",
                ),
            ]
            for payload, want_status, want_code in cases:
                async with f.cloud.http.post(
                    f"{f.cloud.url}/v1/sites/{a.site}/changes", json=payload
                ) as resp:
                    answer = await resp.json()
                    assert (resp.status, answer["error"]["code"]) == (want_status, want_code)
                assert (await f.cloud.head(a.site), await f.cloud.checksums(a.site)) == before
            # A device reads only its own site's feed, whatever it asks for.
            headers = {"Authorization": f"Bearer {a.token}"}
            head_b = await f.cloud.head(b.site)
            async with f.cloud.http.get(
                f"{f.cloud.url}/v1/sync/pull", params={"cursor": str(head_b + 50)}, headers=headers
            ) as resp:
                assert resp.status == 400 and resp.content_type == SYNC_TYPE
                assert wire.decode_error(await resp.read())[0] == "invalid_cursor"
            async with f.cloud.http.get(
                f"{f.cloud.url}/v1/sync/pull", params={"cursor": "0"}, headers=headers
            ) as resp:
                page = wire.decode_pull(await resp.read())
            # (rows the edge created itself are not echoed back to it; the rest are site A's)
            names = {e.state.values.get("table_name") for e in page.entries}
            assert "Quay" not in names and page.head == await f.cloud.head(a.site)

    asyncio.run(body())
