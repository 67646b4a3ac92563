"""Checkout over real HTTP against a real edge and SQLite file: splits, cash payments with
tips and change, refunds with a manager's approval, tills from float to count, and every
refusal leaving nothing behind."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import payments, tills
from edge.api.auth import grant_approval
from edge.config import EdgeConfig, PaymentSettings
from edge.errors import ApiCode, ApiError
from edge.payments import NewPayment, NewRefund, PaymentPolicy
from edge.store import EdgeStore
from shared.config import ConfigError, load_config
from shared.gratuity import vat_in
from shared.registry import default_registry
from sync_protocol.changes import Op

from .api_harness import Edge, Tablet, running_edge
from .test_api_orders import add_line, code, open_order, till_for

T = TypeVar("T")
ORDERS = "/v1/orders"


def run(fn: Callable[[Edge], Coroutine[Any, Any, T]], tmp_path: Path, **config: Any) -> T:
    async def body() -> T:
        async with running_edge(tmp_path, **config) as edge:
            return await fn(edge)

    return asyncio.run(body())


def money(edge: Edge) -> dict[str, Any]:
    """Everything a refused payment request must leave as it was."""
    tables = ("orders", "payments", "refunds", "tills", "till_movements", "approvals")
    out: dict[str, Any] = {t: edge.sql(f"SELECT * FROM {t} ORDER BY 1") for t in tables}
    for table in ("outbox", "audit_log", "idempotency"):
        out[table] = edge.sql(f"SELECT count(*) FROM {table}")
    return out


async def order_of(edge: Edge, tablet: Tablet, *items: str) -> str:
    order = await open_order(edge, tablet)
    for item in items:
        got, answer = await add_line(edge, tablet, order["id"], item_id=item)
        assert got == 201, answer
    return str(order["id"])


async def open_drawer(
    edge: Edge, tablet: Tablet, name: str = "Bar", float_pence: int = 10_000
) -> str:
    got, till, _ = await edge.call(
        "POST", "/v1/tills", tablet.headers("bo"), json={"name": name, "float_pence": float_pence}
    )
    assert got == 201, till
    return str(till["id"])


async def pay(
    edge: Edge, tablet: Tablet, order_id: str, who: str = "sam", **payment: Any
) -> tuple[int, Any]:
    got, answer, _ = await edge.call(
        "POST", f"{ORDERS}/{order_id}/payments", tablet.headers(who), json=payment
    )
    return got, answer


def test_a_check_split_three_ways_is_paid_in_cash_with_tips_and_change(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        oid = await order_of(edge, tablet, "steak", "soup", "ipa")  # 2200 + 450 + 550
        till = await open_drawer(edge, tablet)
        got, sheet, _ = await edge.call("GET", f"{ORDERS}/{oid}/checkout", tablet.headers("sam"))
        assert got == 200 and sheet["balance_pence"] == 3200 and sheet["paid_pence"] == 0
        offers = {t["tender"]: t for t in sheet["tenders"]}
        assert offers["cash"]["available"] and not offers["card"]["available"]
        assert offers["card"]["fees_pence"] == 93 + 30 + 32  # 2.9% + 30p, and the platform's 1%
        assert sheet["bank_saves_pence"] == (93 + 30 + 32) - (6 + 32)
        assert sheet["saved_by"] == "restaurant"
        pre_tax = 3200 - vat_in(3200, 20)  # 2667
        assert [t["tip_pence"] for t in sheet["tip_options"]] == [133, 267, 533]
        assert pre_tax == 2667

        even = {"method": "even", "parts": 3}
        got, split, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/split", tablet.headers("sam"), json=even
        )
        assert got == 200 and [p["amount_pence"] for p in split["parts"]] == [1067, 1067, 1066]

        # Guest 1 presses the 10% button (on 1067 less its VAT: 889) and hands over £20.
        got, after = await pay(
            edge, tablet, oid, tender="cash", amount_pence=1067, tip_pence=89, tip_preset="10",
            tendered_pence=2000, till_id=till,
        )  # fmt: skip
        assert got == 201, after
        [first] = after["payments"]
        assert (first["charged_pence"], first["change_pence"]) == (1156, 844)
        assert first["tip_employee_id"] == "sam" and first["status"] == "succeeded"
        assert after["balance_pence"] == 2133 and after["status"] == "open"
        # One guest cannot pay more than is left; a close is refused while money is due.
        got, refused = await pay(edge, tablet, oid, tender="cash", amount_pence=2134, till_id=till)
        assert (got, code(refused)) == (409, "overpayment")
        assert refused["error"]["details"]["balance_pence"] == 2133
        got, refused, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", tablet.headers("sam"))
        assert (got, code(refused)) == (409, "balance_due")
        assert refused["error"]["details"]["due_pence"] == 2133
        got, after = await pay(edge, tablet, oid, tender="cash", amount_pence=1067, till_id=till)
        assert got == 201 and after["payments"][1]["change_pence"] == 0
        got, after = await pay(
            edge, tablet, oid, tender="cash", amount_pence=1066, tip_pence=300, till_id=till,
            tendered_pence=1500,
        )  # fmt: skip
        assert got == 201 and after["balance_pence"] == 0 and after["status"] == "paid"
        assert after["tips_pence"] == 389 and after["paid_pence"] == 3200
        got, closed, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", tablet.headers("sam"))
        assert got == 200 and closed["status"] == "closed"

        got, sheet, _ = await edge.call("GET", f"/v1/tills/{till}", tablet.headers("bo"))
        assert got == 200
        assert sheet["cash_taken_pence"] == 3200 + 389
        assert sheet["expected_pence"] == 10_000 + 3589
        [sam] = sheet["employees"]
        assert (sam["employee_id"], sam["payments"], sam["sales_pence"], sam["tips_pence"]) == (
            "sam", 3, 3200, 389,
        )  # fmt: skip
        # The day's takings, for the manager: the cash, the tips by employee, no fees.
        day = sheet["business_day"]
        got, takings, _ = await edge.call(
            "GET", f"/v1/reports/takings?business_day={day}", tablet.headers("mia")
        )
        assert got == 200, takings
        [cash] = takings["tenders"]
        assert (cash["tender"], cash["payments"], cash["amount_pence"], cash["tips_pence"]) == (
            "cash", 3, 3200, 389,
        )  # fmt: skip
        assert takings["tips"] == [{"employee_id": "sam", "tips_pence": 389, "payments": 2}]
        assert takings["net_pence"] == 3589 and takings["platform_fee_pence"] == 0
        got, refused, _ = await edge.call(
            "GET", f"/v1/reports/takings?business_day={day}", tablet.headers("sam")
        )
        assert (got, code(refused)) == (403, "permission_denied")

    run(body, tmp_path)


def test_refunds_never_exceed_the_payment_and_big_ones_need_a_manager(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        oid = await order_of(edge, tablet, "steak", "steak")  # 4400
        till = await open_drawer(edge, tablet, float_pence=0)
        got, paid = await pay(
            edge, tablet, oid, tender="cash", amount_pence=4400, tip_pence=400, till_id=till
        )
        assert got == 201 and paid["status"] == "paid"
        pid = paid["payments"][0]["id"]
        refunds = f"/v1/payments/{pid}/refunds"

        # Up to the threshold (£20) a server refunds alone.
        got, after, _ = await edge.call(
            "POST", refunds, tablet.headers("sam"), json={"amount_pence": 2000, "reason": "cold"}
        )
        assert got == 201 and after["refunded_pence"] == 2000
        assert after["refunds"][0]["approved_by"] is None
        # Above it the server needs a manager's PIN; nothing is written without one.
        before = money(edge)
        got, refused, _ = await edge.call(
            "POST", refunds, tablet.headers("sam"), json={"amount_pence": 2001, "reason": "cold"}
        )
        assert (got, code(refused)) == (403, "manager_approval_required")
        assert money(edge) == before
        # Never more than is left of the payment (4800 charged, 2000 back).
        _, approval, _ = await edge.store.transaction(
            lambda tx: grant_approval(tx, "mia", tablet.device_id)
        )
        headers = tablet.headers("sam", **{"X-Fynlo-Approval": approval})
        before = money(edge)
        got, refused, _ = await edge.call(
            "POST", refunds, headers, json={"amount_pence": 2801, "reason": "cold"}
        )
        assert (got, code(refused)) == (409, "refund_exceeds_payment")
        assert refused["error"]["details"]["refundable_pence"] == 2800
        assert money(edge) == before  # the approval is not spent on a refusal
        got, after, _ = await edge.call(
            "POST", refunds, headers, json={"amount_pence": 2800, "reason": "cold"}
        )
        assert got == 201 and after["refunds"][1]["approved_by"] == "mia"
        got, payment, _ = await edge.call("GET", f"/v1/payments/{pid}", tablet.headers("sam"))
        assert payment["refunded_pence"] == 4800 == payment["charged_pence"]
        got, refused, _ = await edge.call(
            "POST", refunds, tablet.headers("sam"), json={"amount_pence": 1, "reason": "again"}
        )
        assert (got, code(refused)) == (409, "refund_exceeds_payment")
        got, sheet, _ = await edge.call("GET", f"/v1/tills/{till}", tablet.headers("bo"))
        assert sheet["cash_refunded_pence"] == 4800 and sheet["expected_pence"] == 0

    run(body, tmp_path)


def test_lines_voided_after_payment_show_a_refund_due_and_block_the_close(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        oid = await order_of(edge, tablet, "steak", "soup")  # 2650
        till = await open_drawer(edge, tablet)
        got, after = await pay(edge, tablet, oid, tender="cash", amount_pence=2000, till_id=till)
        assert got == 201 and after["balance_pence"] == 650
        got, order, _ = await edge.call("GET", f"{ORDERS}/{oid}", tablet.headers("sam"))
        steak = next(line for line in order["lines"] if line["item_id"] == "steak")
        got, _, _ = await edge.call(
            "POST", f"{ORDERS}/{oid}/lines/{steak['id']}/void", tablet.headers("sam"),
            json={"reason": "sent back"},
        )  # fmt: skip
        assert got == 200
        got, sheet, _ = await edge.call("GET", f"{ORDERS}/{oid}/checkout", tablet.headers("sam"))
        assert (sheet["total_pence"], sheet["balance_pence"], sheet["refund_due_pence"]) == (
            450, 0, 1550,
        )  # fmt: skip
        got, refused, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", tablet.headers("sam"))
        assert (got, code(refused)) == (409, "balance_due")
        assert refused["error"]["details"]["refund_due_pence"] == 1550
        pid = sheet["payments"][0]["id"]
        got, _, _ = await edge.call(
            "POST", f"/v1/payments/{pid}/refunds", tablet.headers("sam"),
            json={"amount_pence": 1550, "reason": "steak sent back"},
        )  # fmt: skip
        assert got == 201
        got, closed, _ = await edge.call("POST", f"{ORDERS}/{oid}/close", tablet.headers("sam"))
        assert got == 200 and closed["status"] == "closed"

    run(body, tmp_path)


def test_a_retried_payment_is_taken_once(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        oid = await order_of(edge, tablet, "steak")
        till = await open_drawer(edge, tablet)
        headers = tablet.headers("sam", **{"Idempotency-Key": "pay-table-4-guest-1"})
        payment = {"tender": "cash", "amount_pence": 1000, "till_id": till}
        answers = await asyncio.gather(
            *(
                edge.call("POST", f"{ORDERS}/{oid}/payments", headers, json=payment)
                for _ in range(3)
            )
        )
        assert {got for got, _, _ in answers} == {201}
        assert len({str(answer) for _, answer, _ in answers}) == 1
        assert edge.sql("SELECT count(*), sum(amount_pence) FROM payments") == [(1, 1000)]

    run(body, tmp_path)


@pytest.mark.parametrize(
    ("payment", "status", "error"),
    [
        ({"tender": "card", "amount_pence": 100}, 409, "tender_unavailable"),
        ({"tender": "cash", "amount_pence": 100, "till_id": "OPEN", "payment_method": "pm_x"},
         422, "invalid_request"),
        ({"tender": "bank", "amount_pence": 100}, 409, "tender_unavailable"),
        ({"tender": "cash", "amount_pence": 100}, 422, "invalid_request"),  # no till
        ({"tender": "cash", "amount_pence": 100, "till_id": "till_nope"}, 404, "not_found"),
        ({"tender": "cash", "amount_pence": 100, "till_id": "CLOSED"}, 409, "till_not_open"),
        ({"tender": "cash", "amount_pence": 1000, "tendered_pence": 999, "till_id": "OPEN"}, 409,
         "insufficient_tender"),
        ({"tender": "cash", "amount_pence": 1000, "tip_pence": 84, "tip_preset": "10",
          "till_id": "OPEN"}, 409, "invalid_tip"),
        ({"tender": "cash", "amount_pence": 1000, "tip_pence": 2000, "till_id": "OPEN"}, 409,
         "invalid_tip"),
        ({"tender": "cash", "amount_pence": 2201, "till_id": "OPEN"}, 409, "overpayment"),
        ({"tender": "cash", "amount_pence": 0, "till_id": "OPEN"}, 422, "invalid_request"),
        ({"tender": "cash", "amount_pence": -5, "till_id": "OPEN"}, 422, "invalid_request"),
        ({"tender": "cash", "amount_pence": 10.5, "till_id": "OPEN"}, 422, "invalid_request"),
        ({"tender": "cheque", "amount_pence": 100}, 422, "invalid_request"),
        ({"tender": "cash", "amount_pence": 100, "till_id": "OPEN", "extra": 1}, 422,
         "invalid_request"),
    ],
)  # fmt: skip
def test_a_bad_payment_is_refused_whole(
    tmp_path: Path, payment: dict[str, Any], status: int, error: str
) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        oid = await order_of(edge, tablet, "steak")  # 2200
        drawers = {
            "OPEN": await open_drawer(edge, tablet),
            "CLOSED": await open_drawer(edge, tablet, "Old"),
        }
        got, _, _ = await edge.call(
            "POST", f"/v1/tills/{drawers['CLOSED']}/close", tablet.headers("bo"),
            json={"counted_pence": 10_000},
        )  # fmt: skip
        assert got == 200
        body = {k: drawers.get(v, v) if k == "till_id" else v for k, v in payment.items()}
        before = money(edge)
        got, refused = await pay(edge, tablet, oid, **body)
        assert (got, code(refused)) == (status, error), refused
        assert money(edge) == before

    run(body, tmp_path)


def test_a_till_is_opened_paid_in_and_out_and_counted(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        till = await open_drawer(edge, tablet, float_pence=5000)
        got, refused, _ = await edge.call(
            "POST", "/v1/tills", tablet.headers("bo"), json={"name": "Bar", "float_pence": 1}
        )
        assert (got, code(refused)) == (409, "till_already_open")
        moves = f"/v1/tills/{till}/movements"
        got, sheet, _ = await edge.call(
            "POST", moves, tablet.headers("bo"),
            json={"kind": "paid_in", "amount_pence": 2000, "reason": "more change"},
        )  # fmt: skip
        assert got == 201 and sheet["expected_pence"] == 7000
        got, refused, _ = await edge.call(
            "POST", moves, tablet.headers("bo"),
            json={"kind": "paid_out", "amount_pence": 7001, "reason": "fish delivery"},
        )  # fmt: skip
        assert (got, code(refused)) == (409, "insufficient_cash")
        got, sheet, _ = await edge.call(
            "POST", moves, tablet.headers("bo"),
            json={"kind": "paid_out", "amount_pence": 4500, "reason": "fish delivery"},
        )  # fmt: skip
        assert got == 201 and (sheet["paid_in_pence"], sheet["paid_out_pence"]) == (2000, 4500)
        got, closed, _ = await edge.call(
            "POST", f"/v1/tills/{till}/close", tablet.headers("bo"), json={"counted_pence": 2450}
        )
        assert got == 200 and closed["status"] == "closed"
        assert (closed["expected_pence"], closed["counted_pence"], closed["variance_pence"]) == (
            2500, 2450, -50,
        )  # fmt: skip
        for path, payload in (
            (moves, {"kind": "paid_in", "amount_pence": 1, "reason": "late"}),
            (f"/v1/tills/{till}/close", {"counted_pence": 1}),
        ):
            got, refused, _ = await edge.call("POST", path, tablet.headers("bo"), json=payload)
            assert (got, code(refused)) == (409, "till_not_open")
        # The day's sheets; a new drawer of the same name may open once the old one closed.
        again = await open_drawer(edge, tablet, float_pence=100)
        got, listed, _ = await edge.call(
            "GET", f"/v1/tills?business_day={closed['business_day']}", tablet.headers("bo")
        )
        assert [t["id"] for t in listed["tills"]] == [till, again]
        got, listed, _ = await edge.call("GET", "/v1/tills?status=open", tablet.headers("bo"))
        assert [t["id"] for t in listed["tills"]] == [again]

    run(body, tmp_path)


def test_who_may_take_money_and_handle_cash(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        oid = await order_of(edge, tablet, "soup")
        till = await open_drawer(edge, tablet)
        got, refused = await pay(
            edge, tablet, oid, "kai", tender="cash", amount_pence=450, till_id=till
        )
        assert (got, code(refused)) == (403, "permission_denied")  # the kitchen
        got, refused, _ = await edge.call(
            "POST", "/v1/tills", tablet.headers("sam"), json={"name": "Door", "float_pence": 0}
        )
        assert (got, code(refused)) == (403, "permission_denied")  # a server
        got, _ = await pay(edge, tablet, oid, "sam", tender="cash", amount_pence=450, till_id=till)
        assert got == 201

    run(body, tmp_path)


def test_split_by_items_and_seat_over_http(tmp_path: Path) -> None:
    async def body(edge: Edge) -> None:
        tablet = await till_for(edge)
        order = await open_order(edge, tablet)
        oid = order["id"]
        ids = []
        for item, seat in (("steak", 1), ("soup", 2), ("ipa", None)):
            got, added = await add_line(edge, tablet, oid, item_id=item, seat=seat)
            assert got == 201, added
            ids.append(added["lines"][0]["id"])
        url, who = f"{ORDERS}/{oid}/split", tablet.headers("sam")
        got, split, _ = await edge.call("POST", url, who, json={"method": "seat"})
        assert got == 200 and [(p["label"], p["amount_pence"]) for p in split["parts"]] == [
            ("seat 1", 2475), ("seat 2", 725),
        ]  # fmt: skip
        items = {"ann": [ids[0], ids[2]], "bob": [ids[1], ids[2]]}
        got, split, _ = await edge.call("POST", url, who, json={"method": "items", "items": items})
        assert got == 200 and [p["amount_pence"] for p in split["parts"]] == [2475, 725]
        got, refused, _ = await edge.call(
            "POST", url, who, json={"method": "items", "items": {"ann": [ids[0]]}}
        )
        assert (got, code(refused)) == (422, "invalid_request")  # nobody had the soup
        got, split, _ = await edge.call(
            "POST", url, who, json={"method": "amounts", "amounts": [1000]}
        )
        assert got == 200 and split["unassigned_pence"] == 2200
        got, refused, _ = await edge.call(
            "POST", url, who, json={"method": "amounts", "amounts": [3201]}
        )
        assert (got, code(refused)) == (422, "invalid_request")

    run(body, tmp_path)


def test_payment_settings_are_checked_at_start_up(tmp_path: Path) -> None:
    assert PaymentSettings().fees().pass_through is False
    with pytest.raises(ValueError, match="pass_through_banned"):
        PaymentSettings(pass_through=True)  # GB
    assert PaymentSettings(jurisdiction="US-NY", pass_through=True).fees().pass_through
    for bad in ({"card_percent": "abc"}, {"tip_presets": ("5", "5")}, {"vat_percent": "101"}):
        with pytest.raises(ValueError):
            PaymentSettings(**bad)  # type: ignore[arg-type]
    toml = tmp_path / "edge.toml"
    toml.write_text('[payments]\ncard_percent = "x"\n')
    with pytest.raises(ConfigError) as info:
        load_config(EdgeConfig, toml, env_prefix="FYNLO_TEST")
    assert info.value.key == "payments"
    # money is never merged by a rule, whatever the configuration says
    with pytest.raises(ValueError, match="payments is always manual"):
        EdgeConfig(strategies="payments=server_wins")


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    parts=st.lists(st.integers(1, 3000), min_size=1, max_size=4),
    tips=st.lists(st.integers(0, 500), min_size=4, max_size=4),
    asks=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 4000)), min_size=1, max_size=12),
)
def test_refunds_never_exceed_what_a_payment_took(
    tmp_path_factory: pytest.TempPathFactory,
    parts: list[int],
    tips: list[int],
    asks: list[tuple[int, int]],
) -> None:
    """Whatever refunds are asked for, in any order and size, each payment gives back at most
    what it took, and a refused refund leaves nothing behind."""
    policy = PaymentPolicy(refund_approval_above_pence=10**9)

    async def body() -> None:
        path = tmp_path_factory.mktemp("refunds") / "edge.sqlite"
        async with await EdgeStore.open(path, default_registry(), "site-1", "edge-1") as store:
            total = sum(parts)
            await store.write_many(
                [
                    ("orders", "o1", Op.INSERT, {"check_number": 1, "business_day": "2026-11-27"}),
                    ("order_lines", "l1", Op.INSERT, {"order_id": "o1", "quantity": 1,
                                                      "unit_price_pence": total}),
                ]
            )  # fmt: skip
            till = await store.transaction(
                lambda tx: tills.open_till(tx, tills.OpenTill("Bar", 10**7), "bo", "till1")
            )
            ids = []
            for n, (part, tip) in enumerate(zip(parts, tips, strict=False)):
                pid = f"pay{n}"
                new = NewPayment(
                    tender="cash", amount_pence=part, tip_pence=min(tip, part), till_id=till.id
                )
                await store.transaction(
                    lambda tx, new=new, pid=pid: payments.take_payment(
                        tx, "o1", new, "sam", pid, policy
                    )
                )
                ids.append(pid)
            for n, (which, amount) in enumerate(asks):
                pid = ids[which % len(ids)]
                before = await store.query("SELECT count(*), sum(amount_pence) FROM refunds")
                ask = NewRefund(amount_pence=amount, reason="guest")
                try:
                    await store.transaction(
                        lambda tx, pid=pid, ask=ask, n=n: payments.refund(
                            tx, pid, ask, "sam", None, f"ref{n}", policy
                        )
                    )
                except ApiError as refused:
                    assert refused.code is ApiCode.REFUND_EXCEEDS_PAYMENT
                    after = await store.query("SELECT count(*), sum(amount_pence) FROM refunds")
                    assert after == before
            for pid in ids:
                view = await store.transaction(lambda tx, pid=pid: payments.payment(tx, pid))
                assert 0 <= view.refunded_pence <= view.charged_pence
                asked = [a for w, a in asks if ids[w % len(ids)] == pid]
                # greedy: every ask that fitted what was left was taken
                left = view.charged_pence
                for amount in asked:
                    if amount <= left:
                        left -= amount
                assert view.refunded_pence == view.charged_pence - left

    asyncio.run(body())
