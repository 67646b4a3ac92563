"""The menu over real HTTP against a real edge and SQLite file.

Reading it whole, a manager authoring categories, items, modifier groups and modifiers (and
what syncs and is audited), the rules that span rows, 86ing, permissions, and bad input
refused whole with nothing changed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import pytest

from .api_harness import Edge, Tablet, running_edge, seed_modifiers

T = TypeVar("T")
MENU = "/v1/menu"


def run(fn: Callable[[Edge], Coroutine[Any, Any, T]], tmp_path: Path) -> T:
    async def body() -> T:
        async with running_edge(tmp_path) as edge:
            await seed_modifiers(edge.store)
            return await fn(edge)

    return asyncio.run(body())


async def till_for(edge: Edge, name: str = "till") -> Tablet:
    tablet = await edge.pair(name)
    for who in ("sam", "mia", "kai", "bo", "ola"):
        await edge.login(tablet, who)
    return tablet


def state(edge: Edge) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    tables = ("menu_categories", "menu_items", "modifier_groups", "modifiers")
    out: dict[str, Any] = {t: edge.sql(f"SELECT * FROM {t} ORDER BY 1") for t in tables}
    for table in ("outbox", "audit_log"):
        out[table] = edge.sql(f"SELECT count(*) FROM {table}")
    return out


def code(answer: Any) -> str:
    return str(answer["error"]["code"])


def test_the_menu_is_read_whole_by_anyone_who_sells(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        got, menu, _ = await edge.call("GET", MENU, till.headers("sam"))
        assert got == 200
        assert [c["name"] for c in menu["categories"]] == ["Mains"]
        items = {i["id"]: i for i in menu["items"]}
        assert items["ipa"] | {"id": "ipa"} == {
            "id": "ipa", "category_id": "mains", "name": "IPA", "price_pence": 550,
            "currency": "GBP", "station": "bar", "available": True, "modifier_group_ids": [],
            "position": 0,
        }  # fmt: skip
        assert items["steak"]["modifier_group_ids"] == ["cooking", "sauces"]
        groups = {g["id"]: g for g in menu["modifier_groups"]}
        assert (groups["cooking"]["min_choices"], groups["cooking"]["max_choices"]) == (1, 1)
        assert [(m["name"], m["price_pence"]) for m in groups["sauces"]["modifiers"]] == [
            ("Peppercorn", 250), ("Bearnaise", 300), ("Aioli", 150),
        ]  # fmt: skip
        # 86 on one tablet: the next read on another sees it at once.
        other = await till_for(edge, "bar-tablet")
        got, _, _ = await edge.call("POST", f"{MENU}/items/ipa/availability",
                                    till.headers("bo"), json={"available": False})  # fmt: skip
        assert got == 200
        got, menu, _ = await edge.call("GET", MENU, other.headers("kai"))
        assert {i["id"]: i["available"] for i in menu["items"]}["ipa"] is False
        _, doc, _ = await edge.call("GET", "/api/openapi.json")
        schema = doc["paths"][MENU]["get"]["responses"]["200"]["content"]["application/json"]
        jsonschema.validate(menu, {**schema["schema"], "components": doc["components"]})

    run(body, tmp_path)


def test_a_manager_authors_the_menu_and_every_edit_syncs_and_is_audited(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        mia = till.headers("mia")
        got, cat, _ = await edge.call("POST", f"{MENU}/categories", mia,
                                      json={"name": "Desserts", "position": 2})  # fmt: skip
        assert got == 201 and cat["name"] == "Desserts" and cat["active"] is True
        got, group, _ = await edge.call("POST", f"{MENU}/modifier-groups", mia,
                                        json={"name": "Scoops", "min_choices": 1,
                                              "max_choices": 3})  # fmt: skip
        assert got == 201 and group["modifiers"] == []
        got, mod, _ = await edge.call(
            "POST", f"{MENU}/modifier-groups/{group['id']}/modifiers", mia,
            json={"name": "Vanilla", "price_pence": 120},
        )  # fmt: skip
        assert got == 201 and mod["group_id"] == group["id"]
        got, item, _ = await edge.call(
            "POST", f"{MENU}/items", mia,
            json={"category_id": cat["id"], "name": "Sundae", "price_pence": 650,
                  "station": "pastry", "modifier_group_ids": [group["id"]]},
        )  # fmt: skip
        assert got == 201 and (item["station"], item["price_pence"]) == ("pastry", 650)
        got, item, _ = await edge.call("PATCH", f"{MENU}/items/{item['id']}", mia,
                                       json={"price_pence": 700})  # fmt: skip
        assert got == 200 and (item["price_pence"], item["name"]) == (700, "Sundae")
        got, group, _ = await edge.call("PATCH", f"{MENU}/modifier-groups/{group['id']}", mia,
                                        json={"max_choices": 2})  # fmt: skip
        assert got == 200 and [m["name"] for m in group["modifiers"]] == ["Vanilla"]
        got, mod, _ = await edge.call("PATCH", f"{MENU}/modifiers/{mod['id']}", mia,
                                      json={"available": False})  # fmt: skip
        assert got == 200 and mod["available"] is False
        got, cat, _ = await edge.call("PATCH", f"{MENU}/categories/{cat['id']}", mia,
                                      json={"name": "Puddings"})  # fmt: skip
        assert got == 200 and cat["name"] == "Puddings"
        got, menu, _ = await edge.call("GET", MENU, till.headers("sam"))
        assert item in menu["items"] and cat in menu["categories"]
        # Every edit is a synced change and an audit entry.
        tables = {r[0] for r in edge.sql("SELECT tbl FROM outbox")}
        assert {"menu_categories", "menu_items", "modifier_groups", "modifiers"} <= tables
        actions = [r[0] for r in edge.sql("SELECT action FROM audit_log ORDER BY position")]
        assert actions == [
            "create_category", "create_modifier_group", "create_modifier", "create_item",
            "update_item", "update_modifier_group", "update_modifier", "update_category",
        ]  # fmt: skip
        # Deleting: nothing still named by an item goes.
        got, answer, _ = await edge.call("DELETE", f"{MENU}/categories/{cat['id']}", mia)
        assert (got, code(answer)) == (409, "conflict")
        assert answer["error"]["details"]["item_ids"] == [item["id"]]
        got, answer, _ = await edge.call("DELETE", f"{MENU}/modifier-groups/{group['id']}", mia)
        assert (got, code(answer)) == (409, "conflict")
        got, answer, _ = await edge.call("DELETE", f"{MENU}/items/{item['id']}", mia)
        assert (got, answer) == (200, {"id": item["id"], "deleted": True})
        for path in (f"modifier-groups/{group['id']}", f"categories/{cat['id']}"):
            got, _, _ = await edge.call("DELETE", f"{MENU}/{path}", mia)
            assert got == 200, path
        assert edge.sql("SELECT count(*) FROM modifiers WHERE group_id = ?", (group["id"],)) == [
            (0,)
        ]
        got, answer, _ = await edge.call("DELETE", f"{MENU}/modifiers/{mod['id']}", mia)
        assert (got, code(answer)) == (404, "not_found")

    run(body, tmp_path)


def test_a_retried_menu_edit_gets_the_first_answer(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        for method, path, payload in [
            ("POST", "/categories", {"name": "Sides"}),
            ("PATCH", "/items/soup", {"price_pence": 475}),
            ("DELETE", "/modifiers/aioli", None),
        ]:
            headers = till.headers("mia", **{"Idempotency-Key": f"menu-{method}-0001"})
            first = await edge.call(method, MENU + path, headers, json=payload)
            audited = edge.sql("SELECT count(*) FROM audit_log")
            got, answer, resp = await edge.call(method, MENU + path, headers, json=payload)
            assert first[0] in (200, 201) and (got, answer) == first[:2], path
            assert resp.headers.get("Idempotent-Replayed") == "true"
            assert edge.sql("SELECT count(*) FROM audit_log") == audited
        assert answer == {"id": "aioli", "deleted": True}
        assert len(edge.sql("SELECT * FROM menu_categories")) == 2

    run(body, tmp_path)


def test_a_price_change_applies_to_new_lines_only(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        got, order, _ = await edge.call("POST", "/v1/orders", till.headers("sam"),
                                        json={"table_name": "T1", "covers": 1})  # fmt: skip
        lines = f"/v1/orders/{order['id']}/lines"
        await edge.call("POST", lines, till.headers("sam"), json={"item_id": "soup"})
        got, _, _ = await edge.call("PATCH", f"{MENU}/items/soup", till.headers("mia"),
                                    json={"price_pence": 500})  # fmt: skip
        assert got == 200
        got, added, _ = await edge.call("POST", lines, till.headers("sam"),
                                        json={"item_id": "soup"})  # fmt: skip
        assert [x["unit_price_pence"] for x in added["lines"]] == [500]
        assert added["order"]["totals"]["total_pence"] == 950
        got, order, _ = await edge.call("GET", f"/v1/orders/{order['id']}", till.headers("sam"))
        assert [x["unit_price_pence"] for x in order["lines"]] == [450, 500]

    run(body, tmp_path)


@pytest.mark.parametrize(
    ("who", "method", "path", "payload", "status"),
    [
        ("sam", "POST", "/categories", {"name": "X"}, 403),
        ("sam", "PATCH", "/items/soup", {"price_pence": 1}, 403),
        ("kai", "DELETE", "/items/soup", None, 403),
        ("bo", "POST", "/modifier-groups", {"name": "X"}, 403),
        ("kai", "POST", "/items/soup/availability", {"available": False}, 200),
        ("sam", "POST", "/items/soup/availability", {"available": False}, 403),
        ("ola", "PATCH", "/items/soup", {"price_pence": 1}, 200),
        ("mia", "DELETE", "/modifiers/aioli", None, 200),
    ],
)
def test_only_managers_edit_the_menu(
    tmp_path: Path, who: str, method: str, path: str, payload: Any, status: int
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        before = state(edge)
        got, answer, _ = await edge.call(method, MENU + path, till.headers(who), json=payload)
        assert got == status, answer
        if status == 403:
            assert code(answer) == "permission_denied"
            assert answer["error"]["details"]["permission"] in ("menu.edit", "menu.86")
            assert state(edge) == before

    run(body, tmp_path)


BAD: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": -1}, 422,
     "invalid_request"),
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": 4.5}, 422,
     "invalid_request"),
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": "450"}, 422,
     "invalid_request"),
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": 10**12}, 422,
     "invalid_request"),
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": 1,
                        "station": "Bar Top"}, 422, "invalid_request"),
    ("POST", "/items", {"category_id": "nope", "name": "X", "price_pence": 1}, 404,
     "not_found"),
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": 1,
                        "modifier_group_ids": ["cooking", "nope"]}, 404, "not_found"),
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": 1,
                        "modifier_group_ids": ["cooking", "cooking"]}, 422, "invalid_request"),
    ("POST", "/items", {"category_id": "mains", "name": "X", "price_pence": 1, "colour": 1},
     422, "invalid_request"),
    ("POST", "/items", {"category_id": "mains", "price_pence": 1}, 422, "invalid_request"),
    ("PATCH", "/items/soup", {}, 422, "invalid_request"),
    ("PATCH", "/items/soup", {"price_pence": None}, 422, "invalid_request"),
    ("PATCH", "/items/soup", {"available": "no"}, 422, "invalid_request"),
    ("PATCH", "/items/nope", {"price_pence": 1}, 404, "not_found"),
    ("POST", "/categories", {"name": ""}, 422, "invalid_request"),
    ("POST", "/categories", {"name": "a\nb"}, 422, "invalid_request"),
    ("POST", "/modifier-groups", {"name": "X", "min_choices": 3, "max_choices": 2}, 422,
     "invalid_request"),
    ("POST", "/modifier-groups", {"name": "X", "max_choices": 0}, 422, "invalid_request"),
    ("POST", "/modifier-groups", {"name": "X", "min_choices": -1}, 422, "invalid_request"),
    ("PATCH", "/modifier-groups/cooking", {"min_choices": 2}, 422, "invalid_request"),
    ("POST", "/modifier-groups/nope/modifiers", {"name": "X"}, 404, "not_found"),
    ("POST", "/modifier-groups/cooking/modifiers", {"name": "X", "price_pence": 0.5}, 422,
     "invalid_request"),
    ("PATCH", "/modifiers/rare", {"group_id": "sauces"}, 422, "invalid_request"),
    ("DELETE", "/categories/nope", None, 404, "not_found"),
    ("DELETE", "/categories/mains", None, 409, "conflict"),
    ("DELETE", "/modifier-groups/cooking", None, 409, "conflict"),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "payload", "status", "error"), BAD)
def test_bad_menu_edits_are_refused_and_change_nothing(
    tmp_path: Path, method: str, path: str, payload: Any, status: int, error: str
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        before = state(edge)
        got, answer, _ = await edge.call(method, MENU + path, till.headers("mia"), json=payload)
        assert (got, code(answer)) == (status, error), answer
        assert state(edge) == before

    run(body, tmp_path)


def test_a_menu_row_the_cloud_wrote_without_some_columns_reads_with_defaults(
    tmp_path: Path,
) -> None:
    async def body(edge: Edge) -> None:
        till = await till_for(edge)
        edge.sql("INSERT INTO menu_items (id, name, modifier_group_ids) VALUES ('tea', 'Tea', '{')")
        got, menu, _ = await edge.call("GET", MENU, till.headers("sam"))
        (tea,) = [i for i in menu["items"] if i["id"] == "tea"]
        assert (tea["station"], tea["available"], tea["price_pence"]) == ("kitchen", True, None)
        assert tea["modifier_group_ids"] == []
        got, order, _ = await edge.call("POST", "/v1/orders", till.headers("sam"),
                                        json={"table_name": "T1", "covers": 1})  # fmt: skip
        got, answer, _ = await edge.call("POST", f"/v1/orders/{order['id']}/lines",
                                         till.headers("sam"), json={"item_id": "tea"})  # fmt: skip
        assert (got, code(answer)) == (409, "item_unavailable")

    run(body, tmp_path)
