"""The cloud's HTTP contract (docs/sync-http.md) over a real server, client and Postgres."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import asyncpg
import msgpack
import pytest
from aiohttp import web

from cloud.app import create_app
from cloud.config import CloudConfig, PaymentSettings, SyncSettings, load
from shared.config import ConfigError, config_keys, load_config
from sync_protocol import wire
from sync_protocol.changes import Change, Op, Value

T = TypeVar("T")
OWNER = "owner-secret"
SYNC_TYPE = "application/x-fynlo-sync"
SMALL_FRAME = 64 * 1024
MAX_RECORDS = 500


@dataclass
class Device:
    """A registered edge node and its credential."""

    site: str
    node: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        """Its bearer header."""
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Cloud:
    """A running cloud and a client session pointed at it."""

    http: aiohttp.ClientSession

    async def owner(
        self, method: str, path: str, body: object = None, token: str = OWNER
    ) -> tuple[int, Any]:
        """Call an owner endpoint; returns (status, JSON body)."""
        headers = {"Authorization": f"Bearer {token}"}
        async with self.http.request(method, path, json=body, headers=headers) as resp:
            return resp.status, await resp.json()

    async def device(self, site: str, name: str = "edge") -> Device:
        """Register a device through the owner API."""
        status, body = await self.owner("POST", f"/v1/sites/{site}/devices", {"name": name})
        assert status == 200, body
        assert body["site_id"] == site and body["token"].startswith(body["node_id"] + ".")
        return Device(site, body["node_id"], body["token"])

    async def site_with_device(self, name: str = "The Anchor") -> Device:
        """Register a site and one device."""
        status, body = await self.owner("POST", "/v1/sites", {"name": name})
        assert status == 200, body
        return await self.device(body["site_id"])

    async def push_raw(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes, str]:
        """POST a body to the push endpoint; returns (status, body, content type)."""
        async with self.http.post("/v1/sync/push", data=body, headers=headers) as resp:
            return resp.status, await resp.read(), resp.content_type

    async def push(self, device: Device, changes: list[Change]) -> wire.PushAck:
        """Push changes as a device; the push must succeed."""
        frame = wire.encode_push(device.site, device.node, changes)
        status, body, content_type = await self.push_raw(frame, device.headers)
        assert status == 200, wire.decode_error(body)
        assert content_type == SYNC_TYPE
        return wire.decode_ack(body)

    async def pull(self, device: Device, cursor: int = 0, **params: object) -> wire.PullPage:
        """Pull a page as a device; the pull must succeed."""
        query = {"cursor": str(cursor), **{k: str(v) for k, v in params.items()}}
        async with self.http.get("/v1/sync/pull", params=query, headers=device.headers) as resp:
            body = await resp.read()
            assert resp.status == 200, wire.decode_error(body)
        return wire.decode_pull(body)

    async def head(self, site: str) -> int:
        """The site's feed head from the owner's status page."""
        status, body = await self.owner("GET", "/v1/status")
        assert status == 200
        [found] = [s for s in body["sites"] if s["site_id"] == site]
        return int(found["feed_head"])


def config_for(dsn: str, strategies: str = "") -> CloudConfig:
    """A test config: small frames so oversize is cheap to provoke."""
    return CloudConfig(
        port=0,
        dsn=dsn,
        admin_token=OWNER,
        strategies=strategies,
        pool_min=1,
        pool_max=4,
        payments=PaymentSettings(bank="off"),
        sync=SyncSettings(
            max_frame_bytes=SMALL_FRAME,
            max_records=MAX_RECORDS,
            pull_limit_default=100,
            pull_limit_max=MAX_RECORDS,
        ),
    )


@asynccontextmanager
async def serving(config: CloudConfig) -> AsyncIterator[Cloud]:
    """Run the app on a real socket and yield a client for it."""
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession(base_url=f"http://{host}:{port}") as http:
            yield Cloud(http)
    finally:
        await runner.cleanup()


def run(config: CloudConfig, body: Callable[[Cloud], Awaitable[T]]) -> T:
    """Serve ``config`` and run ``body`` against it."""

    async def main() -> T:
        async with serving(config) as cloud:
            return await body(cloud)

    return asyncio.run(main())


def line(node: str, seq: int, pk: str | None = None, **overrides: Value) -> Change:
    """An order-line insert from ``node``."""
    fields: dict[str, Value] = {"order_id": "o1", "name": "Fish", "unit_price_pence": 1250}
    fields.update(overrides)
    return Change(node, seq, "order_lines", pk or f"{node}-l{seq}", Op.INSERT, fields, 0, seq)


def frame_with(device: Device, **outer: object) -> bytes:
    """A valid push frame with some outer fields replaced."""
    frame = msgpack.unpackb(wire.encode_push(device.site, device.node, [line(device.node, 1)]))
    frame.update(outer)
    packed: bytes = msgpack.packb(frame, use_bin_type=True)
    return packed


# -- happy paths -----------------------------------------------------------------------------


def test_register_push_and_pull_round_trip(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        device = await cloud.site_with_device()
        ack = await cloud.push(device, [line(device.node, i) for i in (1, 2, 3)])
        assert (ack.acked_through, ack.head, ack.outcomes["applied"]) == (3, 3, 3)
        assert ack.segments == ((1, 3, 1),) and ack.hlc > 0 and ack.server_ms > 0
        # the writer holds the rows it created: its page skips them, not their revs
        own = await cloud.pull(device, 0, holds=3)
        assert own.entries == [] and own.segments == ((1, 3, 1),)
        assert (own.next, own.head, own.more, own.conflicts) == (3, 3, False, 0)
        # restored from a copy that holds only seq 1, it gets rows 2 and 3 back
        restored = await cloud.pull(device, 0, holds=1)
        assert [e.rev for e in restored.entries] == [2, 3]
        other = await cloud.device(device.site, "bar edge")
        page = await cloud.pull(other, 0)
        assert [e.state.pk for e in page.entries] == [f"{device.node}-l{i}" for i in (1, 2, 3)]
        assert (page.next, page.head, page.more, page.segments) == (3, 3, False, ())
        paged = await cloud.pull(other, 1, limit=1)
        assert [e.rev for e in paged.entries] == [2] and paged.more and paged.next == 2

        # a dashboard edit reaches the edge through the feed
        status, written = await cloud.owner(
            "POST",
            f"/v1/sites/{device.site}/changes",
            {
                "changes": [
                    {"table": "menu_items", "id": "m1", "op": "insert", "fields": {"name": "Pie"}}
                ]
            },
        )
        assert (status, written) == (200, {"rev": 4})
        [entry] = (await cloud.pull(device, 3)).entries
        assert entry.state.values["name"] == "Pie" and entry.state.version.origin == "cloud"
        status, rows = await cloud.owner("GET", f"/v1/sites/{device.site}/rows/menu_items")
        assert status == 200 and rows["rows"]["m1"]["name"] == "Pie"
        status, sums = await cloud.owner("GET", f"/v1/sites/{device.site}/checksums")
        assert status == 200 and sums["order_lines"]["count"] == 3

    run(config_for(pg_database), body)


def test_long_poll_answers_as_soon_as_another_client_pushes(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        writer = await cloud.site_with_device()
        reader = await cloud.device(writer.site, "kitchen edge")
        started = time.monotonic()
        empty = await cloud.pull(reader, 0, wait=0.2)  # nothing comes: answered empty
        assert empty.entries == [] and empty.next == 0
        assert time.monotonic() - started >= 0.2

        poll = asyncio.create_task(cloud.pull(reader, 0, wait=20))
        await cloud.push(writer, [line(writer.node, 1)])
        pushed = time.monotonic()
        page = await poll
        assert time.monotonic() - pushed < 1.0
        assert [e.state.pk for e in page.entries] == [f"{writer.node}-l1"]

    run(config_for(pg_database), body)


# -- refusals: each with its own status and code, nothing applied ----------------------------

Refusal = Callable[[Cloud, Device, Device], Awaitable[tuple[int, bytes, str]]]


async def _malformed(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    return await cloud.push_raw(b"\xc1 not msgpack", dev.headers)


async def _version(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    return await cloud.push_raw(frame_with(dev, v=99), dev.headers)


async def _hash(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    return await cloud.push_raw(frame_with(dev, sha256=hashlib.sha256(b"x").digest()), dev.headers)


async def _kind(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    return await cloud.push_raw(frame_with(dev, kind="pull"), dev.headers)


async def _unknown_table(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    bad = Change(dev.node, 2, "payroll", "p1", Op.INSERT, {"x": 1}, 0, 2)
    frame = wire.encode_push(dev.site, dev.node, [line(dev.node, 1), bad])
    return await cloud.push_raw(frame, dev.headers)


async def _oversized(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    changes = [line(dev.node, i, notes="x" * 400) for i in range(1, 301)]
    frame = wire.encode_push(dev.site, dev.node, changes, codec="none")
    assert len(frame) > SMALL_FRAME
    return await cloud.push_raw(frame, dev.headers)


async def _too_many(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    frame = wire.encode_push(dev.site, dev.node, [line(dev.node, i) for i in range(1, 502)])
    assert len(frame) < SMALL_FRAME
    return await cloud.push_raw(frame, dev.headers)


async def _no_credential(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    return await cloud.push_raw(frame_with(dev), {})


async def _unknown_credential(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    forged = {"Authorization": f"Bearer {dev.node}.not-the-secret"}
    return await cloud.push_raw(frame_with(dev), forged)


async def _owner_token(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    return await cloud.push_raw(frame_with(dev), {"Authorization": f"Bearer {OWNER}"})


async def _other_site(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    # site A's credential, a frame claiming site B (and B's node)
    frame = wire.encode_push(other.site, other.node, [line(other.node, 1)])
    return await cloud.push_raw(frame, dev.headers)


async def _other_node(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    frame = wire.encode_push(dev.site, "node_someone_else", [line("node_someone_else", 1)])
    return await cloud.push_raw(frame, dev.headers)


async def _gap(cloud: Cloud, dev: Device, other: Device) -> tuple[int, bytes, str]:
    frame = wire.encode_push(dev.site, dev.node, [line(dev.node, 5)])
    return await cloud.push_raw(frame, dev.headers)


REFUSALS: dict[str, tuple[Refusal, int, str]] = {
    "malformed msgpack": (_malformed, 400, "malformed_batch"),
    "wrong protocol version": (_version, 400, "unsupported_version"),
    "hash mismatch": (_hash, 400, "hash_mismatch"),
    "wrong frame kind": (_kind, 400, "wrong_frame_kind"),
    "unknown table": (_unknown_table, 422, "unknown_table"),
    "oversized frame": (_oversized, 413, "batch_too_large"),
    "too many changes": (_too_many, 413, "batch_too_large"),
    "no credential": (_no_credential, 401, "unauthorized"),
    "unknown credential": (_unknown_credential, 401, "unauthorized"),
    "owner token on a device endpoint": (_owner_token, 401, "unauthorized"),
    "frame claims another site": (_other_site, 403, "site_mismatch"),
    "frame claims another node": (_other_node, 403, "site_mismatch"),
    "sequence gap": (_gap, 409, "sequence_gap"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_every_refusal_has_its_code_and_applies_nothing(pg_database: str, case: str) -> None:
    refuse, want_status, want_code = REFUSALS[case]

    async def body(cloud: Cloud) -> None:
        dev = await cloud.site_with_device("A")
        other = await cloud.site_with_device("B")
        status, data, content_type = await refuse(cloud, dev, other)
        code, message, details = wire.decode_error(data)
        assert (status, code) == (want_status, want_code), message
        assert content_type == SYNC_TYPE and message
        if want_code == "sequence_gap":
            assert details["expected"] == 1
        assert await cloud.head(dev.site) == 0 and await cloud.head(other.site) == 0
        # the device is not stuck: a good batch still lands
        assert (await cloud.push(dev, [line(dev.node, 1)])).acked_through == 1

    run(config_for(pg_database), body)


def test_bad_pull_requests_are_refused(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        dev = await cloud.site_with_device()
        for params, status, code in (
            ({"cursor": "7"}, 400, "invalid_cursor"),
            ({"cursor": "seven"}, 400, "invalid_cursor"),
            ({"cursor": "0", "wait": "-1"}, 400, "bad_request"),
            ({"cursor": "0", "limit": "0"}, 400, "bad_request"),
            ({"cursor": "0", "limit": "many"}, 400, "bad_request"),
        ):
            async with cloud.http.get("/v1/sync/pull", params=params, headers=dev.headers) as r:
                assert (r.status, wire.decode_error(await r.read())[0]) == (status, code)
        async with cloud.http.get("/v1/sync/pull") as r:
            assert (r.status, wire.decode_error(await r.read())[0]) == (401, "unauthorized")

    run(config_for(pg_database), body)


# -- conflicts -------------------------------------------------------------------------------


async def parked_conflict(cloud: Cloud, dev: Device, pk: str) -> None:
    """Edge inserts an order, the dashboard renames its table, the edge (stale) renames it."""
    fields: dict[str, Value] = {"check_number": 1, "table_name": "T1"}
    ack = await cloud.push(dev, [Change(dev.node, 1, "orders", pk, Op.INSERT, fields, 0, 1)])
    base = ack.head
    status, _ = await cloud.owner(
        "POST",
        f"/v1/sites/{dev.site}/changes",
        {
            "changes": [
                {"table": "orders", "id": pk, "op": "update", "fields": {"table_name": "T5"}}
            ]
        },
    )
    assert status == 200
    edit = Change(dev.node, 2, "orders", pk, Op.UPDATE, {"table_name": "T9"}, base, 1 << 62)
    ack = await cloud.push(dev, [edit])
    assert ack.outcomes["parked"] == 1


def test_conflicts_are_listed_and_resolved_by_devices_and_owners(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        a = await cloud.site_with_device("A")
        b = await cloud.site_with_device("B")
        await parked_conflict(cloud, a, "o1")
        await parked_conflict(cloud, b, "o1")

        async with cloud.http.get("/v1/sync/conflicts", headers=a.headers) as resp:
            assert resp.status == 200 and resp.content_type == SYNC_TYPE
            [mine] = msgpack.unpackb(await resp.read())["conflicts"]
        assert (mine["table"], mine["pk"], mine["columns"]) == ("orders", "o1", ["table_name"])
        assert (mine["local"], mine["remote"]) == ({"table_name": "T9"}, {"table_name": "T5"})
        assert (await cloud.pull(a, 0)).conflicts == 1

        status, listed = await cloud.owner("GET", f"/v1/sites/{b.site}/conflicts")
        [theirs] = listed["conflicts"]
        assert status == 200 and theirs["id"] != mine["id"]

        # A's device cannot see or settle B's conflict
        resolve = f"/v1/sync/conflicts/{theirs['id']}/resolve"
        choice = msgpack.packb({"choose": "local"})
        async with cloud.http.post(resolve, data=choice, headers=a.headers) as resp:
            assert resp.status == 404
            assert wire.decode_error(await resp.read())[0] == "conflict_not_found"

        resolve = f"/v1/sync/conflicts/{mine['id']}/resolve"
        async with cloud.http.post(resolve, data=choice, headers=a.headers) as resp:
            assert resp.status == 200
            done = msgpack.unpackb(await resp.read())
        assert done["conflict"]["resolved_by"] == a.node and done["rev"] == 4
        [entry] = (await cloud.pull(a, 3)).entries
        assert entry.state.values["table_name"] == "T9"
        async with cloud.http.post(resolve, data=choice, headers=a.headers) as resp:
            assert resp.status == 409
            assert wire.decode_error(await resp.read())[0] == "conflict_already_resolved"

        path = f"/v1/sites/{b.site}/conflicts/{theirs['id']}/resolve"
        status, done = await cloud.owner("POST", path, {"choose": "values", "values": {"x": 1}})
        assert (status, done["error"]["code"]) == (422, "unknown_field")
        status, done = await cloud.owner(
            "POST", path, {"choose": "values", "values": {"table_name": "Bar"}, "by": "sam"}
        )
        assert status == 200 and done["conflict"]["resolved_by"] == "sam"
        status, rows = await cloud.owner("GET", f"/v1/sites/{b.site}/rows/orders")
        assert rows["rows"]["o1"]["table_name"] == "Bar"
        status, listed = await cloud.owner("GET", f"/v1/sites/{b.site}/conflicts?all=1")
        assert [c["resolution"]["choose"] for c in listed["conflicts"]] == ["values"]

    run(config_for(pg_database, strategies="orders=manual"), body)


# -- owner API -------------------------------------------------------------------------------


def test_status_shows_each_nodes_lag(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        writer = await cloud.site_with_device()
        reader = await cloud.device(writer.site, "bar edge")
        await cloud.push(writer, [line(writer.node, i) for i in range(1, 6)])
        await cloud.pull(reader, 0, limit=2)
        await cloud.pull(reader, 2, limit=2)
        status, body = await cloud.owner("GET", "/v1/status")
        assert status == 200
        [site] = body["sites"]
        nodes = {n["node_id"]: n for n in site["nodes"]}
        assert site["feed_head"] == 5 and site["open_conflicts"] == 0
        assert nodes[writer.node]["watermark"] == 5 and nodes[writer.node]["lag_revs"] == 5
        assert nodes[reader.node]["pull_cursor"] == 2 and nodes[reader.node]["lag_revs"] == 3
        assert nodes[reader.node]["last_pull_at_ms"] is not None
        assert body["clock"]["hlc"] > 0

        status, refused = await cloud.owner("GET", "/v1/status", token="wrong")
        assert (status, refused["error"]["code"]) == (401, "unauthorized")
        status, refused = await cloud.owner("GET", "/v1/status", token=writer.token)
        assert (status, refused["error"]["code"]) == (401, "unauthorized")

    run(config_for(pg_database), body)


def test_owners_read_a_table_a_page_at_a_time(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        dev = await cloud.site_with_device()
        ids = ["a", "b", "c", "d", "e"]
        changes = [
            {"table": "menu_items", "id": i, "op": "insert", "fields": {"name": i.upper()}}
            for i in [*ids, "gone"]
        ]
        await cloud.owner("POST", f"/v1/sites/{dev.site}/changes", {"changes": changes})
        gone = {"table": "menu_items", "id": "gone", "op": "delete", "fields": {}}
        await cloud.owner("POST", f"/v1/sites/{dev.site}/changes", {"changes": [gone]})
        url = f"/v1/sites/{dev.site}/rows/menu_items"
        pages, after = [], ""
        while after is not None:
            status, page = await cloud.owner("GET", f"{url}?after={after}&limit=2")
            assert status == 200 and page["table"] == "menu_items"
            pages.append(list(page["rows"]))
            after = page["next"]
        assert pages == [["a", "b"], ["c", "d"], ["e"]]  # in id order, the deleted row left out
        status, whole = await cloud.owner("GET", url)  # the default page holds all five
        assert status == 200 and list(whole["rows"]) == ids and whole["next"] is None
        assert whole["rows"]["c"]["name"] == "C"
        status, tail = await cloud.owner("GET", f"{url}?after=d")
        assert list(tail["rows"]) == ["e"] and tail["next"] is None
        for bad in ("0", "10001", "x", "-1"):
            status, refused = await cloud.owner("GET", f"{url}?limit={bad}")
            assert (status, refused["error"]["code"]) == (400, "bad_request"), bad

    run(config_for(pg_database), body)


def test_owner_api_refusals(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        dev = await cloud.site_with_device()
        cases: list[tuple[str, str, object, int, str]] = [
            ("POST", "/v1/sites/nowhere/devices", {"name": "x"}, 404, "site_not_found"),
            ("GET", "/v1/sites/nowhere/checksums", None, 404, "site_not_found"),
            ("GET", f"/v1/sites/{dev.site}/rows/payroll", None, 422, "unknown_table"),
            ("POST", "/v1/sites", {"nom": "x"}, 400, "bad_request"),
            ("POST", "/v1/sites", {"name": "x", "site_id": dev.site}, 409, "site_exists"),
            ("GET", "/v1/nothing-here", None, 404, "not_found"),
            ("DELETE", "/v1/status", None, 405, "method_not_allowed"),
            (
                "POST",
                f"/v1/sites/{dev.site}/changes",
                {
                    "changes": [
                        {
                            "table": "order_lines",
                            "id": "l1",
                            "op": "insert",
                            "fields": {"name": "x"},
                        }
                    ]
                },
                403,
                "table_not_authored_here",
            ),
            (
                "POST",
                f"/v1/sites/{dev.site}/changes",
                {"changes": [{"table": "menu_items", "id": "m", "op": "upsert"}]},
                400,
                "bad_request",
            ),
        ]
        for method, path, payload, want_status, want_code in cases:
            status, answer = await cloud.owner(method, path, payload)
            assert (status, answer["error"]["code"]) == (want_status, want_code), path
        async with cloud.http.post(
            "/v1/sites", data=b"{not json", headers={"Authorization": f"Bearer {OWNER}"}
        ) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_request"
        async with cloud.http.get("/healthz") as resp:
            assert resp.status == 200 and await resp.json() == {"ok": True}

    run(config_for(pg_database), body)


# -- config ----------------------------------------------------------------------------------


def test_every_config_key_is_documented_and_set_in_cloud_toml() -> None:
    text = (Path(__file__).parent.parent / "cloud.toml").read_text(encoding="utf-8")
    for key in config_keys(CloudConfig):
        assert key.doc, f"{key.key} has no doc"
        section, _, name = key.key.rpartition(".")
        assert f"\n{name} = " in text, f"{key.key} is not in cloud.toml"
        if section:
            assert f"[{section}]" in text
    assert load(Path(__file__).parent.parent / "cloud.toml") == CloudConfig(dsn="", admin_token="")


def test_strategy_overrides_are_checked_at_start_up() -> None:
    config = load_config(
        CloudConfig, None, "FYNLO_CLOUD", environ={"FYNLO_CLOUD_STRATEGIES": "orders=manual"}
    )
    assert config.registry().get("orders").strategy == "manual"
    assert config.registry().get("menu_items").strategy == "smart_merge"
    for bad in ("orders", "payroll=manual", "orders=coin_toss"):
        with pytest.raises(ConfigError, match="strategies"):
            load_config(CloudConfig, None, "FYNLO_CLOUD", environ={"FYNLO_CLOUD_STRATEGIES": bad})


def test_a_pipelined_push_waits_its_turn_instead_of_being_refused(pg_database: str) -> None:
    async def body(cloud: Cloud) -> None:
        device = await cloud.site_with_device()
        await cloud.push(device, [line(device.node, 1)])  # the worker knows the watermark
        # The second batch reaches the cloud first; it waits for the first, then lands.
        second = asyncio.create_task(cloud.push(device, [line(device.node, i) for i in (4, 5)]))
        await asyncio.sleep(0)  # let it go out first
        first = await cloud.push(device, [line(device.node, i) for i in (2, 3)])
        ack = await second
        assert (first.acked_through, ack.acked_through) == (3, 5)
        assert ack.segments == ((4, 5, 4),) and ack.outcomes["duplicate"] == 0

    run(config_for(pg_database), body)


def test_a_postgres_that_refuses_writes_answers_503_and_the_push_is_taken_later(
    pg_database: str,
) -> None:
    """Postgres turned read-only under the cloud (a failover to a standby, an operator): a
    push is answered 503 ``unavailable`` (retry later), applies nothing, and the same batch
    is taken once Postgres writes again."""

    async def set_read_only(on: bool) -> None:
        conn = await asyncpg.connect(pg_database)
        try:
            await conn.execute("SET default_transaction_read_only = off")  # this session only
            name = await conn.fetchval("SELECT current_database()")
            setting = "SET default_transaction_read_only = on" if on else "RESET ALL"
            await conn.execute(f'ALTER DATABASE "{name}" {setting}')
            await conn.execute(  # the pool's sessions reconnect and take the setting
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
        finally:
            await conn.close()

    async def body(cloud: Cloud) -> None:
        device = await cloud.site_with_device()
        await cloud.push(device, [line(device.node, 1)])
        await set_read_only(True)
        batch = wire.encode_push(device.site, device.node, [line(device.node, 2)])
        answers = []
        for _ in range(3):
            status, answer, _ = await cloud.push_raw(batch, device.headers)
            answers.append((status, wire.decode_error(answer)[0]))
        # Pooled sessions the server cut while idle fail too, and also as 503 (never 500).
        assert answers == [(503, "unavailable")] * 3, answers
        assert await cloud.head(device.site) == 1  # nothing of the batch was applied
        await set_read_only(False)
        for _ in range(5):  # the pool finds its cut sessions one by one
            status, answer, _ = await cloud.push_raw(batch, device.headers)
            if status == 200:
                break
            assert status == 503
        ack = wire.decode_ack(answer)
        assert (ack.acked_through, ack.head, ack.outcomes.get("applied")) == (2, 2, 1)

    run(config_for(pg_database), body)


def test_a_device_that_hangs_up_mid_push_is_not_taken_for_a_store_failure(
    pg_database: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A tablet's Wi-Fi dropping mid-upload cuts the body short: nothing is applied, the
    cloud logs no store failure and answers the next push as usual."""

    async def body(cloud: Cloud) -> None:
        device = await cloud.site_with_device()
        frame = wire.encode_push(device.site, device.node, [line(device.node, 1)])
        url = cloud.http._base_url
        assert url is not None
        reader, writer = await asyncio.open_connection(url.host, url.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in device.headers.items())
        writer.write(
            f"POST /v1/sync/push HTTP/1.1\r\nHost: {url.host}\r\n{head}"
            f"Content-Length: {len(frame)}\r\n\r\n".encode()
            + frame[: len(frame) // 2]
        )
        await writer.drain()
        await asyncio.sleep(0.1)  # the handler is reading the body
        writer.transport.abort()  # the connection is reset, not closed cleanly
        await asyncio.sleep(0.2)
        assert await cloud.head(device.site) == 0
        ack = await cloud.push(device, [line(device.node, 1)])
        assert ack.acked_through == 1

    with caplog.at_level("DEBUG", logger="cloud"):
        run(config_for(pg_database), body)
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.text
