"""Every role against every route that needs a permission: allowed exactly when the role has it.

The table is the app's own operations (``OPERATIONS``) crossed with the default roles
(``shared.roles.DEFAULT_ROLES``). A route checks the permission before it reads the body or
looks anything up, so a refused call is answered 403 whatever the body, and changes nothing;
an allowed one gets past that check (any answer but a permission refusal).

Voids are a second table: voiding something the kitchen already has (a fired line, an order
with a fired line) needs ``order.void_sent`` on top of the route's own ``order.void_line``.
Every role against every such void, with and without a manager's approval: allowed exactly
when the role holds both, or holds ``order.void_line`` and brings an approval, which it
spends.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from edge.api import OPERATIONS
from edge.api.auth import grant_approval
from edge.api.routing import Auth
from shared.roles import APPROVABLE, DEFAULT_ROLES, Permission

from .api_harness import STAFF, Edge, Tablet, running_edge

REFUSED = {"permission_denied", "manager_approval_required"}


def test_every_role_on_every_route_is_allowed_exactly_when_its_role_says_so(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        by_role = {role: employee for employee, role in STAFF.items()}
        for employee in STAFF:
            await edge.login(till, employee)
        ops = [o for o in edge.app[OPERATIONS] if o.permission and o.auth is Auth.EMPLOYEE]
        assert len(ops) >= 20  # the table really covers the API
        assert {"void_line", "void_order"} <= {o.op_id for o in ops}
        checked = 0
        for op in ops:
            path = re.sub(r"\{\w+\}", "x-unknown", op.path)
            for role, (_, permissions) in DEFAULT_ROLES.items():
                before = edge.sql("SELECT count(*) FROM outbox")
                got, answer, _ = await edge.call(
                    op.method, path, till.headers(by_role[role]), json={}
                )
                code = (answer or {}).get("error", {}).get("code")
                allowed = op.permission in permissions
                if allowed:
                    assert code not in REFUSED, (op.op_id, role, got, answer)
                else:
                    expected = (
                        "manager_approval_required"
                        if op.permission in APPROVABLE
                        else "permission_denied"
                    )
                    assert (got, code) == (403, expected), (op.op_id, role, answer)
                    assert edge.sql("SELECT count(*) FROM outbox") == before
                checked += 1
        assert checked == len(ops) * len(DEFAULT_ROLES)

    async def run() -> None:
        async with running_edge(tmp_path) as edge:
            await body(edge)

    asyncio.run(run())


async def _sent_order(edge: Edge, till: Tablet) -> tuple[str, str]:
    """A new order (opened by the manager) with one line fired: (order id, line id)."""
    headers = till.headers("mia")
    got, order, _ = await edge.call(
        "POST", "/v1/orders", headers, json={"table_name": "T1", "covers": 1}
    )
    assert got == 201, order
    got, added, _ = await edge.call(
        "POST", f"/v1/orders/{order['id']}/lines", headers, json={"item_id": "soup"}
    )
    assert got == 201, added
    got, fired, _ = await edge.call("POST", f"/v1/orders/{order['id']}/fire", headers, json={})
    assert got == 200, fired
    return order["id"], added["line_ids"][0]


#: op id -> the path that voids what ``_sent_order`` made
_SENT_VOIDS = {
    "void_line": "/v1/orders/{order}/lines/{line}/void",
    "void_order": "/v1/orders/{order}/void",
}


def test_every_role_voiding_what_was_sent_needs_void_sent_or_an_approval(tmp_path: Path) -> None:
    async def attempt(
        edge: Edge, till: Tablet, path: str, employee: str, approval: str | None
    ) -> tuple[int, Any]:
        order_id, line_id = await _sent_order(edge, till)
        extra = {"X-Fynlo-Approval": approval} if approval else {}
        target = path.format(order=order_id, line=line_id)
        before = edge.sql("SELECT count(*) FROM outbox")
        got, answer, _ = await edge.call(
            "POST", target, till.headers(employee, **extra), json={"reason": "sent back"}
        )
        if got != 200:
            assert edge.sql("SELECT count(*) FROM outbox") == before, (target, answer)
        return got, answer

    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        by_role = {role: employee for employee, role in STAFF.items()}
        for employee in STAFF:
            await edge.login(till, employee)
        declared = {o.op_id: o.permission for o in edge.app[OPERATIONS]}
        assert {declared[op] for op in _SENT_VOIDS} == {Permission.ORDER_VOID_LINE}
        for op_id, path in _SENT_VOIDS.items():
            for role, (_, permissions) in DEFAULT_ROLES.items():
                who = by_role[role]
                may_void = Permission.ORDER_VOID_LINE in permissions
                may_void_sent = may_void and Permission.ORDER_VOID_SENT in permissions
                got, answer = await attempt(edge, till, path, who, None)
                if may_void_sent:
                    assert got == 200, (op_id, role, answer)
                else:
                    expected = "manager_approval_required" if may_void else "permission_denied"
                    assert (got, answer["error"]["code"]) == (403, expected), (op_id, role)
                # With the manager's approval: it is spent exactly when it was needed.
                _, approval, _ = await edge.store.transaction(
                    lambda tx: grant_approval(tx, "mia", till.device_id)
                )
                spent = edge.sql("SELECT count(*) FROM approvals WHERE used_at_ms IS NOT NULL")
                got, answer = await attempt(edge, till, path, who, approval)
                now_spent = edge.sql("SELECT count(*) FROM approvals WHERE used_at_ms IS NOT NULL")
                if may_void:
                    assert got == 200, (op_id, role, answer)
                    assert (now_spent[0][0] - spent[0][0]) == (0 if may_void_sent else 1)
                else:
                    assert (got, answer["error"]["code"]) == (403, "permission_denied")
                    assert now_spent == spent

    async def run() -> None:
        async with running_edge(tmp_path) as edge:
            await body(edge)

    asyncio.run(run())
