"""Random restaurant workloads: writes on two edges and the cloud, interleaved with syncs.

The same scenarios drive the in-memory model (``test_convergence_model``) and the real
SQLite edges and Postgres cloud (``test_convergence_e2e``).
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from shared.registry import DISCOUNT_COLUMNS
from sync_protocol import Op

ORDER_IDS = ["o1", "o2", "o3"]
ITEM_IDS = ["burger", "chips", "cola"]
LINE_IDS = [f"l{i}" for i in range(6)]


@dataclass(frozen=True)
class Write:
    """One write by ``who`` (``a``, ``b`` or ``cloud``); ``op`` None means insert-or-update."""

    who: str
    table: str
    pk: str
    fields: dict[str, object]
    delete: bool = False


@dataclass(frozen=True)
class Sync:
    """One sync step by an edge: ``push`` or ``pull``."""

    who: str
    step: str


Step = Write | Sync

#: the discounts writers give a check (each written whole, as the edge does), and none
DISCOUNTS = [
    (10, None, "vip", "ann", "mia"),
    (None, 500, "late food", "bob", "mia"),
    (25, None, "vip", "bob", "ola"),
    (None,) * len(DISCOUNT_COLUMNS),
]
order_fields = (
    st.tuples(
        st.fixed_dictionaries(
            {},
            optional={
                "table_name": st.sampled_from(["T1", "T2", "Bar", "Patio"]),
                "covers": st.integers(1, 8),
                "server_id": st.sampled_from(["ann", "bob"]),
                "notes": st.sampled_from(["", "vip", "birthday"]),
                "status": st.sampled_from(["open", "fired", "paid", "closed"]),
            },
        ),
        st.one_of(
            st.just({}),
            st.sampled_from([dict(zip(DISCOUNT_COLUMNS, d, strict=True)) for d in DISCOUNTS]),
        ),
    )
    .map(lambda parts: parts[0] | parts[1])
    .filter(bool)
)


def whole_discounts(orders: dict[str, dict[str, object]]) -> bool:
    """Whether every check's discount is one that a writer gave, whole (or none)."""
    return all(tuple(row.get(c) for c in DISCOUNT_COLUMNS) in DISCOUNTS for row in orders.values())


stock_fields = st.fixed_dictionaries(
    {}, optional={"on_hand": st.integers(-5, 20), "par_level": st.integers(0, 30)}
).filter(bool)
item_fields = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["Burger", "Cheeseburger"]),
        "price_pence": st.integers(100, 2500),
        "available": st.booleans(),
    },
).filter(bool)


@st.composite
def writes(draw: st.DrawFn, who: str) -> Write:
    """A write ``who`` may make."""
    tables = ["orders", "stock_levels", "menu_items"] + (["order_lines"] if who != "cloud" else [])
    table = draw(st.sampled_from(tables))
    if table == "orders":
        return Write(who, table, draw(st.sampled_from(ORDER_IDS)), draw(order_fields))
    if table == "stock_levels":
        return Write(who, table, draw(st.sampled_from(ITEM_IDS)), draw(stock_fields))
    if table == "menu_items":
        delete = draw(st.integers(0, 5)) == 0
        return Write(who, table, draw(st.sampled_from(ITEM_IDS)), draw(item_fields), delete)
    line = draw(st.sampled_from(LINE_IDS))
    if draw(st.booleans()):
        return Write(who, table, line, {"voided": True, "void_reason": "guest changed mind"})
    return Write(
        who,
        table,
        f"{who}-{line}",
        {
            "order_id": draw(st.sampled_from(ORDER_IDS)),
            "item_id": draw(st.sampled_from(ITEM_IDS)),
            "quantity": draw(st.integers(1, 3)),
            "unit_price_pence": 1250,
        },
    )


steps = st.lists(
    st.one_of(
        writes("a"),
        writes("b"),
        writes("cloud"),
        st.builds(Sync, st.sampled_from(["a", "b"]), st.sampled_from(["push", "pull"])),
    ),
    min_size=1,
    max_size=40,
)


def plan(step: Write, exists: bool) -> tuple[Op, dict[str, object]] | None:
    """The op a writer uses for ``step`` given whether it sees the row; None to skip."""
    if step.delete:
        return (Op.DELETE, {}) if exists else None
    if step.table == "order_lines":
        voiding = "voided" in step.fields
        if voiding != exists:
            return None  # void only a line it has; add only a line it hasn't
        return (Op.UPDATE if exists else Op.INSERT), step.fields
    if exists:
        return Op.UPDATE, step.fields
    if step.table == "orders":
        return Op.INSERT, {"check_number": 1, "business_day": "2026-11-26", **step.fields}
    return Op.INSERT, step.fields
