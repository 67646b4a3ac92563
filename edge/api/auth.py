"""Devices, employee sessions and manager approvals: who is calling, checked on every request.

Credentials are random tokens (``secrets.token_urlsafe``); the edge keeps only their SHA-256
(a stolen database file holds no usable credential) in its own tables, which never sync:

* ``devices``: a tablet or screen paired with this edge (``X-Fynlo-Device``);
* ``sessions``: an employee logged in on one device: a short-lived access token
  (``Authorization: Bearer``) and a longer refresh token, both bound to that device;
* ``approvals``: a manager's one-time approval of an action on someone else's device
  (``X-Fynlo-Approval``), spent by the transaction of the action it approves.

A refresh rotates both of a session's tokens (``rotate_session``). Logging out, deactivating
an employee and revoking a device mark their rows revoked; the route then tells the
``Authenticator`` to forget them. ``Authenticator`` answers "who is this" from memory after
the first look-up of a token (revocations through it take effect at once). Permissions come
from the employee's role: the synced ``roles`` table, or ``shared.roles.DEFAULT_ROLES`` for a
role not in it; the cache of employees and roles is dropped whenever a row of either changes
(store events).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aiohttp import web

from shared.roles import DEFAULT_ROLES, Permission, parse_permissions
from sync_protocol.changes import Value

from ..store import EdgeStore
from ..tx import Event, Tx
from .errors import ApiCode, ApiError

ACCESS_TTL_MS = 15 * 60_000  # an access token lives 15 minutes
REFRESH_TTL_MS = 14 * 3_600_000  # a refresh token lives a long shift (14 h)
APPROVAL_TTL_MS = 2 * 60_000  # a manager's approval must be used within 2 minutes


def token_hash(token: str) -> str:
    """The stored form of a credential."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    """A fresh random credential."""
    return secrets.token_urlsafe(32)


def new_id(prefix: str) -> str:
    """A fresh random id such as ``dev_…``."""
    return f"{prefix}_{secrets.token_hex(8)}"


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller: a paired device and, once logged in, an employee with a role."""

    device_id: str
    device_name: str
    device_kind: str
    employee_id: str | None = None
    role_id: str | None = None
    permissions: frozenset[Permission] = frozenset()
    session_id: str | None = None
    #: when the access token presented expires (None: a device credential, which does not)
    expires_ms: int | None = None


@dataclass(frozen=True, slots=True)
class _Session:
    session_id: str
    employee_id: str
    device_id: str
    expires_ms: int


# -- writes (inside a store transaction) -------------------------------------------------------


def pair_device(tx: Tx, name: str, kind: str, paired_by: str | None) -> tuple[str, str]:
    """Register a device; returns (device id, its credential, shown to it once)."""
    device_id, token = new_id("dev"), new_token()
    tx.execute(
        "INSERT INTO devices (id, name, kind, token_hash, paired_at_ms, paired_by)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (device_id, name, kind, token_hash(token), tx.now_ms, paired_by),
    )
    return device_id, token


def start_session(tx: Tx, employee_id: str, device_id: str) -> tuple[str, str, str, int]:
    """Log an employee in on a device; returns (session id, access, refresh, expiry ms)."""
    session_id, access, refresh = new_id("ses"), new_token(), new_token()
    expires = tx.now_ms + ACCESS_TTL_MS
    tx.execute(
        "INSERT INTO sessions (id, employee_id, device_id, access_hash, access_expires_ms,"
        " refresh_hash, refresh_expires_ms, created_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            session_id,
            employee_id,
            device_id,
            token_hash(access),
            expires,
            token_hash(refresh),
            tx.now_ms + REFRESH_TTL_MS,
            tx.now_ms,
        ),
    )
    return session_id, access, refresh, expires


def grant_approval(tx: Tx, manager_id: str, device_id: str) -> tuple[str, str, int]:
    """A manager approves one action on ``device_id``; returns (id, token, expiry ms)."""
    approval_id, token = new_id("apr"), new_token()
    expires = tx.now_ms + APPROVAL_TTL_MS
    tx.execute(
        "INSERT INTO approvals (id, token_hash, manager_id, device_id, expires_ms)"
        " VALUES (?, ?, ?, ?, ?)",
        (approval_id, token_hash(token), manager_id, device_id, expires),
    )
    return approval_id, token, expires


@dataclass(frozen=True, slots=True)
class Tokens:
    """A session's tokens as handed to its device (only their hashes are kept)."""

    session_id: str
    employee_id: str
    access: str
    refresh: str
    expires_ms: int
    refresh_expires_ms: int


def rotate_session(tx: Tx, refresh_token: str, device_id: str) -> Tokens | None:
    """Swap a live refresh token for new tokens (the old pair stops working at once).

    None for a refresh token that is unknown, already rotated, ended, expired or presented
    by another device. The refresh expiry stays the login's: refreshing never outlives a shift.
    """
    found = tx.one(
        "SELECT id, employee_id, refresh_expires_ms FROM sessions"
        " WHERE refresh_hash = ? AND device_id = ? AND revoked_at_ms IS NULL",
        (token_hash(refresh_token), device_id),
    )
    if found is None or found[2] <= tx.now_ms:
        return None
    session_id, employee_id, refresh_expires = str(found[0]), str(found[1]), int(found[2])
    access, refresh = new_token(), new_token()
    expires = min(tx.now_ms + ACCESS_TTL_MS, refresh_expires)
    tx.execute(
        "UPDATE sessions SET access_hash = ?, access_expires_ms = ?, refresh_hash = ? WHERE id = ?",
        (token_hash(access), expires, token_hash(refresh), session_id),
    )
    return Tokens(session_id, employee_id, access, refresh, expires, refresh_expires)


def end_session(tx: Tx, session_id: str) -> bool:
    """Log a session out; returns whether it was live."""
    return (
        tx.execute(
            "UPDATE sessions SET revoked_at_ms = ? WHERE id = ? AND revoked_at_ms IS NULL",
            (tx.now_ms, session_id),
        )
        == 1
    )


def end_sessions_of(tx: Tx, employee_id: str) -> int:
    """Log an employee out everywhere; returns how many sessions ended."""
    return tx.execute(
        "UPDATE sessions SET revoked_at_ms = ? WHERE employee_id = ? AND revoked_at_ms IS NULL",
        (tx.now_ms, employee_id),
    )


def revoke_device(tx: Tx, device_id: str) -> bool:
    """Unpair a device and end its sessions; returns whether it was paired until now."""
    revoked = tx.execute(
        "UPDATE devices SET revoked_at_ms = ? WHERE id = ? AND revoked_at_ms IS NULL",
        (tx.now_ms, device_id),
    )
    tx.execute(
        "UPDATE sessions SET revoked_at_ms = ? WHERE device_id = ? AND revoked_at_ms IS NULL",
        (tx.now_ms, device_id),
    )
    return revoked == 1


# -- checks --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Revoked:
    """What stopped being valid: a device (and its sessions), an employee's, or one session."""

    device_id: str | None = None
    employee_id: str | None = None
    session_id: str | None = None

    def covers(self, who: Principal) -> bool:
        """Whether a caller authenticated as ``who`` is no longer valid."""
        return (
            (self.device_id is not None and who.device_id == self.device_id)
            or (self.employee_id is not None and who.employee_id == self.employee_id)
            or (self.session_id is not None and who.session_id == self.session_id)
        )


class Authenticator:
    """Checks credentials against the edge's tables, remembering what it has checked."""

    def __init__(self, store: EdgeStore) -> None:
        self.store = store
        self._devices: dict[str, Principal | None] = {}
        self._sessions: dict[str, _Session | None] = {}
        self._employees: dict[str, tuple[str, frozenset[Permission]] | None] = {}
        self._unsubscribe = store.subscribe(self._on_events)
        self._listeners: list[Callable[[Revoked], None]] = []

    def on_revoked(self, listener: Callable[[Revoked], None]) -> None:
        """Call ``listener`` whenever a device, an employee or a session stops being valid
        (the live endpoint closes the connections they opened)."""
        self._listeners.append(listener)

    def _revoked(self, revoked: Revoked) -> None:
        for listener in self._listeners:
            listener(revoked)

    def close(self) -> None:
        """Stop following the store's events."""
        self._unsubscribe()

    def _on_events(self, events: list[Event]) -> None:
        for event in events:
            if event.topic == "row" and (
                '"table":"employees"' in event.data or '"table":"roles"' in event.data
            ):
                self._employees.clear()
                return

    def forget_device(self, device_id: str) -> None:
        """Drop a revoked device (and its sessions) from memory."""
        self._devices = {
            k: v for k, v in self._devices.items() if not v or v.device_id != device_id
        }
        self._sessions = {
            k: v for k, v in self._sessions.items() if not v or v.device_id != device_id
        }
        self._revoked(Revoked(device_id=device_id))

    def forget_employee(self, employee_id: str) -> None:
        """Drop an employee's sessions and role from memory (deactivated, logged out)."""
        self._sessions = {
            k: v for k, v in self._sessions.items() if not v or v.employee_id != employee_id
        }
        self._employees.pop(employee_id, None)
        self._revoked(Revoked(employee_id=employee_id))

    def forget_session(self, session_id: str) -> None:
        """Drop an ended session from memory."""
        self._sessions = {
            k: v for k, v in self._sessions.items() if not v or v.session_id != session_id
        }
        self._revoked(Revoked(session_id=session_id))

    async def device(self, token: str) -> Principal:
        """The paired device presenting ``token``, or DEVICE_NOT_PAIRED."""
        if not token:
            raise ApiError(
                ApiCode.DEVICE_NOT_PAIRED, "send the device credential as X-Fynlo-Device"
            )
        key = token_hash(token)
        if key not in self._devices:
            rows = await self.store.query(
                "SELECT id, name, kind FROM devices WHERE token_hash = ? AND revoked_at_ms IS NULL",
                (key,),
            )
            if not rows:  # not remembered: forged tokens must not grow memory
                raise ApiError(ApiCode.DEVICE_NOT_PAIRED)
            self._devices[key] = Principal(*rows[0])
        found = self._devices[key]
        if found is None:
            raise ApiError(ApiCode.DEVICE_NOT_PAIRED)
        return found

    async def session(self, token: str, device: Principal) -> Principal:
        """The employee session of ``token`` on ``device``, with its permissions."""
        key = token_hash(token)
        if key not in self._sessions:
            rows = await self.store.query(
                "SELECT id, employee_id, device_id, access_expires_ms FROM sessions"
                " WHERE access_hash = ? AND revoked_at_ms IS NULL",
                (key,),
            )
            if not rows:  # not remembered: forged tokens must not grow memory
                raise ApiError(ApiCode.NOT_LOGGED_IN, "unknown, ended or revoked session token")
            self._sessions[key] = _Session(*rows[0])
        found = self._sessions[key]
        if found is None:
            raise ApiError(ApiCode.NOT_LOGGED_IN, "unknown, ended or revoked session token")
        if found.device_id != device.device_id:
            raise ApiError(ApiCode.WRONG_DEVICE)
        if found.expires_ms <= self.store.clock.now_ms():
            raise ApiError(ApiCode.TOKEN_EXPIRED)
        role = await self.role_of(found.employee_id)
        if role is None:
            raise ApiError(ApiCode.NOT_LOGGED_IN, "the employee is no longer active")
        return Principal(
            device.device_id,
            device.device_name,
            device.device_kind,
            found.employee_id,
            role[0],
            role[1],
            found.session_id,
            found.expires_ms,
        )

    async def role_of(self, employee_id: str) -> tuple[str, frozenset[Permission]] | None:
        """An active employee's (role id, permissions), or None."""
        if employee_id not in self._employees:
            employee = await self.store.get("employees", employee_id)
            if employee is None or not employee.get("active", True):
                self._employees[employee_id] = None
            else:
                role_id = str(employee.get("role_id") or "")
                self._employees[employee_id] = (role_id, await self._permissions(role_id))
        return self._employees[employee_id]

    async def _permissions(self, role_id: str) -> frozenset[Permission]:
        return role_permissions(await self.store.get("roles", role_id), role_id) or frozenset()

    async def approval(self, token: str, principal: Principal) -> tuple[str, str]:
        """The unused, unexpired approval ``token`` for this device: (id, manager id)."""
        rows = await self.store.query(
            "SELECT id, manager_id, device_id, expires_ms, used_at_ms FROM approvals"
            " WHERE token_hash = ?",
            (token_hash(token),),
        )
        if not rows:
            raise ApiError(ApiCode.APPROVAL_INVALID)
        approval_id, manager_id, device_id, expires_ms, used = rows[0]
        if used is not None or expires_ms <= self.store.clock.now_ms():
            raise ApiError(ApiCode.APPROVAL_INVALID, "the approval was used or has expired")
        if device_id != principal.device_id:
            raise ApiError(ApiCode.APPROVAL_INVALID, "the approval is for another device")
        return str(approval_id), str(manager_id)


def role_permissions(row: Mapping[str, Value] | None, role_id: str) -> frozenset[Permission] | None:
    """A role's permissions: its row's, else its default's; None when there is no such role."""
    if row is not None and row.get("permissions"):
        try:
            return parse_permissions(json.loads(str(row["permissions"])))
        except (ValueError, TypeError):
            return frozenset()  # a malformed role grants nothing
    default = DEFAULT_ROLES.get(role_id)
    if default is not None:
        return default[1]
    return frozenset() if row is not None else None


def permissions_json(permissions: Iterable[Permission]) -> str:
    """A role's permissions as stored in the ``roles`` table."""
    return json.dumps(sorted(str(p) for p in permissions))


AUTHENTICATOR = web.AppKey("authenticator", Authenticator)
