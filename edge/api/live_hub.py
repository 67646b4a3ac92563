"""The fan-out behind ``/v1/live``: each committed event routed and framed once, for everyone.

How it works. One ``Hub`` per app subscribes to the store once. Each committed event is
routed once: its topic and subscription keys are worked out, and it is encoded once into a
complete WebSocket frame (header included). That same bytes object is written, synchronously,
into the send buffer of every live client that follows one of its keys (an index from key to
clients): no JSON, no framing and no task switch per client, so 2,000 screens cost 2,000
buffer writes. (aiohttp's own writer also writes whole frames synchronously, so frames never
interleave.) A client whose send buffer holds more than 64 KB is not reading: it is dropped
(close 4409) rather than buffered without bound, and comes back with ``since``. The hub keeps
the last few thousand routed events in memory, so a storm of reconnecting screens replays
without touching SQLite.

No gap and no duplicate between replay and live: attaching a client and reading the hub's
newest seq H happen in one step on the event loop (no ``await`` between), so every event after
H reaches the client, held in its queue (bounded) while the replay sends the events in
(since, H]; then the held frames go out and the client is live. Event seqs are contiguous
(AUTOINCREMENT, one writer; a rolled-back transaction takes its seqs back), so a replay whose
first event is not ``since + 1`` lost events to pruning, and is a reset.

A ticker sends the heartbeat (encoded once per tick) and, while anyone follows ``sync``, polls
the ``/v1/sync/status`` document and sends it when it changed. A pruner (at start-up, then
every minute) keeps the events table to the last day and the last 100,000 events (always a
prefix, so kept seqs stay contiguous).
"""

from __future__ import annotations

import asyncio
import json
import logging
import struct
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from ..store import EdgeStore, wall_clock_ms
from ..tx import Event
from .auth import Principal, Revoked

log = logging.getLogger(__name__)

#: the topic family of each live table's ``row`` events
TABLE_TOPICS = {
    "orders": "orders",
    "order_lines": "orders",
    "tickets": "tickets",
    "menu_categories": "menu",
    "menu_items": "menu",
    "modifier_groups": "menu",
    "modifiers": "menu",
    "payments": "payments",
    "refunds": "payments",
    "tills": "payments",
}
CLOSE_TIMEOUT_S = 1.0  # a close frame that cannot get out in this time: the link is cut


class Close(IntEnum):
    """Why the edge closed a live connection (WebSocket close codes)."""

    BAD_SUBSCRIBE = 4400
    REVOKED = 4401
    FORBIDDEN = 4403
    TOO_SLOW = 4409
    EXPIRED = 4440


@dataclass(frozen=True, slots=True)
class LiveSettings:
    """Timings and limits of the live endpoint."""

    heartbeat_s: float = 1.0  # a heartbeat (and a sync status poll) this often
    queue_limit: int = 1000  # frames held for one client during its replay, at most
    buffer_limit: int = 64 * 1024  # bytes waiting in one client's send buffer, at most
    recent_events: int = 4096  # routed events kept in memory for replays
    replay_page: int = 500  # events read from SQLite at a time for an older replay
    subscribe_timeout_s: float = 10.0  # a connection must subscribe within this time
    ping_s: float = 10.0  # protocol-level pings: a peer that does not answer is closed
    prune_every_s: float = 60.0
    keep_events_ms: int = 24 * 3_600_000
    keep_events: int = 100_000


async def close_socket(
    ws: web.WebSocketResponse, transport: asyncio.Transport | None, code: int, reason: str
) -> None:
    """Close a WebSocket, cutting the link when the close frame cannot get out in time."""
    try:
        await asyncio.wait_for(ws.close(code=code, message=reason.encode()), CLOSE_TIMEOUT_S)
    except TimeoutError:
        if transport is not None:
            transport.abort()


def text_frame(payload: bytes) -> bytes:
    """``payload`` as one final, unmasked WebSocket text frame, as a server sends it (RFC 6455)."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x81, size)
    elif size < 65536:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


def payload_of(frame: bytes) -> bytes:
    """The payload of a ``text_frame``."""
    size = frame[1] & 0x7F
    return frame[2 + {126: 2, 127: 8}.get(size, 0) :]


def message_frame(message: dict[str, Any]) -> bytes:
    """A JSON message as a WebSocket text frame."""
    return text_frame(json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode())


def event_frame(seq: int, topic: str, data: str) -> bytes:
    """An ``event`` message around ``data`` (already JSON text: not parsed again), framed."""
    return text_frame(
        b'{"type":"event","seq":%d,"topic":%b,"data":%b}'
        % (seq, json.dumps(topic).encode(), data.encode())
    )


@dataclass(frozen=True, slots=True)
class Routed:
    """An event ready to send: the subscription keys it matches and its WebSocket frame."""

    seq: int
    keys: tuple[str, ...]  # "tickets:*": every station (a deleted ticket's is unknown)
    frame: bytes


class _RowOf(msgspec.Struct):
    """What routing needs of a ``row`` event's row (other columns are skipped unread)."""

    station: Any = None


class _RowEvent(msgspec.Struct):
    """What routing needs of a ``row`` event: the table, and the row's station."""

    table: Any = None
    row: _RowOf | None = None


_row_event = msgspec.json.Decoder(_RowEvent)


def route(event: Event) -> Routed | None:
    """Where a store event goes, and its frame (None: no topic carries it)."""
    if event.topic != "row":
        if event.topic not in ("orders", "tickets", "menu", "payments"):
            return None
        return Routed(event.seq, (event.topic,), event_frame(event.seq, event.topic, event.data))
    try:
        data = _row_event.decode(event.data)
    except msgspec.ValidationError:  # not an object, or its row is not one: no table's topic
        return None
    family = TABLE_TOPICS.get(data.table) if isinstance(data.table, str) else None
    if family is None:
        return None
    keys: tuple[str, ...] = (family,)
    topic = family
    if family == "tickets":
        station = data.row.station if data.row is not None else None
        if isinstance(station, str) and station:
            topic = f"tickets:{station}"
            keys = ("tickets", topic)
        else:
            keys = ("tickets", "tickets:*")
    return Routed(event.seq, keys, event_frame(event.seq, topic, event.data))


class Client:
    """One subscribed connection: what it follows, and how its frames reach its socket.

    Until its replay is sent, new frames are held in a queue (at most ``limit``); then each
    frame is written straight into the connection's send buffer, the same bytes for every
    client. A client whose queue or buffer (``max_buffer`` bytes) is full is dropped.
    """

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        keys: frozenset[str],
        limits: tuple[int, int],  # (frames held during the replay, bytes buffered once live)
        on_drop: Callable[[], None],
        principal: Principal | None = None,
    ) -> None:
        self.ws = ws
        self.keys = keys
        self.principal = principal  #: who opened it (closed when that is revoked)
        self.limit, self.max_buffer = limits
        self.held: deque[bytes] | None = deque()  # None once live
        self.dropped = False  # closing: nothing more is sent
        self.owes_sync = "sync" in keys  # the first sync status is still to be sent
        self._on_drop = on_drop
        self._transport = transport
        self._closer: asyncio.Task[None] | None = None

    def matches(self, keys: Iterable[str]) -> bool:
        """Whether an event with these subscription keys is for this client."""
        for key in keys:
            if key in self.keys:
                return True
            if key.endswith(":*") and any(k.startswith(key[:-1]) for k in self.keys):
                return True
        return False

    def push(self, frame: bytes) -> None:
        """Send a WebSocket frame (hold it while the replay runs); drop a client that lags."""
        if self.dropped:
            return
        held = self.held
        if held is None:
            self._write(frame)
        elif len(held) < self.limit:
            held.append(frame)
        else:
            self._drop()

    def go_live(self) -> None:
        """The replay is sent: send the held frames, then every frame as it comes."""
        held, self.held = self.held, None
        for frame in held or ():
            self._write(frame)

    async def replay(self, frame: bytes) -> None:
        """Send one replayed frame, waiting while the socket is busy."""
        await self.ws.send_frame(payload_of(frame), WSMsgType.TEXT)

    def _write(self, frame: bytes) -> None:
        transport = self._transport
        if self.dropped or self.ws.closed or transport is None or transport.is_closing():
            return  # closing: the handler's read loop ends and detaches this client
        if transport.get_write_buffer_size() > self.max_buffer:
            self._drop()
            return
        transport.write(frame)  # whole frames only, as aiohttp's own writer does

    def _drop(self) -> None:
        self._on_drop()
        self.end(Close.TOO_SLOW, "too far behind: reconnect with since")

    def end(self, code: int, reason: str) -> None:
        """Stop sending now and close in the background."""
        self.dropped = True
        self.held = None
        if self._closer is None:
            self._closer = asyncio.ensure_future(self.close(code, reason))

    async def close(self, code: int, reason: str) -> None:
        """Stop sending and close (cutting the link if the close frame cannot get out)."""
        self.dropped = True
        self.held = None
        await close_socket(self.ws, self._transport, code, reason)


@dataclass(frozen=True, slots=True)
class Start:
    """Where a new subscription stands: the newest seq, and its replay."""

    head: int
    reset: bool
    frames: list[bytes] | None  # the replay from memory; None: read it from SQLite


class Hub:
    """Routes each committed event once and hands its frame to every client following it."""

    def __init__(
        self,
        store: EdgeStore,
        settings: LiveSettings,
        sync_status: Callable[[], Awaitable[dict[str, Any]]],
    ) -> None:
        self.store = store
        self.settings = settings
        self.last_seq = 0  # the newest event routed to clients
        self.dropped = 0  # clients dropped for falling behind
        self.closing = False
        self._sync_status = sync_status
        self._sync_text: str | None = None
        self._clients: set[Client] = set()
        self._index: dict[str, set[Client]] = {}
        self._recent: deque[Routed] = deque()
        self._recent_from: int | None = None  # every event from this seq on is in _recent
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def clients(self) -> int:
        """How many clients are connected."""
        return len(self._clients)

    async def start(self) -> None:
        """Prune old events, follow the store, start the heartbeat and the periodic pruner."""
        settings = self.settings
        await prune_events(self.store, settings.keep_events_ms, settings.keep_events)
        self._unsubscribe = self.store.subscribe(self._on_events)
        _, high = await self.store.event_bounds()
        self.last_seq = max(self.last_seq, high)
        self._tasks = [asyncio.create_task(self._tick()), asyncio.create_task(self._prune())]

    async def close_clients(self) -> None:
        """Close every connection (the edge is shutting down) and refuse new ones."""
        self.closing = True
        clients = list(self._clients)
        await asyncio.gather(
            *(c.close(WSCloseCode.GOING_AWAY, "the edge is shutting down") for c in clients)
        )

    async def stop(self) -> None:
        """Stop following the store; stop the heartbeat and the pruner."""
        if self._unsubscribe is not None:
            self._unsubscribe()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- fan-out ---------------------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        limit = self.settings.recent_events
        for event in events:
            if self._recent_from is None:
                self._recent_from = event.seq
            self.last_seq = max(self.last_seq, event.seq)
            routed = route(event)
            if routed is None:
                continue
            if len(self._recent) >= limit:
                self._recent_from = self._recent.popleft().seq + 1
            self._recent.append(routed)
            for client in self._targets(routed.keys):
                client.push(routed.frame)

    def _targets(self, keys: tuple[str, ...]) -> Iterable[Client]:
        groups: list[set[Client]] = []
        for key in keys:
            if key.endswith(":*"):
                groups += [s for k, s in self._index.items() if k.startswith(key[:-1])]
            elif key in self._index:
                groups.append(self._index[key])
        if len(groups) == 1:
            return groups[0]
        return set().union(*groups)

    def client(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        keys: frozenset[str],
        principal: Principal | None = None,
    ) -> Client:
        """A new client of ``principal`` following ``keys`` (not attached yet)."""
        limits = (self.settings.queue_limit, self.settings.buffer_limit)
        return Client(ws, transport, keys, limits, self._count_drop, principal)

    def revoke(self, revoked: Revoked) -> None:
        """Close at once every connection opened with a credential that is no longer valid."""
        for client in list(self._clients):
            if client.principal is not None and revoked.covers(client.principal):
                self.detach(client)
                client.end(Close.REVOKED, "the credential was revoked or the session ended")

    def expire(self, now_ms: int) -> None:
        """Close every connection whose access token has expired (checked each heartbeat):
        the session's permissions were granted for the token's life, not the socket's."""
        for client in list(self._clients):
            expires_ms = client.principal.expires_ms if client.principal else None
            if expires_ms is not None and expires_ms <= now_ms:
                self.detach(client)
                client.end(Close.EXPIRED, "the access token expired: refresh it, reconnect")

    def _count_drop(self) -> None:
        self.dropped += 1

    def attach(self, client: Client, since: int | None) -> Start:
        """Send ``client`` every event from now on; returns what it must replay first."""
        head = self.last_seq
        self._clients.add(client)
        for key in client.keys:
            self._index.setdefault(key, set()).add(client)
        if since is None or since == head:
            return Start(head, False, [])
        if since > head:  # a seq this edge never gave out (another database, another edge)
            return Start(head, True, None)
        if self._recent_from is not None and since + 1 >= self._recent_from:
            frames: list[bytes] = []
            for routed in reversed(self._recent):
                if routed.seq <= since:
                    break
                if client.matches(routed.keys):
                    frames.append(routed.frame)
            frames.reverse()
            return Start(head, False, frames)
        return Start(head, False, None)

    def detach(self, client: Client) -> None:
        """Stop sending to ``client``."""
        self._clients.discard(client)
        for key in client.keys:
            followers = self._index.get(key)
            if followers is not None:
                followers.discard(client)
                if not followers:
                    del self._index[key]

    async def replay(self, client: Client, since: int, head: int) -> bool:
        """Send the events in (since, head] from SQLite; False when some were pruned."""
        cursor = since
        while cursor < head and not client.dropped:
            page = await self.store.events_after(cursor, self.settings.replay_page)
            if cursor == since and (not page or page[0].seq != since + 1):
                return False
            if not page:
                break
            for event in page:
                if event.seq > head:
                    return True
                routed = route(event)
                if routed is not None and client.matches(routed.keys):
                    await client.replay(routed.frame)
                cursor = event.seq
        return True

    # -- heartbeat, sync status, pruning ---------------------------------------------------

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            frame = message_frame(
                {"type": "heartbeat", "seq": self.last_seq, "now_ms": wall_clock_ms()}
            )
            for client in self._clients:
                client.push(frame)
            self.expire(self.store.clock.now_ms())
            try:
                await self._push_sync()
            except Exception:  # the heartbeat must go on whatever the status poll does
                log.exception("live: the sync status poll failed")

    async def _push_sync(self) -> None:
        if "sync" not in self._index:
            self._sync_text = None
            return
        document = await self._sync_status()
        text = json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        changed, self._sync_text = text != self._sync_text, text
        frame = event_frame(self.last_seq, "sync", text)  # one frame for every follower
        for client in self._index.get("sync", ()):
            if changed or client.owes_sync:
                client.owes_sync = False
                client.push(frame)

    async def _prune(self) -> None:
        while True:
            settings = self.settings
            await asyncio.sleep(settings.prune_every_s)
            try:
                await prune_events(self.store, settings.keep_events_ms, settings.keep_events)
            except Exception:  # pruning is housekeeping: log it, try again next time
                log.exception("live: pruning the events table failed")


async def prune_events(store: EdgeStore, keep_ms: int, keep_last: int, chunk: int = 10_000) -> int:
    """Delete the events older than ``keep_ms`` or beyond the last ``keep_last``; returns how many.

    Always a prefix of the seqs (up to the first event young enough), in transactions of at
    most ``chunk`` rows so that writers never wait long.
    """
    newest = int((await store.query("SELECT max(seq) FROM events"))[0][0] or 0)
    young = await store.query(
        "SELECT seq FROM events WHERE at_ms >= ? ORDER BY seq LIMIT 1",
        (store.clock.now_ms() - keep_ms,),
    )
    through = max(int(young[0][0]) - 1 if young else newest, newest - keep_last)
    deleted = 0
    while True:
        count = await store.transaction(
            lambda tx: tx.execute(
                "DELETE FROM events WHERE seq IN"
                " (SELECT seq FROM events WHERE seq <= ? ORDER BY seq LIMIT ?)",
                (through, chunk),
            ),
            heavy=True,
        )
        deleted += count
        if count < chunk:
            return deleted
