"""People and devices as the edge keeps them: PIN hashes, wrong-guess limits, pairing codes, roles.

How it works:

* **PINs** are hashed with argon2id (argon2-cffi's ``PasswordHasher`` defaults: about a third
  of a second and 64 MiB each). Hashing and checking run in a worker thread, never on the
  event loop. An unknown (or inactive, or PIN-less) employee is checked against a dummy hash,
  so neither the answer nor its timing tells whether the employee exists.
* **Wrong guesses** are counted in the edge's own ``pin_failures`` table, one row per
  subject, under the rules of ``RULES``: ``employee:<id>`` (5 wrong PINs in a row lock the
  employee for 15 minutes, until a correct PIN or a manager clears it), ``device:<id>``
  (after 3 wrong PINs each further attempt waits 1 s, 2 s, 4 s, … up to 5 minutes; forgotten
  after a quiet hour), ``pair:<address>`` and ``pair:*`` (pairing-code guesses, per address
  and over all addresses).
* An attempt **counts as wrong before it is checked**: ``reserve`` records it in the same
  transaction that checks the limits, and a right one is given back (``give_back``; a right
  PIN also ``forgive``s the employee's count). So concurrent guesses cannot all slip under a
  limit that none of them has recorded yet, and a failed request needs no second
  transaction to be counted.
* **Pairing codes**: 8 characters from an alphabet without look-alikes (no I, L, O, 0, 1),
  about 40 bits; stored as SHA-256 (like device credentials), single use, 10 minutes.
* **Roles** are the synced ``roles`` table over ``shared.roles.DEFAULT_ROLES`` (a role not in
  the table has its default permissions, as ``auth.Authenticator`` reads them).
  ``ensure_default_roles`` writes the defaults into an empty table, in the transaction of the
  first staff change (an API or CLI write), so they sync and can be edited.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from shared.roles import DEFAULT_ROLES, Permission
from sync_protocol.changes import Op

from ..tx import Tx
from .auth import permissions_json, role_permissions, token_hash
from .errors import ApiCode, ApiError

PIN_PATTERN = r"^[0-9]{4,8}$"  # a PIN is 4 to 8 digits
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # employee and role ids
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
CODE_LENGTH = 8
CODE_TTL_MS = 10 * 60_000  # a pairing code must be used within 10 minutes
DEVICE_KINDS = ("tablet", "kds", "handheld")

_HASHER = PasswordHasher()


# -- PINs ----------------------------------------------------------------------------------


async def hash_pin(pin: str) -> str:
    """The argon2id hash of a PIN (computed off the event loop)."""
    return await asyncio.to_thread(_HASHER.hash, pin)


async def check_pin(pin_hash: str | None, pin: str) -> bool:
    """Whether ``pin`` matches ``pin_hash`` (None: no such employee; as slow as a real one)."""
    return await asyncio.to_thread(_verify, pin_hash, pin)


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash(secrets.token_hex(8))


def _verify(pin_hash: str | None, pin: str) -> bool:
    try:
        return _HASHER.verify(pin_hash or _dummy_hash(), pin) and pin_hash is not None
    except (VerificationError, InvalidHashError):
        return False


# -- wrong guesses -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rule:
    """How many wrong guesses a subject gets, and how long it waits after them.

    After ``failures >= free`` wrong guesses the subject waits ``base_ms * 2 ** (failures -
    free)`` (at most ``cap_ms``) from the last one; ``forget_ms`` without a wrong guess
    starts the count over (None: only a right guess or a manager does).
    """

    free: int
    base_ms: int
    cap_ms: int
    forget_ms: int | None

    def wait_ms(self, failures: int) -> int | None:
        """How long the subject waits after ``failures`` wrong guesses (None: not at all)."""
        if failures < self.free:
            return None
        return min(self.cap_ms, self.base_ms << min(failures - self.free, 32))


_MINUTE = 60_000
RULES: dict[str, Rule] = {
    "employee": Rule(free=5, base_ms=15 * _MINUTE, cap_ms=15 * _MINUTE, forget_ms=None),
    "device": Rule(free=3, base_ms=1_000, cap_ms=5 * _MINUTE, forget_ms=60 * _MINUTE),
    "pair": Rule(free=3, base_ms=1_000, cap_ms=5 * _MINUTE, forget_ms=60 * _MINUTE),
    "pair-all": Rule(free=20, base_ms=1_000, cap_ms=5 * _MINUTE, forget_ms=60 * _MINUTE),
}


def employee_subject(employee_id: str) -> str:
    """The ``pin_failures`` subject of an employee."""
    return f"employee:{employee_id}"


def device_subject(device_id: str) -> str:
    """The ``pin_failures`` subject of a device."""
    return f"device:{device_id}"


PAIR_ALL = "pair:*"


def pair_subject(address: str) -> str:
    """The ``pin_failures`` subject of an address trying pairing codes."""
    return f"pair:{address}"


def blocked_until(tx: Tx, subject: str) -> int | None:
    """When ``subject`` may try again, if it must wait now."""
    row = tx.one("SELECT locked_until_ms FROM pin_failures WHERE subject = ?", (subject,))
    if row is not None and row[0] is not None and row[0] > tx.now_ms:
        return int(row[0])
    return None


@dataclass(frozen=True, slots=True)
class Reservation:
    """One attempt counted as wrong in advance, and the subject's row before it."""

    subject: str
    failures: int  # the count it wrote
    at_ms: int  # the time it wrote
    until_ms: int | None  # the wait it set, if any
    before: tuple[int, int, int | None] | None  # (failures, last_ms, locked_until_ms)


def reserve(tx: Tx, subject: str, rule: Rule) -> Reservation:
    """Count one attempt as wrong until it proves right (see ``give_back``)."""
    row = tx.one(
        "SELECT failures, last_ms, locked_until_ms FROM pin_failures WHERE subject = ?",
        (subject,),
    )
    failures = 0
    if row is not None and (rule.forget_ms is None or tx.now_ms - row[1] < rule.forget_ms):
        failures = int(row[0])
    failures += 1
    wait = rule.wait_ms(failures)
    until = tx.now_ms + wait if wait is not None else None
    tx.execute(
        "INSERT INTO pin_failures (subject, failures, last_ms, locked_until_ms)"
        " VALUES (?, ?, ?, ?) ON CONFLICT (subject) DO UPDATE SET failures = excluded.failures,"
        " last_ms = excluded.last_ms, locked_until_ms = excluded.locked_until_ms",
        (subject, failures, tx.now_ms, until),
    )
    before = (int(row[0]), int(row[1]), row[2]) if row is not None else None
    return Reservation(subject, failures, tx.now_ms, until, before)


def give_back(tx: Tx, reservation: Reservation) -> None:
    """Undo a reservation whose attempt proved right.

    If nothing counted since, the row is as it was before; otherwise the later attempts
    (which the reservation may have kept waiting) stay counted and only the count drops.
    """
    subject = reservation.subject
    row = tx.one("SELECT failures, last_ms FROM pin_failures WHERE subject = ?", (subject,))
    if row is None:
        return  # a manager cleared it meanwhile
    if (row[0], row[1]) != (reservation.failures, reservation.at_ms):
        tx.execute(
            "UPDATE pin_failures SET failures = max(failures - 1, 0) WHERE subject = ?",
            (subject,),
        )
    elif reservation.before is None:
        tx.execute("DELETE FROM pin_failures WHERE subject = ?", (subject,))
    else:
        tx.execute(
            "UPDATE pin_failures SET failures = ?, last_ms = ?, locked_until_ms = ?"
            " WHERE subject = ?",
            (*reservation.before, subject),
        )


def forgive(tx: Tx, subject: str) -> bool:
    """Forget every wrong guess of ``subject``; returns whether there were any."""
    return tx.execute("DELETE FROM pin_failures WHERE subject = ?", (subject,)) == 1


def too_many_attempts(until_ms: int, now_ms: int, what: str) -> ApiError:
    """The 429 for a device or address that must wait, with its Retry-After."""
    seconds = max(1, -(-(until_ms - now_ms) // 1000))
    return ApiError(
        ApiCode.TOO_MANY_ATTEMPTS,
        f"too many wrong {what}: try again in {seconds} s",
        retry_after_s=seconds,
    ).with_headers({"Retry-After": str(seconds)})


def locked_out(employee_id: str, until_ms: int) -> ApiError:
    """The 423 for a locked-out employee."""
    return ApiError(ApiCode.LOCKED_OUT, employee_id=employee_id, locked_until_ms=until_ms)


@dataclass(frozen=True, slots=True)
class PinAttempt:
    """A PIN attempt under way: the hash to check it against, and what it has counted."""

    employee_id: str
    pin_hash: str | None  # None: no such active employee with a PIN (checked as a dummy)
    device: Reservation
    employee: Reservation


def begin_pin_attempt(tx: Tx, device_id: str, employee_id: str) -> PinAttempt:
    """Check the device's and the employee's limits, then count the attempt as wrong."""
    device, employee = device_subject(device_id), employee_subject(employee_id)
    until = blocked_until(tx, device)
    if until is not None:
        raise too_many_attempts(until, tx.now_ms, "PINs from this device")
    until = blocked_until(tx, employee)
    if until is not None:
        raise locked_out(employee_id, until)
    held = (reserve(tx, device, RULES["device"]), reserve(tx, employee, RULES["employee"]))
    row = tx.get("employees", employee_id)
    pin_hash = None
    if row is not None and row.get("active", True) and row.get("pin_hash"):
        pin_hash = str(row["pin_hash"])
    return PinAttempt(employee_id, pin_hash, *held)


def wrong_pin(attempt: PinAttempt) -> ApiError:
    """The answer to a wrong PIN: 423 if it locked the employee, else 401."""
    if attempt.employee.until_ms is not None:
        return locked_out(attempt.employee_id, attempt.employee.until_ms)
    return ApiError(ApiCode.WRONG_PIN)


def pin_was_right(tx: Tx, attempt: PinAttempt) -> None:
    """A right PIN: the employee starts over, the device gets its attempt back."""
    forgive(tx, employee_subject(attempt.employee_id))
    give_back(tx, attempt.device)


# -- pairing codes -------------------------------------------------------------------------


def normalise_code(code: str) -> str:
    """A code as typed (any case, with dashes or spaces) in its stored form."""
    return "".join(code.split()).replace("-", "").upper()


def create_pairing_code(tx: Tx, kind: str, created_by: str | None) -> tuple[str, int]:
    """A new single-use pairing code for a device of ``kind``; returns (code, expiry ms)."""
    tx.execute("DELETE FROM pairing_codes WHERE expires_ms < ?", (tx.now_ms - 24 * 60 * _MINUTE,))
    expires = tx.now_ms + CODE_TTL_MS
    while True:
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        added = tx.execute(
            "INSERT OR IGNORE INTO pairing_codes (code_hash, kind, created_by, expires_ms)"
            " VALUES (?, ?, ?, ?)",
            (token_hash(code), kind, created_by, expires),
        )
        if added == 1:
            return f"{code[:4]}-{code[4:]}", expires


def begin_pairing(tx: Tx, address: str) -> tuple[Reservation, Reservation]:
    """Check the address's and everyone's pairing limits, then count the attempt as wrong."""
    for subject in (pair_subject(address), PAIR_ALL):
        until = blocked_until(tx, subject)
        if until is not None:
            raise too_many_attempts(until, tx.now_ms, "pairing codes")
    return reserve(tx, pair_subject(address), RULES["pair"]), reserve(
        tx, PAIR_ALL, RULES["pair-all"]
    )


def redeem_pairing_code(
    tx: Tx, code: str, kind: str, attempt: tuple[Reservation, Reservation]
) -> str | None:
    """Use up a live code for a device of ``kind``; returns who created it.

    Raises PAIRING_CODE_INVALID (the attempt stays counted as wrong) for an unknown, used or
    expired code, or a code made for another kind of device.
    """
    code_hash = token_hash(normalise_code(code))
    row = tx.one(
        "SELECT kind, created_by, expires_ms, used_at_ms FROM pairing_codes WHERE code_hash = ?",
        (code_hash,),
    )
    if row is None or row[3] is not None or row[2] <= tx.now_ms:
        raise ApiError(ApiCode.PAIRING_CODE_INVALID)
    if row[0] != kind:
        raise ApiError(ApiCode.PAIRING_CODE_INVALID, f"the code pairs a {row[0]}, not a {kind}")
    tx.execute(
        "UPDATE pairing_codes SET used_at_ms = ? WHERE code_hash = ?", (tx.now_ms, code_hash)
    )
    for reservation in attempt:
        give_back(tx, reservation)
    return str(row[1]) if row[1] is not None else None


# -- roles and employees -------------------------------------------------------------------


def ensure_default_roles(tx: Tx) -> None:
    """Write the default roles into an empty ``roles`` table (a no-op once it has any)."""
    if tx.one("SELECT 1 FROM roles LIMIT 1") is not None:
        return
    for role_id, (name, permissions) in DEFAULT_ROLES.items():
        tx.write(
            "roles",
            role_id,
            Op.INSERT,
            {"name": name, "permissions": permissions_json(permissions)},
        )


def add_employee(tx: Tx, employee_id: str, name: str, role_id: str, pin_hash: str) -> None:
    """Add an employee with a role and a hashed PIN (CONFLICT if the id is taken)."""
    if tx.get("employees", employee_id) is not None:
        raise ApiError(
            ApiCode.CONFLICT, f"employee {employee_id!r} exists", employee_id=employee_id
        )
    require_role(tx, role_id)
    ensure_default_roles(tx)
    tx.write(
        "employees",
        employee_id,
        Op.INSERT,
        {"name": name, "role_id": role_id, "pin_hash": pin_hash, "active": True},
    )


def require_role(tx: Tx, role_id: str) -> frozenset[Permission]:
    """The permissions of an existing role, or INVALID_REQUEST naming it."""
    permissions = role_permissions(tx.get("roles", role_id), role_id)
    if permissions is None:
        raise ApiError(ApiCode.INVALID_REQUEST, f"no role {role_id!r}", role_id=role_id)
    return permissions
