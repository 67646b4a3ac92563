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
from enum import StrEnum

import msgspec
from aiohttp import web

from sync_protocol.errors import CodedError, ErrorInfo

from ..errors import EdgeError

log = logging.getLogger(__name__)


class ApiCode(StrEnum):
    """Every way the tablet API refuses a request."""

    MALFORMED_JSON = "malformed_json"
    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    BODY_TOO_LARGE = "body_too_large"
    ROUTE_NOT_FOUND = "route_not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    NOT_FOUND = "not_found"
    DEVICE_NOT_PAIRED = "device_not_paired"
    NOT_LOGGED_IN = "not_logged_in"
    TOKEN_EXPIRED = "token_expired"
    WRONG_DEVICE = "wrong_device"
    PERMISSION_DENIED = "permission_denied"
    APPROVAL_REQUIRED = "manager_approval_required"
    APPROVAL_INVALID = "approval_invalid"
    WRONG_PIN = "wrong_pin"
    LOCKED_OUT = "employee_locked_out"
    TOO_MANY_ATTEMPTS = "too_many_attempts"
    PAIRING_CODE_INVALID = "pairing_code_invalid"
    CONFLICT = "conflict"
    STALE_VERSION = "stale_version"
    INVALID_TRANSITION = "invalid_transition"
    ITEM_UNAVAILABLE = "item_unavailable"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    INTERNAL = "internal_error"


API_ERRORS: dict[ApiCode, ErrorInfo] = {
    ApiCode.MALFORMED_JSON: ErrorInfo(400, "the body is not valid JSON"),
    ApiCode.INVALID_REQUEST: ErrorInfo(422, "the request does not match its schema"),
    ApiCode.UNSUPPORTED_MEDIA_TYPE: ErrorInfo(415, "the body must be application/json"),
    ApiCode.BODY_TOO_LARGE: ErrorInfo(413, "the body is larger than the edge accepts"),
    ApiCode.ROUTE_NOT_FOUND: ErrorInfo(404, "no such route"),
    ApiCode.METHOD_NOT_ALLOWED: ErrorInfo(405, "the route does not take this method"),
    ApiCode.NOT_FOUND: ErrorInfo(404, "no such object"),
    ApiCode.DEVICE_NOT_PAIRED: ErrorInfo(401, "the device is not paired (or was revoked)"),
    ApiCode.NOT_LOGGED_IN: ErrorInfo(401, "no valid employee session"),
    ApiCode.TOKEN_EXPIRED: ErrorInfo(401, "the session token has expired: refresh it"),
    ApiCode.WRONG_DEVICE: ErrorInfo(403, "the session belongs to another device"),
    ApiCode.PERMISSION_DENIED: ErrorInfo(403, "the employee's role does not allow this"),
    ApiCode.APPROVAL_REQUIRED: ErrorInfo(403, "this needs a manager's approval"),
    ApiCode.APPROVAL_INVALID: ErrorInfo(403, "the approval is unknown, used or expired"),
    ApiCode.WRONG_PIN: ErrorInfo(401, "wrong employee or PIN"),
    ApiCode.LOCKED_OUT: ErrorInfo(423, "too many wrong PINs: the employee is locked out"),
    ApiCode.TOO_MANY_ATTEMPTS: ErrorInfo(429, "too many wrong PINs from this device"),
    ApiCode.PAIRING_CODE_INVALID: ErrorInfo(401, "the pairing code is unknown or expired"),
    ApiCode.CONFLICT: ErrorInfo(409, "the request conflicts with the current state"),
    ApiCode.STALE_VERSION: ErrorInfo(409, "the object changed since it was read"),
    ApiCode.INVALID_TRANSITION: ErrorInfo(409, "the object cannot move to that state"),
    ApiCode.ITEM_UNAVAILABLE: ErrorInfo(409, "the item is 86'd"),
    ApiCode.IDEMPOTENCY_KEY_REUSED: ErrorInfo(
        422, "the idempotency key was used for another request"
    ),
    ApiCode.INTERNAL: ErrorInfo(500, "the edge failed unexpectedly"),
}


class ApiError(CodedError):
    """A refusal of the tablet API, with its stable code and details."""

    table = API_ERRORS
    code: ApiCode

    def __init__(self, code: ApiCode, message: str | None = None, **details: object) -> None:
        super().__init__(code, message or API_ERRORS[code].meaning, **details)


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
        return error_response(exc)
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
