"""The uplink: its pure decisions, a real unreachable cloud, and one real round trip."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from edge.app import STORE_KEY, UPLINK_KEY
from edge.app import create_app as create_edge_app
from edge.config import (
    CloudSettings,
    EdgeConfig,
    MdnsSettings,
    SyncSettings,
    load_edge_config,
    parse_strategies,
)
from edge.errors import EdgeErrorCode
from edge.store import EdgeStore
from edge.uplink import GapAction, RateMeter, Uplink, UplinkError, decide_gap, is_transient
from shared.config import config_keys
from shared.registry import default_registry
from sync_protocol.changes import Op
from sync_protocol.schema import Strategy

# -- pure decisions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expected", "acked", "last", "oldest_kept", "action", "code"),
    [
        (11, 5, 20, 3, GapAction.ADVANCE, None),  # the cloud already holds 6..10
        (6, 5, 20, 3, GapAction.RETRY, None),
        (4, 5, 20, 3, GapAction.RESEND, None),  # the cloud lost 4 and 5; we still have them
        (3, 5, 20, 3, GapAction.RESEND, None),
        (2, 5, 20, 3, GapAction.STUCK, EdgeErrorCode.CHANGES_LOST),  # seq 2 was pruned
        (30, 5, 20, 3, GapAction.STUCK, EdgeErrorCode.CLOUD_AHEAD),  # we never wrote 21..29
        (21, 5, 20, 3, GapAction.ADVANCE, None),  # holds everything we wrote
    ],
)
def test_gap_decisions(
    expected: int,
    acked: int,
    last: int,
    oldest_kept: int,
    action: GapAction,
    code: EdgeErrorCode | None,
) -> None:
    decision = decide_gap(expected, acked, last, oldest_kept)
    assert decision.action is action
    assert decision.code is code
    assert bool(decision.message) is (action is GapAction.STUCK)


def test_transient_statuses_are_retried_and_refusals_are_not() -> None:
    assert [s for s in (400, 401, 403, 408, 409, 413, 422, 429, 500, 503) if is_transient(s)] == [
        408,
        429,
        500,
        503,
    ]


def test_rate_meter_counts_over_its_window() -> None:
    meter = RateMeter(window_ms=10_000)
    assert meter.rate(0) == 0.0
    meter.add(0, 500)
    meter.add(2_000, 1500)
    assert meter.rate(4_000) == 500.0  # 2000 changes over 4 s
    assert meter.rate(11_000) == 166.7  # the first burst left the window: 1500 over 9 s
    assert meter.rate(30_000) == 0.0
    assert meter.total == 2000


def test_strategies_setting_parses() -> None:
    assert parse_strategies(" orders=manual, menu_items = server_wins ,") == {
        "orders": Strategy.MANUAL,
        "menu_items": Strategy.SERVER_WINS,
    }
    for bad in ("orders", "orders=sometimes", "=manual"):
        with pytest.raises(ValueError):
            parse_strategies(bad)
    with pytest.raises(ValueError):
        EdgeConfig(site_id="s", strategies="orders=nope")


def test_every_edge_setting_is_documented_in_code_and_in_edge_toml() -> None:
    toml = (Path(__file__).parent.parent / "edge.toml").read_text(encoding="utf-8")
    for key in config_keys(EdgeConfig):
        assert key.doc, f"{key.key} has no doc"
        assert f"{key.key.rpartition('.')[2]} = " in toml, f"{key.key} missing from edge.toml"
    assert load_edge_config(Path(__file__).parent.parent / "edge.toml") == EdgeConfig()


def test_node_id_comes_from_the_token() -> None:
    config = EdgeConfig(site_id="s", cloud=CloudSettings(token="node-7.secret"))
    assert config.effective_node_id == "node-7" and config.uplink_enabled
    with pytest.raises(ValueError):
        EdgeConfig(site_id="s", node_id="node-8", cloud=CloudSettings(token="node-7.secret"))
    assert not EdgeConfig(site_id="s").uplink_enabled


# -- an unreachable cloud: real sockets, nothing listening --------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_unreachable_cloud_backs_off_with_jitter_and_keeps_the_outbox(tmp_path: Path) -> None:
    async def body() -> None:
        store = await EdgeStore.open(tmp_path / "e.sqlite", default_registry(), "s1", "n1")
        settings = SyncSettings(backoff_base_s=0.5, backoff_cap_s=4.0, request_timeout_s=2.0)
        uplink = Uplink(
            store, f"http://127.0.0.1:{_closed_port()}", "n1.secret", settings, rand=lambda: 0.5
        )
        try:
            await store.write("stock_levels", "s", Op.INSERT, {"on_hand": 1})
            delays = []
            for _ in range(5):
                with pytest.raises(UplinkError) as failed:
                    await uplink.sync_once()
                assert failed.value.error.code == "network"
                delays.append(failed.value.delay_s)
            # Full jitter: the draw (0.5) times base * 2**attempt, capped.
            assert delays == [0.25, 0.5, 1.0, 2.0, 2.0]
            status = uplink.status()
            assert not status.online and status.last_error is not None
            assert status.catchup.push_backlog == 1
            assert [c.seq for c in await store.outbox_after(0, 10)] == [1]
            # It was sent (it might have landed) though never acknowledged.
            assert store.cursors().sent_through == 1
        finally:
            await uplink.stop()
            await store.close()

    asyncio.run(body())


# -- one real round trip: the cloud app over a real Postgres ------------------------------

OWNER = "owner-token"


@asynccontextmanager
async def running_cloud(dsn: str, strategies: str = "") -> AsyncIterator[str]:
    """Serve the real cloud app on 127.0.0.1 (any port); yields its base URL."""
    from cloud.app import create_app as create_cloud_app
    from cloud.config import CloudConfig, PaymentSettings

    config = CloudConfig(
        port=0,
        dsn=dsn,
        admin_token=OWNER,
        strategies=strategies,
        payments=PaymentSettings(bank="off"),
    )
    app = create_cloud_app(config)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def _owner(http: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    async with http.request(
        method, url, headers={"Authorization": f"Bearer {OWNER}"}, **kw
    ) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _until(condition: Any, timeout_s: float = 10.0) -> None:
    """Wait until ``await condition()`` holds, or fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        # The condition lives in another process's database: re-checking it is the only way.
        while not await condition():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


@asynccontextmanager
async def running_edge(config: EdgeConfig) -> AsyncIterator[tuple[web.Application, str]]:
    """Serve the edge app on 127.0.0.1 (any port); yields the app and its base URL."""
    # Not announced by mDNS: these tests are about sync (tests/test_mdns.py covers that).
    app = create_edge_app(dataclasses.replace(config, mdns=MdnsSettings(enabled=False)))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield app, f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def _cloud_row(rows: Any, pk: str) -> dict[str, Any] | None:
    if isinstance(rows, dict):
        found = rows.get(pk)
    else:
        found = next((r for r in rows if r.get("id") == pk), None)
    return found if isinstance(found, dict) else None


def test_round_trip_through_the_real_cloud(tmp_path: Path, pg_database: str) -> None:
    async def body() -> None:
        async with running_cloud(pg_database) as url, aiohttp.ClientSession() as http:
            site = await _owner(http, "POST", f"{url}/v1/sites", json={"name": "Harbour"})
            site_url = f"{url}/v1/sites/{site['site_id']}"
            device = await _owner(http, "POST", f"{site_url}/devices", json={"name": "edge"})
            config = EdgeConfig(
                db_path=str(tmp_path / "edge.sqlite"),
                site_id=site["site_id"],
                cloud=CloudSettings(url=url, token=device["token"]),
                sync=SyncSettings(long_poll_s=5, backoff_base_s=0.05),
            )
            async with running_edge(config) as (app, edge_url):
                store = app[STORE_KEY]
                assert store.node_id == device["node_id"]  # taken from the token
                await store.write("stock_levels", "soup", Op.INSERT, {"on_hand": 10})
                await store.write("stock_levels", "soup", Op.UPDATE, {"on_hand": -3})

                async def in_cloud() -> bool:
                    rows = (await _owner(http, "GET", f"{site_url}/rows/stock_levels"))["rows"]
                    row = _cloud_row(rows, "soup")
                    return row is not None and row.get("on_hand") == 7

                await _until(in_cloud)
                # A dashboard edit comes back down through the long-poll.
                await _owner(
                    http,
                    "POST",
                    f"{site_url}/changes",
                    json={"changes": [{"table": "stock_levels", "id": "soup", "op": "update",
                                       "fields": {"on_hand": 5}}]},
                )  # fmt: skip

                async def on_edge() -> bool:
                    row = await store.get("stock_levels", "soup")
                    return row is not None and row["on_hand"] == 12

                await _until(on_edge)
                await _until(lambda: _drained(store))
                async with http.get(f"{edge_url}/v1/sync/status") as resp:
                    status = await resp.json()
                assert status["online"] and status["last_error"] is None
                assert status["outbox_depth"] == 0 and status["acked_through"] == 2
                assert status["catchup"]["pushed"] == 2
                assert status["clock_skew_ms"] is not None and status["last_success_at"]
                sums = await _owner(http, "GET", f"{site_url}/checksums")
                local = await store.checksum("stock_levels")
                assert sums["stock_levels"] == {"count": local.count, "total": local.total}

    asyncio.run(body())


def test_parked_conflict_is_mirrored_at_the_edge(tmp_path: Path, pg_database: str) -> None:
    async def body() -> None:
        async with (
            running_cloud(pg_database, "menu_items=manual") as url,
            aiohttp.ClientSession() as http,
        ):
            site = await _owner(http, "POST", f"{url}/v1/sites", json={"name": "Quay"})
            site_url = f"{url}/v1/sites/{site['site_id']}"
            device = await _owner(http, "POST", f"{site_url}/devices", json={"name": "edge"})
            config = EdgeConfig(
                db_path=str(tmp_path / "edge.sqlite"),
                site_id=site["site_id"],
                strategies="menu_items=manual",
                cloud=CloudSettings(url=url, token=device["token"]),
            )
            async with running_edge(config) as (app, edge_url):
                store, uplink = app[STORE_KEY], app[UPLINK_KEY]
                await uplink.stop()  # drive the link by hand from here
                await store.write(
                    "menu_items", "i1", Op.INSERT, {"name": "Soup", "price_pence": 450}
                )
                await uplink.sync_once()
                # The dashboard renames it while the edge, not yet knowing, renames it too.
                await _owner(
                    http,
                    "POST",
                    f"{site_url}/changes",
                    json={"changes": [{"table": "menu_items", "id": "i1", "op": "update",
                                       "fields": {"name": "Chef's soup"}}]},
                )  # fmt: skip
                await store.write("menu_items", "i1", Op.UPDATE, {"name": "Soup of the day"})
                await uplink.sync_once()
                # The cloud parks the rename; the edge shows the cloud's row and the conflict.
                assert (await store.get("menu_items", "i1") or {})["name"] == "Chef's soup"
                async with http.get(f"{edge_url}/v1/sync/conflicts") as resp:
                    mirrored = (await resp.json())["conflicts"]
                assert len(mirrored) == 1
                assert mirrored[0]["local"] == {"name": "Soup of the day"}
                async with http.get(f"{edge_url}/v1/sync/status") as resp:
                    assert (await resp.json())["open_conflicts"] == 1
                assert (await store.status()).outbox_depth == 0

    asyncio.run(body())


async def _drained(store: EdgeStore) -> bool:
    return await store.outbox_after(0, 1) == []
