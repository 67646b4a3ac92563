"""Devices and people: pairing, PIN logins, manager approvals, staff, roles and lockouts.

How it works (the rules live in ``people``, the credentials in ``auth``):

* a manager (``device.manage``) makes a pairing code; a new device trades it, once, for its
  credential (a public route, limited per address); revoking a device ends its sessions and
  takes effect at once;
* a paired device logs an employee in with a PIN: the attempt is counted as wrong, in one
  transaction with the limit checks, before the PIN is checked off the event loop, and given
  back when it was right; a refresh rotates both tokens; a manager's PIN on someone else's
  session grants a one-time approval (``X-Fynlo-Approval``, spent by ``routing``);
* routes that hand out a credential are not idempotent (``idempotent=False``): the edge keeps
  credentials only as hashes, so it has no answer to replay, and a retry runs again;
* staff (``staff.manage``) edit employees and roles. Nobody grants (or edits someone who
  holds) a permission they do not hold themselves, and the owner role keeps every permission,
  so the edge can always be managed. Role edits apply at once (``auth`` drops its cache).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

from shared.roles import DEFAULT_ROLES, Permission
from sync_protocol.changes import Op, Value

from ..tx import Tx
from . import people
from .auth import (
    AUTHENTICATOR,
    REFRESH_TTL_MS,
    Authenticator,
    Tokens,
    end_session,
    end_sessions_of,
    grant_approval,
    new_id,
    pair_device,
    permissions_json,
    revoke_device,
    role_permissions,
    rotate_session,
    start_session,
)
from .errors import ApiCode, ApiError
from .routing import ApiRoutes, Auth, Ctx

routes = ApiRoutes("people")

DeviceKind = Literal["tablet", "kds", "handheld"]
Pin = Annotated[str, msgspec.Meta(pattern=people.PIN_PATTERN, description="4 to 8 digits")]
Id = Annotated[str, msgspec.Meta(pattern=people.ID_PATTERN)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=80)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_ID = re.compile(people.ID_PATTERN)
_PIN_ERRORS = (ApiCode.WRONG_PIN, ApiCode.LOCKED_OUT, ApiCode.TOO_MANY_ATTEMPTS)


def _auth(ctx: Ctx) -> Authenticator:
    return ctx.request.app[AUTHENTICATOR]


def _device_id(ctx: Ctx) -> str:
    device_id = ctx.device_id
    assert device_id is not None  # DEVICE and EMPLOYEE routes always have one
    return device_id


# -- pairing and devices -------------------------------------------------------------------


class NewPairingCode(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What kind of device the code will pair."""

    kind: DeviceKind = "tablet"


class PairingCode(msgspec.Struct, frozen=True):
    """A single-use code to type on the new device (shown once; dashes and case ignored)."""

    code: str
    kind: str
    expires_ms: int


class PairRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A new device asks to be paired with the code a manager made."""

    code: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    name: Name
    kind: DeviceKind


class PairedDevice(msgspec.Struct, frozen=True):
    """The device's id and its credential (send it as X-Fynlo-Device; shown only once)."""

    device_id: str
    name: str
    kind: str
    device_token: str


class DeviceInfo(msgspec.Struct, frozen=True):
    """A device paired with this edge, and who is logged in on it."""

    device_id: str
    name: str
    kind: str
    paired_at_ms: int
    paired_by: str | None
    revoked_at_ms: int | None
    logged_in: list[str]


class DeviceList(msgspec.Struct, frozen=True):
    """Every device ever paired, oldest first."""

    devices: list[DeviceInfo]


@routes.route(
    "POST",
    "/v1/pairing-codes",
    summary="Make a single-use pairing code (10 minutes) for a new device",
    body=NewPairingCode,
    response=PairingCode,
    status=201,
    permission=Permission.DEVICE_MANAGE,
    idempotent=False,
)
async def create_pairing_code(ctx: Ctx, body: NewPairingCode) -> PairingCode:
    """A new pairing code, stored hashed."""

    def create(tx: Tx) -> PairingCode:
        code, expires = people.create_pairing_code(tx, body.kind, ctx.employee_id)
        return PairingCode(code, body.kind, expires)

    return await ctx.mutate(create)


@routes.route(
    "POST",
    "/v1/devices/pair",
    summary="Pair a new device with a manager's code; returns its credential once",
    body=PairRequest,
    response=PairedDevice,
    status=201,
    auth=Auth.PUBLIC,
    errors=(ApiCode.PAIRING_CODE_INVALID, ApiCode.TOO_MANY_ATTEMPTS),
    idempotent=False,
)
async def pair(ctx: Ctx, body: PairRequest) -> PairedDevice:
    """Trade a live pairing code for a device credential."""
    address = ctx.request.remote or "unknown"
    attempt = await ctx.store.transaction(lambda tx: people.begin_pairing(tx, address))

    def redeem(tx: Tx) -> PairedDevice:
        created_by = people.redeem_pairing_code(tx, body.code, body.kind, attempt)
        device_id, token = pair_device(tx, body.name, body.kind, created_by)
        return PairedDevice(device_id, body.name, body.kind, token)

    return await ctx.mutate(redeem)


def _devices(rows: list[Any], sessions: list[Any]) -> list[DeviceInfo]:
    logged_in: dict[str, set[str]] = {}
    for device_id, employee_id in sessions:
        logged_in.setdefault(device_id, set()).add(employee_id)
    out = []
    for device_id, name, kind, paired_at, paired_by, revoked_at in rows:
        who = sorted(logged_in.get(device_id, ()))
        out.append(DeviceInfo(device_id, name, kind, paired_at, paired_by, revoked_at, who))
    return out


_DEVICE_COLUMNS = "id, name, kind, paired_at_ms, paired_by, revoked_at_ms"
_LIVE_SESSIONS = (
    "SELECT device_id, employee_id FROM sessions"
    " WHERE revoked_at_ms IS NULL AND refresh_expires_ms > ?"
)


@routes.route(
    "GET",
    "/v1/devices",
    summary="The devices paired with this edge, and who is logged in on each",
    response=DeviceList,
    permission=Permission.DEVICE_MANAGE,
)
async def list_devices(ctx: Ctx) -> DeviceList:
    """Every paired (or revoked) device."""
    store = ctx.store
    rows = await store.query(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY paired_at_ms, id")
    sessions = await store.query(_LIVE_SESSIONS, (store.clock.now_ms(),))
    return DeviceList(_devices(rows, sessions))


@routes.route(
    "POST",
    "/v1/devices/{device_id}/revoke",
    summary="Unpair a device: its credential and its sessions stop working at once",
    response=DeviceInfo,
    permission=Permission.DEVICE_MANAGE,
    errors=(ApiCode.NOT_FOUND,),
)
async def revoke(ctx: Ctx) -> DeviceInfo:
    """Revoke a device (again: no change)."""
    device_id = ctx.params["device_id"]

    def change(tx: Tx) -> DeviceInfo:
        revoke_device(tx, device_id)
        rows = tx.query(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE id = ?", (device_id,))
        if not rows:
            raise ApiError(ApiCode.NOT_FOUND, f"no device {device_id!r}", device_id=device_id)
        return _devices(rows, [])[0]

    answer = await ctx.mutate(change)
    _auth(ctx).forget_device(device_id)
    return answer


# -- sessions and approvals ----------------------------------------------------------------


class Login(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An employee logs in on this device with their PIN."""

    employee_id: Id
    pin: Pin


class SessionTokens(msgspec.Struct, frozen=True):
    """A session: send ``access_token`` as 'Authorization: Bearer'; refresh before it expires."""

    session_id: str
    employee_id: str
    role_id: str | None
    permissions: list[str]
    access_token: str
    refresh_token: str
    expires_ms: int
    refresh_expires_ms: int


class Refresh(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The session's current refresh token."""

    refresh_token: Token


class LoggedOut(msgspec.Struct, frozen=True):
    """The session that ended."""

    session_id: str


class ApprovalRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A manager approves one action on this device with their PIN."""

    manager_id: Id
    pin: Pin


class Approval(msgspec.Struct, frozen=True):
    """Send ``approval_token`` as X-Fynlo-Approval with the action, once, before it expires."""

    approval_id: str
    approval_token: str
    manager_id: str
    device_id: str
    expires_ms: int


async def _check_pin(ctx: Ctx, employee_id: str, pin: str) -> people.PinAttempt:
    """Count the attempt, check the PIN off the loop; raises the answer to a wrong one."""
    device_id = _device_id(ctx)
    attempt = await ctx.store.transaction(
        lambda tx: people.begin_pin_attempt(tx, device_id, employee_id)
    )
    if not await people.check_pin(attempt.pin_hash, pin):
        raise people.wrong_pin(attempt)
    return attempt


async def _session(ctx: Ctx, tokens: Tokens) -> SessionTokens:
    role = await _auth(ctx).role_of(tokens.employee_id)
    role_id, granted = role if role is not None else (None, frozenset[Permission]())
    return SessionTokens(
        tokens.session_id,
        tokens.employee_id,
        role_id,
        sorted(str(p) for p in granted),
        tokens.access,
        tokens.refresh,
        tokens.expires_ms,
        tokens.refresh_expires_ms,
    )


@routes.route(
    "POST",
    "/v1/sessions",
    summary="Log an employee in on this device with their PIN",
    body=Login,
    response=SessionTokens,
    status=201,
    auth=Auth.DEVICE,
    errors=_PIN_ERRORS,
    idempotent=False,
)
async def login(ctx: Ctx, body: Login) -> SessionTokens:
    """Check the PIN (with its limits) and start a session."""
    device_id, employee_id = _device_id(ctx), body.employee_id
    attempt = await _check_pin(ctx, employee_id, body.pin)

    def start(tx: Tx) -> Tokens:
        people.pin_was_right(tx, attempt)
        session_id, access, refresh, expires = start_session(tx, employee_id, device_id)
        return Tokens(session_id, employee_id, access, refresh, expires, tx.now_ms + REFRESH_TTL_MS)

    assert ctx.principal is not None
    ctx.principal = dataclasses.replace(ctx.principal, employee_id=employee_id)  # for the audit
    return await _session(ctx, await ctx.mutate(start))


@routes.route(
    "POST",
    "/v1/sessions/refresh",
    summary="Swap the refresh token for new tokens (the old ones stop working)",
    body=Refresh,
    response=SessionTokens,
    auth=Auth.DEVICE,
    errors=(ApiCode.NOT_LOGGED_IN,),
    idempotent=False,
)
async def refresh(ctx: Ctx, body: Refresh) -> SessionTokens:
    """Rotate a session's tokens."""
    device_id = _device_id(ctx)

    def rotate(tx: Tx) -> Tokens:
        tokens = rotate_session(tx, body.refresh_token, device_id)
        employee = tx.get("employees", tokens.employee_id) if tokens is not None else None
        if tokens is None or employee is None or not employee.get("active", True):
            raise ApiError(
                ApiCode.NOT_LOGGED_IN, "unknown, used, ended or expired refresh token: log in"
            )
        return tokens

    tokens = await ctx.mutate(rotate)
    _auth(ctx).forget_session(tokens.session_id)
    return await _session(ctx, tokens)


@routes.route(
    "POST",
    "/v1/sessions/logout",
    summary="End the calling session",
    response=LoggedOut,
)
async def logout(ctx: Ctx) -> LoggedOut:
    """Log the employee out of this device."""
    assert ctx.principal is not None and ctx.principal.session_id is not None
    session_id = ctx.principal.session_id
    await ctx.mutate(lambda tx: end_session(tx, session_id))
    _auth(ctx).forget_session(session_id)
    return LoggedOut(session_id)


@routes.route(
    "POST",
    "/v1/approvals",
    summary="A manager's PIN approves one action on this device (void after send, discount)",
    body=ApprovalRequest,
    response=Approval,
    status=201,
    errors=_PIN_ERRORS,
    idempotent=False,
)
async def approve(ctx: Ctx, body: ApprovalRequest) -> Approval:
    """Check the manager's PIN and that they may approve; grant a one-time approval."""
    device_id, manager_id = _device_id(ctx), body.manager_id
    attempt = await _check_pin(ctx, manager_id, body.pin)
    role = await _auth(ctx).role_of(manager_id)
    if role is None or Permission.APPROVE not in role[1]:
        await ctx.store.transaction(lambda tx: people.pin_was_right(tx, attempt))
        raise ApiError(
            ApiCode.PERMISSION_DENIED,
            f"{manager_id!r} may not approve",
            permission=str(Permission.APPROVE),
        )

    def grant(tx: Tx) -> Approval:
        people.pin_was_right(tx, attempt)
        approval_id, token, expires = grant_approval(tx, manager_id, device_id)
        return Approval(approval_id, token, manager_id, device_id, expires)

    return await ctx.mutate(grant)


# -- staff and roles -----------------------------------------------------------------------


class Employee(msgspec.Struct, frozen=True):
    """An employee (never their PIN or its hash)."""

    employee_id: str
    name: str
    role_id: str | None
    active: bool
    has_pin: bool


class EmployeeList(msgspec.Struct, frozen=True):
    """Every employee, by id."""

    employees: list[Employee]


class NewEmployee(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """A new employee (the id is made up when not given)."""

    employee_id: Id | None = None
    name: Name
    role_id: Id
    pin: Pin


class EmployeePatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """What to change about an employee (at least one field)."""

    name: Name | UnsetType = UNSET
    role_id: Id | UnsetType = UNSET
    pin: Pin | UnsetType = UNSET
    active: bool | UnsetType = UNSET


class Role(msgspec.Struct, frozen=True):
    """A role and what it may do."""

    role_id: str
    name: str
    permissions: list[str]


class RoleList(msgspec.Struct, frozen=True):
    """Every role: the site's, and the defaults it has not changed."""

    roles: list[Role]


class RoleEdit(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A role's name and its permissions (replacing the ones it had)."""

    name: Name
    permissions: list[Permission]


def _employee(employee_id: str, row: dict[str, Value]) -> Employee:
    role_id = row.get("role_id")
    return Employee(
        employee_id,
        str(row.get("name") or ""),
        str(role_id) if role_id is not None else None,
        bool(row.get("active", True)),
        bool(row.get("pin_hash")),
    )


def _may_grant(ctx: Ctx, permissions: frozenset[Permission]) -> None:
    """Refuse unless the caller holds every one of ``permissions``."""
    held = ctx.principal.permissions if ctx.principal is not None else frozenset()
    missing = sorted(str(p) for p in permissions - held)
    if missing:
        raise ApiError(
            ApiCode.PERMISSION_DENIED,
            "nobody can grant, or manage someone holding, a permission they do not hold",
            permission=missing[0],
        )


@routes.route(
    "GET",
    "/v1/employees",
    summary="Every employee (without PINs)",
    response=EmployeeList,
    permission=Permission.STAFF_MANAGE,
)
async def list_employees(ctx: Ctx) -> EmployeeList:
    """The employees, by id."""
    rows = await ctx.store.rows("employees")
    return EmployeeList([_employee(pk, row) for pk, row in sorted(rows.items())])


@routes.route(
    "POST",
    "/v1/employees",
    summary="Add an employee with a role and a PIN",
    body=NewEmployee,
    response=Employee,
    status=201,
    permission=Permission.STAFF_MANAGE,
    errors=(ApiCode.CONFLICT,),
)
async def add_employee(ctx: Ctx, body: NewEmployee) -> Employee:
    """Add an employee (the PIN is stored as its argon2id hash)."""
    employee_id = body.employee_id or new_id("emp")
    pin_hash = await people.hash_pin(body.pin)

    def add(tx: Tx) -> Employee:
        _may_grant(ctx, people.require_role(tx, body.role_id))
        people.add_employee(tx, employee_id, body.name, body.role_id, pin_hash)
        return _employee(employee_id, tx.get("employees", employee_id) or {})

    return await ctx.mutate(add)


@routes.route(
    "PATCH",
    "/v1/employees/{employee_id}",
    summary="Change an employee's name, role, PIN or whether they are active",
    body=EmployeePatch,
    response=Employee,
    permission=Permission.STAFF_MANAGE,
    errors=(ApiCode.NOT_FOUND,),
)
async def change_employee(ctx: Ctx, body: EmployeePatch) -> Employee:
    """Change an employee; deactivating one ends their sessions at once."""
    employee_id = ctx.params["employee_id"]
    if all(value is UNSET for value in msgspec.structs.astuple(body)):
        raise ApiError(ApiCode.INVALID_REQUEST, "nothing to change")
    pin_hash = await people.hash_pin(body.pin) if isinstance(body.pin, str) else None

    def change(tx: Tx) -> Employee:
        row = tx.get("employees", employee_id)
        if row is None:
            raise ApiError(
                ApiCode.NOT_FOUND, f"no employee {employee_id!r}", employee_id=employee_id
            )
        role_id = str(row.get("role_id") or "")
        _may_grant(ctx, role_permissions(tx.get("roles", role_id), role_id) or frozenset())
        fields: dict[str, Value] = {}
        if isinstance(body.name, str):
            fields["name"] = body.name
        if isinstance(body.role_id, str):
            _may_grant(ctx, people.require_role(tx, body.role_id))
            fields["role_id"] = body.role_id
        if pin_hash is not None:
            fields["pin_hash"] = pin_hash
        if isinstance(body.active, bool):
            fields["active"] = body.active
            if not body.active:
                end_sessions_of(tx, employee_id)
        changed = {k: v for k, v in fields.items() if row.get(k) != v}
        if changed:
            people.ensure_default_roles(tx)
            tx.write("employees", employee_id, Op.UPDATE, changed)
        return _employee(employee_id, tx.get("employees", employee_id) or {})

    answer = await ctx.mutate(change)
    _auth(ctx).forget_employee(employee_id)
    return answer


def _roles(rows: dict[str, dict[str, Value]]) -> list[Role]:
    out: dict[str, Role] = {}
    for role_id, (name, granted) in DEFAULT_ROLES.items():
        out[role_id] = Role(role_id, name, sorted(str(p) for p in granted))
    for role_id, row in rows.items():
        granted = role_permissions(row, role_id) or frozenset()
        out[role_id] = Role(role_id, str(row.get("name") or role_id), sorted(map(str, granted)))
    return [out[k] for k in sorted(out)]


@routes.route(
    "GET",
    "/v1/roles",
    summary="Every role and its permissions",
    response=RoleList,
    permission=Permission.STAFF_MANAGE,
)
async def list_roles(ctx: Ctx) -> RoleList:
    """The site's roles over the defaults."""
    return RoleList(_roles(await ctx.store.rows("roles")))


@routes.route(
    "PUT",
    "/v1/roles/{role_id}",
    summary="Create or change a role: its name and permissions (applies at once)",
    body=RoleEdit,
    response=Role,
    permission=Permission.STAFF_MANAGE,
)
async def put_role(ctx: Ctx, body: RoleEdit) -> Role:
    """Set a role's name and permissions."""
    role_id = ctx.params["role_id"]
    if not _ID.fullmatch(role_id):
        raise ApiError(ApiCode.INVALID_REQUEST, f"a role id must match {people.ID_PATTERN}")
    granted = frozenset(body.permissions)
    if role_id == "owner" and granted != frozenset(Permission):
        raise ApiError(ApiCode.INVALID_REQUEST, "the owner role keeps every permission")

    def change(tx: Tx) -> Role:
        row = tx.get("roles", role_id)
        _may_grant(ctx, granted | (role_permissions(row, role_id) or frozenset()))
        people.ensure_default_roles(tx)
        row = tx.get("roles", role_id)
        fields: dict[str, Value] = {"name": body.name, "permissions": permissions_json(granted)}
        if row is None:
            tx.write("roles", role_id, Op.INSERT, fields)
        elif changed := {k: v for k, v in fields.items() if row.get(k) != v}:
            tx.write("roles", role_id, Op.UPDATE, changed)
        return Role(role_id, body.name, sorted(str(p) for p in granted))

    return await ctx.mutate(change)


# -- lockouts ------------------------------------------------------------------------------


class Lockout(msgspec.Struct, frozen=True):
    """An employee locked out by wrong PINs (``name`` is null for an unknown id)."""

    employee_id: str
    name: str | None
    failures: int
    locked_until_ms: int


class SlowedDevice(msgspec.Struct, frozen=True):
    """A device that must wait before its next PIN attempt."""

    device_id: str
    name: str | None
    failures: int
    retry_at_ms: int


class Lockouts(msgspec.Struct, frozen=True):
    """Who is locked out and which devices are slowed, now."""

    employees: list[Lockout]
    devices: list[SlowedDevice]


class Cleared(msgspec.Struct, frozen=True):
    """The employee whose wrong PINs were forgotten."""

    employee_id: str


@routes.route(
    "GET",
    "/v1/lockouts",
    summary="Employees locked out by wrong PINs, and devices slowed by them",
    response=Lockouts,
    permission=Permission.STAFF_MANAGE,
)
async def list_lockouts(ctx: Ctx) -> Lockouts:
    """Current lockouts and slow-downs."""
    store = ctx.store
    rows = await store.query(
        "SELECT subject, failures, locked_until_ms FROM pin_failures"
        " WHERE locked_until_ms > ? ORDER BY subject",
        (store.clock.now_ms(),),
    )
    devices = dict(await store.query("SELECT id, name FROM devices"))
    employees: list[Lockout] = []
    slowed: list[SlowedDevice] = []
    for subject, failures, until in rows:
        kind, _, key = str(subject).partition(":")
        if kind == "employee":
            row = await store.get("employees", key)
            name = str(row["name"]) if row and row.get("name") else None
            employees.append(Lockout(key, name, int(failures), int(until)))
        elif kind == "device":
            slowed.append(SlowedDevice(key, devices.get(key), int(failures), int(until)))
    return Lockouts(employees, slowed)


@routes.route(
    "POST",
    "/v1/lockouts/{employee_id}/clear",
    summary="Forget an employee's wrong PINs, ending their lockout",
    response=Cleared,
    permission=Permission.STAFF_MANAGE,
    errors=(ApiCode.NOT_FOUND,),
)
async def clear_lockout(ctx: Ctx) -> Cleared:
    """End an employee's lockout."""
    employee_id = ctx.params["employee_id"]

    def clear(tx: Tx) -> Cleared:
        if not people.forgive(tx, people.employee_subject(employee_id)):
            raise ApiError(
                ApiCode.NOT_FOUND, f"{employee_id!r} has no wrong PINs", employee_id=employee_id
            )
        return Cleared(employee_id)

    return await ctx.mutate(clear)
