"""The services' event loop: uvloop on Linux, and the edge working on it end to end.

The edge and the cloud run on ``shared.eventloop`` (``python -m edge run``, ``python -m cloud
run``, the demo); the rest of the suite runs on asyncio's own loop. Here the parts that touch
the loop's machinery run on uvloop: the store's writer thread answering through
``call_soon_threadsafe``, HTTP, and the live WebSocket.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from shared import eventloop

from .api_harness import running_edge


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uvloop is a Linux dependency")
def test_the_services_run_on_uvloop_on_linux() -> None:
    loop = eventloop.new_event_loop()
    try:
        assert type(loop).__module__.startswith("uvloop"), type(loop)
    finally:
        loop.close()

    async def which() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert eventloop.run(which()).startswith("uvloop")


def test_an_order_is_taken_and_streamed_live_on_the_services_loop(tmp_path: Path) -> None:
    async def body() -> None:
        async with running_edge(tmp_path) as edge:
            tablet = await edge.pair("bar-tablet")
            await edge.login(tablet, "sam")
            headers = tablet.headers("sam")
            async with edge.http.ws_connect(edge.url + "/v1/live", headers=headers) as ws:
                await ws.send_json({"type": "subscribe", "topics": ["orders"]})
                ready = await ws.receive_json(timeout=5)
                assert ready["type"] == "ready", ready
                status, order, _ = await edge.call(
                    "POST", "/v1/orders", headers, json={"table_name": "T4", "covers": 2}
                )
                assert status == 201, order
                status, added, _ = await edge.call(
                    "POST", f"/v1/orders/{order['id']}/lines", headers, json={"item_id": "soup"}
                )
                assert status == 201, added
                seen: set[str] = set()
                while added["line_ids"][0] not in seen:
                    event = await ws.receive_json(timeout=5)
                    if event.get("type") == "event":
                        seen.add(event["data"]["id"])
            assert edge.sql("SELECT count(*) FROM order_lines")[0][0] == 1
            outbox = edge.sql("SELECT count(*) FROM outbox WHERE tbl = 'order_lines'")[0][0]
            assert outbox == 1  # written through the sync engine's store

    eventloop.run(body())


def test_the_environment_can_pick_asyncios_own_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FYNLO_EVENT_LOOP", "asyncio")
    loop = eventloop.new_event_loop()
    try:
        assert type(loop).__module__.startswith("asyncio"), type(loop)
    finally:
        loop.close()
