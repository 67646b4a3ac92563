"""Conflict strategies and domain merges, unit by unit and as properties."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.orders import ORDER_STATUS_RANKS, ORDER_TRANSITIONS, OrderStatus
from shared.registry import DISCOUNT_COLUMNS, default_registry
from sync_protocol import (
    Author,
    Change,
    ErrorCode,
    Op,
    OutcomeKind,
    RemoteProtocolError,
    RowState,
    Strategy,
    Version,
    apply_change,
    validate_change,
)
from sync_protocol.merge import STRATEGIES, validate_changes
from sync_protocol.schema import Column, ColumnType, Merge, Registry, TableSpec, TieBreak

REG = default_registry()
ORDERS = REG.get("orders")
LINES = REG.get("order_lines")
STOCK = REG.get("stock_levels")


def order_row(rev: int = 10, origin: str = "cloud", hlc: int = 100, **values: object) -> RowState:
    base = {c.name: c.default for c in ORDERS.columns}
    base.update(check_number=1, business_day="2026-11-26", table_name="T1", covers=2)
    base.update(values)
    return RowState("o1", base, Version(rev, hlc, origin))


def edit(
    fields: dict[str, object],
    base: int = 5,
    origin: str = "edge-a",
    hlc: int = 50,
    seq: int = 1,
    op: Op = Op.UPDATE,
    table: str = "orders",
    pk: str = "o1",
) -> Change:
    return Change(origin, seq, table, pk, op, fields, base, hlc)


def test_strategy_table_covers_every_strategy() -> None:
    assert set(STRATEGIES) == set(Strategy)


def test_no_concurrency_applies_under_every_strategy() -> None:
    for strategy in Strategy:
        spec = ORDERS.with_strategy(strategy)
        out = apply_change(spec, order_row(rev=3), edit({"covers": 4}), rev=11)
        assert out.kind is OutcomeKind.APPLIED and out.state.values["covers"] == 4
        assert out.state.version == Version(11, 50, "edge-a")


def test_server_wins_keeps_the_whole_row_when_anything_is_concurrent() -> None:
    spec = ORDERS.with_strategy(Strategy.SERVER_WINS)
    out = apply_change(spec, order_row(notes="cloud"), edit({"covers": 4}), rev=11)
    assert out.kind is OutcomeKind.OVERRIDDEN and out.state.values["covers"] == 2


def test_client_wins_takes_the_change() -> None:
    spec = ORDERS.with_strategy(Strategy.CLIENT_WINS)
    out = apply_change(spec, order_row(covers=6), edit({"covers": 4}), rev=11)
    assert out.kind is OutcomeKind.MERGED and out.state.values["covers"] == 4


def test_smart_merge_merges_disjoint_columns_and_tie_breaks_shared_ones() -> None:
    spec = ORDERS.with_strategy(Strategy.SMART_MERGE)
    # cloud changed table_name at rev 10; the edge changes covers: both survive
    row = RowState(
        "o1",
        order_row(table_name="T9").values,
        Version(10, 100, "cloud"),
        {"covers": Version(1, 1, "edge-a")},
    )
    out = apply_change(spec, row, edit({"covers": 4}), rev=11)
    assert out.state.values["table_name"] == "T9" and out.state.values["covers"] == 4
    assert out.state.version_of("table_name") == Version(10, 100, "cloud")
    # same column on both sides: the later HLC wins
    late = apply_change(spec, order_row(), edit({"table_name": "T5"}, hlc=500), rev=11)
    early = apply_change(spec, order_row(), edit({"table_name": "T5"}, hlc=5), rev=11)
    assert late.state.values["table_name"] == "T5" and late.kind is OutcomeKind.MERGED
    assert early.state.values["table_name"] == "T1" and early.kind is OutcomeKind.OVERRIDDEN
    server = spec.with_strategy(Strategy.SMART_MERGE, TieBreak.SERVER)
    assert (
        apply_change(server, order_row(), edit({"table_name": "T5"}, hlc=500), 11).state.values[
            "table_name"
        ]
        == "T1"
    )


def test_manual_parks_only_truly_conflicting_columns() -> None:
    spec = ORDERS.with_strategy(Strategy.MANUAL)
    change = Change(
        "edge-a",
        1,
        "orders",
        "o1",
        Op.UPDATE,
        {"table_name": "T5", "notes": "vip"},
        5,
        50,
        {"table_name": "T0", "notes": None},
    )
    row = order_row(table_name="T9")
    row = RowState("o1", row.values, row.version, {"notes": Version(1, 1, "edge-a")})
    out = apply_change(spec, row, change, rev=11)
    assert out.kind is OutcomeKind.PARKED
    assert out.state.values["notes"] == "vip" and out.state.values["table_name"] == "T9"
    assert out.conflict is not None
    assert out.conflict.columns == ("table_name",)
    assert (out.conflict.base, out.conflict.local, out.conflict.remote) == (
        {"table_name": "T0"},
        {"table_name": "T5"},
        {"table_name": "T9"},
    )


def test_own_earlier_changes_are_never_a_conflict() -> None:
    spec = ORDERS.with_strategy(Strategy.MANUAL)
    mine = order_row(rev=10, origin="edge-a", covers=3)
    out = apply_change(spec, mine, edit({"covers": 4}, base=5), rev=11)
    assert out.kind is OutcomeKind.APPLIED and out.state.values["covers"] == 4


@pytest.mark.parametrize("strategy", list(Strategy))
@pytest.mark.parametrize("kept", ["paid", "closed"])
def test_a_check_paid_on_one_side_and_voided_on_the_other_keeps_its_payment(
    strategy: Strategy, kept: str
) -> None:
    # The two moves happened concurrently (each side unaware of the other); whichever the
    # cloud receives first, the money taken stands.
    spec = ORDERS.with_strategy(strategy)
    for present, incoming in ((kept, "voided"), ("voided", kept)):
        out = apply_change(spec, order_row(status=present), edit({"status": incoming}), rev=11)
        assert out.state.values["status"] == kept, (present, incoming)
        assert out.conflict is None


def test_every_move_of_the_transition_table_goes_up_the_ranks() -> None:
    # So a merge with an older status never undoes a move a writer made.
    assert set(ORDER_STATUS_RANKS) == {s.value for s in OrderStatus}
    for current, targets in ORDER_TRANSITIONS.items():
        for target in targets:
            assert ORDER_STATUS_RANKS.index(target) > ORDER_STATUS_RANKS.index(current)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_status_only_moves_forward_under_every_strategy(strategy: Strategy) -> None:
    spec = ORDERS.with_strategy(strategy)
    paid = order_row(status="paid")
    back = apply_change(spec, paid, edit({"status": "fired"}), rev=11)
    assert back.state.values["status"] == "paid"
    fwd = apply_change(spec, order_row(status="fired"), edit({"status": "closed"}), rev=11)
    assert fwd.state.values["status"] == "closed"


@pytest.mark.parametrize("strategy", list(Strategy))
def test_stock_counts_merge_as_deltas_under_every_strategy(strategy: Strategy) -> None:
    spec = STOCK.with_strategy(strategy)
    row = RowState("i1", {"on_hand": 10, "par_level": 5, "unit": "each"}, Version(10, 9, "edge-b"))
    out = apply_change(
        spec,
        row,
        Change("edge-a", 1, "stock_levels", "i1", Op.UPDATE, {"on_hand": -3}, 5, 1),
        rev=11,
    )
    assert out.state.values["on_hand"] == 7


def line(seq: int, pk: str, origin: str = "edge-a", **extra: object) -> Change:
    fields = {
        "order_id": "o1",
        "item_id": "burger",
        "name": "Burger",
        "quantity": 1,
        "unit_price_pence": 1250,
    }
    fields.update(extra)
    return Change(origin, seq, "order_lines", pk, Op.INSERT, fields, 0, seq)


def test_order_lines_are_add_only() -> None:
    with pytest.raises(RemoteProtocolError) as err:
        validate_change(
            LINES, Change("e", 1, "order_lines", "l1", Op.DELETE, {}, 0, 1), Author.EDGE
        )
    assert err.value.code is ErrorCode.ADD_ONLY
    with pytest.raises(RemoteProtocolError) as err:
        validate_change(LINES, edit({"quantity": 3}, table="order_lines", pk="l1"), Author.EDGE)
    assert err.value.code is ErrorCode.ADD_ONLY
    validate_change(
        LINES, edit({"voided": True, "void_reason": "spilt"}, table="order_lines"), Author.EDGE
    )
    with pytest.raises(RemoteProtocolError) as err:
        validate_change(LINES, line(1, "l1"), Author.CLOUD)
    assert err.value.code is ErrorCode.NOT_AUTHOR


def test_two_tablets_adding_lines_never_lose_one_and_a_void_sticks() -> None:
    rows: dict[str, RowState] = {}
    for rev, change in enumerate([line(1, "a1"), line(1, "b1", "edge-b"), line(2, "a2")], 1):
        rows[change.pk] = apply_change(LINES, rows.get(change.pk), change, rev).state
    assert set(rows) == {"a1", "b1", "a2"}
    void = Change("edge-b", 2, "order_lines", "a1", Op.UPDATE, {"voided": True}, 0, 9)
    unvoid = Change("edge-a", 3, "order_lines", "a1", Op.UPDATE, {"voided": False}, 0, 10)
    state = apply_change(LINES, rows["a1"], void, 4).state
    assert apply_change(LINES, state, unvoid, 5).state.values["voided"] is True


def test_unknown_columns_and_wrong_types_are_refused() -> None:
    with pytest.raises(RemoteProtocolError) as err:
        validate_change(ORDERS, edit({"tip": 1}), Author.EDGE)
    assert err.value.code is ErrorCode.UNKNOWN_FIELD
    for bad in ({"covers": "two"}, {"covers": True}, {"covers": 2**64}, {"status": "lost"}):
        with pytest.raises(RemoteProtocolError) as err:
            validate_change(ORDERS, edit(bad), Author.EDGE)
        assert err.value.code is ErrorCode.INVALID_CHANGE
    with pytest.raises(RemoteProtocolError) as err:
        validate_change(ORDERS, edit({}), Author.EDGE)
    assert err.value.code is ErrorCode.INVALID_CHANGE
    with pytest.raises(RemoteProtocolError) as err:
        Registry([ORDERS]).get("payments")
    assert err.value.code is ErrorCode.UNKNOWN_TABLE


# -- properties ---------------------------------------------------------------------------

LWW_COLUMNS = ["table_name", "covers", "server_id", "notes"]
values_for = {
    "table_name": st.sampled_from(["T1", "T2", "Bar", None]),
    "covers": st.integers(0, 12),
    "server_id": st.sampled_from(["ann", "bob", "cat"]),
    "notes": st.sampled_from(["", "vip", "nut allergy"]),
    "status": st.sampled_from(["open", "fired", "paid", "closed", "voided"]),
}


@st.composite
def concurrent_edits(draw: st.DrawFn) -> list[Change]:
    """Up to four changes by different nodes, all written against the same base."""
    n = draw(st.integers(2, 4))
    hlcs = draw(st.lists(st.integers(1, 50), min_size=n, max_size=n))
    out = []
    for i in range(n):
        cols = draw(st.sets(st.sampled_from([*LWW_COLUMNS, "status"]), min_size=1, max_size=4))
        fields = {c: draw(values_for[c]) for c in cols}
        op = draw(st.sampled_from([Op.UPDATE] * 5 + [Op.DELETE]))
        if op is Op.DELETE:
            fields = {}
        out.append(Change(f"edge-{i}", 1, "orders", "o1", op, fields, 10, hlcs[i]))
    return out


@settings(max_examples=300)
@given(concurrent_edits())
def test_smart_merge_is_deterministic_and_order_independent(changes: list[Change]) -> None:
    spec = ORDERS.with_strategy(Strategy.SMART_MERGE)
    start = order_row(rev=10)
    results = set()
    for perm in itertools.permutations(changes):
        state = start
        for rev, change in enumerate(perm, 11):
            state = apply_change(spec, state, change, rev).state
        live = None if state.deleted else tuple(sorted(state.values.items(), key=str))
        results.add(live)
    assert len(results) == 1, results


@st.composite
def whole_discounts(draw: st.DrawFn) -> dict[str, Any]:
    """What the edge writes for a discount: every discount column at once (None: taken off)."""
    if draw(st.booleans()) and draw(st.booleans()):
        return dict.fromkeys(DISCOUNT_COLUMNS)
    percent = draw(st.one_of(st.none(), st.integers(1, 100)))
    amount = draw(st.integers(1, 5000)) if percent is None else None
    return dict(
        zip(
            DISCOUNT_COLUMNS,
            (
                percent,
                amount,
                draw(st.sampled_from(["vip", "late food", "staff"])),
                draw(st.sampled_from(["sam", "mia"])),
                draw(st.sampled_from(["mia", "ola"])),
            ),
            strict=True,
        )
    )


@settings(max_examples=200)
@given(
    st.lists(whole_discounts(), min_size=2, max_size=4),
    st.lists(st.integers(1, 5), min_size=4, max_size=4),
)
def test_concurrent_discounts_resolve_to_one_writers_whole_discount(
    discounts: list[dict[str, Any]], hlcs: list[int]
) -> None:
    # Several nodes give the same check a discount at once: whatever the arrival order, the
    # check ends with exactly one of them, never one's percentage with another's amount.
    spec = ORDERS.with_strategy(Strategy.SMART_MERGE)
    changes = [
        Change(f"edge-{i}", 1, "orders", "o1", Op.UPDATE, fields, 10, hlcs[i])
        for i, fields in enumerate(discounts)
    ]
    results = set()
    for perm in itertools.permutations(changes):
        state = order_row(rev=10)
        for rev, change in enumerate(perm, 11):
            state = apply_change(spec, state, change, rev).state
        results.add(tuple(state.values[c] for c in DISCOUNT_COLUMNS))
    (final,) = results
    assert final in {tuple(d[c] for c in DISCOUNT_COLUMNS) for d in discounts}


@pytest.mark.parametrize("strategy", list(Strategy))
def test_a_group_is_decided_as_one_even_where_some_of_its_values_agree(
    strategy: Strategy,
) -> None:
    # Edge b gives 10% where the check has no discount, so its "no amount" agrees with the
    # row's. Edge a, not having seen b's, then gives £5 off. Deciding the agreeing column on
    # its own stamped it with b's version, so a's amount came back concurrent while the rest
    # of a's discount was not, and the check ended with a's reason and no amount at all.
    spec = ORDERS.with_strategy(strategy)
    none = dict.fromkeys(DISCOUNT_COLUMNS)
    state = order_row(rev=1, origin="edge-a", hlc=10, **none)
    tenth = none | {"discount_percent": 10, "discount_reason": "vip", "discounted_by": "ann"}
    fiver = none | {"discount_pence": 500, "discount_reason": "late food", "discounted_by": "bob"}
    given = [tuple(d[c] for c in DISCOUNT_COLUMNS) for d in (none, tenth, fiver)]
    steps = [edit(tenth, base=0, origin="edge-b", hlc=30), edit(fiver, base=1, hlc=20, seq=2)]
    for rev, change in enumerate(steps, 2):
        outcome = apply_change(spec, state, change, rev)
        state = outcome.state
        assert tuple(state.values[c] for c in DISCOUNT_COLUMNS) in given
        assert len({state.version_of(c) for c in DISCOUNT_COLUMNS}) == 1, "versions split"
        if outcome.conflict is not None:
            assert set(outcome.conflict.columns) == set(DISCOUNT_COLUMNS)
    if strategy is Strategy.MANUAL:
        assert tuple(state.values[c] for c in DISCOUNT_COLUMNS) == given[2]


def test_a_discount_is_written_whole_or_not_at_all() -> None:
    whole = dict.fromkeys(DISCOUNT_COLUMNS) | {"discount_pence": 500, "discount_reason": "vip"}
    for op in (Op.INSERT, Op.UPDATE):
        validate_change(ORDERS, Change("edge-a", 1, "orders", "o1", op, whole, 0, 1), Author.EDGE)
    for dropped in DISCOUNT_COLUMNS:
        part = {k: v for k, v in whole.items() if k != dropped} | {"covers": 2}
        bad = Change("edge-a", 1, "orders", "o1", Op.UPDATE, part, 0, 1)
        for check in (
            lambda bad=bad: validate_change(ORDERS, bad, Author.CLOUD),
            lambda bad=bad: validate_changes(REG, [bad], Author.CLOUD),  # the batch's quick path
        ):
            with pytest.raises(RemoteProtocolError) as info:
                check()
            assert info.value.code is ErrorCode.INVALID_CHANGE
            assert dropped in info.value.message
    # a strategy set by configuration keeps the groups
    assert ORDERS.with_strategy(Strategy.MANUAL).group_of == ORDERS.group_of
    assert set(ORDERS.group_of) == set(DISCOUNT_COLUMNS)


@pytest.mark.parametrize(
    "together",
    [(("a",),), (("a", "nope"),), (("a", "n"),), (("a", "b"), ("b", "c")), (("a", "s"),)],
    ids=["one column", "unknown", "a counter", "overlapping", "immutable"],
)
def test_a_group_written_together_is_two_or_more_lww_columns_in_one_group(
    together: tuple[tuple[str, ...], ...],
) -> None:
    columns = (
        Column("a", ColumnType.TEXT),
        Column("b", ColumnType.TEXT),
        Column("c", ColumnType.TEXT),
        Column("n", ColumnType.INT, Merge.COUNTER),
        Column("s", ColumnType.TEXT, Merge.IMMUTABLE),
    )
    TableSpec("t", columns, together=(("a", "b"),))
    with pytest.raises(ValueError, match="group"):
        TableSpec("t", columns, together=together)


# -- the bulk validation of a batch agrees with the change-by-change one -------------------------

PRICE_LISTS = TableSpec("price_lists", (Column("name", ColumnType.TEXT),), author=Author.CLOUD)
BATCH_REGISTRY = Registry([*REG, PRICE_LISTS])
GOOD_FIELDS: dict[str, dict[str, Any]] = {
    "order_lines": {"order_id": "o1", "item_id": "i1", "name": "Soup", "quantity": 2},
    "orders": {"check_number": 4, "table_name": "T1", "covers": 2, "status": "fired"},
    "stock_levels": {"on_hand": -1, "unit": "each"},
    "menu_items": {"name": "Pie", "price_pence": 450, "available": True, "station": None},
    "price_lists": {"name": "Lunch"},
}
ODD: st.SearchStrategy[Any] = st.sampled_from(
    [None, True, 0, -(2**63), 2**63 - 1, 2**63, "", "a\x00b", "a\x00b", "eaten", "paid", b"b", [1]]
)


@st.composite
def batches(draw: st.DrawFn) -> list[Change]:
    """Changes to every kind of table, mostly plain inserts, some with one odd op, column,
    value or old value."""
    out = []
    for seq in range(1, draw(st.integers(1, 6)) + 1):
        table = draw(st.sampled_from([*GOOD_FIELDS, "order_lines", "order_lines", "payroll"]))
        fields: dict[str, Any] = dict(GOOD_FIELDS.get(table, {"x": 1}))
        op = draw(st.sampled_from([Op.INSERT] * 6 + [Op.UPDATE, Op.DELETE]))
        old: dict[str, Any] | None = None
        what = draw(
            st.sampled_from(["none", "none", "value", "value", "column", "drop", "old", "group"])
        )
        name = draw(st.sampled_from([*fields, *fields, "voided", "price_pence", "tip"]))
        if what == "group":  # some of a discount's columns, maybe all of them
            for column in draw(st.sets(st.sampled_from(DISCOUNT_COLUMNS), min_size=1)):
                fields[column] = draw(st.one_of(st.none(), ODD))
        elif what == "value":
            fields[name] = draw(ODD)
        elif what == "column":
            fields[draw(st.sampled_from(["tip", "id", "_rev"]))] = 1
        elif what == "drop":
            fields.pop(name, None)
        elif what == "old":
            old = {name: draw(ODD)}
        if op is Op.DELETE:
            fields = {}
        out.append(Change("edge-a", seq, table, f"r{seq % 3}", op, fields, 0, seq, old))
    return out


def _one_by_one(changes: list[Change], author: Author) -> list[TableSpec]:
    specs = []
    for change in changes:
        spec = BATCH_REGISTRY.get(change.table)
        validate_change(spec, change, author)
        specs.append(spec)
    return specs


@settings(max_examples=500)
@given(batches(), st.sampled_from([Author.EDGE, Author.CLOUD]))
def test_validate_changes_refuses_exactly_what_validate_change_refuses(
    changes: list[Change], author: Author
) -> None:
    def outcome(check: Callable[[], list[TableSpec]]) -> object:
        try:
            return check()
        except RemoteProtocolError as exc:
            return (exc.code, exc.message)

    want = outcome(lambda: _one_by_one(changes, author))
    assert outcome(lambda: validate_changes(BATCH_REGISTRY, changes, author)) == want
