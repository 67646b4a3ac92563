"""Errors of the edge server itself, each with a stable machine-readable code.

Protocol refusals (a bad write, a bad page) are ``sync_protocol.SyncError``; these are the
edge's own conditions: a database that belongs to another node, a cloud that knows more of
this node's changes than the node does. ``EDGE_ERRORS`` maps each code to an HTTP status.
"""

from __future__ import annotations

from enum import StrEnum

from sync_protocol.errors import CodedError, ErrorInfo


class EdgeErrorCode(StrEnum):
    """Every edge-side condition that stops an operation."""

    IDENTITY_MISMATCH = "store_identity_mismatch"
    CLOUD_AHEAD = "cloud_ahead_of_node"
    CHANGES_LOST = "cloud_lost_changes"
    STORE_CLOSED = "store_closed"
    UPLINK_DISABLED = "uplink_disabled"


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
}


class EdgeError(CodedError):
    """Base of the edge's own errors; carries a stable code and details."""

    table = EDGE_ERRORS
    code: EdgeErrorCode

    def __init__(self, code: EdgeErrorCode, message: str, **details: object) -> None:
        super().__init__(code, message, **details)
