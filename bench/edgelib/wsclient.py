"""A minimal WebSocket client for measuring delivery: it stamps each message as its bytes arrive.

With 2,000 sockets in one process, a full client (aiohttp's: a task per socket, a reader, a
JSON parse per message) spends tens of microseconds per message before the next socket is
even looked at, so the last of 2,000 copies of one message is stamped 50-100 ms late by the
client's own work, not the server's. Here each socket is an ``asyncio.Protocol``: bytes are
split into frames in ``data_received``, text messages are kept with the time they arrived,
and parsing waits until the run is over. Pings are answered (the edge closes a peer that does
not answer). RFC 6455, client side: frames we send are masked; frames from a server are not.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
import time
from collections.abc import Mapping
from typing import Any

_TEXT, _CLOSE, _PING, _PONG = 0x1, 0x8, 0x9, 0xA


def now_ms() -> float:
    """The wall clock in ms (the edge stamps ``fired_at_ms`` with it)."""
    return time.time() * 1000


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked, final frame of ``opcode`` carrying ``payload``."""
    size = len(payload)
    if size < 126:
        header = struct.pack("!BB", 0x80 | opcode, 0x80 | size)
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, size)
    else:
        header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, size)
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


class Tally:
    """Events received across all sockets, and an event set once ``target`` is reached."""

    def __init__(self) -> None:
        self.count = 0
        self.target: int | None = None
        self.reached = asyncio.Event()

    def expect(self, target: int) -> None:
        """Set ``reached`` once ``target`` events (counted from now) have arrived."""
        self.count, self.target = 0, target
        self.reached.clear()
        if target <= 0:
            self.reached.set()


#: how an event message starts (compact JSON, as the edge and the baseline send it)
EVENT_PREFIX = b'{"type":"event"'


class StampingSocket(asyncio.Protocol):
    """One client connection: the upgrade, then text messages kept with their arrival time."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.transport: Any = None
        self.upgraded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.messages: list[tuple[float, bytes]] = []  # (arrival ms, payload)
        self.arrived = asyncio.Event()  # set whenever a text message arrives
        self.closed = False
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # uvloop's transports are not asyncio.Transport subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.upgraded.done():
            self.upgraded.set_exception(ConnectionError(f"closed before the upgrade: {exc}"))
        self.arrived.set()

    def data_received(self, data: bytes) -> None:
        at = now_ms()
        self._buffer += data
        if not self.upgraded.done():
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            status = bytes(self._buffer[: self._buffer.find(b"\r\n")])
            del self._buffer[: end + 4]
            if b" 101 " not in status:
                self.upgraded.set_exception(ConnectionError(f"upgrade refused: {status!r}"))
                return
            self.upgraded.set_result(None)
        self._frames(at)

    def _frames(self, at: float) -> None:
        buf = self._buffer
        while len(buf) >= 2:
            opcode, size, start = buf[0] & 0x0F, buf[1] & 0x7F, 2
            if size == 126:
                if len(buf) < 4:
                    return
                size, start = struct.unpack_from("!H", buf, 2)[0], 4
            elif size == 127:
                if len(buf) < 10:
                    return
                size, start = struct.unpack_from("!Q", buf, 2)[0], 10
            if len(buf) < start + size:
                return
            payload = bytes(buf[start : start + size])
            del buf[: start + size]
            if opcode == _TEXT:
                self.messages.append((at, payload))
                self.arrived.set()
                tally = self.tally
                if payload.startswith(EVENT_PREFIX) and tally.target is not None:
                    tally.count += 1
                    if tally.count >= tally.target:
                        tally.reached.set()
            elif opcode == _PING and self.transport is not None:
                self.transport.write(client_frame(_PONG, payload))
            elif opcode == _CLOSE and self.transport is not None:
                self.transport.close()

    def send_text(self, text: str) -> None:
        """Send one text message."""
        assert self.transport is not None
        self.transport.write(client_frame(_TEXT, text.encode()))

    async def next_message(self, timeout_s: float) -> bytes:
        """The oldest message not taken yet (for the handshake's replies), waiting if none."""
        async with asyncio.timeout(timeout_s):
            while not self.messages:
                if self.closed:
                    raise ConnectionError("the socket closed")
                self.arrived.clear()
                await self.arrived.wait()
        return self.messages.pop(0)[1]

    def close(self) -> None:
        """Close the connection (without the closing handshake: the run is over)."""
        if self.transport is not None:
            self.transport.close()


async def connect(
    tally: Tally,
    host: str,
    port: int,
    path: str,
    headers: Mapping[str, str],
    timeout_s: float = 30.0,
) -> StampingSocket:
    """Open a WebSocket to ``ws://host:port/path`` with ``headers``, counting into ``tally``."""
    loop = asyncio.get_running_loop()
    _, sock = await loop.create_connection(lambda: StampingSocket(tally), host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    assert sock.transport is not None
    sock.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    async with asyncio.timeout(timeout_s):
        await sock.upgraded
    return sock
