"""The cloud's own errors (stable codes) and the one middleware that maps every error to HTTP.

Sync refusals are ``sync_protocol.SyncError``; ``CloudError`` covers the cloud's own API
(unknown sites, bad owner requests). ``CLOUD_ERRORS`` is the table of those codes and
statuses. Device endpoints (``/v1/sync/``) answer errors in msgpack, the others in JSON,
both shaped ``{"error": {"code", "message", "details"?}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from enum import StrEnum

import asyncpg
from aiohttp import web
from aiohttp.typedefs import Handler

from sync_protocol import wire
from sync_protocol.errors import CodedError, ErrorCode, ErrorInfo, SyncError

log = logging.getLogger(__name__)


class CloudCode(StrEnum):
    """Every way the cloud's own API refuses a request."""

    BAD_REQUEST = "bad_request"
    SITE_NOT_FOUND = "site_not_found"
    SITE_EXISTS = "site_exists"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HTTP_ERROR = "http_error"
    UNAVAILABLE = "unavailable"
    PROVIDER_NOT_CONFIGURED = "provider_not_configured"
    PROVIDER_UNAVAILABLE = "provider_unavailable"
    PAYMENT_REFUSED = "payment_refused"
    PAYMENT_NOT_SYNCED = "payment_not_synced"
    UNKNOWN_PAYMENT = "unknown_payment"
    INVALID_SIGNATURE = "invalid_signature"
    INTERNAL = "internal_error"


CLOUD_ERRORS: dict[CloudCode, ErrorInfo] = {
    CloudCode.BAD_REQUEST: ErrorInfo(400, "the request body or parameters are not valid"),
    CloudCode.SITE_NOT_FOUND: ErrorInfo(404, "no such site"),
    CloudCode.SITE_EXISTS: ErrorInfo(409, "a site with that id already exists"),
    CloudCode.NOT_FOUND: ErrorInfo(404, "no such endpoint"),
    CloudCode.METHOD_NOT_ALLOWED: ErrorInfo(405, "the endpoint does not take that method"),
    CloudCode.HTTP_ERROR: ErrorInfo(400, "the HTTP request was refused"),
    CloudCode.UNAVAILABLE: ErrorInfo(503, "the database is unreachable or busy; retry later"),
    CloudCode.PROVIDER_NOT_CONFIGURED: ErrorInfo(409, "no payment provider takes that tender"),
    CloudCode.PROVIDER_UNAVAILABLE: ErrorInfo(
        503, "the payment provider cannot be reached now; retry later"
    ),
    CloudCode.PAYMENT_REFUSED: ErrorInfo(402, "the payment provider refused the payment"),
    CloudCode.PAYMENT_NOT_SYNCED: ErrorInfo(
        409, "the payment attempt has not been pushed to the cloud yet"
    ),
    CloudCode.UNKNOWN_PAYMENT: ErrorInfo(404, "the provider has no such payment"),
    CloudCode.INVALID_SIGNATURE: ErrorInfo(400, "the webhook's signature does not verify"),
    CloudCode.INTERNAL: ErrorInfo(500, "the cloud failed unexpectedly"),
}


class CloudError(CodedError):
    """A refusal by the cloud's own API; carries a stable code and details."""

    table = CLOUD_ERRORS
    code: CloudCode

    def __init__(self, code: CloudCode, message: str, **details: object) -> None:
        super().__init__(code, message, **details)


# -- turning errors into HTTP responses (the one place that does it) ------------------------

SYNC_CONTENT_TYPE = "application/x-fynlo-sync"

#: aiohttp's own refusals, by status, as stable codes
_HTTP_CODES: dict[int, str] = {
    404: CloudCode.NOT_FOUND.value,
    405: CloudCode.METHOD_NOT_ALLOWED.value,
    413: ErrorCode.BATCH_TOO_LARGE.value,
}

#: store failures a client should simply retry later (503): nothing of the request was kept
UNAVAILABLE = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # a pooled session the server ended while it sat idle (an operator, a failover) can fail
    # its next statement with this instead of a connection error; the pool then drops it
    asyncpg.InternalClientError,
    asyncpg.OperatorInterventionError,  # shutting down, restarting, cannot connect now
    asyncpg.InsufficientResourcesError,  # disk full, out of memory, too many connections
    asyncpg.ReadOnlySQLTransactionError,  # a standby after a failover, or set read-only
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
)


def error_response(
    request: web.Request, status: int, code: str, message: str, details: Mapping[str, object]
) -> web.Response:
    """An error body: msgpack on the device endpoints, JSON on the others."""
    if request.path.startswith("/v1/sync/"):
        return web.Response(
            status=status,
            body=wire.encode_error(code, message, details),
            content_type=SYNC_CONTENT_TYPE,
        )
    error: dict[str, object] = {"code": code, "message": message}
    if details:
        error["details"] = dict(details)
    return web.json_response({"error": error}, status=status)


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Map every refusal to its status and stable code."""
    try:
        return await handler(request)
    except SyncError as exc:
        return error_response(request, exc.status, str(exc.code), exc.message, exc.details)
    except CloudError as exc:
        return error_response(request, exc.status, str(exc.code), exc.message, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, CloudCode.HTTP_ERROR.value)
        return error_response(request, exc.status, code, exc.reason, {})
    except UNAVAILABLE as exc:
        if _client_gone(request):  # the caller hung up mid-body: no store fault, no answer
            log.debug("%s %s: the caller hung up (%r)", request.method, request.path, exc)
            # never delivered; the access log shows 499 ("client closed request"), as nginx's
            return web.Response(status=499, reason="Client Closed Request")
        log.warning("store unavailable on %s %s: %r", request.method, request.path, exc)
        return error_response(
            request, 503, CloudCode.UNAVAILABLE.value, "the store is unavailable; retry", {}
        )
    except Exception:  # unexpected: logged in full, answered in the endpoint's own format
        log.exception("%s %s failed", request.method, request.path)
        info = CLOUD_ERRORS[CloudCode.INTERNAL]
        return error_response(request, info.status, CloudCode.INTERNAL.value, info.meaning, {})
