"""Money in integer pence, and the one place it is rounded.

Every amount is an ``int`` of the currency's minor unit (pence). A share of an amount (a
percentage discount, a card fee, a tip) is rounded half up to the penny here and nowhere
else, so the edge, the cloud and a report can never disagree by a penny. Rates are whole
or ``Decimal`` percentages (``Decimal("2.9")`` is 2.9%), never floats: a float cannot hold
2.9 exactly. Dividing an amount into parts that must add up to it (a bill split between
guests, a discount spread over seats) is ``allocate``, which never loses or invents a penny.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from fractions import Fraction

#: a percentage: a whole number, or an exact decimal such as Decimal("0.2")
Percent = int | Decimal


def round_half_up(amount: Fraction) -> int:
    """``amount`` pence rounded to a whole penny, halves up (towards +infinity)."""
    # floor(x + 1/2), exactly: 12.5p is 13p and -12.5p is -12p.
    return (amount + Fraction(1, 2)).__floor__()


def percent_of(pence: int, percent: Percent) -> int:
    """``percent``% of ``pence``, rounded half up to the penny (12.5p is 13p, -12.5p is -12p)."""
    if isinstance(percent, int):
        # The common whole-percent case in integers: exact for any size, and fast.
        return (pence * percent * 2 + 100) // 200
    return round_half_up(Fraction(pence) * Fraction(percent) / 100)


def check_percent(percent: object, name: str = "rate") -> Decimal:
    """``percent`` as an exact ``Decimal`` from 0 to 100, or ``ValueError`` saying why.

    Accepts an int, a ``Decimal`` or a string such as ``"2.9"`` (what a config file or a
    JSON body holds); refuses floats, which cannot hold most decimal rates exactly.
    """
    if isinstance(percent, bool) or isinstance(percent, float):
        raise ValueError(f"{name} must be a decimal string such as '2.9', not {percent!r}")
    try:
        value = Decimal(percent) if isinstance(percent, int | str) else percent
    except ArithmeticError:
        raise ValueError(f"{name} must be a number of percent, not {percent!r}") from None
    if not isinstance(value, Decimal) or not value.is_finite() or not 0 <= value <= 100:
        raise ValueError(f"{name} must be a percentage from 0 to 100, not {percent!r}")
    return value


def allocate(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` pence in parts proportional to ``weights``, summing to ``total`` exactly.

    Each part is its exact share rounded down; the pence left over go one each to the parts
    that lost the most in rounding (ties to the earlier part), so no part is more than a
    penny from its exact share. Equal weights give an even split, the odd pence first.
    ``weights`` are non-negative and not all zero (all zero splits evenly).
    """
    if not weights:
        raise ValueError("nothing to allocate between")
    if any(w < 0 for w in weights):
        raise ValueError("weights are never negative")
    whole = sum(weights)
    if whole == 0:
        weights, whole = [1] * len(weights), len(weights)
    parts, remainders = [], []
    for index, weight in enumerate(weights):
        part, remainder = divmod(total * weight, whole)
        parts.append(part)
        remainders.append((-remainder, index))
    for _, index in sorted(remainders)[: total - sum(parts)]:
        parts[index] += 1
    return parts
