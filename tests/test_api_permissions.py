"""Every role against every route that needs a permission: allowed exactly when the role has it.

The table is the app's own operations (``OPERATIONS``) crossed with the default roles
(``shared.roles.DEFAULT_ROLES``). A route checks the permission before it reads the body or
looks anything up, so a refused call is answered 403 whatever the body, and changes nothing;
an allowed one gets past that check (any answer but a permission refusal).
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from edge.api import OPERATIONS
from edge.api.routing import Auth
from shared.roles import APPROVABLE, DEFAULT_ROLES

from .api_harness import STAFF, Edge, running_edge

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
