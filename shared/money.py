"""Money in integer pence, and the one place it is rounded.

Every amount is an ``int`` of the currency's minor unit (pence). A share of an amount (a
percentage discount now; fees and tips on the same rule) is rounded half up to the penny
here and nowhere else, so the edge, the cloud and a report can never disagree by a penny.
"""

from __future__ import annotations


def percent_of(pence: int, percent: int) -> int:
    """``percent``% of ``pence``, rounded half up to the penny (12.5p is 13p, -12.5p is -12p)."""
    # floor(x + 1/2) with x = pence * percent / 100, in integers: exact for any size.
    return (pence * percent * 2 + 100) // 200
