"""Orders over real HTTP against a real edge and SQLite file.

The whole flow (open, add, fire, void, edit, transfer, move, close), check numbers under
concurrency and across business days, concurrent lines, idempotent retries, stale header
edits, voids before and after fire with and without a manager's approval, permissions per
role, and bad input refused whole with nothing changed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import pytest

from edge import order_lines
from edge.api.auth import grant_approval
from edge.errors import ApiCode, ApiError
from edge.orders import DAY_STARTS_AT, business_day
from shared.orders import EDITABLE, ORDER_TRANSITIONS, OrderStatus
from sync_protocol.changes import Op

from .api_harness import Edge, Tablet, edge_server, running_edge, seed_modifiers

T = TypeVar("T")
ORDERS = "/v1/orders"


def run(fn: Callable[[Edge], Coroutine[Any, Any, T]], tmp_path: Path) -> T:
    async def body() -> T:
        async with running_edge(tmp_path) as edge:
            await seed_modifiers(edge.store)
            return await fn(edge)

    return asyncio.run(body())


async def till_for(edge: Edge, name: str = "till", *staff: str) -> Tablet:
    tablet = await edge.pair(name)
    for who in staff or ("sam", "mia", "kai", "bo", "ola"):
        await edge.login(tablet, who)
    return tablet


async def open_order(
    edge: Edge, tablet: Tablet, who: str = "sam", table: str = "T1", covers: int = 2
) -> dict[str, Any]:
    got, order, _ = await edge.call(
        "POST", ORDERS, tablet.headers(who), json={"table_name": table, "covers": covers}
    )
    assert got == 201, order
    return order  # type: ignore[no-any-return]


async def add_line(
    edge: Edge, tablet: Tablet, order_id: str, who: str = "sam", **line: Any
) -> tuple[int, Any]:
    got, answer, _ = await edge.call(
        "POST", f"{ORDERS}/{order_id}/lines", tablet.headers(who), json=line
    )
    return got, answer


def state(edge: Edge) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    tables = ("orders", "order_lines", "tickets", "check_numbers", "menu_items", "approvals")
    out: dict[str, Any] = {t: edge.sql(f"SELECT * FROM {t} ORDER BY 1") for t in tables}
    for table in ("outbox", "audit_log", "idempotency"):
        out[table] = edge.sql(f"SELECT count(*) FROM {table}")
    return out


def code(answer: Any) -> str:
    return str(answer["error"]["code"])


# -- the whole flow --------------------------------------------------------------------------


def test_the_whole_flow_from_open_to_close(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        order = await open_order(edge, till, table="T4", covers=3)
        assert (order["check_number"], order["status"], order["server_id"]) == (1, "open", "sam")
        assert order["business_day"] == business_day(order["opened_at_ms"])
        assert order["totals"]["total_pence"] == 0 and order["lines"] == []
        oid = order["id"]
        got, soup = await add_line(edge, till, oid, item_id="soup", quantity=2, notes="no bread")
        assert got == 201 and soup["order"]["totals"]["total_pence"] == 900
        got, steak = await add_line(
            edge, till, oid, item_id="steak", modifiers=["rare", "pepper"], course=2, seat=1
        )
        assert got == 201
        (steak_line,) = steak["lines"]  # the answer carries the lines it added, not the others
        assert steak["line_ids"] == [steak_line["id"]] and "lines" not in steak["order"]
        got, whole, _ = await edge.call("GET", f"{ORDERS}/{oid}", till.headers("sam"))
        assert whole["lines"][1] == steak_line  # as the whole order shows it
        assert steak["order"] == {k: v for k, v in whole.items() if k != "lines"}
        assert steak_line["unit_price_pence"] == 2200 + 250
        assert [m["name"] for m in steak_line["modifiers"]] == ["Rare", "Peppercorn"]
        got, ipa = await add_line(edge, till, oid, item_id="ipa")
        assert got == 201 and ipa["order"]["totals"] == {
            "subtotal_pence": 900 + 2450 + 550, "discount_pence": 0, "total_pence": 3900,
            "voided_pence": 0, "line_count": 3, "item_count": 4,
        }  # fmt: skip
        # Course 1 goes out: one ticket per station, the steak (course 2) waits.
        got, fired, _ = await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"),
                                        json={"course": 1})  # fmt: skip
        assert got == 200 and fired["order"]["status"] == "fired"
        tickets = {t["station"]: t for t in fired["tickets"]}
        assert sorted(tickets) == ["bar", "kitchen"]
        assert [(i["name"], i["quantity"], i["notes"]) for i in tickets["kitchen"]["items"]] == [
            ("Soup", 2, "no bread")
        ]
        assert [i["name"] for i in tickets["bar"]["items"]] == ["IPA"]
        got, fired, _ = await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"),
                                        json={})  # fmt: skip
        ((station, course, items),) = [(t["station"], t["course"], t["items"])
                                       for t in fired["tickets"]]  # fmt: skip
        assert (station, course) == ("kitchen", 2)
        assert items[0]["modifiers"] == ["Rare", "Peppercorn"] and items[0]["seat"] == 1
        got, again, _ = await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"),
                                        json={})  # fmt: skip
        assert (got, code(again)) == (409, "conflict")
        stored = edge.sql("SELECT station, course, items, check_number, table_name FROM tickets")
        assert (
            len(stored) == 3 and {r[3] for r in stored} == {1} and {r[4] for r in stored} == {"T4"}
        )
        # The header: edit with its version, transfer.
        got, current, _ = await edge.call("GET", f"{ORDERS}/{oid}", till.headers("sam"))
        got, edited, _ = await edge.call(
            "PATCH", f"{ORDERS}/{oid}", till.headers("sam", **{"If-Match": current["version"]}),
            json={"covers": 4, "notes": "birthday"},
        )  # fmt: skip
        assert got == 200 and (edited["covers"], edited["notes"]) == (4, "birthday")
        got, moved, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/transfer", till.headers("sam"), json={"table_name": "T9"}
        )
        assert got == 200 and moved["table_name"] == "T9"
        # Nothing paid yet: an order with something to pay cannot close.
        got, refused, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        assert (got, code(refused)) == (409, "balance_due")
        assert refused["error"]["details"]["due_pence"] == 3900
        for line in moved["lines"]:  # mia voids everything (fired lines need her)
            got, _, _ = await edge.call(
                "POST", f"{ORDERS}/{oid}/lines/{line['id']}/void", till.headers("mia"),
                json={"reason": "walked out"},
            )  # fmt: skip
            assert got == 200
        got, closed, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        assert got == 200 and closed["status"] == "closed" and closed["closed_at_ms"]
        assert closed["totals"]["total_pence"] == 0 and closed["totals"]["voided_pence"] == 3900
        got, late = await add_line(edge, till, oid, item_id="soup")
        assert (got, code(late)) == (409, "invalid_transition")
        got, listed, _ = await edge.call("GET", f"{ORDERS}?status=open", till.headers("sam"))
        assert listed == {"orders": []}
        got, listed, _ = await edge.call("GET", f"{ORDERS}?status=closed", till.headers("kai"))
        assert [o["id"] for o in listed["orders"]] == [oid] and "lines" not in listed["orders"][0]
        actions = [r[0] for r in edge.sql("SELECT action FROM audit_log ORDER BY position")]
        assert actions[:4] == ["open_order", "add_line", "add_line", "add_line"]
        assert actions[-1] == "close_order" and "transfer_order" in actions

    run(body, tmp_path)


def test_an_order_with_nothing_to_pay_closes_and_status_moves_only_forward(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        got, closed, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        assert got == 200 and closed["status"] == "closed"
        got, again, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        assert (got, code(again)) == (409, "invalid_transition")
        assert again["error"]["details"] | {"order_id": oid} == {
            "order_id": oid, "from": "closed", "to": "closed"
        }  # fmt: skip
        for path, payload in [
            (f"{ORDERS}/{oid}/fire", {}),
            (f"{ORDERS}/{oid}/transfer", {"table_name": "T2"}),
        ]:
            got, answer, _ = await edge.call("POST", path, till.headers("sam"), json=payload)
            assert (got, code(answer)) == (409, "invalid_transition"), path
        got, answer, _ = await edge.call(
            "PATCH", f"{ORDERS}/{oid}", till.headers("sam"), json={"covers": 1}
        )
        assert (got, code(answer)) == (409, "invalid_transition")

    run(body, tmp_path)


def test_the_transition_table_only_moves_forward() -> None:
    ranks = {status: n for n, status in enumerate(OrderStatus)}
    assert set(ORDER_TRANSITIONS) == set(OrderStatus)
    for current, targets in ORDER_TRANSITIONS.items():
        assert all(ranks[t] > ranks[current] for t in targets), current


def test_only_a_running_order_can_be_voided_and_a_voided_one_goes_nowhere() -> None:
    into_voided = {s for s, targets in ORDER_TRANSITIONS.items() if OrderStatus.VOIDED in targets}
    assert into_voided == {OrderStatus.OPEN, OrderStatus.FIRED} == EDITABLE
    assert ORDER_TRANSITIONS[OrderStatus.VOIDED] == frozenset()
    assert OrderStatus.VOIDED not in EDITABLE


# -- check numbers ---------------------------------------------------------------------------


def test_concurrent_opens_get_unique_check_numbers(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablets = [await till_for(edge, f"till-{n}", "sam", "bo") for n in range(3)]
        calls = [
            edge.call("POST", ORDERS, tablets[n % 3].headers(("sam", "bo")[n % 2]),
                      json={"table_name": f"T{n}", "covers": 2})
            for n in range(30)
        ]  # fmt: skip
        answers = await asyncio.gather(*calls)
        assert all(got == 201 for got, _, _ in answers)
        numbers = sorted(answer["check_number"] for _, answer, _ in answers)
        assert numbers == list(range(1, 31))
        assert edge.sql("SELECT last FROM check_numbers") == [(30,)]

    run(body, tmp_path)


def _local_ms(year: int, month: int, day: int, hour: int, minute: int = 0) -> int:
    return int(datetime(year, month, day, hour, minute).timestamp() * 1000)


def test_check_numbers_restart_each_business_day(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await edge.pair("till")
        seen: list[tuple[str, int]] = []
        for moment in [
            _local_ms(2031, 3, 14, 11),
            _local_ms(2031, 3, 14, 23, 30),
            _local_ms(2031, 3, 15, 3, 59),  # still the 14th's service
            _local_ms(2031, 3, 15, 4, 0),  # a new business day
            _local_ms(2031, 3, 15, 12),
            _local_ms(2031, 3, 16, 12),
        ]:
            edge.set_wall_clock(moment)
            await edge.login(till, "sam")  # a fresh session at the new time
            order = await open_order(edge, till)
            seen.append((order["business_day"], order["check_number"]))
        assert seen == [
            ("2031-03-14", 1), ("2031-03-14", 2), ("2031-03-14", 3),
            ("2031-03-15", 1), ("2031-03-15", 2), ("2031-03-16", 1),
        ]  # fmt: skip
        # An edge rebuilt from the cloud (its counters lost) never reuses a number.
        edge.sql("DELETE FROM check_numbers")
        order = await open_order(edge, till)
        assert (order["business_day"], order["check_number"]) == ("2031-03-16", 2)

    run(body, tmp_path)


def test_the_business_day_starts_at_the_documented_hour() -> None:
    def at(day: int, hour: int, minute: int) -> int:
        return int(datetime(2030, 1, day, hour, minute, tzinfo=UTC).timestamp() * 1000)

    assert DAY_STARTS_AT.hour == 4
    assert business_day(at(1, 3, 59), UTC) == "2029-12-31"
    assert business_day(at(1, 4, 0), UTC) == "2030-01-01"
    assert business_day(at(1, 23, 59), UTC) == "2030-01-01"
    assert business_day(at(2, 0, 30), UTC, time(0, 0)) == "2030-01-02"


# -- concurrency and retries -----------------------------------------------------------------


def test_concurrent_lines_from_several_tablets_are_all_kept(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablets = [await till_for(edge, f"till-{n}", "sam", "bo", "mia") for n in range(4)]
        oid = (await open_order(edge, tablets[0]))["id"]
        staff = ("sam", "bo", "mia")
        singles = [
            add_line(edge, tablets[n % 4], oid, staff[n % 3], item_id="soup", notes=f"req-{n}")
            for n in range(24)
        ]
        batches = [
            edge.call("POST", f"{ORDERS}/{oid}/lines/batch", tablets[n % 4].headers("sam"),
                      json={"lines": [{"item_id": "ipa", "notes": f"batch-{n}-{k}"}
                                      for k in range(3)]})
            for n in range(4)
        ]  # fmt: skip
        results = await asyncio.gather(*singles, *batches)
        assert [r[0] for r in results] == [201] * 28
        got, order, _ = await edge.call("GET", f"{ORDERS}/{oid}", tablets[1].headers("sam"))
        notes = sorted(line["notes"] for line in order["lines"])
        expected = [f"req-{n}" for n in range(24)]
        expected += [f"batch-{n}-{k}" for n in range(4) for k in range(3)]
        assert notes == sorted(expected)
        assert order["totals"]["total_pence"] == 24 * 450 + 12 * 550
        assert edge.sql("SELECT count(*) FROM order_lines") == [(36,)]
        # Line changes never move the header's version.
        assert {r[1]["order"]["version"] for r in results} == {order["version"]}

    run(body, tmp_path)


def test_a_retried_add_line_with_the_same_idempotency_key_adds_one_line(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        headers = till.headers("sam", **{"Idempotency-Key": "till-add-000001"})
        path, line = f"{ORDERS}/{oid}/lines", {"item_id": "steak", "modifiers": ["well"]}
        first = await edge.call("POST", path, headers, json=line)
        retries = await asyncio.gather(
            *(edge.call("POST", path, headers, json=line) for _ in range(5))
        )
        assert first[0] == 201
        for got, answer, resp in retries:
            assert (got, answer) == (201, first[1])
            assert resp.headers.get("Idempotent-Replayed") == "true"
        assert edge.sql("SELECT count(*) FROM order_lines") == [(1,)]
        got, answer, _ = await edge.call("POST", path, headers, json={"item_id": "soup"})
        assert (got, code(answer)) == (422, "idempotency_key_reused")

    run(body, tmp_path)


def test_a_line_add_answers_with_the_order_totals_and_only_the_lines_it_added(
    tmp_path: Path,
) -> None:
    """The answer's header, version and totals are the whole order's (voids, quantities and
    all), computed without reading every line; its lines are the new ones, as GET shows them."""

    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till, table="T9"))["id"]
        answers = []
        for n in range(12):
            got, added = await add_line(edge, till, oid, item_id=("soup", "ipa")[n % 2],
                                        quantity=1 + n % 3)  # fmt: skip
            assert got == 201 and len(added["lines"]) == 1
            answers.append(added)
            if n % 4 == 1:  # some voided, so the totals must leave them out
                got, _, _ = await edge.call(
                    "POST", f"{ORDERS}/{oid}/lines/{added['line_ids'][0]}/void",
                    till.headers("mia"), json={"reason": "spilt"},
                )  # fmt: skip
                assert got == 200
        got, added, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/batch", till.headers("sam"),
            json={"lines": [{"item_id": "steak", "modifiers": ["rare"]}, {"item_id": "ipa"}]},
        )  # fmt: skip
        assert got == 201 and [x["id"] for x in added["lines"]] == added["line_ids"]
        got, whole, _ = await edge.call("GET", f"{ORDERS}/{oid}", till.headers("sam"))
        assert added["order"] == {k: v for k, v in whole.items() if k != "lines"}
        assert whole["lines"][-2:] == added["lines"]
        got, listed, _ = await edge.call("GET", ORDERS, till.headers("sam"))  # summed, not built
        assert got == 200 and listed["orders"] == [added["order"]]
        assert whole["totals"]["line_count"] == 14 - 3 and whole["totals"]["voided_pence"] > 0
        shown = {line["id"]: line for line in whole["lines"]}
        for answer in answers:  # each line as it was added (none voided yet then)
            (line,) = answer["lines"]
            assert {**shown[line["id"]], "voided": False, "void_reason": None,
                    "voided_by": None} == line  # fmt: skip

    run(body, tmp_path)


# -- firing and listing ----------------------------------------------------------------------


def test_fire_sends_one_ticket_per_station_with_a_snapshot_of_its_lines(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till, table="T5"))["id"]
        got, added, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/batch", till.headers("sam"),
            json={"lines": [
                {"item_id": "steak", "modifiers": ["well", "aioli"], "seat": 2,
                 "notes": "nut allergy"},
                {"item_id": "ipa", "quantity": 2, "seat": 1},
                {"item_id": "soup", "seat": 1},
                {"item_id": "ipa", "seat": 2},
            ]},
        )  # fmt: skip
        steak, ipa, soup, ipa2 = added["line_ids"]
        await edge.call("POST", f"{ORDERS}/{oid}/lines/{soup}/void", till.headers("sam"),
                        json={"reason": "out of bowls"})  # fmt: skip
        got, fired, _ = await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"),
                                        json={})  # fmt: skip
        assert got == 200
        bar, kitchen = fired["tickets"]
        assert (bar["station"], bar["course"], kitchen["station"]) == ("bar", 1, "kitchen")
        assert (bar["order_id"], kitchen["order_id"]) == (oid, oid)  # each names its order
        assert bar["items"] == [
            {"line_id": ipa, "name": "IPA", "quantity": 2, "modifiers": [], "notes": None,
             "seat": 1, "course": 1},
            {"line_id": ipa2, "name": "IPA", "quantity": 1, "modifiers": [], "notes": None,
             "seat": 2, "course": 1},
        ]  # fmt: skip
        assert kitchen["items"] == [
            {"line_id": steak, "name": "Steak", "quantity": 1, "modifiers": ["Well done", "Aioli"],
             "notes": "nut allergy", "seat": 2, "course": 1},
        ]  # fmt: skip
        # The tickets table holds the same snapshot; each fired line names its ticket.
        stored = {
            r[0]: (r[1], json.loads(r[2]), r[3], r[4])
            for r in edge.sql("SELECT id, station, items, order_id, fired_by FROM tickets")
        }
        assert stored == {t["id"]: (t["station"], t["items"], oid, "sam") for t in fired["tickets"]}
        tickets = {x["id"]: x["ticket_id"] for x in fired["order"]["lines"]}
        assert tickets == {steak: kitchen["id"], ipa: bar["id"], ipa2: bar["id"], soup: None}
        # A later menu edit does not touch what the kitchen was sent.
        await edge.call("PATCH", "/v1/menu/items/steak", till.headers("mia"),
                        json={"name": "Sirloin", "station": "grill"})  # fmt: skip
        assert (
            json.loads(edge.sql("SELECT items FROM tickets WHERE station = 'kitchen'")[0][0])[0][
                "name"
            ]
            == "Steak"
        )

    run(body, tmp_path)


def test_orders_are_listed_by_status_and_business_day(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        first = await open_order(edge, till, table="T1")
        second = await open_order(edge, till, table="T2")
        await add_line(edge, till, second["id"], item_id="soup")
        await edge.call("POST", f"{ORDERS}/{second['id']}/fire", till.headers("sam"), json={})
        third = await open_order(edge, till, table="T3")
        await edge.call("POST", f"{ORDERS}/{third['id']}/close", till.headers("sam"))

        async def ids(query: str) -> list[str]:
            got, listed, _ = await edge.call("GET", f"{ORDERS}{query}", till.headers("sam"))
            assert got == 200, listed
            return [o["id"] for o in listed["orders"]]

        assert await ids("?status=open") == [first["id"]]
        assert await ids("?status=open,fired") == [second["id"], first["id"]]
        assert await ids("") == [third["id"], second["id"], first["id"]]
        assert await ids("?limit=1") == [third["id"]]
        assert await ids(f"?business_day={first['business_day']}&status=closed") == [third["id"]]
        assert await ids("?business_day=1999-01-01") == []
        got, listed, _ = await edge.call("GET", f"{ORDERS}?status=fired", till.headers("sam"))
        assert listed["orders"][0]["totals"]["total_pence"] == 450

    run(body, tmp_path)


# -- the header ------------------------------------------------------------------------------


def test_a_stale_header_edit_gets_409_with_the_current_order(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        a = await till_for(edge, "till-a", "sam")
        b = await till_for(edge, "till-b", "bo")
        order = await open_order(edge, a)
        oid, read = order["id"], order["version"]
        got, line = await add_line(edge, b, oid, "bo", item_id="soup")
        assert line["order"]["version"] == read  # lines do not touch the header
        got, edited, _ = await edge.call(
            "PATCH", f"{ORDERS}/{oid}", a.headers("sam", **{"If-Match": f'"{read}"'}),
            json={"table_name": "T7"},
        )  # fmt: skip
        assert got == 200 and edited["version"] != read
        before = state(edge)
        got, stale, _ = await edge.call(
            "PATCH", f"{ORDERS}/{oid}", b.headers("bo", **{"If-Match": read}),
            json={"covers": 6},
        )  # fmt: skip
        assert (got, code(stale)) == (409, "stale_version")
        current = stale["error"]["details"]["current"]
        assert (current["table_name"], current["covers"], current["version"]) == (
            "T7", 2, edited["version"],
        )  # fmt: skip
        assert len(current["lines"]) == 1
        assert state(edge) == before
        # With the fresh version it goes through; without If-Match the last write wins.
        got, ok, _ = await edge.call(
            "PATCH", f"{ORDERS}/{oid}", b.headers("bo", **{"If-Match": current["version"]}),
            json={"covers": 6},
        )  # fmt: skip
        assert got == 200 and (ok["table_name"], ok["covers"]) == ("T7", 6)
        got, ok, _ = await edge.call(
            "PATCH", f"{ORDERS}/{oid}", a.headers("sam"), json={"notes": None, "covers": 5}
        )
        assert got == 200 and ok["covers"] == 5
        got, stale, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/transfer", a.headers("sam", **{"If-Match": read}),
            json={"table_name": "T1"},
        )  # fmt: skip
        assert (got, code(stale)) == (409, "stale_version")

    run(body, tmp_path)


def test_transfer_to_another_table_and_server(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        got, moved, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/transfer", till.headers("sam"),
            json={"table_name": "Bar 2", "server_id": "bo"},
        )  # fmt: skip
        assert got == 200 and (moved["table_name"], moved["server_id"]) == ("Bar 2", "bo")
        got, answer, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/transfer", till.headers("sam"), json={"server_id": "nobody"}
        )
        assert (got, code(answer)) == (404, "not_found")
        got, answer, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/transfer", till.headers("kai"), json={"table_name": "T3"}
        )
        assert (got, code(answer)) == (403, "permission_denied")

    run(body, tmp_path)


# -- voids -----------------------------------------------------------------------------------


def test_voids_before_and_after_fire_with_and_without_approval(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        ids = []
        for _ in range(4):
            got, added = await add_line(edge, till, oid, item_id="soup")
            ids += added["line_ids"]

        def void(line_id: str) -> str:
            return f"{ORDERS}/{oid}/lines/{line_id}/void"

        why = {"reason": "changed mind"}
        # Before fire: a server voids alone; an approval sent along is not spent.
        _, approval, _ = await edge.store.transaction(
            lambda tx: grant_approval(tx, "mia", till.device_id)
        )
        got, order, _ = await edge.call(
            "POST", void(ids[0]), till.headers("sam", **{"X-Fynlo-Approval": approval}), json=why
        )
        assert got == 200
        (line,) = [x for x in order["lines"] if x["id"] == ids[0]]
        assert (line["voided"], line["voided_by"], line["void_approved_by"]) == (True, "sam", None)
        assert edge.sql("SELECT used_at_ms FROM approvals") == [(None,)]
        got, again, _ = await edge.call("POST", void(ids[0]), till.headers("sam"), json=why)
        assert (got, code(again)) == (409, "conflict")
        got, _, _ = await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"), json={})
        # After fire: a server needs a manager's approval.
        before = state(edge)
        got, refused, _ = await edge.call("POST", void(ids[1]), till.headers("sam"), json=why)
        assert (got, code(refused)) == (403, "manager_approval_required")
        assert refused["error"]["details"] == {"permission": "order.void_sent"}
        assert state(edge) == before
        approved = till.headers(
            "sam", **{"X-Fynlo-Approval": approval, "Idempotency-Key": "void-after-fire-1"}
        )
        got, order, _ = await edge.call("POST", void(ids[1]), approved, json=why)
        assert got == 200
        (line,) = [x for x in order["lines"] if x["id"] == ids[1]]
        assert (line["voided_by"], line["void_approved_by"]) == ("sam", "mia")
        # The tablet retries after a Wi-Fi blip: the first answer, although the approval
        # it carries is spent now.
        got, retried, resp = await edge.call("POST", void(ids[1]), approved, json=why)
        assert (got, retried) == (200, order) and resp.headers["Idempotent-Replayed"] == "true"
        assert edge.sql("SELECT count(*) FROM approvals WHERE used_at_ms IS NOT NULL") == [(1,)]
        (entry,) = edge.sql("SELECT detail FROM audit_log WHERE action = 'void_line'"
                            " ORDER BY position DESC LIMIT 1")  # fmt: skip
        assert json.loads(entry[0])["approved_by"] == "mia"
        # The approval was spent: it cannot void another line.
        got, refused, _ = await edge.call(
            "POST", void(ids[2]), till.headers("sam", **{"X-Fynlo-Approval": approval}), json=why
        )
        assert (got, code(refused)) == (403, "approval_invalid")
        # A manager holds order.void_sent herself; the kitchen may not void at all.
        got, order, _ = await edge.call("POST", void(ids[2]), till.headers("mia"), json=why)
        assert got == 200
        (line,) = [x for x in order["lines"] if x["id"] == ids[2]]
        assert line["void_approved_by"] == "mia"
        got, refused, _ = await edge.call("POST", void(ids[3]), till.headers("kai"), json=why)
        assert (got, code(refused)) == (403, "permission_denied")
        got, refused, _ = await edge.call("POST", void("ln_nope"), till.headers("mia"), json=why)
        assert (got, code(refused)) == (404, "not_found")
        got, refused, _ = await edge.call(
            "POST", void(ids[3]), till.headers("mia"), json={"reason": "  "}
        )
        assert (got, code(refused)) == (422, "invalid_request")

    run(body, tmp_path)


# -- discounts -------------------------------------------------------------------------------


def discount_path(order_id: str) -> str:
    return f"{ORDERS}/{order_id}/discount"


def test_a_discount_comes_off_the_total_follows_the_check_and_comes_off_again(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        await add_line(edge, till, oid, item_id="soup", quantity=2)
        await add_line(edge, till, oid, item_id="ipa")  # subtotal 900 + 550
        mia = till.headers("mia")
        got, order, _ = await edge.call(
            "PUT", discount_path(oid), mia, json={"percent": 5, "reason": "regulars"}
        )
        assert got == 200, order
        assert order["discount"] == {
            "percent": 5, "amount_pence": None, "reason": "regulars", "by": "mia",
            "approved_by": "mia",
        }  # fmt: skip
        totals = order["totals"]  # 5% of 1450 is 72.5: half up to 73 (not to the even 72)
        assert (totals["subtotal_pence"], totals["discount_pence"], totals["total_pence"]) == (
            1450, 73, 1377
        )  # fmt: skip
        # A percentage follows the check: the next line's answer and every read agree.
        got, added = await add_line(edge, till, oid, item_id="soup")
        assert got == 201
        assert (added["order"]["totals"]["discount_pence"], added["order"]["totals"]["total_pence"]
                ) == (95, 1900 - 95)  # fmt: skip
        got, whole, _ = await edge.call("GET", f"{ORDERS}/{oid}", mia)
        assert added["order"] == {k: v for k, v in whole.items() if k != "lines"}
        got, listed, _ = await edge.call("GET", ORDERS, mia)
        assert listed["orders"][0] == added["order"]
        # An amount replaces it, and never takes more than the subtotal.
        got, order, _ = await edge.call(
            "PUT", discount_path(oid), mia, json={"amount_pence": 500, "reason": "late food"}
        )
        assert got == 200 and order["discount"]["percent"] is None
        assert (order["totals"]["discount_pence"], order["totals"]["total_pence"]) == (500, 1400)
        got, order, _ = await edge.call(
            "PUT", discount_path(oid), mia, json={"amount_pence": 99_999, "reason": "on us"}
        )
        assert (order["totals"]["discount_pence"], order["totals"]["total_pence"]) == (1900, 0)
        # Taken off: the full price again (and taking off nothing changes nothing).
        got, order, _ = await edge.call("DELETE", discount_path(oid), mia)
        assert got == 200 and order["discount"] is None
        assert (order["totals"]["discount_pence"], order["totals"]["total_pence"]) == (0, 1900)
        head = outbox_head(edge)
        got, again, _ = await edge.call("DELETE", discount_path(oid), mia)
        assert (got, again) == (200, order) and new_changes(edge, head) == []
        # Each change synced (the order's row) and was audited with its before and after.
        stored = edge.sql("SELECT discount_percent, discount_pence FROM orders")
        assert stored == [(None, None)]
        logged = edge.sql(
            "SELECT action, detail FROM audit_log WHERE action LIKE '%discount' ORDER BY position"
        )
        assert [a for a, _ in logged] == [
            "set_discount", "set_discount", "set_discount", "remove_discount", "remove_discount"
        ]  # fmt: skip
        (change,) = json.loads(logged[0][1])["changes"]
        assert change["table"] == "orders" and change["after"]["discount_percent"] == 5
        assert change["before"]["discount_percent"] is None

    run(body, tmp_path)


def test_a_full_discount_lets_the_check_close_with_nothing_to_pay(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        await add_line(edge, till, oid, item_id="soup")
        got, refused, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        assert (got, refused["error"]["details"]["due_pence"]) == (409, 450)
        got, _, _ = await edge.call(
            "PUT", discount_path(oid), till.headers("mia"), json={"percent": 50, "reason": "x"}
        )
        got, refused, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        assert (got, refused["error"]["details"]["due_pence"]) == (409, 225)
        got, _, _ = await edge.call(
            "PUT", discount_path(oid), till.headers("mia"), json={"percent": 100, "reason": "comp"}
        )
        got, closed, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        assert got == 200 and closed["status"] == "closed", closed
        assert closed["totals"]["total_pence"] == 0 and closed["totals"]["discount_pence"] == 450
        # Closed: the discount can no longer change.
        got, refused, _ = await edge.call("DELETE", discount_path(oid), till.headers("mia"))
        assert (got, code(refused)) == (409, "invalid_transition")

    run(body, tmp_path)


def test_a_server_discounts_only_with_a_managers_approval_spent_once(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        await add_line(edge, till, oid, item_id="soup")
        offer = {"percent": 10, "reason": "birthday"}
        before = state(edge)
        got, refused, _ = await edge.call("PUT", discount_path(oid), till.headers("sam"),
                                          json=offer)  # fmt: skip
        assert (got, code(refused)) == (403, "manager_approval_required")
        assert refused["error"]["details"] == {"permission": "order.discount"}
        assert state(edge) == before
        _, approval, _ = await edge.store.transaction(
            lambda tx: grant_approval(tx, "mia", till.device_id)
        )
        approved = till.headers(
            "sam", **{"X-Fynlo-Approval": approval, "Idempotency-Key": "discount-birthday-1"}
        )
        got, order, _ = await edge.call("PUT", discount_path(oid), approved, json=offer)
        assert got == 200, order
        assert (order["discount"]["by"], order["discount"]["approved_by"]) == ("sam", "mia")
        assert order["totals"]["discount_pence"] == 45
        # A retry gets the first answer; the approval was spent once, and only once.
        got, retried, resp = await edge.call("PUT", discount_path(oid), approved, json=offer)
        assert (got, retried) == (200, order) and resp.headers["Idempotent-Replayed"] == "true"
        assert edge.sql("SELECT count(*) FROM approvals WHERE used_at_ms IS NOT NULL") == [(1,)]
        (entry,) = edge.sql("SELECT detail FROM audit_log WHERE action = 'set_discount'")
        assert json.loads(entry[0])["approved_by"] == "mia"
        before = state(edge)
        got, refused, _ = await edge.call(
            "DELETE", discount_path(oid), till.headers("sam", **{"X-Fynlo-Approval": approval})
        )
        assert (got, code(refused)) == (403, "approval_invalid")
        got, refused, _ = await edge.call("DELETE", discount_path(oid), till.headers("kai"))
        assert (got, code(refused)) == (403, "manager_approval_required")
        assert state(edge) == before

    run(body, tmp_path)


@pytest.mark.parametrize(
    "payload",
    [
        {"percent": 10, "amount_pence": 100, "reason": "both"},
        {"reason": "neither"},
        {"percent": 0, "reason": "none"},
        {"percent": 101, "reason": "more than all"},
        {"percent": 12.5, "reason": "not whole"},
        {"amount_pence": -100, "reason": "a surcharge"},
        {"amount_pence": 100, "reason": "   "},
        {"amount_pence": 100},
        {"amount_pence": "100", "reason": "text"},
        {"percent": 10, "reason": "x", "line_id": "ln_1"},
    ],
)
def test_a_bad_discount_is_refused_and_changes_nothing(tmp_path: Path, payload: Any) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        await add_line(edge, till, oid, item_id="soup")
        before = state(edge)
        got, answer, _ = await edge.call(
            "PUT", discount_path(oid), till.headers("mia"), json=payload
        )
        assert (got, code(answer)) == (422, "invalid_request"), answer
        got, answer, _ = await edge.call(
            "PUT", discount_path("ord_no"), till.headers("mia"), json={"percent": 5, "reason": "x"}
        )
        assert (got, code(answer)) == (404, "not_found")
        assert state(edge) == before

    run(body, tmp_path)


# -- voiding the whole order -----------------------------------------------------------------


def void_path(order_id: str) -> str:
    return f"{ORDERS}/{order_id}/void"


def new_changes(edge: Edge, after_seq: int) -> list[tuple[str, str, int]]:
    """The synced changes written after outbox ``after_seq``: (table, row, op), audit aside."""
    return edge.sql(
        "SELECT tbl, pk, op FROM outbox WHERE seq > ? AND tbl != 'audit_log' ORDER BY seq",
        (after_seq,),
    )


def outbox_head(edge: Edge) -> int:
    return int(edge.sql("SELECT coalesce(max(seq), 0) FROM outbox")[0][0])


def test_voiding_an_open_order_voids_each_live_line_and_ends_the_order(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        order = await open_order(edge, till, table="T6")
        oid = order["id"]
        got, added, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/batch", till.headers("sam"),
            json={"lines": [{"item_id": "soup", "quantity": 2},
                            {"item_id": "steak", "modifiers": ["rare"]}, {"item_id": "ipa"}]},
        )  # fmt: skip
        assert got == 201
        soup, steak, ipa = added["line_ids"]
        got, _, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/{ipa}/void", till.headers("sam"),
            json={"reason": "spilt"},
        )  # fmt: skip
        assert got == 200
        head = outbox_head(edge)
        got, voided, _ = await edge.call(
            "POST", void_path(oid), till.headers("sam"), json={"reason": "guests left"}
        )
        assert got == 200, voided
        assert voided["status"] == "voided" and voided["closed_at_ms"] is not None
        assert voided["closed_at_ms"] >= order["opened_at_ms"]
        assert voided["totals"] == {
            "subtotal_pence": 0, "discount_pence": 0, "total_pence": 0,
            "voided_pence": 900 + 2200 + 550, "line_count": 0, "item_count": 0,
        }  # fmt: skip
        voids = {x["id"]: (x["voided"], x["void_reason"], x["voided_by"], x["void_approved_by"])
                 for x in voided["lines"]}  # fmt: skip
        assert voids == {
            soup: (True, "guests left", "sam", None),
            steak: (True, "guests left", "sam", None),
            ipa: (True, "spilt", "sam", None),  # voided before: left as it was
        }
        # One change per line still live, then the order's move: nothing else.
        assert new_changes(edge, head) == [
            ("order_lines", soup, Op.UPDATE), ("order_lines", steak, Op.UPDATE),
            ("orders", oid, Op.UPDATE),
        ]  # fmt: skip
        assert edge.sql("SELECT status, closed_at_ms FROM orders WHERE id = ?", (oid,)) == [
            ("voided", voided["closed_at_ms"])
        ]
        # The audit entry names the action, who, and every row it changed.
        ((action, who, detail),) = edge.sql(
            "SELECT action, employee_id, detail FROM audit_log ORDER BY position DESC LIMIT 1"
        )
        assert (action, who) == ("void_order", "sam")
        changed = {(c["table"], c["id"]): c for c in json.loads(detail)["changes"]}
        assert sorted(changed) == sorted([("order_lines", soup), ("order_lines", steak),
                                          ("orders", oid)])  # fmt: skip
        assert changed[("orders", oid)]["after"]["status"] == "voided"
        assert changed[("order_lines", soup)]["after"]["void_reason"] == "guests left"
        assert "approved_by" not in json.loads(detail)
        # The tablets read it as voided, and list it under that status.
        got, read, _ = await edge.call("GET", f"{ORDERS}/{oid}", till.headers("kai"))
        assert read == voided
        got, listed, _ = await edge.call("GET", f"{ORDERS}?status=voided", till.headers("sam"))
        assert [o["id"] for o in listed["orders"]] == [oid]

    run(body, tmp_path)


def test_a_voided_order_is_terminal(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        got, voided, _ = await edge.call(
            "POST", void_path(oid), till.headers("sam"), json={"reason": "opened by mistake"}
        )
        assert got == 200 and voided["status"] == "voided" and voided["lines"] == []
        before = state(edge)
        got, again, _ = await edge.call(
            "POST", void_path(oid), till.headers("mia"), json={"reason": "twice"}
        )
        assert (got, code(again)) == (409, "invalid_transition")
        assert again["error"]["details"] == {"order_id": oid, "from": "voided", "to": "voided"}
        for method, path, payload in [
            ("POST", f"{ORDERS}/{oid}/close", None),
            ("POST", f"{ORDERS}/{oid}/lines", {"item_id": "soup"}),
            ("POST", f"{ORDERS}/{oid}/fire", {}),
            ("PATCH", f"{ORDERS}/{oid}", {"covers": 1}),
        ]:
            got, answer, _ = await edge.call(method, path, till.headers("sam"), json=payload)
            assert (got, code(answer)) == (409, "invalid_transition"), path
        assert state(edge) == before

    run(body, tmp_path)


@pytest.mark.parametrize("status", ["closed", "paid"])
def test_a_closed_or_paid_order_cannot_be_voided_and_nothing_changes(
    tmp_path: Path, status: str
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        got, added = await add_line(edge, till, oid, item_id="soup")
        await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"), json={})
        if status == "closed":  # a fired line voided by the manager: nothing left to pay
            (line_id,) = added["line_ids"]
            got, _, _ = await edge.call(
                "POST", f"{ORDERS}/{oid}/lines/{line_id}/void", till.headers("mia"),
                json={"reason": "cold"},
            )  # fmt: skip
            got, _, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", till.headers("sam"))
        else:  # payments do not exist yet: the status they will set
            await edge.store.write("orders", oid, Op.UPDATE, {"status": "paid"})
        assert edge.sql("SELECT status FROM orders") == [(status,)]
        _, approval, _ = await edge.store.transaction(
            lambda tx: grant_approval(tx, "mia", till.device_id)
        )
        before = state(edge)
        # Neither a server (even with a manager's approval, which stays unspent) nor the
        # manager herself: the order is refused for what it is, not for who asks.
        for headers in (
            till.headers("sam"),
            till.headers("sam", **{"X-Fynlo-Approval": approval}),
            till.headers("mia"),
        ):
            got, refused, _ = await edge.call(
                "POST", void_path(oid), headers, json={"reason": "wrong table"}
            )
            assert (got, code(refused)) == (409, "invalid_transition"), refused
            assert refused["error"]["details"] == {"order_id": oid, "from": status,
                                                   "to": "voided"}  # fmt: skip
        assert state(edge) == before

    run(body, tmp_path)


def test_voiding_an_order_with_fired_lines_needs_a_managers_approval(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        _, soup = await add_line(edge, till, oid, item_id="soup")
        await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"), json={})
        _, steak = await add_line(edge, till, oid, item_id="steak", modifiers=["rare"], course=2)
        fired_id, unsent_id = soup["line_ids"][0], steak["line_ids"][0]
        why = {"reason": "table walked out"}
        before = state(edge)
        for who in ("sam", "bo"):  # servers and bartenders void lines, not sent ones
            got, refused, _ = await edge.call("POST", void_path(oid), till.headers(who), json=why)
            assert (got, code(refused)) == (403, "manager_approval_required"), who
            assert refused["error"]["details"] == {"permission": "order.void_sent"}
        assert state(edge) == before
        _, approval, _ = await edge.store.transaction(
            lambda tx: grant_approval(tx, "mia", till.device_id)
        )
        approved = till.headers("sam", **{"X-Fynlo-Approval": approval})
        got, voided, _ = await edge.call("POST", void_path(oid), approved, json=why)
        assert got == 200 and voided["status"] == "voided"
        voids = {x["id"]: (x["voided"], x["voided_by"], x["void_approved_by"])
                 for x in voided["lines"]}  # fmt: skip
        assert voids == {fired_id: (True, "sam", "mia"), unsent_id: (True, "sam", None)}
        assert edge.sql("SELECT count(*) FROM approvals WHERE used_at_ms IS NOT NULL") == [(1,)]
        (entry,) = edge.sql("SELECT detail FROM audit_log WHERE action = 'void_order'")
        assert json.loads(entry[0])["approved_by"] == "mia"
        # The approval is spent: it cannot void another check.
        other = (await open_order(edge, till, table="T2"))["id"]
        await add_line(edge, till, other, item_id="soup")
        await edge.call("POST", f"{ORDERS}/{other}/fire", till.headers("sam"), json={})
        got, refused, _ = await edge.call("POST", void_path(other), approved, json=why)
        assert (got, code(refused)) == (403, "approval_invalid")
        # A manager holds order.void_sent herself: no approval is needed or spent.
        got, voided, _ = await edge.call("POST", void_path(other), till.headers("mia"), json=why)
        assert got == 200 and [x["void_approved_by"] for x in voided["lines"]] == ["mia"]
        assert edge.sql("SELECT count(*) FROM approvals WHERE used_at_ms IS NOT NULL") == [(1,)]

    run(body, tmp_path)


def test_fired_lines_voided_before_need_no_approval_to_void_the_rest(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        _, soup = await add_line(edge, till, oid, item_id="soup")
        await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"), json={})
        await add_line(edge, till, oid, item_id="ipa")
        got, _, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/{soup['line_ids'][0]}/void", till.headers("mia"),
            json={"reason": "sent back"},
        )  # fmt: skip
        assert got == 200
        _, approval, _ = await edge.store.transaction(
            lambda tx: grant_approval(tx, "mia", till.device_id)
        )
        got, voided, _ = await edge.call(
            "POST", void_path(oid), till.headers("sam", **{"X-Fynlo-Approval": approval}),
            json={"reason": "left"},
        )  # fmt: skip
        assert got == 200 and voided["status"] == "voided"
        voids = [(x["void_reason"], x["voided_by"], x["void_approved_by"]) for x in voided["lines"]]
        assert voids == [("sent back", "mia", "mia"), ("left", "sam", None)]
        assert edge.sql("SELECT used_at_ms FROM approvals") == [(None,)]  # not spent

    run(body, tmp_path)


def test_a_line_fired_after_the_route_looked_still_needs_the_approval(tmp_path: Path) -> None:
    """The route decides from a read before the transaction; the void itself checks again."""

    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        await add_line(edge, till, oid, item_id="soup")
        await edge.call("POST", f"{ORDERS}/{oid}/fire", till.headers("sam"), json={})
        before = state(edge)
        with pytest.raises(ApiError) as refused:
            await edge.store.transaction(
                lambda tx: order_lines.void_order(tx, oid, "left", "sam", False, None)
            )
        assert refused.value.code is ApiCode.APPROVAL_REQUIRED
        assert state(edge) == before
        voided = await edge.store.transaction(
            lambda tx: order_lines.void_order(tx, oid, "left", "sam", True, "mia")
        )
        assert voided.status == "voided"
        assert [(x.voided, x.void_approved_by) for x in voided.lines] == [(True, "mia")]

    run(body, tmp_path)


def test_a_retried_void_with_the_same_idempotency_key_gets_the_first_answer(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        await add_line(edge, till, oid, item_id="soup")
        await add_line(edge, till, oid, item_id="ipa")
        headers = till.headers("sam", **{"Idempotency-Key": "till-void-order-0001"})
        why = {"reason": "wrong table"}
        first = await edge.call("POST", void_path(oid), headers, json=why)
        assert first[0] == 200 and first[1]["status"] == "voided"
        after = state(edge)
        retries = await asyncio.gather(
            *(edge.call("POST", void_path(oid), headers, json=why) for _ in range(5))
        )
        for got, answer, resp in retries:
            assert (got, answer) == (200, first[1])
            assert resp.headers.get("Idempotent-Replayed") == "true"
        assert state(edge) == after  # nothing written twice, no second audit entry
        assert edge.sql("SELECT count(*) FROM audit_log WHERE action = 'void_order'") == [(1,)]
        # Without the key it is a second void, refused; the same key with another body too.
        got, answer, _ = await edge.call("POST", void_path(oid), till.headers("sam"), json=why)
        assert (got, code(answer)) == (409, "invalid_transition")
        got, answer, _ = await edge.call("POST", void_path(oid), headers, json={"reason": "x"})
        assert (got, code(answer)) == (422, "idempotency_key_reused")
        assert state(edge) == after

    run(body, tmp_path)


def test_a_void_that_is_not_json_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        before = state(edge)
        got, answer, _ = await edge.call(
            "POST", void_path(oid), till.headers("sam", **{"Content-Type": "application/json"}),
            data=b'{"reason": "oops"',
        )  # fmt: skip
        assert (got, code(answer)) == (400, "malformed_json")
        assert state(edge) == before

    run(body, tmp_path)


# -- moving lines ----------------------------------------------------------------------------


def test_moving_lines_voids_them_here_and_copies_them_there(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        a = (await open_order(edge, till, table="T1"))["id"]
        b = (await open_order(edge, till, table="T2"))["id"]
        _, soup = await add_line(edge, till, a, item_id="soup", course=1)
        await edge.call("POST", f"{ORDERS}/{a}/fire", till.headers("sam"), json={})
        _, steak = await add_line(edge, till, a, item_id="steak", modifiers=["rare"], course=2)
        ids = soup["line_ids"] + steak["line_ids"]
        got, moved, _ = await edge.call(
            "POST", f"{ORDERS}/{a}/lines/move", till.headers("sam"),
            json={"line_ids": ids, "to_order_id": b},
        )  # fmt: skip
        assert got == 200
        source, target = moved["source"], moved["target"]
        assert all(x["voided"] and x["void_reason"] == "moved" for x in source["lines"])
        assert source["totals"]["total_pence"] == 0
        copies = {x["moved_from"]: x for x in target["lines"]}
        assert sorted(copies) == sorted(ids)
        assert copies[ids[0]]["fired"] is True and copies[ids[1]]["fired"] is False
        assert [m["name"] for m in copies[ids[1]]["modifiers"]] == ["Rare"]
        assert target["status"] == "fired" and target["totals"]["total_pence"] == 450 + 2200
        # A moved line cannot move again from its old order; a line cannot move to its order.
        got, answer, _ = await edge.call(
            "POST", f"{ORDERS}/{a}/lines/move", till.headers("sam"),
            json={"line_ids": ids[:1], "to_order_id": b},
        )  # fmt: skip
        assert (got, code(answer)) == (409, "conflict")
        got, answer, _ = await edge.call(
            "POST", f"{ORDERS}/{b}/lines/move", till.headers("sam"),
            json={"line_ids": [next(iter(copies.values()))["id"]], "to_order_id": b},
        )  # fmt: skip
        assert (got, code(answer)) == (422, "invalid_request")

    run(body, tmp_path)


# -- permissions and bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "action", "status"),
    [
        ("kai", "open", 403), ("kai", "add", 403), ("kai", "fire", 403), ("kai", "view", 200),
        ("kai", "close", 403), ("bo", "open", 201), ("bo", "add", 201), ("bo", "fire", 200),
        ("sam", "close", 200), ("ola", "open", 201), ("mia", "view", 200),
        ("kai", "void", 403), ("sam", "void", 200), ("bo", "void", 200), ("ola", "void", 200),
    ],
)  # fmt: skip
def test_permissions_follow_the_role(tmp_path: Path, who: str, action: str, status: int) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till, "mia"))["id"]
        if action == "fire":
            await add_line(edge, till, oid, "mia", item_id="soup")
        requests: dict[str, tuple[str, str, Any]] = {
            "open": ("POST", ORDERS, {"table_name": "T2", "covers": 1}),
            "add": ("POST", f"{ORDERS}/{oid}/lines", {"item_id": "soup"}),
            "fire": ("POST", f"{ORDERS}/{oid}/fire", {}),
            "view": ("GET", f"{ORDERS}/{oid}", None),
            "close": ("POST", f"{ORDERS}/{oid}/close", None),
            "void": ("POST", f"{ORDERS}/{oid}/void", {"reason": "opened by mistake"}),
        }
        method, path, payload = requests[action]
        got, answer, _ = await edge.call(method, path, till.headers(who), json=payload)
        assert got == status, answer
        if status == 403:
            assert code(answer) == "permission_denied"

    run(body, tmp_path)


BAD_LINES: list[tuple[dict[str, Any], int, str]] = [
    ({"item_id": "soup", "quantity": "2"}, 422, "invalid_request"),
    ({"item_id": "soup", "quantity": 0}, 422, "invalid_request"),
    ({"item_id": "soup", "quantity": -3}, 422, "invalid_request"),
    ({"item_id": "soup", "quantity": 10**6}, 422, "invalid_request"),
    ({"item_id": "soup", "quantity": 2**70}, 422, "invalid_request"),
    ({"item_id": "soup", "quantity": 1.5}, 422, "invalid_request"),
    ({"item_id": "soup", "price_pence": 1}, 422, "invalid_request"),
    ({"item_id": "soup", "notes": "a\x00b"}, 422, "invalid_request"),
    ({"item_id": "soup", "course": 0}, 422, "invalid_request"),
    ({"item_id": 7}, 422, "invalid_request"),
    ({}, 422, "invalid_request"),
    ({"item_id": "lobster"}, 404, "not_found"),
    ({"item_id": "chips"}, 409, "item_unavailable"),
    ({"item_id": "steak"}, 422, "invalid_request"),  # Cooking needs one choice
    ({"item_id": "steak", "modifiers": ["rare", "well"]}, 422, "invalid_request"),
    ({"item_id": "steak", "modifiers": ["rare", "pepper", "aioli", "bearnaise"]}, 422,
     "invalid_request"),
    ({"item_id": "steak", "modifiers": ["rare", "rare"]}, 422, "invalid_request"),
    ({"item_id": "steak", "modifiers": ["rare", "truffle"]}, 404, "not_found"),
    ({"item_id": "soup", "modifiers": ["rare"]}, 422, "invalid_request"),  # not offered
    ({"item_id": "steak", "modifiers": ["rare", "blue"]}, 409, "item_unavailable"),
]  # fmt: skip


@pytest.mark.parametrize(("line", "status", "error"), BAD_LINES)
def test_a_bad_line_is_refused_and_changes_nothing(
    tmp_path: Path, line: dict[str, Any], status: int, error: str
) -> None:
    async def body(edge: Edge) -> None:
        await edge.store.write_many([
            ("menu_items", "chips", Op.INSERT, {"name": "Chips", "price_pence": 300,
                                                "available": False}),
            ("modifiers", "blue", Op.INSERT, {"group_id": "sauces", "name": "Blue cheese",
                                              "available": False}),
        ])  # fmt: skip
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        before = state(edge)
        got, answer = await add_line(edge, till, oid, **line)
        assert (got, code(answer)) == (status, error), answer
        got, answer, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/batch", till.headers("sam"),
            json={"lines": [{"item_id": "soup"}, line]},
        )  # fmt: skip
        assert (got, code(answer)) == (status, error), answer
        assert state(edge) == before

    run(body, tmp_path)


BAD_REQUESTS: list[tuple[str, str, Any, int, str]] = [
    ("POST", ORDERS, {"table_name": "T1", "covers": -1}, 422, "invalid_request"),
    ("POST", ORDERS, {"table_name": "", "covers": 1}, 422, "invalid_request"),
    ("POST", ORDERS, {"table_name": "   ", "covers": 1}, 422, "invalid_request"),
    ("POST", ORDERS, {"table_name": "T1", "covers": 1, "check_number": 7}, 422,
     "invalid_request"),
    ("POST", ORDERS, {"table_name": "T1", "covers": 1, "server_id": "ghost"}, 404, "not_found"),
    ("POST", ORDERS, {"table_name": "T1"}, 422, "invalid_request"),
    ("POST", ORDERS, [], 422, "invalid_request"),
    ("PATCH", "{order}", {}, 422, "invalid_request"),
    ("PATCH", "{order}", {"status": "closed"}, 422, "invalid_request"),
    ("PATCH", "{order}", {"covers": 10**9}, 422, "invalid_request"),
    ("PATCH", "/v1/orders/ord_nope", {"covers": 1}, 404, "not_found"),
    ("POST", "{order}/lines/batch", {"lines": []}, 422, "invalid_request"),
    ("POST", "{order}/lines/batch", {"lines": [{"item_id": "soup"}] * 51}, 422,
     "invalid_request"),
    ("POST", "/v1/orders/ord_nope/lines", {"item_id": "soup"}, 404, "not_found"),
    ("POST", "{order}/fire", {"course": "2"}, 422, "invalid_request"),
    ("POST", "{order}/fire", {}, 409, "conflict"),  # nothing to fire
    ("POST", "{order}/transfer", {}, 422, "invalid_request"),
    ("POST", "{order}/lines/move", {"line_ids": [], "to_order_id": "x"}, 422, "invalid_request"),
    ("POST", "{order}/lines/move", {"line_ids": ["ln_x"], "to_order_id": "ord_nope"}, 404,
     "not_found"),
    ("POST", "/v1/orders/ord_nope/void", {"reason": "mistake"}, 404, "not_found"),
    ("POST", "{order}/void", {}, 422, "invalid_request"),
    ("POST", "{order}/void", None, 422, "invalid_request"),
    ("POST", "{order}/void", {"reason": ""}, 422, "invalid_request"),
    ("POST", "{order}/void", {"reason": " \n\t"}, 422, "invalid_request"),
    ("POST", "{order}/void", {"reason": "x" * 201}, 422, "invalid_request"),
    ("POST", "{order}/void", {"reason": "a\x00b"}, 422, "invalid_request"),
    ("POST", "{order}/void", {"reason": 7}, 422, "invalid_request"),
    ("POST", "{order}/void", {"reason": "mistake", "status": "closed"}, 422, "invalid_request"),
    ("POST", "{order}/void", ["mistake"], 422, "invalid_request"),
    ("GET", "/v1/orders?status=eaten", None, 422, "invalid_request"),
    ("GET", "/v1/orders?status=open,", None, 422, "invalid_request"),
    ("GET", "/v1/orders?business_day=yesterday", None, 422, "invalid_request"),
    ("GET", "/v1/orders?limit=0", None, 422, "invalid_request"),
    ("GET", "/v1/orders?colour=red", None, 422, "invalid_request"),
    ("GET", "/v1/orders/ord_nope", None, 404, "not_found"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "payload", "status", "error"), BAD_REQUESTS)
def test_bad_order_requests_are_refused_and_change_nothing(
    tmp_path: Path, method: str, path: str, payload: Any, status: int, error: str
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        oid = (await open_order(edge, till))["id"]
        before = state(edge)
        target = path.replace("{order}", f"{ORDERS}/{oid}")
        got, answer, _ = await edge.call(method, target, till.headers("sam"), json=payload)
        assert (got, code(answer)) == (status, error), answer
        assert state(edge) == before

    run(body, tmp_path)


def test_order_responses_match_the_openapi_document(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        _, doc, _ = await edge.call("GET", "/api/openapi.json")
        oid = (await open_order(edge, till))["id"]
        sent, fresh, done = [(await open_order(edge, till))["id"] for _ in range(3)]
        await add_line(edge, till, sent, item_id="soup")
        await edge.call("POST", f"{ORDERS}/{sent}/fire", till.headers("sam"), json={})
        await add_line(edge, till, fresh, item_id="soup")
        await edge.call("POST", f"{ORDERS}/{done}/close", till.headers("sam"))
        samples: list[tuple[str, str, str, Any]] = [
            ("POST", ORDERS, ORDERS, {"table_name": "T8", "covers": 2}),
            ("POST", f"{ORDERS}/{oid}/lines", "/v1/orders/{order_id}/lines",
             {"item_id": "steak", "modifiers": ["rare"]}),
            ("POST", f"{ORDERS}/{oid}/lines", "/v1/orders/{order_id}/lines", {"item_id": "x"}),
            ("GET", f"{ORDERS}/{oid}", "/v1/orders/{order_id}", None),
            ("GET", f"{ORDERS}?status=open", ORDERS, None),
            ("POST", f"{ORDERS}/{oid}/fire", "/v1/orders/{order_id}/fire", {}),
            ("PATCH", f"{ORDERS}/{oid}", "/v1/orders/{order_id}", {"covers": 3}),
            ("POST", f"{ORDERS}/{oid}/close", "/v1/orders/{order_id}/close", None),
            ("POST", f"{ORDERS}/{done}/void", "/v1/orders/{order_id}/void", {"reason": "late"}),
            ("POST", f"{ORDERS}/{sent}/void", "/v1/orders/{order_id}/void", {"reason": "x"}),
            ("POST", f"{ORDERS}/{fresh}/void", "/v1/orders/{order_id}/void", {"reason": ""}),
            ("POST", f"{ORDERS}/{fresh}/void", "/v1/orders/{order_id}/void", {"reason": "ok"}),
        ]  # fmt: skip
        voids = []
        for method, path, template, payload in samples:
            got, answer, _ = await edge.call(method, path, till.headers("sam"), json=payload)
            response = doc["paths"][template][method.lower()]["responses"][str(got)]
            schema = response["content"]["application/json"]["schema"]
            jsonschema.validate(answer, {**schema, "components": doc["components"]})
            if path.endswith("/void"):
                voids.append(got)
        assert voids == [409, 403, 422, 200]  # closed, sent, blank reason, voided
        # A fired ticket names its order, and the document says it always does.
        schemas = doc["components"]["schemas"]
        fired = doc["paths"]["/v1/orders/{order_id}/fire"]["post"]["responses"]["200"]
        fired_ref = fired["content"]["application/json"]["schema"]["$ref"]
        ticket_ref = schemas[fired_ref.rpartition("/")[2]]["properties"]["tickets"]["items"]["$ref"]
        ticket = schemas[ticket_ref.rpartition("/")[2]]
        assert ticket["properties"]["order_id"] == {"type": "string"}
        assert "order_id" in ticket["required"]

    run(body, tmp_path)


def test_a_full_disk_refuses_a_line_with_507_and_keeps_nothing_of_it(tmp_path: Path) -> None:
    """With the database at its cap (``max_db_mb``; SQLite's own SQLITE_FULL), adding a line
    answers 507 ``storage_full`` and leaves every table as it was; reads still work."""

    async def body() -> None:
        async with edge_server(tmp_path, max_db_mb=1) as (_, edge):
            till = await till_for(edge)
            order = await open_order(edge, till)
            for _ in range(2000):
                before = state(edge)
                got, answer = await add_line(
                    edge, till, order["id"], item_id="soup", notes="n" * 500
                )
                if got != 201:
                    break
            else:
                raise AssertionError("the database never filled")
            assert (got, code(answer)) == (507, "storage_full"), answer
            assert state(edge) == before
            _, document, _ = await edge.call("GET", "/api/openapi.json", {})
            documented = document["paths"]["/v1/orders/{order_id}/lines"]["post"]["responses"]
            assert "storage_full" in documented["507"]["description"]
            got, now, _ = await edge.call("GET", f"{ORDERS}/{order['id']}", till.headers("sam"))
            assert got == 200 and len(now["lines"]) == len(before["order_lines"])

    asyncio.run(body())


def test_a_tablet_that_hangs_up_mid_request_adds_nothing_and_logs_no_failure(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Wi-Fi drops while a tablet is sending a line: the half-sent body is dropped, nothing
    is kept, no error is logged, and the same line sent again is added once."""

    async def body() -> None:
        async with edge_server(tmp_path) as (_, edge):
            till = await till_for(edge)
            order = await open_order(edge, till)
            before = state(edge)
            payload = json.dumps({"item_id": "soup", "notes": "n" * 2000}).encode()
            host, port = edge.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            head = "".join(f"{k}: {v}\r\n" for k, v in till.headers("sam").items())
            writer.write(
                f"POST {ORDERS}/{order['id']}/lines HTTP/1.1\r\nHost: {host}\r\n{head}"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload[:1000]
            )
            await writer.drain()
            await asyncio.sleep(0.1)  # the handler is waiting for the rest of the body
            writer.transport.abort()
            await asyncio.sleep(0.2)
            assert state(edge) == before
            got, answer = await add_line(edge, till, order["id"], item_id="soup")
            assert got == 201, answer
            assert len(edge.sql("SELECT id FROM order_lines")) == 1

    with caplog.at_level("DEBUG"):
        asyncio.run(body())
    assert not [r for r in caplog.records if r.levelno >= 30], caplog.text
