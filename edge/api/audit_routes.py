"""The audit trail for managers: read it and check its hash chain."""

from __future__ import annotations

import json
from typing import Any

import msgspec

from shared.roles import Permission

from . import audit
from .routing import ApiRoutes, Ctx

routes = ApiRoutes("audit")


class AuditQuery(msgspec.Struct, frozen=True):
    """Which entries: after a position, at most ``limit``."""

    after: int = 0
    limit: int = msgspec.field(default=100)

    def __post_init__(self) -> None:
        if self.after < 0 or not 1 <= self.limit <= 1000:
            raise ValueError("after must be >= 0 and limit between 1 and 1000")


class AuditEntry(msgspec.Struct, frozen=True):
    """One mutation: who, on which device, what, before and after."""

    position: int
    at_ms: int
    employee_id: str | None
    device_id: str | None
    action: str
    detail: dict[str, Any]
    prev_hash: str
    hash: str


class AuditPage(msgspec.Struct, frozen=True):
    """Entries in chain order."""

    entries: list[AuditEntry]


class ChainCheck(msgspec.Struct, frozen=True):
    """Whether the chain is intact, and where it first breaks if not."""

    ok: bool
    entries: int
    first_bad_position: int | None
    reason: str | None


_COLUMNS = "position, at_ms, employee_id, device_id, action, detail, prev_hash, hash"


@routes.route(
    "GET",
    "/v1/audit",
    summary="Audit entries of this edge, oldest first",
    query=AuditQuery,
    response=AuditPage,
    permission=Permission.AUDIT_VIEW,
)
async def list_audit(ctx: Ctx) -> AuditPage:
    """A page of the audit trail."""
    q: AuditQuery = ctx.query
    rows = await ctx.store.query(
        f"SELECT {_COLUMNS} FROM audit_log WHERE position > ? ORDER BY position LIMIT ?",
        (q.after, q.limit),
    )
    return AuditPage(
        [AuditEntry(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]
    )


@routes.route(
    "GET",
    "/v1/audit/verify",
    summary="Check the audit trail's hash chain",
    response=ChainCheck,
    permission=Permission.AUDIT_VIEW,
)
async def verify_audit(ctx: Ctx) -> ChainCheck:
    """Walk the whole chain and say whether every entry checks out.

    The chain grows by one entry per mutation, for ever: it is read a page at a time and
    checked off the event loop (``EdgeStore.scan``), so a manager's check on a busy night
    neither holds a year of entries in memory nor stops the tablets for its length."""
    names = _COLUMNS.split(", ")
    verdict = await ctx.store.scan(
        f"SELECT {_COLUMNS} FROM audit_log WHERE id >= ? AND id < ? ORDER BY id",
        audit.node_range(ctx.store.node_id),
        lambda rows: audit.verify(dict(zip(names, row, strict=True)) for row in rows),
    )
    return ChainCheck(verdict.ok, verdict.entries, verdict.first_bad_position, verdict.reason)
