"""Voids reach the kitchen: over real HTTP and WebSocket against a real edge and SQLite file.

A fired line voided through the API is struck off its ticket (REST, a live ``tickets:<station>``
event, and a change in the outbox with the void, so it syncs); a voided order voids every
ticket it sent; a line never fired, or moved to another order, strikes nothing; a void ticket
is bumped as usual; and a mark lost to a concurrent write still shows, because the lines'
own voids are sticky.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import msgpack

from shared.registry import TICKETS
from sync_protocol.changes import Change, Op, RowState
from sync_protocol.merge import apply_change, new_row

from .api_harness import Edge, Tablet, running_edge
from .test_live import collect, connect

T = TypeVar("T")
ORDERS = "/v1/orders"
TICKETS_PATH = "/v1/kitchen/tickets"


def run(fn: Callable[[Edge], Coroutine[Any, Any, T]], tmp_path: Path) -> T:
    async def body() -> T:
        async with running_edge(tmp_path) as edge:
            return await fn(edge)

    return asyncio.run(body())


async def till_for(edge: Edge) -> Tablet:
    till = await edge.pair("till")
    for who in ("sam", "mia"):
        await edge.login(till, who)
    return till


async def fired_order(
    edge: Edge, till: Tablet, *item_ids: str, table: str = "T1"
) -> tuple[str, list[str], dict[str, Any]]:
    """Open an order, add ``item_ids`` and fire them: (order id, line ids, ticket by station)."""
    got, order, _ = await edge.call(
        "POST", ORDERS, till.headers("sam"), json={"table_name": table, "covers": 2}
    )
    assert got == 201, order
    lines = [{"item_id": item} for item in item_ids]
    got, added, _ = await edge.call(
        "POST", f"{ORDERS}/{order['id']}/lines/batch", till.headers("sam"), json={"lines": lines}
    )
    assert got == 201, added
    got, fired, _ = await edge.call(
        "POST", f"{ORDERS}/{order['id']}/fire", till.headers("sam"), json={}
    )
    assert got == 200, fired
    return order["id"], added["line_ids"], {t["station"]: t for t in fired["tickets"]}


async def void_line(edge: Edge, till: Tablet, order_id: str, line_id: str) -> None:
    got, answer, _ = await edge.call(
        "POST", f"{ORDERS}/{order_id}/lines/{line_id}/void", till.headers("mia"),
        json={"reason": "sent back"},
    )  # fmt: skip
    assert got == 200, answer


async def void_order(edge: Edge, till: Tablet, order_id: str) -> None:
    got, answer, _ = await edge.call(
        "POST", f"{ORDERS}/{order_id}/void", till.headers("mia"), json={"reason": "walked out"}
    )
    assert got == 200 and answer["status"] == "voided", answer


async def listed(edge: Edge, screen: Tablet, query: str) -> dict[str, Any]:
    """``GET /v1/kitchen/tickets?<query>``, checked against the OpenAPI document; by id."""
    _, doc, _ = await edge.call("GET", "/api/openapi.json")
    got, page, _ = await edge.call("GET", f"{TICKETS_PATH}?{query}", screen.headers())
    assert got == 200, page
    schema = doc["paths"][TICKETS_PATH]["get"]["responses"]["200"]["content"]["application/json"]
    jsonschema.validate(page, {**schema["schema"], "components": doc["components"]})
    return {t["id"]: t for t in page["tickets"]}


def voids(ticket: dict[str, Any]) -> tuple[bool, list[str]]:
    return ticket["voided"], ticket["voided_line_ids"]


def stored_voids(edge: Edge, ticket_id: str) -> tuple[Any, Any]:
    ((voided, marks),) = edge.sql(
        "SELECT voided, voided_line_ids FROM tickets WHERE id = ?", (ticket_id,)
    )
    return voided, None if marks is None else json.loads(marks)


def outbox_head(edge: Edge) -> int:
    return int(edge.sql("SELECT coalesce(max(seq), 0) FROM outbox")[0][0])


def ticket_changes(edge: Edge, after_seq: int) -> list[tuple[str, dict[str, Any]]]:
    """The ticket changes logged for sync after outbox ``after_seq``: (ticket id, fields)."""
    rows = edge.sql(
        "SELECT pk, op, fields FROM outbox WHERE seq > ? AND tbl = 'tickets' ORDER BY seq",
        (after_seq,),
    )
    assert all(op == Op.UPDATE for _, op, _ in rows)
    return [(pk, msgpack.unpackb(fields)) for pk, _, fields in rows]


def live_voids(events: list[dict[str, Any]]) -> list[tuple[str, str, bool, list[str]]]:
    """(topic, ticket id, voided, voided line ids) of each ticket row event."""
    out = []
    for event in events:
        assert event["type"] == "event", event
        row = event["data"]["row"]
        marks = json.loads(row["voided_line_ids"] or "[]")
        out.append((event["topic"], event["data"]["id"], row["voided"], marks))
    return out


def test_a_fired_line_voided_is_struck_off_its_ticket_over_rest_live_and_sync(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        till, screen = await till_for(edge), await edge.pair("pass", "kds")
        oid, (soup, steak, ipa), tickets = await fired_order(edge, till, "soup", "steak", "ipa")
        kitchen, bar = tickets["kitchen"]["id"], tickets["bar"]["id"]
        before = await listed(edge, screen, "station=kitchen")
        assert voids(before[kitchen]) == (False, [])
        live, ready = await connect(edge, screen.device_token, ["tickets:kitchen"])
        head = outbox_head(edge)

        await void_line(edge, till, oid, soup)
        # Over REST: the soup is struck off the kitchen's ticket, which is still to make.
        page = await listed(edge, screen, "station=kitchen")
        assert voids(page[kitchen]) == (False, [soup])
        assert page[kitchen]["items"] == before[kitchen]["items"]  # the snapshot as fired
        assert voids((await listed(edge, screen, "station=bar"))[bar]) == (False, [])
        # One change to the ticket, logged with the void (so it syncs) and in its audit entry.
        assert ticket_changes(edge, head) == [(kitchen, {"voided_line_ids": json.dumps([soup])})]
        ((detail,),) = edge.sql(
            "SELECT detail FROM audit_log WHERE action = 'void_line' ORDER BY position DESC"
        )
        changed = {(c["table"], c["id"]) for c in json.loads(detail)["changes"]}
        assert changed == {("order_lines", soup), ("tickets", kitchen)}

        # The last item voided: nothing is left to make, the ticket is void.
        await void_line(edge, till, oid, steak)
        page = await listed(edge, screen, "station=kitchen")
        assert voids(page[kitchen]) == (True, [soup, steak])
        assert stored_voids(edge, kitchen) == (True, [soup, steak])
        # Each void reached the kitchen's screens live; the bar's ticket was never touched.
        events = await collect(live, (await edge.store.event_bounds())[1])
        assert live_voids(events) == [
            ("tickets:kitchen", kitchen, False, [soup]),
            ("tickets:kitchen", kitchen, True, [soup, steak]),
        ]
        assert all(event["seq"] > ready["seq"] for event in events)
        assert [pk for pk, _ in ticket_changes(edge, head)] == [kitchen, kitchen]
        await live.close()

    run(body, tmp_path)


def test_a_voided_order_voids_every_ticket_it_sent_and_a_cook_bumps_them(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till, screen = await till_for(edge), await edge.pair("pass", "kds")
        oid, (soup, ipa), tickets = await fired_order(edge, till, "soup", "ipa")
        kitchen, bar = tickets["kitchen"]["id"], tickets["bar"]["id"]
        got, added, _ = await edge.call(  # a second course, never fired
            "POST", f"{ORDERS}/{oid}/lines", till.headers("sam"),
            json={"item_id": "steak", "course": 2},
        )  # fmt: skip
        assert got == 201, added
        live, _ = await connect(edge, screen.device_token, ["tickets"])
        head = outbox_head(edge)

        await void_order(edge, till, oid)
        page = {
            **await listed(edge, screen, "station=kitchen"),
            **await listed(edge, screen, "station=bar"),
        }
        assert voids(page[kitchen]) == (True, [soup])
        assert voids(page[bar]) == (True, [ipa])
        assert sorted(ticket_changes(edge, head)) == sorted(
            [
                (kitchen, {"voided_line_ids": json.dumps([soup]), "voided": True}),
                (bar, {"voided_line_ids": json.dumps([ipa]), "voided": True}),
            ]
        )
        events = await collect(live, (await edge.store.event_bounds())[1])
        assert sorted(live_voids(events)) == sorted(
            [("tickets:kitchen", kitchen, True, [soup]), ("tickets:bar", bar, True, [ipa])]
        )
        # A void ticket stays on the screen until a cook bumps it; the bump is as usual.
        got, bumped, _ = await edge.call("POST", f"{TICKETS_PATH}/{kitchen}/bump", screen.headers())
        assert got == 200 and bumped["bumped"] and voids(bumped) == (True, [soup])
        assert kitchen not in await listed(edge, screen, "station=kitchen")
        recalled = await listed(edge, screen, "station=kitchen&state=bumped")
        assert voids(recalled[kitchen]) == (True, [soup])
        await live.close()

    run(body, tmp_path)


def test_a_line_never_fired_strikes_nothing(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till, screen = await till_for(edge), await edge.pair("pass", "kds")
        oid, _, tickets = await fired_order(edge, till, "soup")
        kitchen = tickets["kitchen"]["id"]
        got, added, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines", till.headers("sam"), json={"item_id": "steak"}
        )
        assert got == 201
        head = outbox_head(edge)
        await void_line(edge, till, oid, added["line_ids"][0])
        assert ticket_changes(edge, head) == []
        assert stored_voids(edge, kitchen) == (False, None)
        assert voids((await listed(edge, screen, "station=kitchen"))[kitchen]) == (False, [])

    run(body, tmp_path)


def test_a_moved_line_keeps_its_item_and_voiding_its_copy_strikes_it(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till, screen = await till_for(edge), await edge.pair("pass", "kds")
        oid, (soup, steak), tickets = await fired_order(edge, till, "soup", "steak")
        kitchen = tickets["kitchen"]["id"]
        got, other, _ = await edge.call(
            "POST", ORDERS, till.headers("sam"), json={"table_name": "T2", "covers": 1}
        )
        assert got == 201
        head = outbox_head(edge)
        got, moved, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/move", till.headers("sam"),
            json={"line_ids": [steak], "to_order_id": other["id"]},
        )  # fmt: skip
        assert got == 200, moved
        assert ticket_changes(edge, head) == []  # the steak is still wanted, at another table
        # The first table walks out: its soup is void, the steak that moved is not.
        await void_order(edge, till, oid)
        assert voids((await listed(edge, screen, "station=kitchen"))[kitchen]) == (False, [soup])
        # Then the steak's copy is voided at its new table: it comes off the same ticket.
        (copy,) = moved["target"]["lines"]
        await void_line(edge, till, other["id"], copy["id"])
        page = await listed(edge, screen, "station=kitchen")
        assert voids(page[kitchen]) == (True, [soup, steak])

    run(body, tmp_path)


def test_a_mark_lost_to_a_concurrent_list_still_shows(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till, screen = await till_for(edge), await edge.pair("pass", "kds")
        oid, (soup, steak), tickets = await fired_order(edge, till, "soup", "steak")
        kitchen = tickets["kitchen"]["id"]
        await void_line(edge, till, oid, soup)
        # Another edge struck nothing it knew of, and its list won (last writer wins).
        await edge.store.write("tickets", kitchen, Op.UPDATE, {"voided_line_ids": "[]"})
        assert stored_voids(edge, kitchen) == (False, [])
        page = await listed(edge, screen, "station=kitchen")
        assert voids(page[kitchen]) == (False, [soup])  # the soup's line is voided: sticky
        # The next void writes the whole list again, from the lines themselves.
        await void_line(edge, till, oid, steak)
        assert stored_voids(edge, kitchen) == (True, [soup, steak])

    run(body, tmp_path)


def test_a_void_ticket_stays_void_whatever_a_concurrent_write_says() -> None:
    """``voided`` is sticky in the registry: a concurrent write cannot clear it, in either order."""
    void = Change("edge-a", 7, "tickets", "t1", Op.UPDATE, {"voided": True}, 1, 200)
    clear = Change("edge-b", 9, "tickets", "t1", Op.UPDATE, {"voided": False}, 1, 300)
    insert = Change("edge-a", 1, "tickets", "t1", Op.INSERT, {"station": "kitchen"}, 0, 100)
    start = new_row(TICKETS, insert, 1)
    assert start.values["voided"] is False
    for first, second in ((void, clear), (clear, void)):
        state: RowState = apply_change(TICKETS, start, first, 2).state
        state = apply_change(TICKETS, state, second, 3).state
        assert state.values["voided"] is True, (first.origin, second.origin)
