"""An in-process "cloud + N edges" fleet for end-to-end tests.

The cloud is the real aiohttp app (``cloud.app.create_app``) over a real Postgres database,
served on 127.0.0.1. Sites and devices are registered through the owner HTTP API. Each edge
is a real ``EdgeStore`` (a SQLite file) with a real ``Uplink`` whose URL points at the edge's
own ``Proxy``: a small TCP relay in front of the cloud that can go offline (stop listening:
a dead port), come back on the same port, or misbehave once for a chosen request (hold it,
cut it after N bytes, or swallow the cloud's answer). Edges can also be crashed (uplink
cancelled, store closed) and restarted from their file, and their wall clock can be skewed.

``Fleet.drain`` brings everything to rest: with the uplinks running it waits until every
edge's outbox is empty and its pull cursor equals the cloud's feed head; otherwise it runs
``sync_once`` rounds until that holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import msgpack
from aiohttp import web

from cloud.app import create_app as create_cloud_app
from cloud.auth import STORE
from cloud.config import CloudConfig
from cloud.config import PaymentSettings as CloudPaymentSettings
from cloud.config import SyncSettings as CloudSyncSettings
from cloud.payments import PaymentProviders
from cloud.store import CloudStore
from edge.app import status_body
from edge.config import SyncSettings
from edge.store import EdgeStore, wall_clock_ms
from edge.uplink import Uplink
from shared.registry import default_registry
from sync_protocol.changes import Change, Op, Value
from sync_protocol.schema import Registry

OWNER = "harness-owner-token"
SYNC_TYPE = "application/x-fynlo-sync"

Sums = dict[str, tuple[int, int]]  #: table -> (count, total)


async def wait_until(
    condition: Callable[[], Any], timeout_s: float = 20.0, what: str = "condition"
) -> None:
    """Wait until ``condition()`` (sync or async) is truthy, or fail after ``timeout_s``.

    The conditions live in SQLite files, Postgres and sockets that no single event covers,
    so they are re-checked every few milliseconds up to a deadline.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


def edge_settings(**overrides: Any) -> SyncSettings:
    """Uplink settings for tests: small batches and pages, quick retries."""
    values: dict[str, Any] = {
        "batch_max_changes": 500,
        "pull_limit": 500,
        "long_poll_s": 5.0,
        "backoff_base_s": 0.02,
        "backoff_cap_s": 0.2,
        "request_timeout_s": 15.0,
    }
    values.update(overrides)
    return SyncSettings(**values)


def registry_with(strategies: Mapping[str, str] | None = None) -> Registry:
    """The shared registry with per-table strategy overrides."""
    return default_registry().with_strategies(dict(strategies or {}))


# -- a misbehaving TCP relay -------------------------------------------------------------------


@dataclass
class Fault:
    """What a proxy does to the next ``times`` requests whose path starts with ``path``.

    ``action`` is one of

    * ``hold_request``: read the request and never forward it (the cloud sees nothing);
    * ``cut_request``: forward ``after_bytes`` bytes of it, then cut both connections;
    * ``hold_response``: forward the request, swallow the whole answer and keep the client
      waiting (the cloud has answered, so it has committed; the edge never hears);
    * ``drop_response``: like ``hold_response`` but cut the connection at the answer;
    * ``cut_response``: forward ``after_bytes`` bytes of the answer, then cut;
    * ``observe``: pass everything through, firing once the answer has been relayed.

    The first ``skip`` matching requests pass untouched (to hit one in the middle of a run).
    """

    path: str
    action: str
    after_bytes: int = 0
    times: int = 1
    skip: int = 0
    hits: int = 0
    skipped: int = 0
    fired: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        actions = {
            "hold_request",
            "cut_request",
            "hold_response",
            "drop_response",
            "cut_response",
            "observe",
        }
        if self.action not in actions:
            raise ValueError(f"unknown fault action {self.action!r}")


class Proxy:
    """A TCP relay from 127.0.0.1:<port> to the cloud that can fail on purpose."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.faults: list[Fault] = []
        self.requests: list[str] = []  #: "METHOD path" of every request seen
        self._server: asyncio.Server | None = None
        self._links: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        """The base URL an uplink should use."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def online(self) -> bool:
        """Whether the relay is listening."""
        return self._server is not None

    async def start(self) -> None:
        """Listen (on the same port as before, once one was chosen)."""
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every open connection: the port is dead until ``start``."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()
        for writer in list(self._writers):
            writer.transport.abort()
        links = list(self._links)
        if links:  # every relay ends at its cut connections; cancel only a straggler
            _, stragglers = await asyncio.wait(links, timeout=5)
            for task in stragglers:
                task.cancel()
            await asyncio.gather(*stragglers, return_exceptions=True)

    def arm(
        self, path: str, action: str, after_bytes: int = 0, times: int = 1, skip: int = 0
    ) -> Fault:
        """Misbehave for ``times`` requests to ``path`` after ``skip`` more; returns the fault."""
        fault = Fault(path, action, after_bytes, times, skip)
        self.faults.append(fault)
        return fault

    def disarm(self) -> None:
        """Forget every fault not yet used up."""
        self.faults.clear()

    def _match(self, head: bytes) -> Fault | None:
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        target = parts[1].decode("latin-1") if len(parts) >= 2 else ""
        self.requests.append(f"{parts[0].decode('latin-1')} {target}")
        for fault in self.faults:
            if fault.hits < fault.times and target.startswith(fault.path):
                if fault.skipped < fault.skip:
                    fault.skipped += 1
                    return None
                fault.hits += 1
                return fault
        return None

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        self._writers.add(client_w)
        cloud_w: asyncio.StreamWriter | None = None
        try:
            try:
                cloud_r, cloud_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            except OSError:
                return
            self._writers.add(cloud_w)
            await self._relay(client_r, client_w, cloud_r, cloud_w)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            for writer in (client_w, cloud_w):
                if writer is not None:
                    self._writers.discard(writer)
                    writer.transport.abort()
            self._links.discard(task)

    async def _relay(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        cloud_r: asyncio.StreamReader,
        cloud_w: asyncio.StreamWriter,
    ) -> None:
        # HTTP/1.1 without pipelining: a client sends a request only once the previous answer
        # has arrived, so the first bytes after an answer open a new request.
        current: Fault | None = None
        new_request = True
        sent = received = 0

        async def upward() -> None:
            nonlocal current, new_request, sent, received
            while data := await client_r.read(65536):
                if new_request:
                    new_request, sent, received = False, 0, 0
                    current = self._match(data)
                fault = current
                if fault is not None and fault.action == "hold_request":
                    fault.fired.set()
                    continue
                if fault is not None and fault.action == "cut_request":
                    room = fault.after_bytes - sent
                    if len(data) >= room:
                        cloud_w.write(data[:room])
                        await cloud_w.drain()
                        fault.fired.set()
                        return
                cloud_w.write(data)
                await cloud_w.drain()
                sent += len(data)

        async def downward() -> None:
            nonlocal new_request, received
            while data := await cloud_r.read(65536):
                new_request = True
                fault = current
                if fault is not None and fault.action == "hold_response":
                    fault.fired.set()
                    continue
                if fault is not None and fault.action == "drop_response":
                    fault.fired.set()
                    return
                if fault is not None and fault.action == "cut_response":
                    room = fault.after_bytes - received
                    if len(data) >= room:
                        client_w.write(data[:room])
                        await client_w.drain()
                        fault.fired.set()
                        return
                client_w.write(data)
                await client_w.drain()
                received += len(data)
                if fault is not None and fault.action == "observe":
                    fault.fired.set()

        tasks = [asyncio.create_task(upward()), asyncio.create_task(downward())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


# -- the cloud ---------------------------------------------------------------------------------


@dataclass
class Cloud:
    """The running cloud app and an owner client for it."""

    url: str
    port: int
    http: aiohttp.ClientSession
    app: web.Application

    @property
    def store(self) -> CloudStore:
        """The cloud's store (for reads that have no HTTP endpoint: the feed head)."""
        return self.app[STORE]

    async def owner(self, method: str, path: str, body: object = None) -> Any:
        """Call an owner endpoint; it must answer 200 with JSON."""
        async with self.http.request(method, self.url + path, json=body) as resp:
            answer = await resp.json()
            assert resp.status == 200, (resp.status, answer)
            return answer

    async def add_site(self, name: str, site_id: str | None = None) -> str:
        """Register a site; returns its id."""
        body: dict[str, Any] = {"name": name}
        if site_id is not None:
            body["site_id"] = site_id
        return str((await self.owner("POST", "/v1/sites", body))["site_id"])

    async def add_device(self, site: str, name: str) -> tuple[str, str]:
        """Register a node to a site; returns (node_id, token)."""
        answer = await self.owner("POST", f"/v1/sites/{site}/devices", {"name": name})
        return str(answer["node_id"]), str(answer["token"])

    async def write(self, site: str, *changes: tuple[str, str, str, Mapping[str, Any]]) -> int:
        """Dashboard edits ``(table, id, op, fields)`` in one transaction; returns the head."""
        body = {
            "changes": [
                {"table": t, "id": pk, "op": op, "fields": dict(fields)}
                for t, pk, op, fields in changes
            ]
        }
        return int((await self.owner("POST", f"/v1/sites/{site}/changes", body))["rev"])

    async def rows(self, site: str, table: str) -> dict[str, dict[str, Any]]:
        """A table's live rows at the cloud (every page)."""
        rows: dict[str, dict[str, Any]] = {}
        after: str | None = ""
        while after is not None:
            page = await self.owner(
                "GET", f"/v1/sites/{site}/rows/{table}?{urlencode({'after': after})}"
            )
            rows |= page["rows"]
            after = page["next"]
        return rows

    async def checksums(self, site: str) -> Sums:
        """Per-table (count, total) at the cloud."""
        sums = await self.owner("GET", f"/v1/sites/{site}/checksums")
        return {t: (int(s["count"]), int(s["total"])) for t, s in sums.items()}

    async def conflicts(self, site: str, include_resolved: bool = False) -> list[dict[str, Any]]:
        """The site's conflicts from the owner JSON endpoint."""
        query = "?all=1" if include_resolved else ""
        found: list[dict[str, Any]] = (
            await self.owner("GET", f"/v1/sites/{site}/conflicts{query}")
        )["conflicts"]
        return found

    async def device_conflicts(self, token: str) -> list[dict[str, Any]]:
        """The caller's site's open conflicts from the device msgpack endpoint."""
        async with self.http.get(
            self.url + "/v1/sync/conflicts", headers={"Authorization": f"Bearer {token}"}
        ) as resp:
            assert resp.status == 200 and resp.content_type == SYNC_TYPE
            found: list[dict[str, Any]] = msgpack.unpackb(await resp.read())["conflicts"]
            return found

    async def resolve(
        self, site: str, conflict_id: int, choose: str, values: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resolve a conflict through the owner JSON endpoint."""
        body: dict[str, Any] = {"choose": choose}
        if values is not None:
            body["values"] = dict(values)
        path = f"/v1/sites/{site}/conflicts/{conflict_id}/resolve"
        answer: dict[str, Any] = await self.owner("POST", path, body)
        return answer

    async def device_resolve(
        self, token: str, conflict_id: int, choose: str, values: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Resolve a conflict through the device msgpack endpoint."""
        body: dict[str, Any] = {"choose": choose}
        if values is not None:
            body["values"] = dict(values)
        async with self.http.post(
            f"{self.url}/v1/sync/conflicts/{conflict_id}/resolve",
            data=msgpack.packb(body),
            headers={"Authorization": f"Bearer {token}", "Content-Type": SYNC_TYPE},
        ) as resp:
            data = await resp.read()
            assert resp.status == 200, msgpack.unpackb(data)
            answer: dict[str, Any] = msgpack.unpackb(data)
            return answer

    async def head(self, site: str) -> int:
        """The site's feed head."""
        return await self.store.head(site)

    async def nodes(self, site: str) -> dict[str, dict[str, Any]]:
        """The owner status of each node of a site (watermark, pull cursor, lag)."""
        status = await self.owner("GET", "/v1/status")
        [found] = [s for s in status["sites"] if s["site_id"] == site]
        return {n["node_id"]: n for n in found["nodes"]}

    async def push_raw(self, token: str, body: bytes) -> tuple[int, bytes]:
        """POST raw bytes to the push endpoint as a device; returns (status, body)."""
        async with self.http.post(
            self.url + "/v1/sync/push",
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": SYNC_TYPE},
        ) as resp:
            return resp.status, await resp.read()


def cloud_config(dsn: str, strategies: Mapping[str, str] | None = None, **sync: Any) -> CloudConfig:
    """A cloud config for tests (owner token ``OWNER``, a small pool)."""
    text = ",".join(f"{t}={s}" for t, s in (strategies or {}).items())
    return CloudConfig(
        port=0,
        dsn=dsn,
        admin_token=OWNER,
        strategies=text,
        pool_min=1,
        pool_max=6,
        sync=CloudSyncSettings(**sync),
        payments=CloudPaymentSettings(bank="off"),  # a test names its providers
    )


@asynccontextmanager
async def running_cloud(
    config: CloudConfig, providers: PaymentProviders | None = None
) -> AsyncIterator[Cloud]:
    """Serve the real cloud app on 127.0.0.1 (any port), taking payments with ``providers``."""
    app = create_cloud_app(config, providers=providers)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = int(runner.addresses[0][1])
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {OWNER}"}) as http:
            yield Cloud(f"http://127.0.0.1:{port}", port, http, app)
    finally:
        await runner.cleanup()


# -- edges -------------------------------------------------------------------------------------


@dataclass
class WallClock:
    """An edge's wall clock: the machine's, shifted by ``offset_ms`` (for skew tests)."""

    offset_ms: int = 0

    def __call__(self) -> int:
        return wall_clock_ms() + self.offset_ms


@dataclass
class Edge:
    """One edge node: its SQLite file, its store and uplink, and its proxy to the cloud."""

    name: str
    site: str
    node: str
    token: str
    path: Path
    registry: Registry
    proxy: Proxy
    settings: SyncSettings
    clock: WallClock
    synchronous: str = "NORMAL"
    max_db_bytes: int | None = None
    _store: EdgeStore | None = None
    _uplink: Uplink | None = None

    @property
    def store(self) -> EdgeStore:
        """The open store (fails if the edge is down)."""
        assert self._store is not None, f"edge {self.name} is down"
        return self._store

    @property
    def uplink(self) -> Uplink:
        """The uplink (fails if the edge is down)."""
        assert self._uplink is not None, f"edge {self.name} is down"
        return self._uplink

    @property
    def up(self) -> bool:
        """Whether the store is open."""
        return self._store is not None

    @property
    def running(self) -> bool:
        """Whether the uplink tasks are running."""
        return self._uplink is not None and self._uplink.status().running

    async def open(self) -> None:
        """Open the store from its file and build a fresh uplink (not started)."""
        assert self._store is None
        self._store = await EdgeStore.open(
            self.path,
            self.registry,
            self.site,
            self.node,
            now_ms=self.clock,
            synchronous=self.synchronous,  # type: ignore[arg-type]
            max_db_bytes=self.max_db_bytes,
        )
        self._uplink = Uplink(
            self._store, self.proxy.url, self.token, self.settings, now_ms=self.clock
        )

    async def start(self) -> None:
        """Start the uplink's push and pull tasks."""
        await self.uplink.start()

    async def stop(self) -> None:
        """Cancel the uplink's tasks (the store stays open): the sync daemon is killed."""
        if self._uplink is not None:
            await self._uplink.stop()

    async def crash(self) -> None:
        """Kill the edge: cancel the uplink, close the store, forget every in-memory state."""
        await self.stop()
        if self._store is not None:
            await self._store.close()
        self._store = self._uplink = None

    async def restart(self, start: bool = True) -> None:
        """Crash (if up) and come back from the file, with a fresh store and uplink."""
        await self.crash()
        await self.open()
        if start:
            await self.start()

    async def offline(self) -> None:
        """Cut the edge off the internet (its proxy's port goes dead)."""
        await self.proxy.stop()

    async def online(self) -> None:
        """Reconnect the edge (its proxy listens again on the same port)."""
        await self.proxy.start()

    async def sync(self) -> None:
        """One ``sync_once``: push everything, pull until the feed has no more."""
        await self.uplink.sync_once()

    async def write(self, table: str, pk: str, op: Op | str, fields: Mapping[str, Any]) -> Change:
        """One local write (op may be "insert", "update" or "delete")."""
        return await self.store.write(table, pk, _op(op), fields)

    async def write_many(
        self, writes: Sequence[tuple[str, str, Op | str, Mapping[str, Any]]]
    ) -> list[Change]:
        """Several local writes in one transaction."""
        return await self.store.write_many([(t, pk, _op(op), f) for t, pk, op, f in writes])

    async def rows(self, table: str) -> dict[str, dict[str, Value]]:
        """A table's rows at the edge."""
        return await self.store.rows(table)

    async def checksums(self) -> Sums:
        """Per-table (count, total) at the edge."""
        out: Sums = {}
        for name in self.registry.names():
            c = await self.store.checksum(name)
            out[name] = (c.count, c.total)
        return out

    async def status(self) -> dict[str, Any]:
        """The edge's ``/v1/sync/status`` document (store and uplink status combined)."""
        store_status = await self.store.status()
        uplink = self._uplink.status() if self._uplink is not None else None
        return status_body(store_status, uplink)

    async def drained(self, head: int) -> bool:
        """Nothing left to push, the outbox pruned, and pulled up to ``head``."""
        c = self.store.cursors()
        if c.last_seq != c.acked_through or c.pull_cursor != head:
            return False
        return await self.store.outbox_after(0, 1) == []


def _op(op: Op | str) -> Op:
    return op if isinstance(op, Op) else Op[op.upper()]


class Fleet:
    """One cloud and the edges registered to it."""

    def __init__(self, cloud: Cloud, tmp: Path, strategies: Mapping[str, str]) -> None:
        self.cloud = cloud
        self.tmp = tmp
        self.strategies = dict(strategies)
        self.edges: list[Edge] = []
        self._names = itertools.count(1)

    async def add_edge(
        self,
        site: str,
        name: str | None = None,
        *,
        registry: Registry | None = None,
        settings: SyncSettings | None = None,
        clock_offset_ms: int = 0,
        start: bool = False,
        synchronous: str = "NORMAL",
        max_db_bytes: int | None = None,
    ) -> Edge:
        """Register a device to ``site`` and open an edge for it behind its own proxy."""
        name = name or f"edge{next(self._names)}"
        node, token = await self.cloud.add_device(site, name)
        proxy = Proxy(self.cloud.port)
        await proxy.start()
        edge = Edge(
            name,
            site,
            node,
            token,
            self.tmp / f"{name}-{node}.sqlite",
            registry or registry_with(self.strategies),
            proxy,
            settings or edge_settings(),
            WallClock(clock_offset_ms),
            synchronous,
            max_db_bytes,
        )
        self.edges.append(edge)
        await edge.open()
        if start:
            await edge.start()
        return edge

    async def retire(self, edge: Edge) -> None:
        """Crash an edge for good and close its proxy."""
        await edge.crash()
        await edge.proxy.stop()
        self.edges.remove(edge)

    async def drain(self, edges: Sequence[Edge] | None = None, timeout_s: float = 30.0) -> None:
        """Bring ``edges`` (default: all that are up) to rest with the cloud."""
        group = [e for e in (edges or self.edges) if e.up]
        if any(e.running for e in group):
            assert all(e.running for e in group), "drain either running edges or stopped ones"

            async def settled() -> bool:
                heads = {site: await self.cloud.head(site) for site in {e.site for e in group}}
                return all([await e.drained(heads[e.site]) for e in group])

            await wait_until(settled, timeout_s, "every edge to drain")
            return
        for _ in range(20):
            for edge in group:
                await edge.sync()
            heads = {site: await self.cloud.head(site) for site in {e.site for e in group}}
            if all([await e.drained(heads[e.site]) for e in group]):
                return
        raise AssertionError("edges did not drain in 20 sync rounds")

    async def assert_converged(self, edges: Sequence[Edge] | None = None) -> Sums:
        """Every edge's per-table checksums equal its site's at the cloud; returns them."""
        group = [e for e in (edges or self.edges) if e.up]
        by_site: dict[str, Sums] = {}
        for edge in group:
            if edge.site not in by_site:
                by_site[edge.site] = await self.cloud.checksums(edge.site)
            want = {
                t: by_site[edge.site][t] for t in edge.registry.names() if t in by_site[edge.site]
            }
            have = {t: s for t, s in (await edge.checksums()).items() if t in want}
            assert have == want, f"{edge.name} differs from the cloud: {have} != {want}"
        return by_site[group[0].site] if group else {}

    async def close(self) -> None:
        """Stop every edge and proxy."""
        for edge in self.edges:
            with contextlib.suppress(Exception):
                await edge.crash()
            await edge.proxy.stop()


@asynccontextmanager
async def fleet(
    dsn: str,
    tmp: Path,
    strategies: Mapping[str, str] | None = None,
    **cloud_sync: Any,
) -> AsyncIterator[Fleet]:
    """A running cloud over ``dsn`` (strategies applied on both sides) and no edges yet."""
    async with running_cloud(cloud_config(dsn, strategies, **cloud_sync)) as cloud:
        group = Fleet(cloud, tmp, strategies or {})
        try:
            yield group
        finally:
            await group.close()


def sqlite_exec(path: Path, *statements: str) -> None:
    """Run statements on an edge's SQLite file from outside (another connection)."""
    conn = sqlite3.connect(str(path), timeout=10, isolation_level=None)
    try:
        for statement in statements:
            conn.execute(statement)
    finally:
        conn.close()


def write_locked(path: Path) -> bool:
    """Whether some connection holds the SQLite file's write lock right now."""
    conn = sqlite3.connect(str(path), timeout=0, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return True
        raise
    else:
        conn.execute("ROLLBACK")
        return False
    finally:
        conn.close()


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` that fails with the first error after every awaitable finished."""
    results = await asyncio.gather(*aws, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results
