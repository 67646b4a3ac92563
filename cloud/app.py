"""The cloud's HTTP service: the sync endpoints for edges and the owners' JSON API.

``create_app(config)`` builds the application; the store (and, with no DSN, a throwaway
Postgres) is opened and closed by a ``cleanup_ctx``. The contract is ``docs/sync-http.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from aiohttp import web

from sync_protocol import wire
from sync_protocol.changes import Op
from sync_protocol.errors import ErrorCode, RemoteProtocolError
from sync_protocol.hlc import HybridClock

from . import audit as site_audit
from . import conflicts as conflict_store
from .applepay import ApplePayMerchant, MerchantValidator, load_merchant
from .auth import NODE_ID, OWNER_TOKEN, SITE_ID, STORE, setup_auth
from .config import CloudConfig, PaymentSettings
from .errors import SYNC_CONTENT_TYPE, CloudCode, CloudError, error_middleware
from .payments import PROVIDERS, PaymentProviders
from .payments import routes as payment_routes
from .pgtemp import TemporaryPostgres
from .providers.simbank import SimBank, SimBankProvider, wall_clock_ms
from .providers.stripe_card import StripeCardProvider
from .store import CloudStore

log = logging.getLogger(__name__)

CONFIG = web.AppKey("config", CloudConfig)
CLOCK = web.AppKey("clock", HybridClock)

sync_routes = web.RouteTableDef()
owner_routes = web.RouteTableDef()

_OPS = {"insert": Op.INSERT, "update": Op.UPDATE, "delete": Op.DELETE}


def cloud_clock(config: CloudConfig) -> HybridClock:
    """The cloud's hybrid logical clock over the wall clock."""
    return HybridClock(
        now_ms=lambda: time.time_ns() // 1_000_000, max_forward_ms=config.sync.max_forward_ms
    )


def create_app(
    config: CloudConfig, store: CloudStore | None = None, providers: PaymentProviders | None = None
) -> web.Application:
    """The cloud application; opens its own store unless one is given (the caller's to close),
    and takes payments with ``providers`` (none: card and bank payments are refused)."""
    app = web.Application(client_max_size=config.sync.max_frame_bytes)
    app[CONFIG] = config
    app[OWNER_TOKEN] = config.admin_token or secrets.token_urlsafe(24)
    if store is not None:
        app[STORE] = store
        app[CLOCK] = store.clock
    else:
        app[CLOCK] = cloud_clock(config)
        app.cleanup_ctx.append(_store_ctx)
        app.on_shutdown.append(_release_long_polls)
    if providers is not None:
        app[PROVIDERS] = providers
    else:
        app[PROVIDERS] = PaymentProviders()
        app.cleanup_ctx.append(_providers_ctx)
    setup_middlewares(app)
    app.add_routes(sync_routes)
    app.add_routes(owner_routes)
    app.add_routes(payment_routes)
    return app


def setup_middlewares(app: web.Application) -> None:
    """Install the middlewares; order matters: errors outermost, so auth refusals map too."""
    app.middlewares.append(error_middleware)
    setup_auth(app)


async def _release_long_polls(app: web.Application) -> None:
    # on_shutdown runs before the server waits for in-flight handlers: answer held pulls now.
    app[STORE].release_waiters()


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    server: TemporaryPostgres | None = None
    dsn = config.dsn
    if not dsn:
        server = TemporaryPostgres(fast=True)
        await asyncio.to_thread(server.start)
        dsn = server.dsn
    try:
        store = await CloudStore.open(
            dsn,
            config.registry(),
            clock=app[CLOCK],
            pool_min=config.pool_min,
            pool_max=config.pool_max,
            limits=config.sync.limits,
        )
        app[STORE] = store
        try:
            yield
        finally:
            await store.close()
    finally:
        if server is not None:
            await asyncio.to_thread(server.stop)


async def _providers_ctx(app: web.Application) -> AsyncIterator[None]:
    """Set up the configured payment providers (and the simulated bank, when it runs here)."""
    config, providers = app[CONFIG], app[PROVIDERS]
    settings = config.payments
    async with aiohttp.ClientSession() as http, contextlib.AsyncExitStack() as stack:
        if settings.bank == "simbank":
            url, key, hook = (
                settings.simbank_url,
                settings.simbank_secret_key,
                settings.simbank_webhook_secret,
            )
            key, hook = key or secrets.token_urlsafe(24), hook or secrets.token_urlsafe(24)
            clock = wall_clock_ms
            if not url:
                bank = await stack.enter_async_context(_embedded_bank(config, key, hook))
                url, clock = bank.public_url or "", bank.clock  # its demo clock may be moved
            providers.bank = SimBankProvider(url, key, hook, http, clock)
        if settings.applepay_merchant_id:
            providers.applepay = MerchantValidator(applepay_merchant(settings))
        if settings.stripe_api_key:
            providers.card = StripeCardProvider(
                settings.stripe_api_key,
                settings.stripe_webhook_secret,
                api_base=settings.stripe_api_base or None,
                session=http,
            )
        yield


def applepay_merchant(settings: PaymentSettings) -> ApplePayMerchant:
    """The Apple Pay merchant of the cloud's settings (its certificates and keys from files)."""
    return load_merchant(
        merchant_identifier=settings.applepay_merchant_id,
        display_name=settings.applepay_display_name,
        domain=settings.applepay_domain,
        payment_certificate_pem=Path(settings.applepay_payment_certificate).read_bytes(),
        payment_key_pem=Path(settings.applepay_payment_key).read_bytes(),
        identity_certificate_pem=Path(settings.applepay_identity_certificate).read_bytes(),
        identity_key_pem=Path(settings.applepay_identity_key).read_bytes(),
    )


@contextlib.asynccontextmanager
async def _embedded_bank(config: CloudConfig, key: str, hook: str) -> AsyncIterator[SimBank]:
    """The simulated bank on its own port of this process, sending webhooks to this cloud."""
    settings = config.payments
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    bank = SimBank(
        secret_key=key,
        webhook_secret=hook,
        webhook_url=f"http://{host}:{config.port}/webhooks/simbank",
        public_url=settings.simbank_public_url or None,
        sweep_interval_s=5.0,
    )
    runner = web.AppRunner(bank.app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.host, settings.simbank_port).start()
        port = runner.addresses[0][1]
        log.warning("simulated bank (no real money) on port %s", port)
        bank.public_url = settings.simbank_public_url or f"http://{host}:{port}"
        yield bank
    finally:
        await runner.cleanup()


# -- helpers ----------------------------------------------------------------------------------


def _sync_response(body: bytes) -> web.Response:
    return web.Response(body=body, content_type=SYNC_CONTENT_TYPE)


def _msgpack_response(value: object) -> web.Response:
    return _sync_response(msgpack.packb(value, use_bin_type=True))


def _json_response(value: object) -> web.Response:
    return web.json_response(value, dumps=conflict_store.dumps)


ROWS_PAGE_DEFAULT = 1_000  #: rows in a page of the owners' rows endpoint, unless asked
ROWS_PAGE_MAX = 10_000


def _int_param(request: web.Request, name: str, default: int) -> int | None:
    """An integer query parameter, its default when absent, None when malformed."""
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        return None


def _float_param(request: web.Request, name: str, default: float) -> float:
    text = request.query.get(name)
    if text is None or text == "":
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also refuses NaN
        raise CloudError(CloudCode.BAD_REQUEST, f"{name} must be a non-negative number")
    return value


async def _body(request: web.Request) -> bytes:
    limit = request.app[CONFIG].sync.max_frame_bytes
    if request.content_length is not None and request.content_length > limit:
        raise RemoteProtocolError(
            ErrorCode.BATCH_TOO_LARGE, f"body of {request.content_length} bytes exceeds {limit}"
        )
    return await request.read()


async def _msgpack_body(request: web.Request) -> dict[str, Any]:
    body = await _body(request)
    try:
        value = msgpack.unpackb(body, raw=False) if body else {}
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"body is not msgpack: {exc}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "body must be a map")
    return value


async def _json_body(request: web.Request) -> dict[str, Any]:
    body = await _body(request)
    try:
        value = json.loads(body) if body else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise CloudError(CloudCode.BAD_REQUEST, f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CloudError(CloudCode.BAD_REQUEST, "body must be a JSON object")
    return value


def _conflict_id(request: web.Request) -> int:
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise RemoteProtocolError(
            ErrorCode.CONFLICT_NOT_FOUND, "conflict ids are integers"
        ) from None


async def _resolve(
    request: web.Request, site_id: str, body: Mapping[str, Any], by: str
) -> dict[str, Any]:
    who = body.get("by") or by
    if not isinstance(who, str):
        raise RemoteProtocolError(ErrorCode.INVALID_RESOLUTION, "by must be a string")
    conflict, rev = await request.app[STORE].resolve_conflict(
        site_id,
        _conflict_id(request),
        body.get("choose"),
        body.get("values"),
        who,
    )
    return {"conflict": conflict, "rev": rev}


# -- device endpoints (msgpack) ----------------------------------------------------------------


@sync_routes.post("/v1/sync/push")
async def push(request: web.Request) -> web.Response:
    """Apply a push frame from the calling node; answer with an ack frame."""
    config, store, clock = request.app[CONFIG], request.app[STORE], request.app[CLOCK]
    site_id, node_id = request[SITE_ID], request[NODE_ID]
    batch = wire.decode_push(await _body(request), config.sync.limits)
    if batch.site != site_id or batch.node != node_id:
        raise RemoteProtocolError(
            ErrorCode.SITE_MISMATCH,
            "the frame names another site or node than the credential",
            site=batch.site,
            node=batch.node,
        )
    ack = await store.ingest(site_id, node_id, batch, 0, clock.now_ms())
    # Only an accepted batch moves the cloud's clock: a refused one leaves no trace.
    ack = dataclasses.replace(ack, hlc=clock.observe(max(c.hlc for c in batch.changes)))
    return _sync_response(wire.encode_ack(site_id, node_id, ack))


@sync_routes.get("/v1/sync/pull")
async def pull(request: web.Request) -> web.Response:
    """A page of the caller's site feed after ``cursor``; long-polls with ``wait``."""
    settings, store = request.app[CONFIG].sync, request.app[STORE]
    site_id, node_id = request[SITE_ID], request[NODE_ID]
    cursor = _int_param(request, "cursor", 0)
    if cursor is None:
        raise RemoteProtocolError(ErrorCode.INVALID_CURSOR, "cursor must be an integer")
    limit = _int_param(request, "limit", settings.pull_limit_default)
    if limit is None or limit < 1:
        raise CloudError(CloudCode.BAD_REQUEST, "limit must be a positive integer")
    limit = min(limit, settings.pull_limit_max)
    holds = _int_param(request, "holds", 0)
    if holds is None or holds < 0:
        raise CloudError(CloudCode.BAD_REQUEST, "holds must be a non-negative integer")
    wait = min(_float_param(request, "wait", 0.0), settings.long_poll_max_s)
    if wait > 0:
        await store.wait_for_feed(site_id, cursor, wait, node_id)
    return _sync_response(await store.pull(site_id, node_id, cursor, limit, holds))


@sync_routes.get("/v1/sync/conflicts")
async def device_conflicts(request: web.Request) -> web.Response:
    """The open conflicts of the caller's site."""
    return _msgpack_response({"conflicts": await request.app[STORE].conflicts(request[SITE_ID])})


@sync_routes.post("/v1/sync/conflicts/{id}/resolve")
async def device_resolve(request: web.Request) -> web.Response:
    """Resolve one of the caller's site's conflicts."""
    body = await _msgpack_body(request)
    return _msgpack_response(await _resolve(request, request[SITE_ID], body, request[NODE_ID]))


# -- owner endpoints (JSON) --------------------------------------------------------------------


async def _site(request: web.Request) -> str:
    site_id = request.match_info["site"]
    await request.app[STORE].head(site_id)  # SITE_NOT_FOUND when unknown
    return site_id


@owner_routes.get("/healthz")
async def health(request: web.Request) -> web.Response:
    """Liveness for load balancers (no credential)."""
    return _json_response({"ok": True})


@owner_routes.post("/v1/sites")
async def add_site(request: web.Request) -> web.Response:
    """Register a site."""
    body = await _json_body(request)
    name, site_id = body.get("name"), body.get("site_id")
    if not isinstance(name, str) or not name or not isinstance(site_id, str | None):
        raise CloudError(CloudCode.BAD_REQUEST, "need a name (and optionally a site_id) string")
    return _json_response({"site_id": await request.app[STORE].register_site(name, site_id)})


@owner_routes.post("/v1/sites/{site}/devices")
async def add_device(request: web.Request) -> web.Response:
    """Register a node (edge box) to a site; the token is shown only here."""
    body = await _json_body(request)
    name = body.get("name")
    if not isinstance(name, str) or not name:
        raise CloudError(CloudCode.BAD_REQUEST, "need a device name string")
    site_id = request.match_info["site"]
    node_id, token = await request.app[STORE].register_device(site_id, name)
    return _json_response({"site_id": site_id, "node_id": node_id, "token": token})


@owner_routes.post("/v1/sites/{site}/changes")
async def cloud_changes(request: web.Request) -> web.Response:
    """Cloud-authored writes (dashboard edits), applied in one transaction."""
    body = await _json_body(request)
    items = body.get("changes")
    if not isinstance(items, list):
        raise CloudError(CloudCode.BAD_REQUEST, "changes must be a list")
    writes = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise CloudError(CloudCode.BAD_REQUEST, f"change {index} is not an object")
        op = _OPS.get(str(item.get("op", "")).lower())
        fields = item.get("fields") or {}
        if op is None or not isinstance(fields, dict):
            raise CloudError(
                CloudCode.BAD_REQUEST, f"change {index}: op is insert|update|delete, fields a map"
            )
        table, pk = item.get("table"), item.get("id")
        if not isinstance(table, str) or not isinstance(pk, str):
            raise CloudError(CloudCode.BAD_REQUEST, f"change {index}: table and id are strings")
        writes.append((table, pk, op, fields))
    rev = await request.app[STORE].write(request.match_info["site"], writes)
    return _json_response({"rev": rev})


@owner_routes.get("/v1/sites/{site}/rows/{table}")
async def site_rows(request: web.Request) -> web.Response:
    """A page of the live rows of one synced table of a site, in id order."""
    site_id, table = await _site(request), request.match_info["table"]
    limit = _int_param(request, "limit", ROWS_PAGE_DEFAULT)
    if limit is None or not 1 <= limit <= ROWS_PAGE_MAX:
        raise CloudError(CloudCode.BAD_REQUEST, f"limit must be 1 to {ROWS_PAGE_MAX}")
    after = request.query.get("after", "")
    rows, following = await request.app[STORE].rows_page(site_id, table, after, limit)
    return _json_response({"table": table, "rows": rows, "next": following})


@owner_routes.get("/v1/sites/{site}/checksums")
async def site_checksums(request: web.Request) -> web.Response:
    """Per-table checksums of a site's live rows."""
    sums = await request.app[STORE].checksums(await _site(request))
    return _json_response({t: {"count": c.count, "total": c.total} for t, c in sums.items()})


@owner_routes.get("/v1/sites/{site}/audit/verify")
async def verify_site_audit(request: web.Request) -> web.Response:
    """Walk each edge node's audit hash chain of a site and say where it first breaks."""
    site_id = await _site(request)
    verdicts = await site_audit.verify_site(request.app[STORE].pool, site_id)
    nodes = [
        {
            "node_id": n.node_id,
            "ok": n.verdict.ok,
            "entries": n.verdict.entries,
            "first_bad_position": n.verdict.first_bad_position,
            "reason": n.verdict.reason,
        }
        for n in verdicts
    ]
    return _json_response({"site_id": site_id, "ok": all(n["ok"] for n in nodes), "nodes": nodes})


@owner_routes.get("/v1/sites/{site}/conflicts")
async def owner_conflicts(request: web.Request) -> web.Response:
    """A site's conflicts (open ones; ``?all=1`` for resolved ones too)."""
    open_only = request.query.get("all", "") not in ("1", "true", "yes")
    found = await request.app[STORE].conflicts(await _site(request), open_only)
    return _json_response({"conflicts": found})


@owner_routes.post("/v1/sites/{site}/conflicts/{id}/resolve")
async def owner_resolve(request: web.Request) -> web.Response:
    """Resolve a site's conflict from the dashboard."""
    body = await _json_body(request)
    return _json_response(await _resolve(request, await _site(request), body, "owner"))


@owner_routes.get("/v1/status")
async def status(request: web.Request) -> web.Response:
    """Per-site lag and the cloud clock's measured skew."""
    clock = request.app[CLOCK]
    sites = await request.app[STORE].status()
    return _json_response(
        {
            "sites": sites,
            "clock": {
                "hlc": clock.last,
                "last_skew_ms": clock.last_skew_ms,
                "refused": clock.refused,
            },
        }
    )
