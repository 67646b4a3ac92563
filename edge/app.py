"""The edge's aiohttp application: sync status and the local conflicts mirror.

``create_app(config)`` builds the app; the store, the uplink and the mDNS announcement are
long-lived resources owned by ``cleanup_ctx`` (opened at start-up in that order, closed in
reverse), so the uplink always stops before the store closes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.log import access_logger as aiohttp_access_logger

from shared.registry import default_registry
from sync_protocol.schema import Registry

from .api import LIVE_TABLES, error_middleware, setup_api
from .api.payment_routes import GATEWAY, SETTINGS
from .api.routing import MAX_BODY, ApiRoutes, Auth, Ctx
from .config import EdgeConfig
from .mdns import mdns_ctx
from .payment_gateway import CloudPayments, PaymentWatcher, payment_watcher
from .state import StoreStatus
from .store import EdgeStore, wall_clock_ms
from .uplink import Uplink, UplinkStatus

CONFIG_KEY = web.AppKey("config", EdgeConfig)
REGISTRY_KEY = web.AppKey("registry", Registry)
STORE_KEY = web.AppKey("store", EdgeStore)
UPLINK_KEY = web.AppKey("uplink", Uplink)
WATCHER_KEY = web.AppKey("payment_watcher", PaymentWatcher)

sync_routes = ApiRoutes("sync")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json_default(value: object) -> object:
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


_dumps = partial(json.dumps, default=_json_default)


def _iso(ms: int | None) -> str | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, UTC).isoformat()


def status_body(store: StoreStatus, uplink: UplinkStatus | None) -> dict[str, Any]:
    """The ``/v1/sync/status`` document from the store's and the uplink's status."""
    successes = [store.last_push_ok_ms, store.last_pull_ok_ms]
    if uplink is not None:
        successes.append(uplink.last_ok_ms)
    last_ok = max((ms for ms in successes if ms), default=None)
    catchup: dict[str, Any] = {
        "pushed": 0,
        "push_backlog": store.outbox_depth,
        "push_rate": 0.0,
        "pulled": 0,
        "pull_backlog": max(0, store.cloud_head - store.pull_cursor),
        "pull_rate": 0.0,
    }
    if uplink is not None:
        catchup.update(uplink.to_dict()["catchup"])
    return {
        "online": bool(uplink and uplink.online),
        "uplink_running": bool(uplink and uplink.running),
        "outbox_depth": store.outbox_depth,
        "oldest_unsynced_age_ms": store.oldest_unsynced_age_ms,
        "last_success_at": _iso(last_ok),
        "last_success_ms": last_ok,
        "last_error": None if uplink is None or uplink.last_error is None
        else uplink.to_dict()["last_error"],
        "stuck": uplink.stuck if uplink is not None else None,
        "open_conflicts": store.open_conflicts,
        "clock_skew_ms": uplink.clock_skew_ms if uplink is not None else None,
        "last_seq": store.last_seq,
        "acked_through": store.acked_through,
        "pull_cursor": store.pull_cursor,
        "cloud_head": store.cloud_head,
        "catchup": catchup,
    }  # fmt: skip


@sync_routes.route(
    "GET",
    "/v1/sync/status",
    summary="Sync health: link, outbox depth and age, conflicts, clock skew, catch-up",
    response=dict[str, Any],
    auth=Auth.PUBLIC,
)
async def sync_status(ctx: Ctx) -> dict[str, Any]:
    """Sync health: outbox depth and age, link state, conflicts, skew, catch-up progress."""
    app = ctx.request.app
    store_status = await app[STORE_KEY].status(wall_clock_ms())
    uplink = app.get(UPLINK_KEY)
    return status_body(store_status, uplink.status() if uplink is not None else None)


@sync_routes.route(
    "GET",
    "/v1/sync/conflicts",
    summary="The site's open parked conflicts, as last mirrored from the cloud",
    response=dict[str, Any],
    auth=Auth.PUBLIC,
)
async def sync_conflicts(ctx: Ctx) -> dict[str, Any]:
    """The site's open parked conflicts, as last mirrored from the cloud (works offline)."""
    conflicts = await ctx.request.app[STORE_KEY].conflicts()
    return {"conflicts": json.loads(_dumps(conflicts))}


SLOW_REQUEST_S = 0.25  #: an answer this late is logged even when only slow ones are


class AccessLog(AbstractAccessLogger):
    """One line per request: method, path (never the query: it may hold a credential), status
    and time; every request (``access_log = "all"``)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Log one answered request."""
        self.logger.info(
            '%s "%s %s" %s %.1fms',
            request.remote,
            request.method,
            request.path,
            response.status,
            time * 1000,
        )


class SlowAccessLog(AccessLog):
    """The access log of ``access_log = "slow"``: only requests refused or failed (status 400
    and up) or answered in ``SLOW_REQUEST_S`` or more."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        """Log one answered request, if refused, failed or slow."""
        if response.status >= 400 or time >= SLOW_REQUEST_S:
            super().log(request, response, time)


def access_log_options(setting: str) -> dict[str, Any]:
    """``web.run_app``'s access log arguments for an ``access_log`` setting."""
    if setting == "off":
        return {"access_log": None}
    return {
        "access_log": aiohttp_access_logger,
        "access_log_class": SlowAccessLog if setting == "slow" else AccessLog,
    }


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    store = await EdgeStore.open(
        config.db_path,
        app[REGISTRY_KEY],
        config.site_id,
        config.effective_node_id,
        synchronous=config.synchronous,
        live_tables=LIVE_TABLES,
        max_db_bytes=config.max_db_bytes,
    )
    app[STORE_KEY] = store
    try:
        yield
    finally:
        await store.close()


async def _uplink_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG_KEY]
    if not config.uplink_enabled:
        yield
        return
    store = app[STORE_KEY]
    uplink = Uplink(store, config.cloud.url, config.cloud.token, config.sync)
    await uplink.start()
    app[UPLINK_KEY] = uplink
    gateway = app[GATEWAY] = CloudPayments(
        config.cloud.url,
        config.cloud.token,
        push_timeout_s=config.payments.push_timeout_s,
        online=lambda: uplink.status().online,
    )
    watcher = app[WATCHER_KEY] = payment_watcher(store, gateway, poll_s=config.payments.poll_s)
    await watcher.start()
    try:
        yield
    finally:
        await watcher.stop()
        await gateway.close()
        await uplink.stop()


def create_app(config: EdgeConfig, registry: Registry | None = None) -> web.Application:
    """Build the edge application for ``config`` (the registry defaults to the shared one)."""
    if not config.site_id or not config.effective_node_id:
        raise ValueError("site_id and node_id (or a '<node_id>.<secret>' token) are required")
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY)
    app[CONFIG_KEY] = config
    app[REGISTRY_KEY] = config.registry(registry or default_registry())
    app[SETTINGS] = config.payments
    setup_api(app, STORE_KEY, extra=[sync_routes])
    # Order matters: the store opens before the uplink and closes after it.
    app.cleanup_ctx.insert(0, _store_ctx)
    app.cleanup_ctx.append(_uplink_ctx)
    # Announced last (tablets may connect once they see it), so withdrawn first on shutdown.
    app.cleanup_ctx.append(mdns_ctx(config))
    return app
