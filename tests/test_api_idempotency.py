"""Idempotency keys over real HTTP: answers survive a restart, race their originals, and expire.

The common cases (a retry gets the first answer, a reused key is refused, keys are per
device) are in ``test_api.py`` and next to each route's tests.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from edge import migrations
from edge.api import idempotency
from edge.api.auth import grant_approval
from edge.api.idempotency import ANSWERED

from .api_harness import Edge, Tablet, edge_server, running_edge

ORDERS = "/v1/orders"


async def fired_order(edge: Edge, till: Tablet) -> tuple[str, str]:
    """An order with one soup, fired; returns (order id, line id)."""
    got, order, _ = await edge.call(
        "POST", ORDERS, till.headers("sam"), json={"table_name": "T1", "covers": 2}
    )
    assert got == 201, order
    _, added, _ = await edge.call(
        "POST", f"{ORDERS}/{order['id']}/lines", till.headers("sam"), json={"item_id": "soup"}
    )
    fire = f"{ORDERS}/{order['id']}/fire"
    got, _, _ = await edge.call("POST", fire, till.headers("sam"), json={})
    assert got == 200
    return order["id"], added["line_ids"][0]


async def approved_void(edge: Edge, till: Tablet, key: str) -> tuple[str, dict[str, str]]:
    """The path and headers of a server's void of a fired line, with a manager's approval."""
    order_id, line_id = await fired_order(edge, till)
    _, approval, _ = await edge.store.transaction(
        lambda tx: grant_approval(tx, "mia", till.device_id)
    )
    headers = till.headers("sam", **{"X-Fynlo-Approval": approval, "Idempotency-Key": key})
    return f"{ORDERS}/{order_id}/lines/{line_id}/void", headers


WHY = {"reason": "sent to the wrong table"}


def test_a_retry_after_the_edge_restarts_gets_the_first_answer(tmp_path: Path) -> None:
    async def body() -> None:
        async with edge_server(tmp_path) as (server, edge):
            till = await edge.pair("till")
            await edge.login(till, "sam")
            path, headers = await approved_void(edge, till, "till-void-000001")
            got, first, _ = await edge.call("POST", path, headers, json=WHY)
            assert got == 200, first
            await server.stop()
            edge = await server.start()
            # The approval it carries is spent: only the stored answer can satisfy the retry.
            got, again, resp = await edge.call("POST", path, headers, json=WHY)
            assert (got, again) == (200, first)
            assert resp.headers.get("Idempotent-Replayed") == "true"
            assert edge.sql("SELECT count(*) FROM audit_log WHERE action = 'void_line'") == [(1,)]

    asyncio.run(body())


def test_retries_racing_their_original_all_get_its_answer(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "sam")
        path, headers = await approved_void(edge, till, "till-void-000002")
        answers = await asyncio.gather(
            *(edge.call("POST", path, headers, json=WHY) for _ in range(5))
        )
        bodies = [(got, answer) for got, answer, _ in answers]
        assert bodies == [bodies[0]] * 5 and bodies[0][0] == 200, bodies
        replayed = [resp.headers.get("Idempotent-Replayed") for _, _, resp in answers]
        assert replayed.count("true") == 4
        assert edge.sql("SELECT count(*) FROM approvals WHERE used_at_ms IS NOT NULL") == [(1,)]
        assert edge.sql("SELECT count(*) FROM audit_log WHERE action = 'void_line'") == [(1,)]

    run(body, tmp_path)


def test_answers_expire_after_a_day_and_only_then(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "mia")
        now = edge.store.clock.now_ms()
        edge.set_wall_clock(now)
        path = "/v1/menu/items/soup/availability"

        async def set_available(key: str, available: bool) -> Any:
            headers = till.headers("mia", **{"Idempotency-Key": key})
            return await edge.call("POST", path, headers, json={"available": available})

        await set_available("till-86-000001", False)
        edge.set_wall_clock(now + 1000)
        await set_available("till-86-000002", True)
        keys = edge.app[ANSWERED]
        assert len(keys) == 2
        # A day after the first answer: it goes, the one a second younger stays.
        edge.set_wall_clock(now + idempotency.KEEP_MS + 1)
        restarted = idempotency.AnsweredKeys()  # what a restart now would hold in memory
        await restarted.load(edge.store)
        assert len(restarted) == 1 and restarted.may_have(till.device_id, "till-86-000002")
        assert await idempotency.prune(edge.store, keys) == 1
        assert edge.sql("SELECT key FROM idempotency") == [("till-86-000002",)]
        assert not keys.may_have(till.device_id, "till-86-000001")
        assert keys.may_have(till.device_id, "till-86-000002")
        # The expired key is a new request now; the kept one is still answered.
        await edge.login(till, "mia")  # her session of a day ago has expired too
        got, _, resp = await set_available("till-86-000001", False)
        assert got == 200 and "Idempotent-Replayed" not in resp.headers
        got, _, resp = await set_available("till-86-000002", True)
        assert got == 200 and resp.headers.get("Idempotent-Replayed") == "true"
        assert edge.sql("SELECT count(*) FROM audit_log") == [(2 + 1,)]

    run(body, tmp_path)


def run(fn: Any, tmp_path: Path) -> None:
    async def body() -> None:
        async with running_edge(tmp_path) as edge:
            await fn(edge)

    asyncio.run(body())


def test_answers_stored_before_the_rowid_layout_survive_the_upgrade(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 6 moves answers out of the WITHOUT ROWID table: a tablet retrying across
    the upgrade still gets its first answer, and a key still has at most one answer."""

    async def body() -> None:
        monkeypatch.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:5])
        async with edge_server(tmp_path) as (server, edge):
            till = await edge.pair("till")
            await edge.login(till, "sam")
            path, headers = await approved_void(edge, till, "till-void-000009")
            got, first, _ = await edge.call("POST", path, headers, json=WHY)
            assert got == 200, first
            assert edge.sql("SELECT max(version) FROM schema_migrations") == [(5,)]
            await server.stop()
            monkeypatch.undo()
            edge = await server.start()
            assert edge.sql("SELECT max(version) FROM schema_migrations") == [(6,)]
            got, again, resp = await edge.call("POST", path, headers, json=WHY)
            assert (got, again) == (200, first)
            assert resp.headers.get("Idempotent-Replayed") == "true"
            assert edge.sql("SELECT count(*) FROM audit_log WHERE action = 'void_line'") == [(1,)]
            layout = edge.sql("SELECT sql FROM sqlite_master WHERE name = 'idempotency'")[0][0]
            assert "WITHOUT ROWID" not in layout
            with pytest.raises(sqlite3.IntegrityError):
                edge.sql(
                    "INSERT INTO idempotency (device_id, key, fingerprint, status, body, at_ms)"
                    " SELECT device_id, key, 'x', 200, x'7b7d', 0 FROM idempotency LIMIT 1"
                )

    asyncio.run(body())
