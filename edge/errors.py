"""Errors of the edge server itself, each with a stable machine-readable code.

Protocol refusals (a bad write, a bad page) are ``sync_protocol.SyncError``; ``EdgeError``s are the
edge's own conditions: a database that belongs to another node, a cloud that knows more of
this node's changes than the node does. ``EDGE_ERRORS`` maps each code to an HTTP status.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from sync_protocol.errors import CodedError, ErrorInfo


class EdgeErrorCode(StrEnum):
    """Every edge-side condition that stops an operation."""

    IDENTITY_MISMATCH = "store_identity_mismatch"
    CLOUD_AHEAD = "cloud_ahead_of_node"
    CHANGES_LOST = "cloud_lost_changes"
    STORE_CLOSED = "store_closed"
    UPLINK_DISABLED = "uplink_disabled"
    STORAGE_FULL = "storage_full"
    STORAGE_BUSY = "storage_busy"
    STORAGE_FAILED = "storage_failed"


EDGE_ERRORS: dict[EdgeErrorCode, ErrorInfo] = {
    EdgeErrorCode.IDENTITY_MISMATCH: ErrorInfo(
        500, "the database file belongs to another site or node"
    ),
    EdgeErrorCode.CLOUD_AHEAD: ErrorInfo(
        500,
        "the cloud has acknowledged sequence numbers this node never wrote "
        "(database restored from an old copy, or a node id reused)",
    ),
    EdgeErrorCode.CHANGES_LOST: ErrorInfo(
        500,
        "the cloud asks for changes this node has already pruned (cloud restored from backup)",
    ),
    EdgeErrorCode.STORE_CLOSED: ErrorInfo(503, "the edge store is closed"),
    EdgeErrorCode.UPLINK_DISABLED: ErrorInfo(503, "no cloud url or token is configured"),
    EdgeErrorCode.STORAGE_FULL: ErrorInfo(
        507, "the edge's disk, or its database size cap (max_db_mb), is full: nothing was saved"
    ),
    EdgeErrorCode.STORAGE_BUSY: ErrorInfo(
        503, "another process holds the edge's database: nothing was saved, try again"
    ),
    EdgeErrorCode.STORAGE_FAILED: ErrorInfo(
        503, "the edge's database could not be written (I/O error, read-only or damaged file)"
    ),
}


#: what a write the database cannot take is refused with (any route that writes can answer these)
STORAGE_CODES = (
    EdgeErrorCode.STORAGE_FULL,
    EdgeErrorCode.STORAGE_BUSY,
    EdgeErrorCode.STORAGE_FAILED,
)


class EdgeError(CodedError):
    """Base of the edge's own errors; carries a stable code and details."""

    table = EDGE_ERRORS
    code: EdgeErrorCode

    def __init__(self, code: EdgeErrorCode, message: str, **details: object) -> None:
        super().__init__(code, message, **details)


class StorageError(EdgeError):
    """The database could not take a write (``STORAGE_CODES``): nothing of it was kept, and
    the same write may succeed later (room freed, the lock released). Not a reason to stop."""


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
    OVERPAYMENT = "overpayment"
    INSUFFICIENT_TENDER = "insufficient_tender"
    INVALID_TIP = "invalid_tip"
    TENDER_UNAVAILABLE = "tender_unavailable"
    REFUND_EXCEEDS_PAYMENT = "refund_exceeds_payment"
    TILL_NOT_OPEN = "till_not_open"
    TILL_ALREADY_OPEN = "till_already_open"
    INSUFFICIENT_CASH = "insufficient_cash"
    BALANCE_DUE = "balance_due"
    PAYMENTS_OFFLINE = "payments_offline"
    PAYMENT_DECLINED = "payment_declined"
    MERCHANT_VALIDATION_FAILED = "merchant_validation_failed"
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
    ApiCode.OVERPAYMENT: ErrorInfo(409, "the payment is more than the balance due"),
    ApiCode.INSUFFICIENT_TENDER: ErrorInfo(409, "the cash handed over does not cover it"),
    ApiCode.INVALID_TIP: ErrorInfo(409, "the site does not take this tip"),
    ApiCode.TENDER_UNAVAILABLE: ErrorInfo(409, "this way of paying is not available here now"),
    ApiCode.REFUND_EXCEEDS_PAYMENT: ErrorInfo(
        409, "the refund is more than what is left of the payment"
    ),
    ApiCode.TILL_NOT_OPEN: ErrorInfo(409, "the till is not open"),
    ApiCode.TILL_ALREADY_OPEN: ErrorInfo(409, "a till of that name is already open"),
    ApiCode.INSUFFICIENT_CASH: ErrorInfo(409, "the till does not hold that much cash"),
    ApiCode.BALANCE_DUE: ErrorInfo(409, "payments do not cover the check exactly"),
    ApiCode.PAYMENTS_OFFLINE: ErrorInfo(
        503, "card and bank payments need the cloud, which is out of reach: take cash"
    ),
    ApiCode.PAYMENT_DECLINED: ErrorInfo(402, "the payment provider refused the payment"),
    ApiCode.MERCHANT_VALIDATION_FAILED: ErrorInfo(
        502, "Apple Pay did not start a merchant session"
    ),
    ApiCode.INTERNAL: ErrorInfo(500, "the edge failed unexpectedly"),
}


class ApiError(CodedError):
    """A refusal of the tablet API, with its stable code and details."""

    table = API_ERRORS
    code: ApiCode

    def __init__(self, code: ApiCode, message: str | None = None, **details: object) -> None:
        super().__init__(code, message or API_ERRORS[code].meaning, **details)
        self.headers: dict[str, str] = {}  # extra response headers, e.g. Retry-After

    def with_headers(self, headers: Mapping[str, str]) -> ApiError:
        """This error, answered with ``headers`` as well."""
        self.headers.update(headers)
        return self


def not_found(kind: str, object_id: str) -> ApiError:
    """The refusal for an unknown id (``kind`` names it in restaurant words)."""
    return ApiError(ApiCode.NOT_FOUND, f"no {kind} {object_id!r}", id=object_id)
