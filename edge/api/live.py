"""Live updates over WebSocket (``GET /v1/live``), and the kitchen display page that uses them.

Protocol (JSON text frames; docs/live.md is the full description):

* connect with a paired device's credential, ``?device=<token>`` (browsers cannot set headers
  on a WebSocket) or the ``X-Fynlo-Device`` header, and optionally an employee's access token,
  ``&session=<token>`` or ``Authorization: Bearer``; a bad one is refused before the upgrade
  with the usual JSON 401;
* the client sends ``{"type":"subscribe","topics":[...],"since":<seq|null>}`` once. Topics:
  ``orders`` (needs a session with ``order.view``), ``tickets``, ``tickets:<station>``,
  ``menu``, ``sync``;
* the server answers ``{"type":"ready","seq":H,"now_ms":T}`` (H: the newest event now); then,
  when ``since`` is given, the events after it that the client missed, or
  ``{"type":"reset","seq":H}`` when they are no longer kept (reload over REST); then live
  ``{"type":"event","seq":N,"topic":...,"data":{...}}`` in ``seq`` order, without gaps or
  duplicates for the subscription, and ``{"type":"heartbeat","seq":N,"now_ms":T}`` every
  second (everything up to N that matches was sent: a client may resume from N);
* close codes: 4400 bad subscribe, 4401 the device was revoked or the session ended (at once,
  not at the next request), 4403 a topic is not allowed, 4409 the client fell too far behind
  (reconnect with ``since``), 4440 the access token it was opened with expired (refresh it,
  reconnect with ``since``), 1001 the edge is shutting down.

How it works. ``live_hub.Hub`` does the fan-out (each event encoded once, bounded queues per
client, replay without gaps or duplicates). This module checks the credential and the
subscribe message, sends ``ready`` and the replay, then hands the connection to the hub's
queue; it also serves the kitchen display page (``edge.kds``), which is this endpoint's
browser client.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from shared.roles import Permission

from .. import kds
from ..store import EdgeStore, wall_clock_ms
from . import openapi
from .auth import AUTHENTICATOR, Principal
from .errors import ApiCode, ApiError
from .live_hub import CLOSE_TIMEOUT_S, Close, Hub, LiveSettings, close_socket, message_frame
from .routing import Auth, Operation

TOPIC = re.compile(r"orders|tickets|menu|sync|payments|tickets:[A-Za-z0-9_.-]{1,64}")
#: what a connection needs, beyond a paired device, to follow a topic family
TOPIC_PERMISSIONS: dict[str, Permission] = {
    "orders": Permission.ORDER_VIEW,
    "payments": Permission.PAYMENT_TAKE,
}
MAX_MESSAGE = 16 * 1024  # bytes a client may send in one frame


class Subscribe(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The client's first message: what it follows, and the last seq it has (if any)."""

    type: Literal["subscribe"]
    topics: Annotated[list[str], msgspec.Meta(min_length=1, max_length=32)]
    since: Annotated[int, msgspec.Meta(ge=0)] | None = None


_SUBSCRIBE = msgspec.json.Decoder(Subscribe)
_ALREADY_SUBSCRIBED = message_frame(
    {"type": "error", "code": "invalid_request", "message": "subscribe comes once, first"}
)
HUB = web.AppKey("live_hub", Hub)
SETTINGS = web.AppKey("live_settings", LiveSettings)


async def _principal(request: web.Request) -> Principal:
    """The device (and employee) of a live connection, from the query or the headers."""
    auth = request.app[AUTHENTICATOR]
    token = request.query.get("device") or request.headers.get("X-Fynlo-Device", "")
    if not token:
        raise ApiError(ApiCode.DEVICE_NOT_PAIRED, "send the device credential as ?device=")
    device = await auth.device(token)
    session = request.query.get("session")
    if session is None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        session = value.strip() if scheme.lower() == "bearer" else None
    return await auth.session(session, device) if session else device


def _message(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


async def _refuse(ws: web.WebSocketResponse, close: Close, code: ApiCode, message: str) -> None:
    await ws.send_frame(
        _message({"type": "error", "code": str(code), "message": message}), WSMsgType.TEXT
    )
    await close_socket(ws, None, close, str(code))


async def _subscription(
    ws: web.WebSocketResponse, principal: Principal, wait_s: float
) -> Subscribe | None:
    """The client's subscribe message, checked; None when refused (the socket is closed)."""
    try:
        msg = await ws.receive(timeout=wait_s)
    except TimeoutError:
        await _refuse(ws, Close.BAD_SUBSCRIBE, ApiCode.INVALID_REQUEST, "subscribe first")
        return None
    if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
        return None
    try:
        if msg.type is not WSMsgType.TEXT:
            raise msgspec.DecodeError("send JSON text frames")
        sub = _SUBSCRIBE.decode(msg.data)
    except msgspec.ValidationError as exc:
        await _refuse(ws, Close.BAD_SUBSCRIBE, ApiCode.INVALID_REQUEST, str(exc))
        return None
    except msgspec.DecodeError as exc:
        await _refuse(ws, Close.BAD_SUBSCRIBE, ApiCode.MALFORMED_JSON, str(exc))
        return None
    unknown = [t for t in sub.topics if not TOPIC.fullmatch(t)]
    if unknown:
        await _refuse(ws, Close.BAD_SUBSCRIBE, ApiCode.INVALID_REQUEST, f"unknown topics {unknown}")
        return None
    for topic in sub.topics:
        needed = TOPIC_PERMISSIONS.get(topic.partition(":")[0])
        if needed is not None and needed not in principal.permissions:
            await _refuse(
                ws, Close.FORBIDDEN, ApiCode.PERMISSION_DENIED, f"{topic!r} needs {needed}"
            )
            return None
    return sub


async def live(request: web.Request) -> web.StreamResponse:
    """``GET /v1/live``: the WebSocket of live events (protocol in the module docstring)."""
    hub = request.app[HUB]
    principal = await _principal(request)  # refused here: a JSON 401/403, before the upgrade
    if hub.closing:
        raise web.HTTPServiceUnavailable(reason="the edge is shutting down")
    settings = hub.settings
    ws = web.WebSocketResponse(
        heartbeat=settings.ping_s, compress=False, max_msg_size=MAX_MESSAGE, timeout=CLOSE_TIMEOUT_S
    )
    await ws.prepare(request)
    try:
        sub = await _subscription(ws, principal, settings.subscribe_timeout_s)
        if sub is not None:
            await _follow(request, ws, hub, sub, principal)
    except ConnectionResetError:  # the client went away
        pass
    return ws


async def _follow(
    request: web.Request,
    ws: web.WebSocketResponse,
    hub: Hub,
    sub: Subscribe,
    principal: Principal,
) -> None:
    """Send ready and the replay, then let the hub's queue feed the client until it closes."""
    client = hub.client(ws, request.transport, frozenset(sub.topics), principal)
    start = hub.attach(client, sub.since)  # from here on, every new event is queued for it
    try:
        ready = {"type": "ready", "seq": start.head, "now_ms": wall_clock_ms()}
        await ws.send_frame(_message(ready), WSMsgType.TEXT)
        if start.frames is not None:  # from the hub's memory
            for frame in start.frames:
                await client.replay(frame)
        elif start.reset or not await hub.replay(client, sub.since or 0, start.head):
            await ws.send_frame(_message({"type": "reset", "seq": start.head}), WSMsgType.TEXT)
        client.go_live()
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                client.push(_ALREADY_SUBSCRIBED)
    finally:
        hub.detach(client)
        await client.close(WSCloseCode.OK, "")


# -- the kitchen display page ------------------------------------------------------------------

_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": "default-src 'self'; connect-src 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
}


async def kds_page(request: web.Request) -> web.StreamResponse:
    """``GET /kds``: the kitchen display page."""
    return _file("index.html")


async def kds_asset(request: web.Request) -> web.StreamResponse:
    """``GET /kds/{asset}``: the page's script and style sheet."""
    name = request.match_info["asset"]
    if name == "index.html" or name not in kds.FILES:
        raise ApiError(ApiCode.NOT_FOUND, f"no kitchen display file {name!r}")
    return _file(name)


def _file(name: str) -> web.Response:
    return web.Response(
        body=kds.read(name),
        content_type=kds.FILES[name],
        charset="utf-8",
        headers=_PAGE_HEADERS,
    )


def _op(
    method: str,
    path: str,
    fn: Callable[[web.Request], Awaitable[web.StreamResponse]],
    summary: str,
    status: int,
    auth: Auth,
    errors: tuple[ApiCode, ...],
    tag: str,
) -> Operation:
    return Operation(
        method, path, fn.__name__, summary, fn, None, None, None, status, auth, None, errors, (tag,)
    )


OPERATIONS = [
    _op(
        "GET", "/v1/live", live, "Live events over WebSocket: orders, tickets, menu, sync",
        101, Auth.DEVICE, (ApiCode.NOT_LOGGED_IN, ApiCode.TOKEN_EXPIRED, ApiCode.WRONG_DEVICE),
        "live",
    ),
    _op("GET", "/kds", kds_page, "The kitchen display (a web page)", 200, Auth.PUBLIC, (), "kds"),
    _op(
        "GET", "/kds/{asset}", kds_asset, "The kitchen display's script and style sheet",
        200, Auth.PUBLIC, (ApiCode.NOT_FOUND,), "kds",
    ),
]  # fmt: skip


def _query(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": {"type": "string"}}  # fmt: skip


openapi.HAND_WRITTEN["live"] = {
    "description": "A WebSocket (JSON text frames): send subscribe, get ready, then events "
    "and a heartbeat every second. See docs/live.md for the messages and close codes.",
    "parameters": [
        _query("device", "the device credential (browsers cannot set X-Fynlo-Device here)"),
        _query("session", "an employee's access token (needed for the orders topic)"),
    ],
    "responses": {"101": {"description": "Switching Protocols: the live WebSocket"}},
}
openapi.HAND_WRITTEN["kds_page"] = {
    "parameters": [_query("station", "the station shown (default kitchen)"),
                   _query("device", "a device credential to keep (then removed from the URL)")],
    "responses": {"200": {"description": "the page",
                          "content": {"text/html": {"schema": {"type": "string"}}}}},
}  # fmt: skip
openapi.HAND_WRITTEN["kds_asset"] = {
    "responses": {"200": {"description": "app.js or kds.css",
                          "content": {"text/javascript": {"schema": {"type": "string"}},
                                      "text/css": {"schema": {"type": "string"}}}}},
}  # fmt: skip


async def _sync_status(app: web.Application, store_key: web.AppKey[EdgeStore]) -> dict[str, Any]:
    # edge.app builds this document and imports this package, so it is imported on first use
    from ..app import UPLINK_KEY, status_body

    uplink = app.get(UPLINK_KEY)
    store_status = await app[store_key].status(wall_clock_ms())
    return status_body(store_status, uplink.status() if uplink is not None else None)


def setup_live(
    app: web.Application, store_key: web.AppKey[EdgeStore], settings: LiveSettings | None = None
) -> list[Operation]:
    """Add ``/v1/live`` and the ``/kds`` page to ``app``; returns their operations."""
    app[SETTINGS] = settings or LiveSettings()
    for op in OPERATIONS:
        app.router.add_route(op.method, op.path, op.fn, name=op.op_id)

    async def hub_ctx(app: web.Application) -> AsyncIterator[None]:
        hub = Hub(app[store_key], app[SETTINGS], partial(_sync_status, app, store_key))
        await hub.start()
        app[HUB] = hub
        try:
            yield
        finally:
            await hub.stop()

    async def close_clients(app: web.Application) -> None:
        if HUB in app:
            await app[HUB].close_clients()

    app.cleanup_ctx.append(hub_ctx)
    app.on_shutdown.append(close_clients)
    return list(OPERATIONS)
