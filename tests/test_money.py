"""Money rounding: a share of an amount is rounded half up to the penny, in one place."""

from __future__ import annotations

from fractions import Fraction
from math import floor

from hypothesis import given
from hypothesis import strategies as st

from edge.order_views import Discount, discount_off
from shared.money import percent_of


@given(st.integers(-(10**15), 10**15), st.integers(0, 100))
def test_percent_of_is_the_exact_share_rounded_half_up(pence: int, percent: int) -> None:
    exact = Fraction(pence * percent, 100)
    assert percent_of(pence, percent) == floor(exact + Fraction(1, 2))


def test_percent_of_rounds_halves_up_not_to_even() -> None:
    assert [percent_of(p, 5) for p in (1450, 1470, 10, 30)] == [73, 74, 1, 2]
    assert percent_of(-125, 10) == -12  # half up is towards +infinity
    assert percent_of(999, 100) == 999 and percent_of(999, 0) == 0


@given(
    st.integers(-1000, 10**9),
    st.one_of(st.none(), st.integers(1, 100)),
    st.one_of(st.none(), st.integers(-(10**6), 10**12)),
)
def test_a_discount_never_takes_less_than_nothing_or_more_than_the_subtotal(
    subtotal: int, percent: int | None, amount: int | None
) -> None:
    discount = Discount(percent, amount, "why", "sam", "mia")
    off = discount_off(discount, subtotal)
    assert 0 <= off <= max(subtotal, 0)
    if percent is not None and subtotal > 0:
        assert off == percent_of(subtotal, percent)  # a percentage wins over an amount
    elif amount is not None and subtotal > 0:
        assert off == max(0, min(amount, subtotal))
    assert discount_off(None, subtotal) == 0
