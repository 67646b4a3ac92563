"""The tablet API: versioned JSON routes for tablets, handhelds and kitchen screens.

``setup_api(app)`` adds every resource module's routes, the OpenAPI document at
``/api/openapi.json`` (built from those same routes) and the authenticator, which lives as
long as the store. Errors become responses in one place (``errors.error_middleware``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import msgspec
from aiohttp import web

from ..store import EdgeStore
from . import idempotency, openapi
from .audit_routes import routes as audit_routes
from .auth import AUTHENTICATOR, Authenticator
from .errors import error_middleware
from .idempotency import ANSWERED, AnsweredKeys
from .kitchen_routes import routes as kitchen_routes
from .live import HUB, setup_live
from .menu_routes import routes as menu_routes
from .order_routes import routes as order_routes
from .payment_routes import routes as payment_routes
from .people_routes import routes as people_routes
from .routing import STORE, ApiRoutes, Operation, add_routes
from .session_routes import routes as session_routes

#: synced tables whose every change is a live event for tablets and screens
LIVE_TABLES = (
    "menu_categories",
    "menu_items",
    "modifier_groups",
    "modifiers",
    "orders",
    "order_lines",
    "tickets",
    "employees",
    "roles",
    "payments",
    "refunds",
    "tills",
)

GROUPS: list[ApiRoutes] = [
    session_routes,
    people_routes,
    menu_routes,
    order_routes,
    payment_routes,
    audit_routes,
    kitchen_routes,
]
OPERATIONS = web.AppKey("api_operations", list)
DOCUMENT_PATH = "/api/openapi.json"


def setup_api(
    app: web.Application, store_key: web.AppKey[EdgeStore], extra: Sequence[ApiRoutes] = ()
) -> None:
    """Add the tablet API (and ``extra`` groups) to ``app``, whose store is ``store_key``."""
    ops: list[Operation] = add_routes(app, [*GROUPS, *extra])
    ops += setup_live(app, store_key)  # the live WebSocket and the kitchen page: not JSON
    app[OPERATIONS] = ops
    document = msgspec.json.encode(openapi.build(ops))

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=document, content_type="application/json")

    app.router.add_get(DOCUMENT_PATH, openapi_json, name="openapi")
    app.cleanup_ctx.append(_authenticator_ctx(store_key))


def _authenticator_ctx(
    store_key: web.AppKey[EdgeStore],
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = app[store_key]
        app[STORE] = store
        auth = Authenticator(store)
        app[AUTHENTICATOR] = auth
        if HUB in app:  # started before: revoking a credential closes its live connections
            auth.on_revoked(app[HUB].revoke)
        answered = app[ANSWERED] = AnsweredKeys()
        try:
            async with idempotency.keeping(store, answered):
                yield
        finally:
            auth.close()

    return ctx


__all__: list[Any] = ["LIVE_TABLES", "error_middleware", "setup_api"]
