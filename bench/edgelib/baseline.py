"""The baselines the edge API is compared with, measured in the same run on the same machine.

``python bench/edgelib/baseline.py get --port P --db FILE``: a plain aiohttp app whose one
route, ``GET /item?id=N``, reads one row from a SQLite file (aiosqlite) and answers JSON.

``python bench/edgelib/baseline.py broadcast --port P``: a plain aiohttp WebSocket endpoint,
``/ws``, and ``POST /fire``, which sends one small JSON message (the send time inside) to
every connected socket, encoded once: the least a fan-out to N screens can cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path: the repo's root

from shared.eventloop import new_event_loop  # noqa: E402

T = TypeVar("T")


def make_db(path: Path, rows: int = 1000) -> None:
    """A table of ``rows`` menu-like rows."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price_pence INTEGER)")
    conn.executemany(
        "INSERT INTO items VALUES (?, ?, ?)", [(i, f"item {i}", 100 + i) for i in range(rows)]
    )
    conn.commit()
    conn.close()


async def serve_get(port: int, db: Path) -> None:
    """Serve ``GET /item`` until killed."""
    conn = await aiosqlite.connect(db)

    async def item(request: web.Request) -> web.Response:
        key = int(request.query.get("id", "0"))
        rows = list(await conn.execute_fetchall("SELECT * FROM items WHERE id = ?", (key,)))
        row = rows[0] if rows else (key, None, None)
        return web.json_response({"id": row[0], "name": row[1], "price_pence": row[2]})

    app = web.Application()
    app.router.add_get("/item", item)
    await _run(app, port)


async def serve_broadcast(port: int) -> None:
    """Serve ``/ws`` and ``POST /fire`` until killed."""
    sockets: set[web.WebSocketResponse] = set()

    async def ws(request: web.Request) -> web.WebSocketResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        sockets.add(sock)
        try:
            async for _ in sock:
                pass
        finally:
            sockets.discard(sock)
        return sock

    async def fire(request: web.Request) -> web.Response:
        text = json.dumps({"type": "event", "sent_ms": time.time() * 1000}, separators=(",", ":"))
        for sock in list(sockets):
            if not sock.closed:
                await sock.send_str(text)
        return web.json_response({"sent": len(sockets)})

    app = web.Application()
    app.router.add_get("/ws", ws)
    app.router.add_post("/fire", fire)
    await _run(app, port)


async def _run(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def _on_edge_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the loop the edge itself runs on (``shared.eventloop``)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("get", "broadcast"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", type=Path)
    ns = parser.parse_args()
    if ns.mode == "get":
        if ns.db is None:
            parser.error("get needs --db")
        _on_edge_loop(serve_get(ns.port, ns.db))
    else:
        _on_edge_loop(serve_broadcast(ns.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
