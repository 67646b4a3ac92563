"""Who is calling: device bearer tokens on the sync endpoints, the owner token elsewhere.

Paths under ``/v1/sync/`` need a device credential (``<node_id>.<secret>``); the handler
then finds the caller's site and node in ``request[SITE_ID]`` and ``request[NODE_ID]``
and never takes a site from the request itself (the tenancy invariant). Other ``/v1/``
paths need the owner token. Anything else (``/healthz``) is open.
"""

from __future__ import annotations

import hmac

from aiohttp import web
from aiohttp.typedefs import Handler

from sync_protocol.errors import ErrorCode, RemoteProtocolError

from .store import CloudStore

SYNC_PREFIX = "/v1/sync/"
OWNER_PREFIX = "/v1/"

SITE_ID = web.RequestKey("site_id", str)
NODE_ID = web.RequestKey("node_id", str)
STORE = web.AppKey("store", CloudStore)
OWNER_TOKEN = web.AppKey("owner_token", str)


def bearer(request: web.Request) -> str:
    """The bearer token of a request, or UNAUTHORIZED."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise RemoteProtocolError(ErrorCode.UNAUTHORIZED, "a bearer credential is required")
    return token.strip()


def is_sync_path(path: str) -> bool:
    """Whether a path is a device (msgpack) endpoint."""
    return path.startswith(SYNC_PREFIX)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Check the caller's credential for the path before the handler runs."""
    path = request.path
    if is_sync_path(path):
        site_id, node_id = await request.app[STORE].authenticate(bearer(request))
        request[SITE_ID] = site_id
        request[NODE_ID] = node_id
    elif path.startswith(OWNER_PREFIX):
        given = bearer(request).encode()
        if not hmac.compare_digest(given, request.app[OWNER_TOKEN].encode()):
            raise RemoteProtocolError(ErrorCode.UNAUTHORIZED, "unknown owner token")
    return await handler(request)


def setup_auth(app: web.Application) -> None:
    """Install the credential check (after the error middleware: see ``app.setup_middlewares``)."""
    app.middlewares.append(auth_middleware)
