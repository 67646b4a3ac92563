"""The tablet API framework over real HTTP against a real edge and SQLite file.

Credentials, permissions, bad input, idempotent retries, the audit chain, and the OpenAPI
document (every route in it, every response matching its schema).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import pytest

from edge import store as edge_store
from edge.api import OPERATIONS, audit
from edge.api.auth import AUTHENTICATOR as AUTH

from .api_harness import Edge, running_edge, serving

T = TypeVar("T")


def run(fn: Callable[[Edge], Coroutine[Any, Any, T]], tmp_path: Path) -> T:
    async def body() -> T:
        async with running_edge(tmp_path) as edge:
            return await fn(edge)

    return asyncio.run(body())


def raw(edge: Edge, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
    conn = sqlite3.connect(edge.path / "edge.sqlite", isolation_level=None)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


AVAILABILITY = "/v1/menu/items/soup/availability"


def test_credentials_are_checked_on_every_route(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        other = await edge.pair("bar-tablet")
        await edge.login(till, "sam")
        cases: list[tuple[dict[str, str], int, str]] = [
            ({}, 401, "device_not_paired"),
            ({"X-Fynlo-Device": "forged"}, 401, "device_not_paired"),
            (till.headers(), 401, "not_logged_in"),
            ({**till.headers(), "Authorization": "Bearer forged"}, 401, "not_logged_in"),
            ({**till.headers(), "Authorization": "Basic abc"}, 401, "not_logged_in"),
            # sam's token presented by another device
            ({**other.headers(), "Authorization": f"Bearer {till.access['sam']}"}, 403,
             "wrong_device"),
        ]  # fmt: skip
        for headers, status, code in cases:
            got, answer, _ = await edge.call("GET", "/v1/me", headers)
            assert (got, answer["error"]["code"]) == (status, code), headers
        got, me, _ = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert got == 200 and me["employee_id"] == "sam" and me["role_id"] == "server"
        assert "order.open" in me["permissions"] and "menu.edit" not in me["permissions"]
        # A revoked device is refused at once.
        await edge.store.transaction(
            lambda tx: tx.execute(
                "UPDATE devices SET revoked_at_ms = 1 WHERE id = ?", (other.device_id,)
            )
        )
        edge.app[AUTH].forget_device(other.device_id)
        got, answer, _ = await edge.call("GET", "/v1/device", other.headers())
        assert (got, answer["error"]["code"]) == (401, "device_not_paired")

    run(body, tmp_path)


def test_an_expired_session_token_is_refused(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "sam")
        await edge.store.transaction(
            lambda tx: tx.execute("UPDATE sessions SET access_expires_ms = 1")
        )
        got, answer, _ = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert (got, answer["error"]["code"]) == (401, "token_expired")

    run(body, tmp_path)


def test_permissions_follow_the_role_and_role_edits(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        for who in ("sam", "kai", "mia"):
            await edge.login(till, who)
        on = {"available": False}
        got, answer, _ = await edge.call("POST", AVAILABILITY, till.headers("sam"), json=on)
        assert (got, answer["error"]["code"]) == (403, "permission_denied")
        assert answer["error"]["details"] == {"permission": "menu.86"}
        assert (await edge.store.get("menu_items", "soup") or {})["available"] is True
        got, answer, _ = await edge.call("POST", AVAILABILITY, till.headers("kai"), json=on)
        assert got == 200 and answer == {"item_id": "soup", "available": False}
        # The owner takes menu.86 away from the kitchen role: it applies at once.
        await edge.store.write(
            "roles", "kitchen", 1, {"name": "Kitchen", "permissions": '["kitchen.bump"]'}
        )
        got, answer, _ = await edge.call("POST", AVAILABILITY, till.headers("kai"), json=on)
        assert (got, answer["error"]["code"]) == (403, "permission_denied")

    run(body, tmp_path)


@pytest.mark.parametrize(
    ("send", "status", "code"),
    [
        ({"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
         "malformed_json"),
        ({"json": {"available": "yes"}}, 422, "invalid_request"),
        ({"json": {}}, 422, "invalid_request"),
        ({"json": {"available": True, "colour": "red"}}, 422, "invalid_request"),
        ({"json": [True]}, 422, "invalid_request"),
        ({"data": b"available=1", "headers": {"Content-Type": "text/plain"}}, 415,
         "unsupported_media_type"),
        ({"json": {"available": True, "pad": "x" * 300_000}}, 413, "body_too_large"),
    ],
)  # fmt: skip
def test_bad_bodies_get_a_clear_4xx_and_change_nothing(
    tmp_path: Path, send: dict[str, Any], status: int, code: str
) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "mia")
        before = raw(edge, "SELECT count(*) FROM outbox")
        headers = {**till.headers("mia"), **send.pop("headers", {})}
        got, answer, _ = await edge.call("POST", AVAILABILITY, headers, **send)
        assert (got, answer["error"]["code"]) == (status, code)
        assert raw(edge, "SELECT count(*) FROM outbox") == before

    run(body, tmp_path)


def test_unknown_routes_methods_and_ids(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "mia")
        got, answer, _ = await edge.call("GET", "/v1/nothing-here", till.headers("mia"))
        assert (got, answer["error"]["code"]) == (404, "route_not_found")
        got, answer, _ = await edge.call("DELETE", "/v1/me", till.headers("mia"))
        assert (got, answer["error"]["code"]) == (405, "method_not_allowed")
        got, answer, _ = await edge.call(
            "POST", "/v1/menu/items/nope/availability", till.headers("mia"),
            json={"available": False},
        )  # fmt: skip
        assert (got, answer["error"]["code"]) == (404, "not_found")
        assert raw(edge, "SELECT count(*) FROM audit_log") == [(0,)]

    run(body, tmp_path)


def test_a_retry_with_the_same_idempotency_key_gets_the_first_answer(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "mia")
        headers = till.headers("mia", **{"Idempotency-Key": "till-1-req-000042"})
        first = await edge.call("POST", AVAILABILITY, headers, json={"available": False})
        # Meanwhile someone brings it back; the retry must not 86 it again.
        await edge.store.write("menu_items", "soup", 1, {"available": True})
        answers = await asyncio.gather(
            *(edge.call("POST", AVAILABILITY, headers, json={"available": False})
              for _ in range(5))
        )  # fmt: skip
        assert first[0] == 200 and first[1] == {"item_id": "soup", "available": False}
        for got, answer, resp in answers:
            assert (got, answer) == (first[0], first[1])
            assert resp.headers.get("Idempotent-Replayed") == "true"
        assert (await edge.store.get("menu_items", "soup") or {})["available"] is True
        assert raw(edge, "SELECT count(*) FROM audit_log") == [(1,)]
        # The same key for another request is refused.
        got, answer, _ = await edge.call("POST", AVAILABILITY, headers, json={"available": True})
        assert (got, answer["error"]["code"]) == (422, "idempotency_key_reused")
        # A key is per device: another tablet may use the same one.
        other = await edge.pair("other")
        await edge.login(other, "mia")
        got, _, resp = await edge.call(
            "POST", AVAILABILITY, other.headers("mia", **{"Idempotency-Key": "till-1-req-000042"}),
            json={"available": False},
        )  # fmt: skip
        assert got == 200 and "Idempotent-Replayed" not in resp.headers
        bad = till.headers("mia", **{"Idempotency-Key": "short"})
        got, answer, _ = await edge.call("POST", AVAILABILITY, bad, json={"available": False})
        assert (got, answer["error"]["code"]) == (422, "invalid_request")

    run(body, tmp_path)


def test_every_mutation_is_audited_in_a_chain_that_detects_tampering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The chain is checked a page at a time, off the event loop: here a row at a time, and
    # each check records the thread it ran on.
    monkeypatch.setattr(edge_store, "SCAN_PAGE", 1)
    checked_on: list[int] = []
    check_chain = audit.verify

    def verify(entries: Any) -> Any:
        checked_on.append(threading.get_ident())
        return check_chain(entries)

    monkeypatch.setattr(audit, "verify", verify)

    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "mia")
        await edge.login(till, "sam")
        for available in (False, True, False):
            got, _, _ = await edge.call(
                "POST", AVAILABILITY, till.headers("mia"), json={"available": available}
            )
            assert got == 200
        got, page, _ = await edge.call("GET", "/v1/audit", till.headers("mia"))
        assert got == 200 and [e["position"] for e in page["entries"]] == [1, 2, 3]
        first = page["entries"][0]
        assert (first["employee_id"], first["device_id"], first["action"]) == (
            "mia", till.device_id, "set_availability",
        )  # fmt: skip
        (change,) = first["detail"]["changes"]
        assert change["before"] == {"available": True} and change["after"] == {"available": False}
        got, check, _ = await edge.call("GET", "/v1/audit/verify", till.headers("mia"))
        assert check == {"ok": True, "entries": 3, "first_bad_position": None, "reason": None}
        got, answer, _ = await edge.call("GET", "/v1/audit", till.headers("sam"))
        assert (got, answer["error"]["code"]) == (403, "permission_denied")
        # Someone edits entry 2 in the file: the chain names it.
        raw(edge, "UPDATE audit_log SET employee_id = 'sam' WHERE position = 2")
        got, check, _ = await edge.call("GET", "/v1/audit/verify", till.headers("mia"))
        assert (check["ok"], check["first_bad_position"]) == (False, 2)
        raw(edge, "UPDATE audit_log SET employee_id = 'mia' WHERE position = 2")
        raw(edge, "DELETE FROM audit_log WHERE position = 2")
        got, check, _ = await edge.call("GET", "/v1/audit/verify", till.headers("mia"))
        assert (check["ok"], check["first_bad_position"]) == (False, 2)
        assert len(checked_on) == 3 and threading.get_ident() not in checked_on

    run(body, tmp_path)


def test_the_openapi_document_lists_every_route_and_responses_match_it(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        got, doc, _ = await edge.call("GET", "/api/openapi.json")
        assert got == 200 and doc["openapi"].startswith("3.1")
        documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
        served = {
            (r.method, r.resource.canonical)
            for r in edge.app.router.routes()
            if r.method != "HEAD" and r.resource is not None
        }
        assert served - {("GET", "/api/openapi.json")} == documented
        # Responses validate against their documented schemas, errors included.
        till = await edge.pair("till")
        await edge.login(till, "mia")
        samples = [
            ("GET", "/v1/me", till.headers("mia"), None),
            ("GET", "/v1/me", {}, None),
            ("GET", "/v1/device", till.headers(), None),
            ("POST", AVAILABILITY, till.headers("mia"), {"available": False}),
            ("POST", AVAILABILITY, till.headers("mia"), {"available": 3}),
            ("GET", "/v1/audit", till.headers("mia"), None),
            ("GET", "/v1/audit/verify", till.headers("mia"), None),
            ("GET", "/v1/sync/status", {}, None),
            ("GET", "/v1/sync/conflicts", {}, None),
        ]
        for method, path, headers, payload in samples:
            got, answer, _ = await edge.call(method, path, headers, json=payload)
            template = path if path in doc["paths"] else "/v1/menu/items/{item_id}/availability"
            response = doc["paths"][template][method.lower()]["responses"][str(got)]
            schema = response["content"]["application/json"]["schema"]
            jsonschema.validate(answer, {**schema, "components": doc["components"]})
        assert len(edge.app[OPERATIONS]) == len(documented)

    run(body, tmp_path)


@pytest.mark.parametrize(
    ("setting", "logged"),
    [("all", ["/ok 200", "/missing 404", "/slow 200"]), ("slow", ["/missing 404", "/slow 200"]),
     ("off", [])],
)  # fmt: skip
def test_the_access_log_lists_all_requests_or_only_refused_failed_and_slow_ones(
    setting: str, logged: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    import aiohttp
    from aiohttp import web

    from edge.app import SLOW_REQUEST_S, access_log_options

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(SLOW_REQUEST_S + 0.05)
        return web.Response(text="late")

    async def body() -> None:
        app = web.Application()
        app.router.add_get("/ok", ok)
        app.router.add_get("/slow", slow)
        options = access_log_options(setting)
        async with serving(app, **options) as url, aiohttp.ClientSession() as http:
            for path in ("/ok", "/missing", "/slow"):
                async with http.get(url + path) as resp:
                    await resp.read()

    with caplog.at_level(logging.INFO, logger="aiohttp.access"):
        asyncio.run(body())
    lines = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    found = [re.search(r'"GET (\S+)" (\d+) ', line) for line in lines]
    assert [f"{m[1]} {m[2]}" for m in found if m] == logged and len(found) == len(logged)


def test_the_access_log_never_writes_query_strings(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from edge.app import AccessLog

    logger = logging.getLogger("test.access")
    request = make_mocked_request("GET", "/v1/live?device=secret-token&session=also-secret")
    with caplog.at_level(logging.INFO, logger="test.access"):
        AccessLog(logger, "").log(request, web.Response(status=101), 0.0123)
    assert caplog.messages and "/v1/live" in caplog.messages[0]
    assert "secret" not in caplog.text and "101" in caplog.messages[0]
