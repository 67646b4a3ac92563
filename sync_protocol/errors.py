"""Errors of the sync protocol, each with a stable machine-readable code.

Codes are part of the wire contract: an edge or a dashboard branches on ``code``,
never on the message. ``ERRORS`` is the one table that code, tests and docs read.
``RemoteProtocolError`` means the peer sent something we refuse; ``LocalProtocolError``
means this side was asked to do something the protocol forbids.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar


class ErrorCode(StrEnum):
    """Every way a batch, a page or a request can be refused."""

    MALFORMED = "malformed_batch"
    UNSUPPORTED_VERSION = "unsupported_version"
    UNSUPPORTED_CODEC = "unsupported_codec"
    HASH_MISMATCH = "hash_mismatch"
    BATCH_TOO_LARGE = "batch_too_large"
    UNKNOWN_TABLE = "unknown_table"
    UNKNOWN_FIELD = "unknown_field"
    INVALID_CHANGE = "invalid_change"
    NOT_AUTHOR = "table_not_authored_here"
    ADD_ONLY = "add_only_table"
    SITE_MISMATCH = "site_mismatch"
    UNAUTHORIZED = "unauthorized"
    SEQUENCE_GAP = "sequence_gap"
    INVALID_CURSOR = "invalid_cursor"
    WRONG_KIND = "wrong_frame_kind"
    SESSION_STATE = "session_state"
    CONFLICT_NOT_FOUND = "conflict_not_found"
    CONFLICT_RESOLVED = "conflict_already_resolved"
    INVALID_RESOLUTION = "invalid_resolution"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The HTTP status a code maps to and what it means."""

    status: int
    meaning: str


ERRORS: dict[ErrorCode, ErrorInfo] = {
    ErrorCode.MALFORMED: ErrorInfo(400, "the body is not a well-formed sync frame"),
    ErrorCode.UNSUPPORTED_VERSION: ErrorInfo(400, "the frame's protocol version is not spoken"),
    ErrorCode.UNSUPPORTED_CODEC: ErrorInfo(400, "the frame's compression codec is unknown"),
    ErrorCode.HASH_MISMATCH: ErrorInfo(400, "the body does not match its content hash"),
    ErrorCode.BATCH_TOO_LARGE: ErrorInfo(413, "the frame exceeds a size or count bound"),
    ErrorCode.UNKNOWN_TABLE: ErrorInfo(422, "a change names a table that is not synced"),
    ErrorCode.UNKNOWN_FIELD: ErrorInfo(422, "a change names a column the table does not have"),
    ErrorCode.INVALID_CHANGE: ErrorInfo(422, "a change record is not valid"),
    ErrorCode.NOT_AUTHOR: ErrorInfo(403, "this side may not write that table"),
    ErrorCode.ADD_ONLY: ErrorInfo(422, "the table is add-only: rows are voided, never edited"),
    ErrorCode.SITE_MISMATCH: ErrorInfo(403, "the credential belongs to another site or node"),
    ErrorCode.UNAUTHORIZED: ErrorInfo(401, "missing or unknown device credential"),
    ErrorCode.SEQUENCE_GAP: ErrorInfo(409, "the batch skips change sequence numbers"),
    ErrorCode.INVALID_CURSOR: ErrorInfo(400, "the pull cursor is not valid"),
    ErrorCode.WRONG_KIND: ErrorInfo(400, "a push frame was expected and another kind came"),
    ErrorCode.SESSION_STATE: ErrorInfo(500, "the sync session was driven out of order"),
    ErrorCode.CONFLICT_NOT_FOUND: ErrorInfo(404, "no such parked conflict for this site"),
    ErrorCode.CONFLICT_RESOLVED: ErrorInfo(409, "the conflict was already resolved"),
    ErrorCode.INVALID_RESOLUTION: ErrorInfo(422, "the resolution is not valid for the conflict"),
}


class CodedError(Exception):
    """An error with a stable code, a message and details; ``table`` maps codes to HTTP.

    The base that each package's own error class extends (``SyncError`` here, the cloud's
    and the edge's errors there), so codes are carried and rendered the same way everywhere.
    """

    table: ClassVar[Mapping[Any, ErrorInfo]] = {}

    def __init__(self, code: Any, message: str, **details: object) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = details

    @property
    def status(self) -> int:
        """The HTTP status this error maps to."""
        return self.table[self.code].status

    def to_dict(self) -> dict[str, object]:
        """The error as a wire/JSON object: ``{"error": {"code", "message", ...}}``."""
        body: dict[str, object] = {"code": str(self.code), "message": self.message}
        if self.details:
            body["details"] = dict(self.details)
        return {"error": body}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!s}: {self.message})"


class SyncError(CodedError):
    """Base of every sync protocol error; carries a stable code and details."""

    table = ERRORS
    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str, **details: object) -> None:
        super().__init__(code, message, **details)


class RemoteProtocolError(SyncError):
    """The peer sent input this side refuses."""


class LocalProtocolError(SyncError):
    """This side was asked to do something the protocol forbids."""
