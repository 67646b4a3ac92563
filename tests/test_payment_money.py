"""Money at checkout, as properties: splits add up, fees and tips round as specified."""

from __future__ import annotations

from decimal import Decimal
from fractions import Fraction
from math import floor

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.fees import DEFAULT_RATES, FeeError, FeeSchedule, Rate, Tender, parse_rate
from shared.gratuity import GratuitySettings, TipBasis, TipError, vat_in
from shared.money import allocate, check_percent, percent_of
from shared.splits import SplitError, SplitLine, by_amounts, by_items, by_seat, evenly

pence = st.integers(0, 10**9)
# rates as a config file holds them: up to two decimal places, 0-20%
rates = st.integers(0, 2000).map(lambda n: Decimal(n) / 100)


def half_up(exact: Fraction) -> int:
    return floor(exact + Fraction(1, 2))


@given(st.integers(-(10**12), 10**12), st.lists(st.integers(0, 10**6), min_size=1, max_size=30))
def test_allocate_sums_exactly_and_keeps_each_part_within_a_penny(
    total: int, weights: list[int]
) -> None:
    parts = allocate(total, weights)
    assert sum(parts) == total
    whole = sum(weights) or len(weights)
    for part, weight in zip(parts, weights or [1], strict=True):
        exact = Fraction(total * (weight if sum(weights) else 1), whole)
        assert exact - 1 < part < exact + 1


def test_allocate_gives_odd_pence_to_the_earliest_parts() -> None:
    assert allocate(10_000, [1, 1, 1]) == [3334, 3333, 3333]
    assert allocate(2, [1, 1, 1]) == [1, 1, 0]
    assert allocate(100, [3, 0, 1]) == [75, 0, 25]
    with pytest.raises(ValueError):
        allocate(100, [])
    with pytest.raises(ValueError):
        allocate(100, [1, -1])


@given(pence, st.integers(1, 100))
def test_an_even_split_sums_to_the_total_and_parts_differ_by_at_most_a_penny(
    total: int, parts: int
) -> None:
    split = evenly(total, parts)
    assert sum(split) == total and len(split) == parts
    assert max(split) - min(split) <= 1
    assert split == sorted(split, reverse=True)  # the odd pence go first


@pytest.mark.parametrize("parts", [0, -1, 101])
def test_an_even_split_needs_one_to_a_hundred_parts(parts: int) -> None:
    with pytest.raises(SplitError) as info:
        evenly(1000, parts)
    assert info.value.code == "invalid_split"


guests = ["ann", "bob", "cat", "dan"]


@st.composite
def item_splits(draw: st.DrawFn) -> tuple[int, list[SplitLine], list[str]]:
    party = draw(st.lists(st.sampled_from(guests), min_size=1, max_size=4, unique=True))
    lines = draw(
        st.lists(
            st.builds(
                SplitLine,
                st.integers(0, 10**6),
                st.lists(st.sampled_from(party), min_size=1, unique=True).map(tuple),
            ),
            max_size=12,
        )
    )
    subtotal = sum(line.amount_pence for line in lines)
    total = draw(st.integers(0, subtotal)) if subtotal else 0  # after some discount
    return total, lines, party


@given(item_splits())
def test_a_split_by_items_sums_to_the_total_and_follows_what_each_guest_had(
    case: tuple[int, list[SplitLine], list[str]],
) -> None:
    total, lines, party = case
    split = by_items(total, lines, party)
    assert sum(split) == total
    subtotal = sum(line.amount_pence for line in lines)
    for guest, part in zip(party, split, strict=True):
        had = sum(Fraction(ln.amount_pence, len(ln.guests)) for ln in lines if guest in ln.guests)
        exact = had * total / subtotal if subtotal else Fraction(total, len(party))
        # under a penny off per line shared, and under one for spreading the discount
        shared = sum(1 for ln in lines if guest in ln.guests and len(ln.guests) > 1)
        assert abs(part - exact) < 1 + shared


def test_a_split_by_items_divides_shared_lines_and_the_discount() -> None:
    lines = [
        SplitLine(1200, ("ann",)),
        SplitLine(900, ("bob",)),
        SplitLine(600, ("ann", "bob", "cat")),  # a shared starter: 200 each
    ]
    assert by_items(2700, lines, ["ann", "bob", "cat"]) == [1400, 1100, 200]
    # 10% off 2700 is 2430, spread as each had: 1260, 990, 180
    assert by_items(2430, lines, ["ann", "bob", "cat"]) == [1260, 990, 180]
    for bad in ([SplitLine(100, ("zed",))], [SplitLine(100, ())], [SplitLine(-1, ("ann",))]):
        with pytest.raises(SplitError):
            by_items(100, bad, ["ann"])
    with pytest.raises(SplitError):
        by_items(100, [], ["ann", "ann"])


def test_a_split_by_seat_shares_seatless_lines_between_every_seat() -> None:
    lines = [(1000, 1), (1500, 2), (300, None)]  # the bread is for the table
    assert by_seat(2800, lines) == {1: 1150, 2: 1650}
    assert by_seat(900, [(900, None)]) == {0: 900}


@given(pence, st.lists(st.integers(1, 10**6), min_size=1, max_size=10))
def test_a_split_by_amounts_never_takes_more_than_is_due(total: int, amounts: list[int]) -> None:
    if sum(amounts) > total:
        with pytest.raises(SplitError) as info:
            by_amounts(total, amounts)
        assert info.value.code == "split_exceeds_total"
        return
    parts, balance = by_amounts(total, amounts)
    assert sum(parts) + balance == total and balance >= 0


@given(pence, st.sampled_from(list(Tender)), rates, st.integers(0, 100), rates)
def test_fees_are_each_share_rounded_half_up_once(
    amount: int, tender: Tender, percent: Decimal, fixed: int, platform: Decimal
) -> None:
    schedule = FeeSchedule().with_rate(tender, Rate(percent, fixed, platform))
    fees = schedule.fees(tender, amount)
    if amount == 0:
        assert fees.total_pence == 0
        return
    assert fees.provider_pence == half_up(Fraction(amount) * Fraction(percent) / 100) + fixed
    assert fees.platform_pence == half_up(Fraction(amount) * Fraction(platform) / 100)


def test_the_default_rates_are_the_plans() -> None:
    schedule = FeeSchedule()
    assert (
        schedule.fees(Tender.BANK, 10_000).provider_pence,
        schedule.fees(Tender.BANK, 10_000).platform_pence,
    ) == (20, 100)
    assert schedule.fees(Tender.CARD, 10_000).provider_pence == 290 + 30
    assert schedule.fees(Tender.CARD, 1_750).provider_pence == 81  # 50.75p rounds up, + 30p
    assert schedule.fees(Tender.BANK, 250).provider_pence == 1  # 0.5p rounds up
    assert schedule.fees(Tender.CASH, 10_000).total_pence == 0
    assert DEFAULT_RATES[Tender.APPLE_PAY] == DEFAULT_RATES[Tender.CARD]


@given(pence, st.sampled_from(list(Tender)), rates, st.integers(0, 100), rates)
def test_passed_through_fees_leave_the_restaurant_the_bill_with_the_least_charge(
    bill: int, tender: Tender, percent: Decimal, fixed: int, platform: Decimal
) -> None:
    schedule = FeeSchedule("US-NY", True).with_rate(tender, Rate(percent, fixed, platform))
    charge = schedule.charge(tender, bill)
    assert charge.net_pence >= bill
    assert charge.surcharge_pence == charge.charge_pence - bill >= 0
    if charge.charge_pence > bill:  # a penny less would leave the restaurant short
        less = charge.charge_pence - 1
        assert less - schedule.fees(tender, less).total_pence < bill


@given(pence)
def test_absorbed_fees_charge_the_bill_and_the_comparison_says_who_saves(bill: int) -> None:
    absorbed = FeeSchedule().compare(bill)
    assert all(c.charge_pence == bill for c in absorbed.charges.values())
    card, bank = absorbed.charges[Tender.CARD], absorbed.charges[Tender.BANK]
    assert absorbed.bank_saves_pence == card.fees.total_pence - bank.fees.total_pence >= 0
    assert absorbed.saved_by == "restaurant"
    passed = FeeSchedule("US-NY", True).compare(bill)
    assert passed.saved_by == "guest"
    assert passed.bank_saves_pence == (
        passed.charges[Tender.CARD].charge_pence - passed.charges[Tender.BANK].charge_pence
    )


@pytest.mark.parametrize("where", ["GB", "gb", "FR", "DE", "US-CT", "NO"])
def test_fee_pass_through_is_refused_where_surcharges_are_banned(where: str) -> None:
    assert FeeSchedule(where).pass_through is False  # off by default
    with pytest.raises(FeeError) as info:
        FeeSchedule(where, pass_through=True)
    assert info.value.code == "pass_through_banned"
    assert FeeSchedule("US-NY", pass_through=True).pass_through


@pytest.mark.parametrize(
    "settings",
    [
        {"percent": 2.9},  # a float cannot hold 2.9
        {"percent": "abc"},
        {"percent": "101"},
        {"percent": "-1"},
        {"fixed_pence": -5},
        {"fixed_pence": "30"},
        {"percent": "60", "platform_percent": "40"},
        {"percent": "1", "surcharge": "2"},
    ],
)
def test_a_bad_rate_is_refused_with_a_stable_code(settings: dict[str, object]) -> None:
    with pytest.raises(FeeError) as info:
        parse_rate(settings)
    assert info.value.code == "invalid_rate"


def test_a_rate_reads_from_settings_exactly() -> None:
    assert parse_rate({"percent": "2.9", "fixed_pence": 30}) == Rate(Decimal("2.9"), 30, Decimal(0))
    assert check_percent("0.2") == Decimal("0.2")
    assert percent_of(250, Decimal("0.2")) == 1


@given(pence, st.sampled_from([0, 5, Decimal("12.5"), 20]), st.sampled_from(list(TipBasis)))
def test_tips_are_a_share_of_the_basis_rounded_half_up(
    due: int, vat: int | Decimal, basis: TipBasis
) -> None:
    settings = GratuitySettings(basis=basis, vat_percent=vat, presets=(5, 10, Decimal("12.5"), 20))
    tax = vat_in(due, vat)
    assert tax == half_up(Fraction(due) * Fraction(vat) / (100 + Fraction(vat)))
    base = due - tax if basis is TipBasis.PRE_TAX else due
    for option in settings.options(due):
        assert option.tip_pence == half_up(Fraction(base) * Fraction(option.percent) / 100)
        assert settings.check(option.tip_pence, due, option.percent) == option.tip_pence


def test_tip_presets_on_a_uk_bill() -> None:
    settings = GratuitySettings()  # 5/10/20% of the bill before VAT
    assert vat_in(6000, 20) == 1000
    assert [o.tip_pence for o in settings.options(6000)] == [250, 500, 1000]
    post = GratuitySettings(basis=TipBasis.POST_TAX)
    assert [o.tip_pence for o in post.options(6000)] == [300, 600, 1200]
    assert GratuitySettings(enabled=False).options(6000) == []


@pytest.mark.parametrize(
    ("settings", "tip", "preset", "code"),
    [
        (GratuitySettings(), -1, None, "invalid_tip"),
        (GratuitySettings(), 501, 10, "invalid_tip"),  # not what the 10% button showed
        (GratuitySettings(), 700, 15, "invalid_tip"),  # not a preset of this site
        (GratuitySettings(enabled=False), 100, None, "tips_disabled"),
        (GratuitySettings(custom_allowed=False), 123, None, "custom_tip_disabled"),
        (GratuitySettings(), 10_001, None, "tip_too_large"),  # over 200% of 5000
    ],
)
def test_a_tip_the_site_does_not_take_is_refused(
    settings: GratuitySettings, tip: int, preset: int | None, code: str
) -> None:
    with pytest.raises(TipError) as info:
        settings.check(tip, 6000, preset)
    assert info.value.code == code
    assert settings.check(0, 6000) == 0  # no tip is always fine


@pytest.mark.parametrize(
    "bad",
    [{"presets": (5, 5)}, {"presets": (101,)}, {"max_percent": -1}, {"vat_percent": 2.5}],
)
def test_bad_tip_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(TipError) as info:
        GratuitySettings(**bad)  # type: ignore[arg-type]
    assert info.value.code == "invalid_tip_settings"
