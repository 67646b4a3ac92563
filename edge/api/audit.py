"""The audit trail: one hash-chained entry per mutation, written in the mutation's transaction.

Each entry of the synced, add-only ``audit_log`` table says who (employee, and the manager
who approved, if one did), on which device, which API operation, and every synced row it
changed with the values before and after (secrets such as PIN hashes only as
``<redacted>``). Entries are numbered ``position`` 1, 2, … on this
edge, and the row id is ``<node>:<position, zero-padded>`` so the newest entry is one index
step away. ``hash`` is SHA-256 over the previous entry's hash and this entry's canonical JSON
(sorted keys, no spaces), so changing, removing or reordering any entry breaks every hash
after it; ``verify`` walks the chain and names the first entry that does not check out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import msgspec

from shared.audit_chain import GENESIS as GENESIS
from shared.audit_chain import Verdict as Verdict
from shared.audit_chain import entry_hash as entry_hash
from shared.audit_chain import verify as verify
from sync_protocol.changes import Op

from ..tx import Tx

if TYPE_CHECKING:
    from .auth import Principal

#: columns whose values never enter the audit trail (it is add-only: nothing there is erased)
REDACTED = frozenset({"pin_hash"})


def node_range(node_id: str) -> tuple[str, str]:
    """Bounds of this node's entry ids, ``[node:, node;)``: a range the primary key index
    answers directly (a ``LIKE 'node:%'`` scans the table on every mutation)."""
    return f"{node_id}:", f"{node_id};"


def record(tx: Tx, action: str, who: Principal | None, approved_by: str | None) -> None:
    """Append the audit entry for everything ``tx`` changed so far (under ``action``)."""
    changes = [
        {
            "table": c.table,
            "id": c.pk,
            "op": Op(c.op).name.lower(),
            "before": _redacted(c.old),
            "after": _redacted(c.fields) if c.op is not Op.DELETE else None,
        }
        for c in tx.changes
        if c.table != "audit_log"
    ]
    detail: dict[str, Any] = {"changes": changes}
    if approved_by is not None:
        detail["approved_by"] = approved_by
    head = tx.one(
        "SELECT position, hash FROM audit_log WHERE id >= ? AND id < ? ORDER BY id DESC LIMIT 1",
        node_range(tx.node_id),
    )
    position, prev_hash = (int(head[0]) + 1, str(head[1])) if head else (1, GENESIS)
    entry: dict[str, Any] = {
        "position": position,
        "at_ms": tx.now_ms,
        "employee_id": who.employee_id if who else None,
        "device_id": who.device_id if who else None,
        "action": action,
        "detail": msgspec.json.encode(detail, order="sorted").decode(),
    }
    entry["prev_hash"] = prev_hash
    entry["hash"] = entry_hash(prev_hash, entry)
    tx.write("audit_log", f"{tx.node_id}:{position:012d}", Op.INSERT, entry, new=True)


def _redacted(values: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Values with secrets (``REDACTED`` columns) replaced by a marker that they changed."""
    if values is None:
        return None
    return {k: ("<redacted>" if k in REDACTED and v is not None else v) for k, v in values.items()}
