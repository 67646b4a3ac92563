"""Property-based fuzz of the tablet API from its own OpenAPI document (schemathesis).

A real edge (real SQLite file, HTTP on loopback) runs in a background thread; schemathesis
generates requests for every documented JSON operation — valid and invalid bodies, query
strings and path values — sent as a logged-in manager on a paired tablet. Whatever it sends,
the edge must answer without a 5xx.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from edge.api import OPERATIONS
from edge.api.openapi import build
from edge.app import create_app
from edge.config import EdgeConfig, MdnsSettings

from .api_harness import running_edge


def _document() -> dict[str, Any]:
    app = create_app(EdgeConfig(site_id="s", node_id="n", mdns=MdnsSettings(enabled=False)))
    return build(app[OPERATIONS])


schema = schemathesis.openapi.from_dict(_document()).exclude(
    path_regex=r"^/(v1/live|kds)"  # a WebSocket and a web page, not JSON operations
)


@pytest.fixture(scope="module")
def edge_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    """A running edge with a paired tablet and a manager logged in: (URL, headers)."""
    path: Path = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    ready: dict[str, Any] = {}

    async def main() -> None:
        async with running_edge(path) as edge:
            till = await edge.pair("till")
            await edge.login(till, "mia")
            ready.update(url=edge.url, headers=till.headers("mia"))
            started.set()
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        assert started.wait(30), "the edge did not start"
        yield ready["url"], ready["headers"]
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)
        loop.close()


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_request_makes_the_edge_fail(
    case: schemathesis.Case, edge_url: tuple[str, dict[str, str]]
) -> None:
    url, headers = edge_url
    response = case.call(base_url=url, headers=headers)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text[:500])
