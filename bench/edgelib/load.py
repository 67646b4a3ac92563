"""The load generator of the edge API benchmark, run as its own process.

``http``: ``--conns`` workers, each on its own keep-alive connection, send requests back to
back for ``--seconds``: against the edge (``--target edge``) each worker opens an order and
adds lines to it (a new order every ``LINES_PER_ORDER`` lines); against the baseline
(``--target baseline``) each sends ``GET /item``. Prints JSON: request count, seconds,
latencies (ms) of the measured requests (line adds, or the GETs).
With ``--rate`` the load is open-loop instead: the workers share a schedule of ``--rate``
requests per second (each worker every ``conns / rate`` s, staggered), an order's opening
taking one slot, and each latency runs from the request's *scheduled* time to its answer, so
a server that falls behind is charged for the wait it causes (no coordinated omission).

``ws``: opens ``--clients`` WebSocket clients, subscribes each (the edge: to
``tickets:kitchen``), then ``--fires`` times, every ``--interval`` s, makes one ticket (the edge:
open an order, add a line, fire it; the baseline: ``POST /fire``) and records, for every
client, the time from the ticket's commit (its ``fired_at_ms``; the baseline: its send time)
to its bytes arriving at that client (``wsclient.StampingSocket``: stamped on arrival, parsed
after the run). Prints JSON: clients, delivered, missing, latencies (ms).

Both print one JSON object on stdout as their only output (or write it to ``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run by path: the repo's root

from bench.edgelib.wsclient import EVENT_PREFIX, StampingSocket, Tally, connect  # noqa: E402
from shared.eventloop import new_event_loop  # noqa: E402

T = TypeVar("T")

LINES_PER_ORDER = 25


def _ms() -> float:
    return time.time() * 1000


async def http_load(ns: argparse.Namespace) -> dict[str, Any]:
    """Requests on ``conns`` connections for ``seconds``: back to back, or at ``rate``."""
    headers = json.loads(ns.headers or "{}")
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    latencies: list[float] = []
    errors: dict[str, int] = {}
    async with aiohttp.ClientSession(connector=connector, headers=headers) as http:
        began = time.perf_counter()
        stop = began + ns.seconds

        keys, run = itertools.count(), f"bench-{secrets.token_hex(4)}"  # unique across runs

        async def timed(method: str, path: str, body: Any = None, since: float = 0.0) -> Any:
            """The answer and the ms from ``since`` (default: now) to it."""
            # A tablet sends every change with its own Idempotency-Key (a retry reuses it).
            key = {"Idempotency-Key": f"{run}-{next(keys):012d}"} if method == "POST" else None
            t0 = since or time.perf_counter()
            async with http.request(method, ns.url + path, json=body, headers=key) as resp:
                data = await resp.read()
                took = (time.perf_counter() - t0) * 1000
                if resp.status >= 300:
                    errors[str(resp.status)] = errors.get(str(resp.status), 0) + 1
                    return None, took
                return (json.loads(data) if data else None), took

        async def slots(k: int) -> AsyncIterator[float]:
            """Worker ``k``'s send times: 0.0 (now) back to back, or its schedule at a rate."""
            if not ns.rate:
                while time.perf_counter() < stop:
                    yield 0.0
                return
            every = ns.conns / ns.rate
            due = began + k * every / ns.conns
            while due < stop:
                wait = due - time.perf_counter()
                if wait > 0:
                    await asyncio.sleep(wait)
                yield due
                due += every

        async def edge_worker(k: int) -> None:
            order_id, lines = None, 0
            async for due in slots(k):
                if order_id is None or lines >= LINES_PER_ORDER:
                    opened, _ = await timed(
                        "POST", "/v1/orders", {"table_name": f"T{k}", "covers": 2}
                    )
                    order_id, lines = (opened or {}).get("id"), 0
                    continue
                _, took = await timed(
                    "POST",
                    f"/v1/orders/{order_id}/lines",
                    {"item_id": "soup", "quantity": 1},
                    due,
                )
                latencies.append(took)
                lines += 1

        async def baseline_worker(k: int) -> None:
            i = k
            async for due in slots(k):
                _, took = await timed("GET", f"/item?id={i % 1000}", None, due)
                latencies.append(took)
                i += ns.conns

        worker = edge_worker if ns.target == "edge" else baseline_worker
        await asyncio.gather(*(worker(k) for k in range(ns.conns)))
        elapsed = time.perf_counter() - began
    return {"requests": len(latencies), "seconds": elapsed, "latencies_ms": latencies,
            "errors": errors}  # fmt: skip


async def ws_load(ns: argparse.Namespace) -> dict[str, Any]:
    """``clients`` subscribers; ``fires`` tickets; per-client delivery latency."""
    headers = json.loads(ns.headers or "{}")
    target = urlsplit(ns.ws_url)
    host, port = target.hostname or "127.0.0.1", target.port or 80
    path = target.path + (f"?{target.query}" if target.query else "")
    ready = asyncio.Semaphore(200)  # handshakes in flight at once
    sockets: list[StampingSocket] = []
    tally = Tally()

    async def client() -> None:
        async with ready:
            sock = await connect(tally, host, port, path, {})
            sockets.append(sock)
            if ns.target == "edge":
                sock.send_text(json.dumps(
                    {"type": "subscribe", "topics": ["tickets:kitchen"], "since": None}
                ))  # fmt: skip
                while json.loads(await sock.next_message(30)).get("type") != "ready":
                    pass
            sock.messages.clear()  # from here on, every message is measured

    await asyncio.wait_for(asyncio.gather(*(client() for _ in range(ns.clients))), 120)
    fired = 0
    tally.expect(ns.fires * ns.clients)
    async with aiohttp.ClientSession() as http:
        for k in range(ns.fires):
            await asyncio.sleep(ns.interval)
            if ns.target == "edge":
                await _edge_ticket(http, ns.url, headers, k)
            else:
                async with http.post(ns.url + "/fire") as resp:
                    await resp.read()
            fired += 1
        try:  # every ticket to every client, or give up after 10 s (counted as missing)
            await asyncio.wait_for(tally.reached.wait(), 10)
        except TimeoutError:
            pass
    for sock in sockets:
        sock.close()
    latencies = [lat for sock in sockets for lat in _latencies(sock, ns.target == "edge")]
    return {"clients": ns.clients, "fired": fired, "delivered": len(latencies),
            "missing": fired * ns.clients - len(latencies), "latencies_ms": latencies}  # fmt: skip


def _latencies(sock: StampingSocket, edge: bool) -> list[float]:
    """Arrival minus commit (the edge's ``fired_at_ms``; the baseline's send time), per ticket."""
    out = []
    for arrived, payload in sock.messages:
        if not payload.startswith(EVENT_PREFIX):
            continue
        data = json.loads(payload)
        if edge:
            row = data["data"]["row"] or {}
            if row.get("bumped"):
                continue
            out.append(arrived - row["fired_at_ms"])
        else:
            out.append(arrived - data["sent_ms"])
    return out


async def _edge_ticket(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str], k: int
) -> None:
    async with http.post(url + "/v1/orders", json={"table_name": f"W{k}", "covers": 2},
                         headers=headers) as resp:  # fmt: skip
        order = await resp.json()
    path = f"/v1/orders/{order['id']}"
    async with http.post(url + path + "/lines", json={"item_id": "soup"}, headers=headers) as r:
        await r.read()
    async with http.post(url + path + "/fire", json={}, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"fire failed: {resp.status} {await resp.text()}")
        await resp.read()


def _on_edge_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the loop the edge itself runs on (``shared.eventloop``)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=("http", "ws"))
    parser.add_argument("--target", choices=("edge", "baseline"), required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--ws-url")
    parser.add_argument("--headers", help="JSON object of request headers")
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rate", type=float, help="http: requests/s, open-loop (default: closed)")
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--fires", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--out", type=Path, help="write the JSON result here (default: stdout)")
    ns = parser.parse_args()
    run = http_load if ns.mode == "http" else ws_load
    result = json.dumps(_on_edge_loop(run(ns)))
    if ns.out is not None:
        ns.out.write_text(result)
    else:
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
