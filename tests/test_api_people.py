"""Devices and people over real HTTP against a real edge and SQLite file.

Pairing (codes, expiry, guessing), PIN logins with refresh, logout and revocation, wrong-PIN
lockouts and device slow-downs under a clock the test moves, manager approvals, staff and
role management, bad input (a stable 4xx and no change), and the bootstrap command line.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edge import __main__ as edge_cli
from edge.api.auth import AUTHENTICATOR, Principal
from edge.api.errors import ApiError
from shared.roles import DEFAULT_ROLES, Permission

from .api_harness import Edge, Tablet, running_edge

T = TypeVar("T")
PINS = {"mia": "1234", "sam": "2468", "kai": "1357", "bo": "8642", "ola": "9999"}
CODE = re.compile(r"[ABCDEFGHJKMNPQRSTUVWXYZ23456789]{4}-[ABCDEFGHJKMNPQRSTUVWXYZ23456789]{4}")
MINUTE = 60_000


def run(fn: Callable[[Edge], Coroutine[Any, Any, T]], tmp_path: Path) -> T:
    async def body() -> T:
        async with running_edge(tmp_path) as edge:
            await edge.set_pins(**PINS)
            return await fn(edge)

    return asyncio.run(body())


class Clock:
    """The edge's wall clock, standing still until the test moves it."""

    def __init__(self, edge: Edge) -> None:
        self.edge = edge
        self.now = edge.store.clock.now_ms()
        edge.set_wall_clock(self.now)

    def advance(self, ms: int) -> None:
        self.now += ms
        self.edge.set_wall_clock(self.now)


async def login(edge: Edge, tablet: Tablet, who: str, pin: str) -> tuple[int, Any]:
    """Log ``who`` in on ``tablet`` through the API; remembers the access token on success."""
    got, answer, _ = await edge.call(
        "POST", "/v1/sessions", tablet.headers(), json={"employee_id": who, "pin": pin}
    )
    if got == 201:
        tablet.access[who] = answer["access_token"]
    return got, answer


def code_of(answer: Any) -> tuple[int, str]:
    return answer[0], answer[1]["error"]["code"]


async def manager_tablet(edge: Edge) -> Tablet:
    till = await edge.pair("till")
    await edge.login(till, "mia")
    return till


# -- pairing -------------------------------------------------------------------------------


def test_a_device_pairs_once_with_a_managers_code(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        till = await manager_tablet(edge)
        await edge.login(till, "sam")
        got, answer, _ = await edge.call(
            "POST", "/v1/pairing-codes", till.headers("sam"), json={"kind": "tablet"}
        )
        assert (got, answer["error"]["code"]) == (403, "permission_denied")
        got, made, _ = await edge.call("POST", "/v1/pairing-codes", till.headers("mia"), json={})
        assert got == 201 and CODE.fullmatch(made["code"]) and made["kind"] == "tablet"
        assert made["expires_ms"] == clock.now + 10 * MINUTE
        (stored,) = edge.sql("SELECT code_hash, created_by, used_at_ms FROM pairing_codes")
        assert made["code"] not in stored[0] and stored[1:] == ("mia", None)
        # Typed as a person would (lower case, no dash), with a retry key that is ignored.
        request = {"code": made["code"].replace("-", "").lower(), "name": "Bar", "kind": "tablet"}
        headers = {"Idempotency-Key": "pair-request-0001"}
        got, paired, _ = await edge.call("POST", "/v1/devices/pair", headers, json=request)
        assert got == 201 and paired["name"] == "Bar" and paired["device_id"].startswith("dev_")
        bar = Tablet(paired["device_id"], paired["device_token"])
        got, me, _ = await edge.call("GET", "/v1/device", bar.headers())
        assert (got, me["device_name"], me["device_kind"]) == (200, "Bar", "tablet")
        # Single use: the same request again is refused, not replayed.
        again = await edge.call("POST", "/v1/devices/pair", headers, json=request)
        assert code_of(again) == (401, "pairing_code_invalid")
        assert edge.sql("SELECT count(*) FROM idempotency") == [(0,)]
        got, listed, _ = await edge.call("GET", "/v1/devices", till.headers("mia"))
        assert got == 200
        found = {d["device_id"]: d for d in listed["devices"]}
        assert found[bar.device_id]["paired_by"] == "mia"
        assert found[till.device_id]["logged_in"] == ["mia", "sam"]
        # Only hashes are kept: neither the code nor the credential is in the file.
        data = (edge.path / "edge.sqlite").read_bytes()
        wal = edge.path / "edge.sqlite-wal"
        data += wal.read_bytes() if wal.exists() else b""
        assert paired["device_token"].encode() not in data
        assert made["code"].replace("-", "").encode() not in data

    run(body, tmp_path)


def test_unpaired_devices_get_nothing(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await manager_tablet(edge)
        for method, path, payload in [
            ("POST", "/v1/sessions", {"employee_id": "mia", "pin": "1234"}),
            ("POST", "/v1/sessions/refresh", {"refresh_token": "x"}),
            ("GET", "/v1/devices", None),
            ("POST", "/v1/approvals", {"manager_id": "mia", "pin": "1234"}),
            ("GET", "/v1/employees", None),
        ]:
            for headers in ({}, {"X-Fynlo-Device": "forged"}, {"Authorization": "Bearer x"}):
                got = await edge.call(method, path, headers, json=payload)
                assert code_of(got) == (401, "device_not_paired"), (path, headers)
        # Not even a PIN attempt is counted for them.
        assert edge.sql("SELECT count(*) FROM pin_failures") == [(0,)]
        assert till.device_id

    run(body, tmp_path)


def test_pairing_codes_expire_and_fit_one_kind_of_device(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        till = await manager_tablet(edge)
        _, made, _ = await edge.call(
            "POST", "/v1/pairing-codes", till.headers("mia"), json={"kind": "kds"}
        )
        request = {"code": made["code"], "name": "Pass", "kind": "tablet"}
        got = await edge.call("POST", "/v1/devices/pair", json=request)
        assert code_of(got) == (401, "pairing_code_invalid")
        got = await edge.call("POST", "/v1/devices/pair", json={**request, "kind": "kds"})
        assert got[0] == 201 and got[1]["kind"] == "kds"
        _, late, _ = await edge.call(
            "POST", "/v1/pairing-codes", till.headers("mia"), json={"kind": "kds"}
        )
        clock.advance(10 * MINUTE)
        got = await edge.call(
            "POST", "/v1/devices/pair", json={**request, "code": late["code"], "kind": "kds"}
        )
        assert code_of(got) == (401, "pairing_code_invalid")
        assert edge.sql("SELECT count(*) FROM devices") == [(2,)]

    run(body, tmp_path)


def test_guessing_pairing_codes_is_slowed_down(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        till = await manager_tablet(edge)
        _, made, _ = await edge.call("POST", "/v1/pairing-codes", till.headers("mia"), json={})
        guess = {"code": "AAAA-AAAA", "name": "Rogue", "kind": "tablet"}
        for _ in range(3):
            got = await edge.call("POST", "/v1/devices/pair", json=guess)
            assert code_of(got) == (401, "pairing_code_invalid")
        waits = []
        for _ in range(3):
            got, answer, resp = await edge.call("POST", "/v1/devices/pair", json=guess)
            assert (got, answer["error"]["code"]) == (429, "too_many_attempts")
            waits.append(int(resp.headers["Retry-After"]))
            assert answer["error"]["details"]["retry_after_s"] == waits[-1]
            # Even the right code waits its turn (and stays unused).
            right = await edge.call(
                "POST", "/v1/devices/pair", json={**guess, "code": made["code"]}
            )
            assert code_of(right) == (429, "too_many_attempts")
            clock.advance(waits[-1] * 1000)
            got = await edge.call("POST", "/v1/devices/pair", json=guess)
            assert code_of(got) == (401, "pairing_code_invalid")
        assert waits == [1, 2, 4]
        clock.advance(8000)
        got = await edge.call("POST", "/v1/devices/pair", json={**guess, "code": made["code"]})
        assert got[0] == 201
        assert edge.sql("SELECT count(*) FROM devices") == [(2,)]

    run(body, tmp_path)


# -- sessions ------------------------------------------------------------------------------


def test_login_refresh_rotation_and_logout(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        till, other = await edge.pair("till"), await edge.pair("other")
        got, first = await login(edge, till, "sam", PINS["sam"])
        assert got == 201 and first["role_id"] == "server" and "order.open" in first["permissions"]
        assert first["expires_ms"] == clock.now + 15 * MINUTE
        assert first["refresh_expires_ms"] == clock.now + 14 * 60 * MINUTE
        got, me, _ = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert (got, me["employee_id"]) == (200, "sam")
        # The access token expires; the refresh token gets new ones and the old stop working.
        clock.advance(15 * MINUTE)
        got = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert code_of(got) == (401, "token_expired")
        old = {"refresh_token": first["refresh_token"]}
        got = await edge.call("POST", "/v1/sessions/refresh", other.headers(), json=old)
        assert code_of(got) == (401, "not_logged_in")  # bound to its device
        got, second, _ = await edge.call("POST", "/v1/sessions/refresh", till.headers(), json=old)
        assert got == 200 and second["session_id"] == first["session_id"]
        assert second["access_token"] != first["access_token"]
        assert second["refresh_token"] != first["refresh_token"]
        got = await edge.call("POST", "/v1/sessions/refresh", till.headers(), json=old)
        assert code_of(got) == (401, "not_logged_in")
        got = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert code_of(got) == (401, "not_logged_in")
        till.access["sam"] = second["access_token"]
        got, me, _ = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert got == 200
        # Logout ends the session at once: its access and refresh tokens are refused.
        got, out, _ = await edge.call("POST", "/v1/sessions/logout", till.headers("sam"))
        assert (got, out) == (200, {"session_id": first["session_id"]})
        got = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert code_of(got) == (401, "not_logged_in")
        new = {"refresh_token": second["refresh_token"]}
        got = await edge.call("POST", "/v1/sessions/refresh", till.headers(), json=new)
        assert code_of(got) == (401, "not_logged_in")
        # A refresh token lives one shift, however often it is used.
        got, third = await login(edge, till, "sam", PINS["sam"])
        clock.advance(14 * 60 * MINUTE)
        late = {"refresh_token": third["refresh_token"]}
        got = await edge.call("POST", "/v1/sessions/refresh", till.headers(), json=late)
        assert code_of(got) == (401, "not_logged_in")
        # Logins are audited under the employee who logged in.
        actions = edge.sql("SELECT action, employee_id FROM audit_log ORDER BY position")
        assert ("login", "sam") in actions and ("logout", "sam") in actions

    run(body, tmp_path)


def test_revoking_a_device_ends_its_sessions_at_once(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await manager_tablet(edge)
        bar = await edge.pair("bar")
        await login(edge, bar, "sam", PINS["sam"])
        assert (await edge.call("GET", "/v1/me", bar.headers("sam")))[0] == 200
        got = await edge.call("POST", f"/v1/devices/{till.device_id}/revoke", bar.headers("sam"))
        assert code_of(got) == (403, "permission_denied")
        got, revoked, _ = await edge.call(
            "POST", f"/v1/devices/{bar.device_id}/revoke", till.headers("mia")
        )
        assert got == 200 and revoked["revoked_at_ms"] is not None and revoked["logged_in"] == []
        for path in ("/v1/me", "/v1/device"):
            got = await edge.call("GET", path, bar.headers("sam"))
            assert code_of(got) == (401, "device_not_paired")
        assert edge.sql(
            "SELECT count(*) FROM sessions WHERE device_id = ? AND revoked_at_ms IS NULL",
            (bar.device_id,),
        ) == [(0,)]
        again = await edge.call("POST", f"/v1/devices/{bar.device_id}/revoke", till.headers("mia"))
        assert again[0] == 200 and again[1]["revoked_at_ms"] == revoked["revoked_at_ms"]
        got = await edge.call("POST", "/v1/devices/dev_nope/revoke", till.headers("mia"))
        assert code_of(got) == (404, "not_found")
        # The manager's own device goes on working.
        assert (await edge.call("GET", "/v1/me", till.headers("mia")))[0] == 200

    run(body, tmp_path)


def test_pins_are_checked_off_the_event_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body(edge: Edge) -> None:
        loop = asyncio.get_running_loop()
        loop.set_debug(True)
        loop.slow_callback_duration = 0.15  # an argon2 check takes longer than this
        till = await edge.pair("till")
        caplog.set_level(logging.WARNING, logger="asyncio")
        answers = await asyncio.gather(
            login(edge, till, "sam", PINS["sam"]), login(edge, till, "kai", "0000")
        )
        assert [got for got, _ in answers] == [201, 401]
        assert not [r for r in caplog.records if "Executing" in r.getMessage()]

    run(body, tmp_path)


# -- wrong PINs ----------------------------------------------------------------------------


def test_five_wrong_pins_lock_the_employee_and_managers_see_and_clear_it(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        till = await manager_tablet(edge)
        tablets = [await edge.pair(f"t{i}") for i in range(3)]  # under each device's limit
        answers = [await login(edge, tablets[i // 2], "sam", "0000") for i in range(5)]
        assert [code_of(a) for a in answers[:4]] == [(401, "wrong_pin")] * 4
        until = clock.now + 15 * MINUTE
        assert code_of(answers[4]) == (423, "employee_locked_out")
        assert answers[4][1]["error"]["details"] == {"employee_id": "sam", "locked_until_ms": until}
        # Locked: even the right PIN is refused, from any device, without being checked.
        got = await login(edge, tablets[2], "sam", PINS["sam"])
        assert code_of(got) == (423, "employee_locked_out")
        got, seen, _ = await edge.call("GET", "/v1/lockouts", till.headers("mia"))
        assert got == 200 and seen["employees"] == [
            {"employee_id": "sam", "name": "Sam", "failures": 5, "locked_until_ms": until}
        ]
        await edge.login(till, "kai")
        got = await edge.call("GET", "/v1/lockouts", till.headers("kai"))
        assert code_of(got) == (403, "permission_denied")
        got, cleared, _ = await edge.call("POST", "/v1/lockouts/sam/clear", till.headers("mia"))
        assert (got, cleared) == (200, {"employee_id": "sam"})
        assert (await login(edge, tablets[2], "sam", PINS["sam"]))[0] == 201
        got = await edge.call("POST", "/v1/lockouts/sam/clear", till.headers("mia"))
        assert code_of(got) == (404, "not_found")
        # A lockout also ends by itself after 15 minutes.
        clock.advance(60 * MINUTE)  # (the devices' counts are forgotten meanwhile)
        for i in range(5):
            await login(edge, tablets[i % 3], "bo", "0000")
        clock.advance(15 * MINUTE - 1)
        assert code_of(await login(edge, till, "bo", PINS["bo"])) == (423, "employee_locked_out")
        clock.advance(1)
        assert (await login(edge, till, "bo", PINS["bo"]))[0] == 201
        assert edge.sql("SELECT count(*) FROM pin_failures WHERE subject = 'employee:bo'") == [(0,)]

    run(body, tmp_path)


def test_a_right_pin_resets_the_count_and_unknown_employees_look_the_same(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        tablets = [await edge.pair(f"t{i}") for i in range(5)]
        for i in range(4):
            assert code_of(await login(edge, tablets[i // 2], "kai", "0000")) == (401, "wrong_pin")
        assert (await login(edge, tablets[4], "kai", PINS["kai"]))[0] == 201
        for i in range(4):  # without the reset, the first of these would lock kai out
            wrong = await login(edge, tablets[2 + i // 2], "kai", "0000")
            assert code_of(wrong) == (401, "wrong_pin")
        clock.advance(60 * MINUTE)  # the devices' counts are forgotten
        # An unknown or inactive employee gets the very same answer as a wrong PIN.
        await edge.store.write("employees", "bo", 2, {"active": False})
        wrong = await login(edge, tablets[3], "sam", "0000")
        ghost = await login(edge, tablets[3], "ghost", PINS["sam"])
        gone = await login(edge, tablets[2], "bo", PINS["bo"])
        assert wrong == ghost == gone == (401, wrong[1])
        assert wrong[1]["error"]["code"] == "wrong_pin"

    run(body, tmp_path)


def test_a_device_with_repeated_wrong_pins_is_slowed_down(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        till = await manager_tablet(edge)
        pad, other = await edge.pair("pad"), await edge.pair("other")
        for who in ("sam", "kai", "bo"):  # three employees: nobody is locked out
            assert code_of(await login(edge, pad, who, "0000")) == (401, "wrong_pin")
        waits = []
        for who in ("sam", "kai", "bo"):
            got, answer, resp = await edge.call(
                "POST", "/v1/sessions", pad.headers(), json={"employee_id": who, "pin": "0000"}
            )
            assert (got, answer["error"]["code"]) == (429, "too_many_attempts")
            waits.append(int(resp.headers["Retry-After"]))
            # The right PIN waits too; another device does not.
            assert code_of(await login(edge, pad, who, PINS[who])) == (429, "too_many_attempts")
            clock.advance(waits[-1] * 1000 - 1)
            assert code_of(await login(edge, pad, who, "0000"))[0] == 429
            clock.advance(1)
            assert code_of(await login(edge, pad, who, "0000")) == (401, "wrong_pin")
        assert waits == [1, 2, 4]
        assert (await login(edge, other, "sam", PINS["sam"]))[0] == 201
        got, seen, _ = await edge.call("GET", "/v1/lockouts", till.headers("mia"))
        assert seen["devices"] == [
            {
                "device_id": pad.device_id,
                "name": "pad",
                "failures": 6,
                "retry_at_ms": clock.now + 8000,
            }
        ]
        # A right PIN, once the wait is over, gets its own attempt back (the others stay).
        clock.advance(8000)
        assert (await login(edge, pad, "mia", PINS["mia"]))[0] == 201
        assert edge.sql(
            "SELECT failures FROM pin_failures WHERE subject = ?", (f"device:{pad.device_id}",)
        ) == [(6,)]

    run(body, tmp_path)


def test_concurrent_guesses_cannot_slip_under_the_limit(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        Clock(edge)
        pad = await edge.pair("pad")
        guesses = [login(edge, pad, who, "0000") for who in ("sam", "kai", "bo", "ola") * 3]
        answers = sorted(code_of(a) for a in await asyncio.gather(*guesses))
        assert answers == [(401, "wrong_pin")] * 3 + [(429, "too_many_attempts")] * 9

    run(body, tmp_path)


# -- approvals -----------------------------------------------------------------------------


def test_a_managers_pin_approves_one_action_on_this_device(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        clock = Clock(edge)
        auth = edge.app[AUTHENTICATOR]
        till, bar = await edge.pair("till"), await edge.pair("bar")
        await edge.login(till, "sam")
        request = {"manager_id": "mia", "pin": PINS["mia"]}
        got, approval, _ = await edge.call(
            "POST", "/v1/approvals", till.headers("sam"), json=request
        )
        assert got == 201 and approval["manager_id"] == "mia"
        assert approval["device_id"] == till.device_id
        assert approval["expires_ms"] == clock.now + 2 * MINUTE
        token = approval["approval_token"]
        on_till = Principal(till.device_id, "till", "tablet", "sam")
        on_bar = Principal(bar.device_id, "bar", "tablet", "sam")
        assert await auth.approval(token, on_till) == (approval["approval_id"], "mia")
        with pytest.raises(ApiError, match="another device"):
            await auth.approval(token, on_bar)
        (row,) = edge.sql("SELECT manager_id, device_id, token_hash, used_at_ms FROM approvals")
        assert row[:2] == ("mia", till.device_id) and row[2] != token and row[3] is None
        # Single use: once an action spends it (as routing's mutate does), it is refused.
        await edge.store.transaction(
            lambda tx: tx.execute(
                "UPDATE approvals SET used_at_ms = ? WHERE id = ? AND used_at_ms IS NULL",
                (tx.now_ms, approval["approval_id"]),
            )
        )
        with pytest.raises(ApiError, match="used or has expired"):
            await auth.approval(token, on_till)
        # It expires after two minutes.
        _, fresh, _ = await edge.call("POST", "/v1/approvals", till.headers("sam"), json=request)
        clock.advance(2 * MINUTE)
        with pytest.raises(ApiError, match="used or has expired"):
            await auth.approval(fresh["approval_token"], on_till)

    run(body, tmp_path)


def test_approvals_need_the_right_pin_of_someone_who_may_approve(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        await edge.login(till, "sam")
        send = till.headers("sam")
        got = await edge.call(
            "POST", "/v1/approvals", send, json={"manager_id": "mia", "pin": "0000"}
        )
        assert code_of(got) == (401, "wrong_pin")
        assert edge.sql("SELECT subject, failures FROM pin_failures ORDER BY subject") == [
            (f"device:{till.device_id}", 1),
            ("employee:mia", 1),
        ]
        # A server's right PIN proves who they are, but they may not approve.
        got = await edge.call(
            "POST", "/v1/approvals", send, json={"manager_id": "sam", "pin": PINS["sam"]}
        )
        assert code_of(got) == (403, "permission_denied")
        assert got[1]["error"]["details"] == {"permission": "approve"}
        assert edge.sql("SELECT count(*) FROM approvals") == [(0,)]
        # The right manager PIN resets the manager's count.
        got = await edge.call(
            "POST", "/v1/approvals", send, json={"manager_id": "mia", "pin": PINS["mia"]}
        )
        assert got[0] == 201
        assert edge.sql("SELECT subject, failures FROM pin_failures") == [
            (f"device:{till.device_id}", 1)
        ]
        # A locked-out manager cannot approve.
        await edge.store.transaction(
            lambda tx: tx.execute(
                "INSERT INTO pin_failures VALUES ('employee:ola', 5, ?, ?)",
                (tx.now_ms, tx.now_ms + 15 * MINUTE),
            )
        )
        got = await edge.call(
            "POST", "/v1/approvals", send, json={"manager_id": "ola", "pin": PINS["ola"]}
        )
        assert code_of(got) == (423, "employee_locked_out")

    run(body, tmp_path)


# -- staff and roles -----------------------------------------------------------------------


def test_managers_add_and_change_employees(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await manager_tablet(edge)
        got, listed, _ = await edge.call("GET", "/v1/employees", till.headers("mia"))
        assert got == 200 and "argon2" not in json.dumps(listed)
        assert not any("pin_hash" in e for e in listed["employees"])
        assert {e["employee_id"]: e["has_pin"] for e in listed["employees"]}["sam"] is True
        assert edge.sql("SELECT count(*) FROM roles") == [(0,)]
        new = {"employee_id": "zoe", "name": "Zoe", "role_id": "server", "pin": "97531"}
        got, zoe, _ = await edge.call("POST", "/v1/employees", till.headers("mia"), json=new)
        assert (got, zoe) == (
            201,
            {
                "employee_id": "zoe",
                "name": "Zoe",
                "role_id": "server",
                "active": True,
                "has_pin": True,
            },
        )
        (stored,) = edge.sql("SELECT pin_hash FROM employees WHERE id = 'zoe'")
        assert stored[0].startswith("$argon2id$") and "97531" not in stored[0]
        # The add-only audit trail says a PIN was set, never the hash.
        trail = " ".join(row[0] for row in edge.sql("SELECT detail FROM audit_log"))
        assert "argon2" not in trail and '"pin_hash":"<redacted>"' in trail
        # The first staff change writes the default roles, so they sync and can be edited.
        assert sorted(r[0] for r in edge.sql("SELECT id FROM roles")) == sorted(DEFAULT_ROLES)
        got, anon, _ = await edge.call(
            "POST",
            "/v1/employees",
            till.headers("mia"),
            json={"name": "Temp", "role_id": "kitchen", "pin": "4321"},
        )
        assert got == 201 and anon["employee_id"].startswith("emp_")
        pad = await edge.pair("pad")
        assert (await login(edge, pad, "zoe", "97531"))[0] == 201
        # A new role applies to her session at once; so does a new PIN to her next login.
        patch = {"role_id": "bartender", "pin": "8080"}
        got, changed, _ = await edge.call(
            "PATCH", "/v1/employees/zoe", till.headers("mia"), json=patch
        )
        assert got == 200 and changed["role_id"] == "bartender"
        _, me, _ = await edge.call("GET", "/v1/me", pad.headers("zoe"))
        assert me["role_id"] == "bartender" and "menu.86" in me["permissions"]
        assert code_of(await login(edge, pad, "zoe", "97531")) == (401, "wrong_pin")
        assert (await login(edge, pad, "zoe", "8080"))[0] == 201
        # Deactivated: her sessions end at once and she cannot log in.
        got, _, _ = await edge.call(
            "PATCH", "/v1/employees/zoe", till.headers("mia"), json={"active": False}
        )
        assert got == 200
        got = await edge.call("GET", "/v1/me", pad.headers("zoe"))
        assert code_of(got) == (401, "not_logged_in")
        assert code_of(await login(edge, pad, "zoe", "8080")) == (401, "wrong_pin")
        # Staff changes sync (the employees table is in the outbox) and are audited.
        assert edge.sql("SELECT count(*) FROM outbox WHERE tbl = 'employees' AND pk = 'zoe'") == [
            (3,)
        ]
        actions = [a for (a,) in edge.sql("SELECT action FROM audit_log ORDER BY position")]
        assert actions.count("add_employee") == 2 and actions.count("change_employee") == 2

    run(body, tmp_path)


def test_role_edits_apply_at_once(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await manager_tablet(edge)
        await login(edge, till, "sam", PINS["sam"])
        soup = "/v1/menu/items/soup/availability"
        got = await edge.call("POST", soup, till.headers("sam"), json={"available": False})
        assert code_of(got) == (403, "permission_denied")
        got, listed, _ = await edge.call("GET", "/v1/roles", till.headers("mia"))
        assert [r["role_id"] for r in listed["roles"]] == sorted(DEFAULT_ROLES)
        server = {"name": "Server", "permissions": ["order.open", "order.view", "menu.86"]}
        got, role, _ = await edge.call("PUT", "/v1/roles/server", till.headers("mia"), json=server)
        assert got == 200 and role["permissions"] == ["menu.86", "order.open", "order.view"]
        got = await edge.call("POST", soup, till.headers("sam"), json={"available": False})
        assert got[0] == 200
        runner = {"name": "Runner", "permissions": ["order.view"]}
        got, _, _ = await edge.call("PUT", "/v1/roles/runner", till.headers("mia"), json=runner)
        assert got == 200
        _, listed, _ = await edge.call("GET", "/v1/roles", till.headers("mia"))
        found = {r["role_id"]: r for r in listed["roles"]}
        assert found["runner"] == {
            "role_id": "runner",
            "name": "Runner",
            "permissions": ["order.view"],
        }
        assert found["server"]["permissions"] == role["permissions"]
        got, _, _ = await edge.call(
            "PATCH", "/v1/employees/sam", till.headers("mia"), json={"role_id": "runner"}
        )
        _, me, _ = await edge.call("GET", "/v1/me", till.headers("sam"))
        assert me["permissions"] == ["order.view"]

    run(body, tmp_path)


def test_nobody_grants_a_permission_they_do_not_hold(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await manager_tablet(edge)
        lead = {"name": "Shift lead", "permissions": ["staff.manage", "order.open", "order.view"]}
        await edge.call("PUT", "/v1/roles/lead", till.headers("mia"), json=lead)
        await edge.call("PATCH", "/v1/employees/bo", till.headers("mia"), json={"role_id": "lead"})
        await login(edge, till, "bo", PINS["bo"])
        as_bo = till.headers("bo")
        everything = sorted(str(p) for p in Permission)
        before = edge.sql("SELECT id, name, role_id, active FROM employees ORDER BY id")
        roles_before = edge.sql("SELECT id, permissions FROM roles ORDER BY id")
        refused = [
            ("POST", "/v1/employees", {"name": "X", "role_id": "manager", "pin": "1111"}),
            ("PATCH", "/v1/employees/mia", {"name": "Not Mia"}),
            ("PATCH", "/v1/employees/kai", {"role_id": "owner"}),
            (
                "PUT",
                "/v1/roles/lead",
                {"name": "Lead", "permissions": ["staff.manage", "audit.view"]},
            ),
            ("PUT", "/v1/roles/owner", {"name": "Boss", "permissions": everything}),
        ]
        for method, path, payload in refused:
            got = await edge.call(method, path, as_bo, json=payload)
            assert code_of(got) == (403, "permission_denied"), path
        assert edge.sql("SELECT id, name, role_id, active FROM employees ORDER BY id") == before
        assert edge.sql("SELECT id, permissions FROM roles ORDER BY id") == roles_before
        # Within what the lead holds, it works.
        got = await edge.call(
            "POST", "/v1/employees", as_bo, json={"name": "New", "role_id": "lead", "pin": "1111"}
        )
        assert got[0] == 201
        # The owner role always keeps every permission, even for the owner.
        got = await edge.call(
            "PUT",
            "/v1/roles/owner",
            till.headers("mia"),
            json={"name": "Owner", "permissions": everything[:-1]},
        )
        assert code_of(got) == (422, "invalid_request")
        got = await edge.call(
            "PUT",
            "/v1/roles/owner",
            till.headers("mia"),
            json={"name": "Patron", "permissions": everything},
        )
        assert got[0] == 200

    run(body, tmp_path)


BAD_INPUT: list[tuple[str, str, str | None, Any, int, str]] = [
    ("POST", "/v1/employees", "mia", {"name": "Z", "role_id": "server", "pin": "12"}, 422,
     "invalid_request"),
    ("POST", "/v1/employees", "mia", {"name": "Z", "role_id": "server", "pin": "12ab"}, 422,
     "invalid_request"),
    ("POST", "/v1/employees", "mia", {"name": "Z", "role_id": "server", "pin": "123456789"},
     422, "invalid_request"),
    ("POST", "/v1/employees", "mia", {"name": "Z", "role_id": "chef", "pin": "1234"}, 422,
     "invalid_request"),
    ("POST", "/v1/employees", "mia", {"employee_id": "a b", "name": "Z", "role_id": "server",
                                      "pin": "1234"}, 422, "invalid_request"),
    ("POST", "/v1/employees", "mia", {"employee_id": "sam", "name": "Z", "role_id": "server",
                                      "pin": "1234"}, 409, "conflict"),
    ("POST", "/v1/employees", "mia", {"name": "", "role_id": "server", "pin": "1234"}, 422,
     "invalid_request"),
    ("POST", "/v1/employees", "mia", {"name": "Z", "role_id": "server", "pin": "1234",
                                      "pin_hash": "x"}, 422, "invalid_request"),
    ("POST", "/v1/employees", "sam", {"name": "Z", "role_id": "server", "pin": "1234"}, 403,
     "permission_denied"),
    ("PATCH", "/v1/employees/nobody", "mia", {"name": "X"}, 404, "not_found"),
    ("PATCH", "/v1/employees/sam", "mia", {}, 422, "invalid_request"),
    ("PATCH", "/v1/employees/sam", "mia", {"name": None}, 422, "invalid_request"),
    ("PATCH", "/v1/employees/sam", "mia", {"active": "no"}, 422, "invalid_request"),
    ("PATCH", "/v1/employees/sam", "mia", {"role_id": "chef"}, 422, "invalid_request"),
    ("PUT", "/v1/roles/server", "mia", {"name": "S", "permissions": ["order.fly"]}, 422,
     "invalid_request"),
    ("PUT", "/v1/roles/a%20b", "mia", {"name": "S", "permissions": []}, 422, "invalid_request"),
    ("PUT", "/v1/roles/server", "mia", {"name": "S"}, 422, "invalid_request"),
    ("PUT", "/v1/roles/server", "kai", {"name": "S", "permissions": []}, 403,
     "permission_denied"),
    ("POST", "/v1/pairing-codes", "mia", {"kind": "toaster"}, 422, "invalid_request"),
    ("POST", "/v1/pairing-codes", "mia", b"{nope", 400, "malformed_json"),
    ("POST", "/v1/devices/pair", None, {"code": "ABCD-EFGH", "name": "", "kind": "tablet"},
     422, "invalid_request"),
    ("POST", "/v1/devices/pair", None, {"code": "ABCD-EFGH", "name": "X", "kind": "phone"},
     422, "invalid_request"),
    ("POST", "/v1/sessions", "", {"employee_id": "sam"}, 422, "invalid_request"),
    ("POST", "/v1/sessions", "", {"employee_id": "sam", "pin": "24 68"}, 422,
     "invalid_request"),
    ("POST", "/v1/sessions/refresh", "", {"refresh_token": "nope"}, 401, "not_logged_in"),
    ("POST", "/v1/sessions/refresh", "", {"refresh_token": ""}, 422, "invalid_request"),
    ("POST", "/v1/approvals", "sam", {"manager_id": "mia", "pin": "12a4"}, 422,
     "invalid_request"),
    ("POST", "/v1/lockouts/sam/clear", "mia", None, 404, "not_found"),
    ("POST", "/v1/devices/dev_nope/revoke", "mia", None, 404, "not_found"),
]  # fmt: skip

_TABLES = (
    "employees",
    "roles",
    "devices",
    "sessions",
    "pairing_codes",
    "pin_failures",
    "approvals",
    "audit_log",
    "outbox",
    "idempotency",
)


@pytest.mark.parametrize(("method", "path", "who", "payload", "status", "code"), BAD_INPUT)
def test_bad_input_gets_its_code_and_changes_nothing(
    tmp_path: Path, method: str, path: str, who: str | None, payload: Any, status: int, code: str
) -> None:
    async def body(edge: Edge) -> None:
        till = await manager_tablet(edge)
        await edge.login(till, "sam")
        await edge.login(till, "kai")
        headers = {} if who is None else till.headers(who or None)
        before = {t: edge.sql(f"SELECT * FROM {t} ORDER BY 1") for t in _TABLES}
        send = {"data": payload, "headers": {**headers, "Content-Type": "application/json"}}
        if not isinstance(payload, bytes):
            send = {"json": payload, "headers": headers}
        got = await edge.call(method, path, **send)
        assert code_of(got) == (status, code)
        assert {t: edge.sql(f"SELECT * FROM {t} ORDER BY 1") for t in _TABLES} == before

    run(body, tmp_path)


# -- the command line ----------------------------------------------------------------------


def _config(tmp_path: Path, port: int | None = None) -> str:
    if port is None:
        with socket.socket() as sock:  # a port nothing listens on
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    path = tmp_path / f"edge-{port}.toml"
    path.write_text(
        f'db_path = "{tmp_path / "edge.sqlite"}"\nsite_id = "site-1"\nnode_id = "edge-1"\n'
        f'port = {port}\n[cloud]\nurl = ""\ntoken = ""\n[mdns]\nenabled = false\n',
        encoding="utf-8",
    )
    return str(path)


def test_the_first_device_is_set_up_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path)
    add = ["add-employee", "--config", config]
    assert (
        edge_cli.main([*add, "--id", "mia", "--name", "Mia", "--role", "manager", "--pin", "1234"])
        == 0
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("5678\n"))  # the PIN, piped in
    assert edge_cli.main([*add, "--id", "ana", "--name", "Ana", "--role", "server"]) == 0
    assert (
        edge_cli.main([*add, "--id", "mia", "--name", "M", "--role", "server", "--pin", "1111"])
        == 1
    )
    assert edge_cli.main([*add, "--id", "x", "--name", "X", "--role", "chef", "--pin", "1111"]) == 1
    assert edge_cli.main([*add, "--id", "x", "--name", "X", "--role", "server", "--pin", "12"]) == 2
    assert "exists" in capsys.readouterr().err
    assert edge_cli.main(["pair", "--config", config, "--name", "Till 1"]) == 0
    out = capsys.readouterr().out
    found = CODE.search(out)
    assert found is not None and "Till 1" in out

    async def body() -> None:
        async with running_edge(tmp_path) as edge:
            request = {"code": found.group(0), "name": "Till 1", "kind": "tablet"}
            got, paired, _ = await edge.call("POST", "/v1/devices/pair", json=request)
            assert got == 201
            till = Tablet(paired["device_id"], paired["device_token"])
            got, session = await login(edge, till, "mia", "1234")
            assert got == 201 and session["role_id"] == "manager"
            assert (await login(edge, till, "ana", "5678"))[0] == 201
            # While the edge runs: pairing codes still come from the command line, but
            # employees (a synced write the running edge would not know of) do not.
            running = _config(tmp_path, int(edge.url.rsplit(":", 1)[1]))
            assert await asyncio.to_thread(edge_cli.main, ["pair", "--config", running]) == 0
            second = CODE.search(capsys.readouterr().out)
            assert second is not None
            got, _, _ = await edge.call(
                "POST", "/v1/devices/pair", json={**request, "code": second.group(0)}
            )
            assert got == 201
            refused = [
                "add-employee",
                "--config",
                running,
                "--id",
                "eve",
                "--name",
                "Eve",
                "--role",
                "server",
                "--pin",
                "1111",
            ]
            assert await asyncio.to_thread(edge_cli.main, refused) == 1
            assert "running" in capsys.readouterr().err
            assert await edge.store.get("employees", "eve") is None
            entries = edge.sql("SELECT action FROM audit_log WHERE employee_id IS NULL")
            assert ("add_employee",) in entries

    asyncio.run(body())
