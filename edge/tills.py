"""Cash drawers: open with a float, take cash, pay in and out, count at the close.

How it works. A till is a ``tills`` row from its opening (name, float, who, when) to its
close (who, when, the cash expected and the cash counted); one till of a name is open at a
time (``409 till_already_open``). Everything that moves its cash is a row of its own, never
a running total that two tablets could race on: cash payments (``payments.till_id``; the
drawer keeps the charge, the change went back to the guest), cash refunds
(``refunds.till_id``) and paid-ins and paid-outs (``till_movements``: a float top-up, a
delivery paid from the drawer, cash tips handed out). So the cash expected is always

    float + cash taken - cash refunded + paid in - paid out

read in the transaction that needs it. A paid-out or a refund that would take the drawer
below nothing is refused (``409 insufficient_cash``). The close records the count; the
variance is counted - expected (negative: cash missing). ``summary`` is the drawer's
end-of-day sheet, with each employee's cash sales, tips and refunds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from sync_protocol.changes import Op

from .errors import ApiCode, ApiError, not_found
from .fields import Name, Reason
from .orders import business_day
from .tx import Tx

Pence = Annotated[int, Meta(ge=0, le=100_000_000)]
Positive = Annotated[int, Meta(ge=1, le=100_000_000)]


class OpenTill(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: Name
    float_pence: Pence


class Movement(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    kind: Literal["paid_in", "paid_out"]
    amount_pence: Positive
    reason: Reason


class CloseTill(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    counted_pence: Pence


class EmployeeCash(msgspec.Struct, frozen=True):
    employee_id: str
    payments: int
    sales_pence: int  #: off the bills, in cash
    tips_pence: int
    refunds_pence: int


class TillSummary(msgspec.Struct, frozen=True):
    """A drawer's sheet: where its cash came from and went, and how the count compares."""

    id: str
    name: str
    business_day: str
    status: Literal["open", "closed"]
    opened_by: str | None
    opened_at_ms: int | None
    closed_by: str | None
    closed_at_ms: int | None
    float_pence: int
    cash_taken_pence: int  #: charges kept by the drawer (bills, tips, surcharges)
    cash_refunded_pence: int
    paid_in_pence: int
    paid_out_pence: int
    expected_pence: int
    counted_pence: int | None
    variance_pence: int | None  #: counted - expected
    employees: list[EmployeeCash]


class TillList(msgspec.Struct, frozen=True):
    tills: list[TillSummary]


_TILL = (
    "SELECT id, name, business_day, float_pence, opened_by, opened_at_ms, closed_by,"
    " closed_at_ms, counted_pence FROM tills"
)


def _row(tx: Tx, till_id: str) -> tuple[Any, ...]:
    row = tx.one(f"{_TILL} WHERE id = ?", (till_id,))
    if row is None:
        raise not_found("till", till_id)
    return tuple(row)


def require_open(tx: Tx, till_id: str) -> None:
    """Refuse a till that does not exist (404) or is closed (409 till_not_open)."""
    if _row(tx, till_id)[7] is not None:
        raise ApiError(ApiCode.TILL_NOT_OPEN, f"till {till_id} is closed", till_id=till_id)


def expected_cash(tx: Tx, till_id: str) -> int:
    """The cash that should be in the drawer now."""
    float_pence = _row(tx, till_id)[3] or 0
    taken, refunded, paid_in, paid_out = _flows(tx, till_id)
    return float_pence + taken - refunded + paid_in - paid_out


def require_cash(tx: Tx, till_id: str, amount_pence: int) -> None:
    """Refuse to take ``amount_pence`` out of a drawer that should not hold it."""
    held = expected_cash(tx, till_id)
    if amount_pence > held:
        raise ApiError(
            ApiCode.INSUFFICIENT_CASH,
            f"till {till_id} should hold {held} pence, less than {amount_pence}",
            expected_pence=held,
        )


def _flows(tx: Tx, till_id: str) -> tuple[int, int, int, int]:
    taken = tx.one(
        "SELECT coalesce(sum(charged_pence), 0) FROM payments"
        " WHERE till_id = ? AND tender = 'cash' AND status = 'succeeded'",
        (till_id,),
    )[0]
    refunded = tx.one(
        "SELECT coalesce(sum(amount_pence), 0) FROM refunds"
        " WHERE till_id = ? AND tender = 'cash' AND status = 'succeeded'",
        (till_id,),
    )[0]
    moved = dict(
        tx.query(
            "SELECT kind, sum(amount_pence) FROM till_movements WHERE till_id = ? GROUP BY kind",
            (till_id,),
        )
    )
    return int(taken), int(refunded), int(moved.get("paid_in", 0)), int(moved.get("paid_out", 0))


def open_till(tx: Tx, new: OpenTill, employee_id: str, till_id: str) -> TillSummary:
    """Open a drawer with its float."""
    clash = tx.one("SELECT id FROM tills WHERE name = ? AND closed_at_ms IS NULL", (new.name,))
    if clash is not None:
        raise ApiError(
            ApiCode.TILL_ALREADY_OPEN, f"till {new.name!r} is already open", till_id=clash[0]
        )
    tx.write(
        "tills",
        till_id,
        Op.INSERT,
        {
            "name": new.name,
            "business_day": business_day(tx.now_ms),
            "float_pence": new.float_pence,
            "opened_by": employee_id,
            "opened_at_ms": tx.now_ms,
        },
        new=True,
    )
    return summary(tx, till_id)


def move_cash(
    tx: Tx, till_id: str, movement: Movement, employee_id: str, movement_id: str
) -> TillSummary:
    """Pay cash into or out of an open drawer."""
    require_open(tx, till_id)
    if movement.kind == "paid_out":
        require_cash(tx, till_id, movement.amount_pence)
    tx.write(
        "till_movements",
        movement_id,
        Op.INSERT,
        {
            "till_id": till_id,
            "kind": movement.kind,
            "amount_pence": movement.amount_pence,
            "reason": movement.reason,
            "employee_id": employee_id,
            "at_ms": tx.now_ms,
        },
        new=True,
    )
    return summary(tx, till_id)


def close_till(tx: Tx, till_id: str, close: CloseTill, employee_id: str) -> TillSummary:
    """Close an open drawer with the cash counted in it."""
    require_open(tx, till_id)
    tx.write(
        "tills",
        till_id,
        Op.UPDATE,
        {
            "closed_by": employee_id,
            "closed_at_ms": tx.now_ms,
            "expected_pence": expected_cash(tx, till_id),
            "counted_pence": close.counted_pence,
        },
    )
    return summary(tx, till_id)


def summary(tx: Tx, till_id: str) -> TillSummary:
    """The drawer's sheet as this transaction sees it."""
    (tid, name, day, float_pence, opened_by, opened_at, closed_by, closed_at, counted) = _row(
        tx, till_id
    )
    taken, refunded, paid_in, paid_out = _flows(tx, till_id)
    expected = (float_pence or 0) + taken - refunded + paid_in - paid_out
    return TillSummary(
        tid,
        name,
        day,
        "open" if closed_at is None else "closed",
        opened_by,
        opened_at,
        closed_by,
        closed_at,
        float_pence or 0,
        taken,
        refunded,
        paid_in,
        paid_out,
        expected,
        counted,
        None if counted is None else counted - expected,
        _by_employee(tx, till_id),
    )


def _by_employee(tx: Tx, till_id: str) -> list[EmployeeCash]:
    sales = tx.query(
        "SELECT taken_by, count(*), sum(amount_pence), sum(tip_pence) FROM payments"
        " WHERE till_id = ? AND tender = 'cash' AND status = 'succeeded' GROUP BY taken_by",
        (till_id,),
    )
    refunds = dict(
        tx.query(
            "SELECT requested_by, sum(amount_pence) FROM refunds"
            " WHERE till_id = ? AND tender = 'cash' AND status = 'succeeded'"
            " GROUP BY requested_by",
            (till_id,),
        )
    )
    out = {
        who: EmployeeCash(who, n, int(s or 0), int(t or 0), int(refunds.get(who, 0)))
        for who, n, s, t in sales
    }
    for who, back in refunds.items():
        out.setdefault(who, EmployeeCash(who, 0, 0, 0, int(back)))
    return [out[who] for who in sorted(out, key=str)]


def tills_of_day(tx: Tx, day: str | None, status: str | None) -> TillList:
    """Every drawer of a business day (or every open one), as sheets."""
    where, params = [], []
    if day is not None:
        where.append("business_day = ?")
        params.append(day)
    if status == "open":
        where.append("closed_at_ms IS NULL")
    elif status == "closed":
        where.append("closed_at_ms IS NOT NULL")
    sql = "SELECT id FROM tills" + (" WHERE " + " AND ".join(where) if where else "")
    ids = [row[0] for row in tx.query(sql + " ORDER BY opened_at_ms, id", params)]
    return TillList([summary(tx, till_id) for till_id in ids])
