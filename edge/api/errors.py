"""Errors of the tablet API, each with a stable code, and the one place they become responses.

Every error a client can get is ``{"error": {"code", "message", "details"?}}`` with the HTTP
status from its table: ``ApiError`` (this API's own conditions, ``API_ERRORS``), the sync
engine's ``SyncError`` (a write the registry refuses) and the edge's ``EdgeError``. aiohttp's
own 404/405/413 get codes too, and anything unexpected is logged with its traceback and
answered ``500 internal_error`` (never a bare stack trace, never silence).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import msgspec
from aiohttp import web

from sync_protocol.errors import CodedError

from ..errors import API_ERRORS, ApiCode, ApiError, EdgeError

log = logging.getLogger(__name__)


def _body(exc: CodedError) -> bytes:
    return msgspec.json.encode(exc.to_dict())


def error_response(exc: CodedError, headers: dict[str, str] | None = None) -> web.Response:
    """The JSON response for a coded error."""
    return web.Response(
        body=_body(exc), status=exc.status, content_type="application/json", headers=headers
    )


_HTTP_CODES = {
    404: ApiCode.ROUTE_NOT_FOUND,
    405: ApiCode.METHOD_NOT_ALLOWED,
    413: ApiCode.BODY_TOO_LARGE,
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into its status and a JSON body with a stable code."""
    try:
        return await handler(request)
    except CodedError as exc:  # ApiError, SyncError, EdgeError
        return error_response(exc, exc.headers if isinstance(exc, ApiError) else None)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like pass through
        code = _HTTP_CODES.get(exc.status)
        if code is None:
            raise
        return error_response(ApiError(code, exc.reason))
    except (ConnectionResetError, TimeoutError):
        raise  # the client went away: nothing to answer
    except Exception:  # an unexpected failure: logged in full, answered with a code
        log.exception("%s %s failed", request.method, request.path)
        return error_response(ApiError(ApiCode.INTERNAL))


__all__ = ["API_ERRORS", "ApiCode", "ApiError", "EdgeError", "error_middleware", "error_response"]
