"""Who am I: the caller's device and employee, as the edge sees them."""

from __future__ import annotations

import msgspec

from .routing import ApiRoutes, Auth, Ctx

routes = ApiRoutes("session")


class WhoAmI(msgspec.Struct, frozen=True):
    """The calling device and, when logged in, the employee and what they may do."""

    device_id: str
    device_name: str
    device_kind: str
    employee_id: str | None
    role_id: str | None
    permissions: list[str]


@routes.route("GET", "/v1/me", summary="The calling device and employee", response=WhoAmI)
async def whoami(ctx: Ctx) -> WhoAmI:
    """The caller's identity and permissions."""
    p = ctx.principal
    assert p is not None  # EMPLOYEE routes always have one
    return WhoAmI(
        p.device_id,
        p.device_name,
        p.device_kind,
        p.employee_id,
        p.role_id,
        sorted(str(x) for x in p.permissions),
    )


@routes.route("GET", "/v1/device", summary="The calling device", response=WhoAmI, auth=Auth.DEVICE)
async def device(ctx: Ctx) -> WhoAmI:
    """The paired device presenting the credential."""
    p = ctx.principal
    assert p is not None
    return WhoAmI(p.device_id, p.device_name, p.device_kind, None, None, [])
