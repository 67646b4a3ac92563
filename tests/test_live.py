"""Live updates over a real WebSocket to a real edge (SQLite file, loopback), and kitchen tickets.

Many screens each get every event in order; a reconnect with ``since`` gets exactly what it
missed, from memory or from SQLite, even while writes race the replay; a ``since`` that is too
old is a reset; bad credentials are refused; a client that stops reading is dropped instead
of buffered; station filtering; the sync status topic; pruning; bump and recall.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import os
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import aiohttp
import jsonschema
import pytest

from edge.api import LIVE_TABLES
from edge.api.auth import ACCESS_TTL_MS
from edge.api.live import HUB
from edge.api.live_hub import Close, LiveSettings, payload_of, prune_events, text_frame
from edge.store import EdgeStore
from shared.registry import default_registry
from sync_protocol.changes import Op

from .api_harness import Edge, EdgeServer, edge_server, role_permissions, ticket

T = TypeVar("T")
Message = dict[str, Any]
DEADLINE_S = 20.0  # generous: two busy cores; every wait ends as soon as its condition holds
ORDER_TABLES = {"orders", "order_lines"}
MENU_TABLES = {"menu_categories", "menu_items", "modifier_groups", "modifiers"}


def run(fn: Callable[[EdgeServer, Edge], Coroutine[Any, Any, T]], tmp_path: Path) -> T:
    async def body() -> T:
        async with edge_server(tmp_path) as (server, edge):
            return await fn(server, edge)

    return asyncio.run(body())


def live_url(edge: Edge, device: str, session: str | None = None) -> str:
    query = {"device": device, **({"session": session} if session else {})}
    return f"{edge.url.replace('http', 'ws', 1)}/v1/live?{urlencode(query)}"


async def receive(ws: aiohttp.ClientWebSocketResponse, deadline: float) -> Message:
    """The next JSON message; fails on a close or at the deadline."""
    msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
    assert msg.type is aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
    message: Message = json.loads(msg.data)
    return message


async def connect(
    edge: Edge,
    device: str,
    topics: list[str],
    since: int | None = None,
    session: str | None = None,
) -> tuple[aiohttp.ClientWebSocketResponse, Message]:
    """A subscribed live connection and its ``ready`` message."""
    ws = await edge.http.ws_connect(live_url(edge, device, session))
    await ws.send_json({"type": "subscribe", "topics": topics, "since": since})
    ready = await receive(ws, time.monotonic() + DEADLINE_S)
    assert ready["type"] == "ready", ready
    return ws, ready


async def collect(ws: aiohttp.ClientWebSocketResponse, through: int) -> list[Message]:
    """Every non-heartbeat message until the client is known to have everything to ``through``."""
    deadline = time.monotonic() + DEADLINE_S
    out: list[Message] = []
    while True:
        message = await receive(ws, deadline)
        if message["type"] != "heartbeat":
            out.append(message)
        if message.get("seq", -1) >= through and message["type"] in ("event", "heartbeat"):
            return out


async def event_seqs(
    edge: Edge, after: int, tables: set[str], station: str | None = None
) -> list[int]:
    """The seqs of stored row events after ``after`` for rows of ``tables`` (at ``station``)."""
    out = []
    for event in await edge.store.events_after(after, 100_000):
        data = json.loads(event.data)
        if event.topic == "row" and data["table"] in tables:
            if station is None or (data["row"] or {}).get("station") == station:
                out.append(event.seq)
    return out


class Follower:
    """Reads a live connection in the background, so that it keeps up whatever the test does."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.messages: list[Message] = []
        self._news = asyncio.Condition()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            async with self._news:
                self.messages.append(json.loads(msg.data))
                self._news.notify_all()

    async def through(self, seq: int) -> list[Message]:
        """The non-heartbeat messages, once one with ``seq`` or later has come."""
        async with self._news:
            await asyncio.wait_for(
                self._news.wait_for(lambda: any(m.get("seq", -1) >= seq for m in self.messages)),
                DEADLINE_S,
            )
        return [m for m in self.messages if m["type"] != "heartbeat"]


async def next_event(ws: aiohttp.ClientWebSocketResponse) -> Message:
    """The next ``event`` message (heartbeats skipped)."""
    deadline = time.monotonic() + DEADLINE_S
    while (message := await receive(ws, deadline))["type"] == "heartbeat":
        pass
    assert message["type"] == "event", message
    return message


def seqs(messages: list[Message]) -> list[int]:
    assert all(m["type"] == "event" for m in messages), messages
    return [m["seq"] for m in messages]


# -- fan-out ----------------------------------------------------------------------------------


def test_two_hundred_screens_each_get_every_event_in_order(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        screen = await edge.pair("pass", "kds")
        clients = await asyncio.gather(
            *(connect(edge, screen.device_token, ["tickets", "menu"]) for _ in range(200))
        )
        start = min(ready["seq"] for _, ready in clients)

        async def writer(n: int) -> None:
            for i in range(10):
                station = "kitchen" if i % 2 else "bar"
                await edge.store.write_many([ticket(f"w{n}-{i}", station)])
                await edge.store.write("menu_items", "soup", Op.UPDATE, {"position": n * 10 + i})
                await edge.store.write("employees", "sam", Op.UPDATE, {"name": f"Sam {i}"})

        await asyncio.gather(*(writer(n) for n in range(5)))  # group commits, interleaved
        expected = await event_seqs(edge, start, {"tickets"} | MENU_TABLES)
        assert len(expected) == 100
        got = await asyncio.gather(*(collect(ws, expected[-1]) for ws, _ in clients))
        for messages in got:
            assert seqs(messages) == expected
        stored = {e.seq: json.loads(e.data) for e in await edge.store.events_after(start)}
        for message in got[0]:
            assert message["data"] == stored[message["seq"]]
            table = message["data"]["table"]
            station = message["data"]["row"].get("station")
            assert message["topic"] == (f"tickets:{station}" if table == "tickets" else "menu")
        await asyncio.gather(*(ws.close() for ws, _ in clients))

    run(body, tmp_path)


def test_each_station_gets_only_its_tickets(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        screen = await edge.pair("pass", "kds")
        kitchen, ready = await connect(edge, screen.device_token, ["tickets:kitchen"])
        bar, _ = await connect(edge, screen.device_token, ["tickets:bar"])
        every, _ = await connect(edge, screen.device_token, ["tickets", "tickets:bar"])
        await edge.store.write_many([ticket("k1"), ticket("b1", "bar")])
        await edge.store.write("menu_items", "soup", Op.UPDATE, {"available": False})
        await edge.store.write_many([ticket("k2")])
        await edge.store.write("tickets", "b1", Op.DELETE, {})  # its station is unknown then
        last = (await edge.store.event_bounds())[1]
        ids = {
            name: [(m["topic"], m["data"]["id"]) for m in await collect(ws, last)]
            for name, ws in (("kitchen", kitchen), ("bar", bar), ("every", every))
        }
        assert ids["kitchen"] == [
            ("tickets:kitchen", "k1"), ("tickets:kitchen", "k2"), ("tickets", "b1")
        ]  # fmt: skip
        assert ids["bar"] == [("tickets:bar", "b1"), ("tickets", "b1")]
        assert ids["every"] == [
            ("tickets:kitchen", "k1"), ("tickets:bar", "b1"), ("tickets:kitchen", "k2"),
            ("tickets", "b1"),
        ]  # fmt: skip
        assert ready["seq"] < last

    run(body, tmp_path)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frames_are_encoded_once_as_rfc_6455_text_frames(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    frame = text_frame(payload)
    assert frame[0] == 0x81 and not frame[1] & 0x80  # final text frame, unmasked (server)
    header = {True: 2, False: 4 if size < 65536 else 10}[size < 126]
    assert len(frame) == header + size and payload_of(frame) == payload


def test_a_ticket_larger_than_64_kib_arrives_whole(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        screen = await edge.pair("pass", "kds")
        ws, _ = await connect(edge, screen.device_token, ["tickets:kitchen"])
        lines = [{"name": "Tasting menu", "qty": 1, "note": "n" * 80_000}]
        await edge.store.write_many([ticket("huge", items=lines), ticket("next")])
        got = await collect(ws, (await edge.store.event_bounds())[1])
        assert [m["data"]["id"] for m in got] == ["huge", "next"]
        assert json.loads(got[0]["data"]["row"]["items"]) == lines

    run(body, tmp_path)


# -- reconnecting -----------------------------------------------------------------------------


def test_a_reconnect_with_since_gets_exactly_the_missed_events(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        screen = await edge.pair("pass", "kds")
        topics = ["tickets:kitchen"]
        ws, _ = await connect(edge, screen.device_token, topics)
        await edge.store.write_many([ticket("t1"), ticket("t2")])
        seen = seqs(await collect(ws, (await edge.store.event_bounds())[1]))
        await ws.close()
        missed = [ticket("t3"), ticket("x1", "bar"), ticket("t4")]
        for write in missed:
            await edge.store.write_many([write])
        # From the hub's memory: exactly t3 and t4, then live t5, no duplicates.
        ws, ready = await connect(edge, screen.device_token, topics, since=seen[-1])
        await edge.store.write_many([ticket("t5")])
        got = await collect(ws, (await edge.store.event_bounds())[1])
        assert [m["data"]["id"] for m in got] == ["t3", "t4", "t5"]
        assert seqs(got) == await event_seqs(edge, seen[-1], {"tickets"}, "kitchen")
        assert got[-1]["seq"] > ready["seq"] >= got[1]["seq"]
        await ws.close()
        last = got[-1]["seq"]
        # The edge restarts (its memory is gone) and t6 is fired while it is down: from SQLite.
        await server.stop()
        store = await EdgeStore.open(tmp_path / "edge.sqlite", default_registry(), "site-1",
                                     "edge-1", live_tables=LIVE_TABLES)  # fmt: skip
        await store.write_many([ticket("t6"), ticket("x2", "bar")])
        await store.close()
        edge = await server.start()
        ws, ready = await connect(edge, screen.device_token, topics, since=last)
        got = await collect(ws, ready["seq"])
        assert [m["data"]["id"] for m in got] == ["t6"] and got[0]["seq"] > last

    run(body, tmp_path)


@pytest.mark.parametrize("recent_events", [4096, 1], ids=["from-memory", "from-sqlite"])
def test_replays_racing_live_writes_have_no_gap_and_no_duplicate(
    tmp_path: Path, recent_events: int
) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        hub = edge.app[HUB]
        hub.settings = dataclasses.replace(hub.settings, recent_events=recent_events)
        screen = await edge.pair("pass", "kds")
        written: list[int] = [(await edge.store.event_bounds())[1]]
        progress = asyncio.Condition()

        async def writer(n: int) -> None:
            for i in range(40):
                await edge.store.write_many([ticket(f"r{n}-{i}", ("kitchen", "bar")[i % 2])])
                async with progress:
                    written.append((await edge.store.event_bounds())[1])
                    progress.notify_all()

        async def screen_joining(k: int) -> tuple[int | None, int, list[Message]]:
            async with progress:  # each joins at another point of the stream, writes racing on
                await progress.wait_for(lambda: len(written) >= 4 * k)
            since = None if k % 3 == 0 else written[len(written) // 2]
            ws, ready = await connect(edge, screen.device_token, ["tickets"], since=since)
            await done.wait()
            got = await collect(ws, final[0])
            await ws.close()
            return since, ready["seq"], got

        done = asyncio.Event()
        final = [0]
        joining = [asyncio.create_task(screen_joining(k)) for k in range(1, 25)]
        await asyncio.gather(*(writer(n) for n in range(3)))
        final[0] = (await edge.store.event_bounds())[1]
        done.set()
        for since, ready_seq, got in await asyncio.gather(*joining):
            start = ready_seq if since is None else since
            assert seqs(got) == await event_seqs(edge, start, {"tickets"}), (since, ready_seq)

    run(body, tmp_path)


def test_a_since_older_than_the_kept_events_is_a_reset(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        hub = edge.app[HUB]  # (with its usual memory, the hub would still replay them)
        hub.settings = dataclasses.replace(hub.settings, recent_events=1)
        screen = await edge.pair("pass", "kds")
        await edge.store.write_many([ticket(f"p{i}") for i in range(30)])
        _, newest = await edge.store.event_bounds()
        deleted = await prune_events(edge.store, keep_ms=3_600_000, keep_last=10, chunk=7)
        low, high = await edge.store.event_bounds()
        assert (low, high) == (newest - 9, newest) and deleted > 10
        ws, ready = await connect(edge, screen.device_token, ["tickets"], since=low - 2)
        assert await receive(ws, time.monotonic() + DEADLINE_S) == {"type": "reset", "seq": high}
        await edge.store.write_many([ticket("after")])  # live events follow the reset
        (event,) = await collect(ws, high + 1)
        assert event["data"]["id"] == "after"
        # The oldest kept one is still replayable, and a seq from another edge is a reset too.
        ws, _ = await connect(edge, screen.device_token, ["tickets"], since=low - 1)
        assert seqs(await collect(ws, high + 1)) == list(range(low, high + 2))
        ws, ready = await connect(edge, screen.device_token, ["tickets"], since=high + 50)
        assert (await receive(ws, time.monotonic() + DEADLINE_S))["type"] == "reset"

    run(body, tmp_path)


# -- who may connect ---------------------------------------------------------------------------


def test_bad_credentials_and_bad_subscriptions_are_refused(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        till = await edge.pair("till")
        other = await edge.pair("other")
        sam = await edge.login(till, "sam")
        kai = await edge.login(till, "kai")
        await edge.store.write_many([role_permissions("kitchen", ["kitchen.bump"])])
        refused = [
            ("", None, 401, "device_not_paired"),
            ("forged", None, 401, "device_not_paired"),
            (till.device_token, "forged", 401, "not_logged_in"),
            (other.device_token, sam, 403, "wrong_device"),
        ]
        for device, session, status, code in refused:
            url = live_url(edge, device, session).replace("ws", "http", 1)
            got, answer, _ = await edge.call("GET", url.removeprefix(edge.url))
            assert (got, answer["error"]["code"]) == (status, code)
            with pytest.raises(aiohttp.WSServerHandshakeError) as refusal:
                await edge.http.ws_connect(live_url(edge, device, session))
            assert refusal.value.status == status

        async def refusal_of(message: Any, session: str | None = None) -> tuple[Message, int]:
            ws = await edge.http.ws_connect(live_url(edge, till.device_token, session))
            await (ws.send_json(message) if not isinstance(message, str) else ws.send_str(message))
            error = await receive(ws, time.monotonic() + DEADLINE_S)
            closing = await ws.receive(timeout=DEADLINE_S)
            assert closing.type is aiohttp.WSMsgType.CLOSE
            return error, closing.data

        subscribe = {"type": "subscribe", "since": None}
        cases = [
            ({**subscribe, "topics": ["orders"]}, None, "permission_denied", Close.FORBIDDEN),
            ({**subscribe, "topics": ["orders"]}, kai, "permission_denied", Close.FORBIDDEN),
            ({**subscribe, "topics": ["kitchen"]}, None, "invalid_request", Close.BAD_SUBSCRIBE),
            ({**subscribe, "topics": []}, None, "invalid_request", Close.BAD_SUBSCRIBE),
            ({**subscribe, "topics": ["menu"], "since": -1}, None, "invalid_request",
             Close.BAD_SUBSCRIBE),
            ({**subscribe, "topics": ["menu"], "extra": 1}, None, "invalid_request",
             Close.BAD_SUBSCRIBE),
            ("{not json", None, "malformed_json", Close.BAD_SUBSCRIBE),
        ]  # fmt: skip
        for message, session, code, close in cases:
            error, close_code = await refusal_of(message, session)
            assert (error["type"], error["code"], close_code) == ("error", code, close), message
        # A server (order.view) may follow orders; a second subscribe is an error, not a close.
        ws, _ = await connect(edge, till.device_token, ["orders", "menu"], session=sam)
        await ws.send_json({**subscribe, "topics": ["menu"]})
        answer = await collect(ws, 0)
        assert answer[0]["type"] == "error" and not ws.closed

    run(body, tmp_path)


def test_a_client_that_stops_reading_is_dropped_not_buffered(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        hub = edge.app[HUB]
        hub.settings = dataclasses.replace(hub.settings, buffer_limit=16 * 1024)
        screen = await edge.pair("pass", "kds")
        ws, ready = await connect(edge, screen.device_token, ["tickets"])
        fast = Follower(ws)
        slow = await _stalled_client(server.port, screen.device_token, ["tickets"])
        assert hub.clients == 2
        big = [{"name": "x" * 200, "qty": i} for i in range(40)]  # ~9 KB a ticket
        deadline = time.monotonic() + DEADLINE_S
        written = 0
        while hub.dropped == 0:
            assert time.monotonic() < deadline, "the stalled client was never dropped"
            await edge.store.write_many([ticket(f"big{written}", items=big)])
            written += 1
        # Nothing waits for the stalled socket: the edge cut or closed it.
        loop = asyncio.get_running_loop()
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(slow, 65536), DEADLINE_S)
            except ConnectionResetError:
                break
            if not chunk:
                break
        slow.close()
        last = (await edge.store.event_bounds())[1]
        assert len(seqs(await fast.through(last))) == written  # the reading one kept up
        assert hub.clients == 1 and hub.dropped == 1
        # It comes back with since and catches up on everything it missed.
        again, _ = await connect(edge, screen.device_token, ["tickets"], since=ready["seq"])
        assert len(seqs(await collect(again, last))) == written

    run(body, tmp_path)


async def _stalled_client(port: int, device: str, topics: list[str]) -> socket.socket:
    """A WebSocket client with a tiny receive buffer that subscribes and then never reads."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /v1/live?device={device} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await loop.sock_sendall(sock, request.encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += await asyncio.wait_for(loop.sock_recv(sock, 1), DEADLINE_S)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    payload = json.dumps({"type": "subscribe", "topics": topics}).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    await loop.sock_sendall(sock, bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    answer = b""
    while b'"type":"ready"' not in answer:  # subscribed: from now on it reads nothing
        answer += await asyncio.wait_for(loop.sock_recv(sock, 1), DEADLINE_S)
    return sock


# -- the sync status topic and pruning --------------------------------------------------------


def test_the_sync_topic_sends_the_status_document_when_it_changes(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        till = await edge.pair("till")
        ws, _ = await connect(edge, till.device_token, ["sync"])
        first = await next_event(ws)
        assert first["topic"] == "sync"
        _, status, _ = await edge.call("GET", "/v1/sync/status")
        assert first["data"]["outbox_depth"] == status["outbox_depth"]
        assert set(first["data"]) == set(status)
        await edge.store.write("menu_items", "soup", Op.UPDATE, {"position": 9})
        message = await next_event(ws)
        assert message["topic"] == "sync"
        assert message["data"]["outbox_depth"] == status["outbox_depth"] + 1

    run(body, tmp_path)


def test_old_events_are_pruned_when_the_edge_starts(tmp_path: Path) -> None:
    async def prepare() -> None:
        a_day_ago = time.time_ns() // 1_000_000 - 25 * 3_600_000
        store = await EdgeStore.open(tmp_path / "edge.sqlite", default_registry(), "site-1",
                                     "edge-1", now_ms=lambda: a_day_ago)  # fmt: skip
        for i in range(5):
            await store.transaction(lambda tx, i=i: tx.emit("orders", {"old": i}))
        await store.close()

    asyncio.run(prepare())

    async def body(server: EdgeServer, edge: Edge) -> None:
        events = await edge.store.events_after(0)
        assert events and all("old" not in e.data for e in events)  # only the staff and menu
        assert events[0].seq == 6

    run(body, tmp_path)


# -- kitchen tickets over REST -----------------------------------------------------------------


def test_bump_and_recall_from_a_screen_or_by_kitchen_staff(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        screen = await edge.pair("pass", "kds")
        till = await edge.pair("till")
        for who in ("sam", "kai"):
            await edge.login(till, who)
        now = int(time.time() * 1000)
        await edge.store.write_many([ticket("t2", fired_at_ms=now - 1000), ticket("b1", "bar"),
                                     ticket("t1", fired_at_ms=now - 9000)])  # fmt: skip
        live, _ = await connect(edge, screen.device_token, ["tickets:kitchen"])
        _, doc, _ = await edge.call("GET", "/api/openapi.json")

        async def call(method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
            got, answer, _ = await edge.call(method, path, headers)
            template = path.split("?")[0]
            if template not in doc["paths"]:
                template = "/v1/kitchen/tickets/{ticket_id}/" + path.rsplit("/", 1)[1]
            response = doc["paths"][template][method.lower()]["responses"][str(got)]
            schema = response["content"]["application/json"]["schema"]
            jsonschema.validate(answer, {**schema, "components": doc["components"]})
            return got, answer

        got, page = await call("GET", "/v1/kitchen/tickets?station=kitchen", screen.headers())
        assert got == 200 and [t["id"] for t in page["tickets"]] == ["t1", "t2"]
        assert page["tickets"][0]["items"] == [{"name": "Steak", "qty": 1, "modifiers": ["rare"]}]
        bump = "/v1/kitchen/tickets/t1/bump"
        refusals = [
            ({"X-Fynlo-Device": "forged"}, 401, "device_not_paired"),
            (till.headers(), 401, "not_logged_in"),
            (till.headers("sam"), 403, "permission_denied"),
        ]
        for headers, status, code in refusals:
            got, answer = await call("POST", bump, headers)
            assert (got, answer["error"]["code"]) == (status, code)
        got, answer = await call("POST", bump, screen.headers())
        assert got == 200 and answer["bumped"] and answer["bumped_at_ms"] >= now
        got, again = await call("POST", bump, screen.headers())  # a double tap changes nothing
        assert (got, again) == (200, answer)
        got, page = await call("GET", "/v1/kitchen/tickets?station=kitchen&state=bumped",
                               screen.headers())  # fmt: skip
        assert [t["id"] for t in page["tickets"]] == ["t1"]
        got, answer = await call("POST", "/v1/kitchen/tickets/t1/recall", till.headers("kai"))
        assert got == 200 and not answer["bumped"] and answer["bumped_at_ms"] is None
        got, answer = await call("POST", "/v1/kitchen/tickets/nope/bump", screen.headers())
        assert (got, answer["error"]["code"]) == (404, "not_found")
        row = await edge.store.get("tickets", "t1") or {}
        assert (row["bumped"], row["bumped_at_ms"]) == (False, None)
        # Every screen saw the bump and the recall; the audit names who did each.
        events = await collect(live, (await edge.store.event_bounds())[1])
        assert [(m["data"]["id"], m["data"]["row"]["bumped"]) for m in events] == [
            ("t1", True), ("t1", False)
        ]  # fmt: skip
        audit = edge.sql("SELECT device_id, employee_id, action FROM audit_log ORDER BY position")
        assert audit == [(screen.device_id, None, "bump_ticket"),
                         (till.device_id, "kai", "recall_ticket")]  # fmt: skip

    run(body, tmp_path)


def test_the_kitchen_display_page_is_served_without_external_resources(tmp_path: Path) -> None:
    async def body(server: EdgeServer, edge: Edge) -> None:
        async with edge.http.get(edge.url + "/kds?station=bar") as resp:
            page = await resp.text()
            assert resp.status == 200 and resp.content_type == "text/html"
            assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
        for name, kind in (("app.js", "text/javascript"), ("kds.css", "text/css")):
            async with edge.http.get(f"{edge.url}/kds/{name}") as resp:
                text = await resp.text()
                assert (resp.status, resp.content_type) == (200, kind) and text
                assert "http://" not in text and "https://" not in text
            assert f"/kds/{name}" in page
        assert "http://" not in page and "https://" not in page
        for name in ("index.html", "..%2Fapi%2F__init__.py", "nope.js"):
            got, answer, _ = await edge.call("GET", f"/kds/{name}")
            assert (got, answer["error"]["code"]) == (404, "not_found")

    run(body, tmp_path)


def test_the_protocol_document_names_every_close_code_topic_and_setting() -> None:
    doc = (Path(__file__).parent.parent / "docs" / "live.md").read_text()
    for close in Close:
        assert f"| {int(close)} |" in doc, close
    for message in ("subscribe", "ready", "reset", "event", "heartbeat", "error"):
        assert f"| `{message}` |" in doc, message
    for topic in ("orders", "tickets", "tickets:<station>", "menu", "sync"):
        assert f"| `{topic}` |" in doc, topic
    for field in dataclasses.fields(LiveSettings):
        assert f"| `{field.name}` | `{field.default}` |" in doc, field.name


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> int | None:
    """The close code the edge sends next (heartbeats skipped), or None if it stays open."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        msg = await ws.receive(timeout=max(0.01, deadline - time.monotonic()))
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
            return ws.close_code
    return None


async def still_live(ws: aiohttp.ClientWebSocketResponse) -> bool:
    """Whether the connection still gets its heartbeat."""
    message = await receive(ws, time.monotonic() + DEADLINE_S)
    return message["type"] in ("heartbeat", "event")


def test_a_revoked_device_or_an_ended_session_loses_its_live_connections_at_once(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with edge_server(tmp_path) as (_, edge):
            screen, other_screen = await edge.pair("pass", "kds"), await edge.pair("grill", "kds")
            till, office = await edge.pair("till"), await edge.pair("office")
            sam = await edge.login(till, "sam")
            await edge.login(office, "mia")
            revoked, _ = await connect(edge, screen.device_token, ["tickets:kitchen"])
            kept, _ = await connect(edge, other_screen.device_token, ["tickets:kitchen"])
            as_sam, _ = await connect(edge, till.device_token, ["orders"], session=sam)
            device_only, _ = await connect(edge, till.device_token, ["menu"])

            got, _, _ = await edge.call(
                "POST", f"/v1/devices/{screen.device_id}/revoke", office.headers("mia")
            )
            assert got == 200
            assert await closed_with(revoked) == Close.REVOKED
            got, _, _ = await edge.call("POST", "/v1/sessions/logout", till.headers("sam"))
            assert got == 200
            assert await closed_with(as_sam) == Close.REVOKED
            # Only what was revoked: the other screen, and the till's own device connection.
            assert await still_live(kept) and await still_live(device_only)
            # The revoked screen cannot come back.
            with pytest.raises(aiohttp.WSServerHandshakeError):
                await edge.http.ws_connect(live_url(edge, screen.device_token))
            for ws in (kept, device_only):
                await ws.close()

    asyncio.run(body())


def test_a_connection_opened_with_an_access_token_closes_when_the_token_expires(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with edge_server(tmp_path) as (_, edge):
            till = await edge.pair("till")
            sam = await edge.login(till, "sam")
            as_sam, ready = await connect(edge, till.device_token, ["orders"], session=sam)
            device_only, _ = await connect(edge, till.device_token, ["menu"])
            assert await still_live(as_sam)  # a heartbeat: alive while the token is
            edge.set_wall_clock(edge.store.clock.now_ms() + ACCESS_TTL_MS + 1)
            assert await closed_with(as_sam) == Close.EXPIRED
            assert await still_live(device_only)
            # Nothing is lost: with a fresh token it resumes from where it was.
            fresh = await edge.login(till, "sam")
            got, order, _ = await edge.call(
                "POST", "/v1/orders", till.headers("sam"), json={"table_name": "T9", "covers": 2}
            )
            assert got == 201, order
            again, _ = await connect(
                edge, till.device_token, ["orders"], since=ready["seq"], session=fresh
            )
            deadline = time.monotonic() + DEADLINE_S
            while (message := await receive(again, deadline))["type"] != "event":
                pass
            assert message["data"]["row"]["table_name"] == "T9", message
            for ws in (again, device_only):
                await ws.close()

    asyncio.run(body())
