"""The owner's check of a site's audit trail in the cloud, over real edges, HTTP and Postgres.

Edges write audited mutations (``edge.api.audit.record`` in the mutation's transaction, as
the tablet API does) and sync them; the cloud walks each node's hash chain from Postgres.
Tampering is done straight in Postgres, as someone with database access would.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cloud import audit as cloud_audit
from edge.api import audit
from edge.tx import Tx
from sync_protocol.changes import Op

from .harness import OWNER, Cloud, Edge, fleet


async def audited(edge: Edge, action: str, item: str, price: int) -> None:
    """One audited mutation on ``edge``: a menu item priced, and its audit entry."""

    def mutate(tx: Tx) -> None:
        op = Op.UPDATE if tx.get("menu_items", item) else Op.INSERT
        tx.write("menu_items", item, op, {"name": item.title(), "price_pence": price})
        audit.record(tx, action, None, None)

    await edge.store.transaction(mutate)


async def verify(cloud: Cloud, site: str) -> dict[str, Any]:
    """The owner's verdict on a site's audit trail (must answer 200)."""
    answer: dict[str, Any] = await cloud.owner("GET", f"/v1/sites/{site}/audit/verify")
    return answer


def by_node(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The verdicts of an answer, keyed by node id (without the id)."""
    return {n["node_id"]: {k: v for k, v in n.items() if k != "node_id"} for n in answer["nodes"]}


def intact(entries: int) -> dict[str, Any]:
    """The verdict on an intact chain of ``entries`` entries."""
    return {"ok": True, "entries": entries, "first_bad_position": None, "reason": None}


async def tamper(dsn: str, sql: str, *args: Any) -> None:
    """Change the cloud's Postgres behind the service's back; exactly one row must change."""
    conn = await asyncpg.connect(dsn)
    try:
        done = await conn.execute(sql, *args)
    finally:
        await conn.close()
    assert done.endswith(" 1"), done


def entry_id(edge: Edge, position: int) -> str:
    """The row id of an edge's audit entry."""
    return f"{edge.node}:{position:012d}"


async def two_edges_synced(f: Any) -> tuple[str, Edge, Edge, Edge]:
    """A site with two audited edges (4 and 3 entries) and another site's edge, all synced."""
    site = await f.cloud.add_site("Harbour")
    other_site = await f.cloud.add_site("Quay")
    till = await f.add_edge(site, "till")
    bar = await f.add_edge(site, "bar")
    quay = await f.add_edge(other_site, "quay")
    for price in (450, 500, 550, 600):
        await audited(till, "update_menu_item", "soup", price)
    for price in (300, 320, 340):
        await audited(bar, "update_menu_item", "ipa", price)
    await audited(quay, "update_menu_item", "chips", 250)
    await f.drain()
    return site, till, bar, quay


def test_an_intact_trail_verifies_per_node(tmp_path: Path, pg_database: str) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, till, bar, quay = await two_edges_synced(f)
            assert len(await f.cloud.rows(site, "audit_log")) == 7  # the trail did sync

            answer = await verify(f.cloud, site)
            assert answer["site_id"] == site and answer["ok"] is True
            assert by_node(answer) == {till.node: intact(4), bar.node: intact(3)}
            # the edge holds both chains after syncing; its own check of its chain agrees
            rows = await till.rows("audit_log")
            own = [rows[pk] for pk in sorted(rows) if pk.startswith(till.node + ":")]
            assert audit.verify(own) == audit.Verdict(True, 4)

            other = await verify(f.cloud, quay.site)
            assert by_node(other) == {quay.node: intact(1)}

    asyncio.run(body())


def test_a_changed_entry_is_named_by_its_position(tmp_path: Path, pg_database: str) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, till, bar, _ = await two_edges_synced(f)
            assert (await verify(f.cloud, site))["ok"] is True
            await tamper(
                pg_database,
                "UPDATE audit_log SET detail = $3 WHERE site_id = $1 AND id = $2",
                site,
                entry_id(till, 3),
                '{"changes":[]}',
            )
            answer = await verify(f.cloud, site)
            assert answer["ok"] is False
            assert by_node(answer) == {
                till.node: {
                    "ok": False,
                    "entries": 3,
                    "first_bad_position": 3,
                    "reason": "its content does not match its hash",
                },
                bar.node: intact(3),
            }

    asyncio.run(body())


@pytest.mark.parametrize(
    "removal",
    [
        "DELETE FROM audit_log WHERE site_id = $1 AND id = $2",
        "UPDATE audit_log SET _deleted = true WHERE site_id = $1 AND id = $2",
    ],
    ids=["deleted", "marked-deleted"],
)
def test_a_removed_entry_is_named_as_a_gap(
    tmp_path: Path, pg_database: str, removal: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cloud_audit, "FETCH_ROWS", 2)  # the walk spans several fetches

    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, till, bar, _ = await two_edges_synced(f)
            await tamper(pg_database, removal, site, entry_id(bar, 2))
            answer = await verify(f.cloud, site)
            assert answer["ok"] is False
            assert by_node(answer) == {
                till.node: intact(4),
                bar.node: {
                    "ok": False,
                    "entries": 2,
                    "first_bad_position": 2,
                    "reason": "entry 2 is missing or out of order",
                },
            }

    asyncio.run(body())


def test_a_site_without_a_trail_lists_its_nodes_as_empty(tmp_path: Path, pg_database: str) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site = await f.cloud.add_site("Harbour")
            node, _ = await f.cloud.add_device(site, "till")
            answer = await verify(f.cloud, site)
            assert answer == {
                "site_id": site,
                "ok": True,
                "nodes": [{"node_id": node, **intact(0)}],
            }

    asyncio.run(body())


def test_only_the_owner_may_verify_and_only_known_sites(tmp_path: Path, pg_database: str) -> None:
    async def body() -> None:
        async with fleet(pg_database, tmp_path) as f:
            site, till, _, quay = await two_edges_synced(f)
            path = f"{f.cloud.url}/v1/sites/{site}/audit/verify"
            refusals = {
                "another site's device": (quay.token, 401, "unauthorized"),
                "this site's device": (till.token, 401, "unauthorized"),
                "a wrong owner token": (OWNER + "x", 401, "unauthorized"),
            }
            for case, (token, status, code) in refusals.items():
                headers = {"Authorization": f"Bearer {token}"}
                async with f.cloud.http.get(path, headers=headers) as resp:
                    answer = await resp.json()
                    assert (resp.status, answer["error"]["code"]) == (status, code), case
            async with f.cloud.http.get(f"{f.cloud.url}/v1/sites/nowhere/audit/verify") as resp:
                answer = await resp.json()
                assert (resp.status, answer["error"]["code"]) == (404, "site_not_found")

    asyncio.run(body())
