"""Tips: the presets a tablet offers, the basis they are a share of, and the checks on a tip.

How it works. A site switches tipping on or off and picks its presets (5%, 10% and 20% by
default) and whether a custom amount is allowed. A preset is a share of the basis, rounded
half up to the penny by ``shared.money``. The basis is the site's choice:

- ``post_tax``: the amount due, as the guest sees it on the bill;
- ``pre_tax``: the amount due less the VAT in it. UK menu prices include VAT, so the tax is
  the VAT fraction of the amount (``vat_in``: 20/120 of it at 20%), rounded half up.

A tip is never negative, and never more than ``max_percent`` of the basis (200% by default)
so that a slip of a finger does not charge a guest £500 on a £50 bill; a tip goes to the
employee who served the check unless the payment names another, for payroll.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from fractions import Fraction

from .money import Percent, check_percent, percent_of, round_half_up


class TipBasis(StrEnum):
    """What a percentage tip is a share of."""

    PRE_TAX = "pre_tax"
    POST_TAX = "post_tax"


class TipError(ValueError):
    """A tip that cannot be taken; ``code`` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def vat_in(gross_pence: int, vat_percent: Percent) -> int:
    """The VAT included in a VAT-inclusive amount, rounded half up (20% of £12.00 is £2.00)."""
    rate = Fraction(check_percent(vat_percent, "vat_percent"))
    return round_half_up(Fraction(gross_pence) * rate / (100 + rate))


@dataclass(frozen=True)
class TipOption:
    """A preset as the tablet shows it."""

    percent: Decimal
    tip_pence: int


@dataclass(frozen=True)
class GratuitySettings:
    """A site's tipping rules."""

    enabled: bool = True
    presets: tuple[Percent, ...] = (5, 10, 20)
    custom_allowed: bool = True
    basis: TipBasis = TipBasis.PRE_TAX
    vat_percent: Percent = 20
    max_percent: Percent = 200

    def __post_init__(self) -> None:
        try:
            presets = tuple(check_percent(p, "preset") for p in self.presets)
            object.__setattr__(self, "presets", presets)
            object.__setattr__(self, "vat_percent", check_percent(self.vat_percent, "vat"))
            cap = self.max_percent
            if (
                isinstance(cap, bool)
                or not isinstance(cap, int | Decimal | str)
                or Decimal(cap) < 0
            ):
                raise ValueError(f"max_percent must be 0 or more, not {cap!r}")
            object.__setattr__(self, "max_percent", Decimal(cap))
        except (ValueError, ArithmeticError) as error:
            raise TipError("invalid_tip_settings", str(error)) from None
        if len(set(presets)) != len(presets) or len(presets) > 6:
            raise TipError("invalid_tip_settings", "up to 6 different presets")
        object.__setattr__(self, "basis", TipBasis(self.basis))

    def basis_of(self, due_pence: int) -> int:
        """What a percentage tip on ``due_pence`` (VAT included) is a share of."""
        if self.basis is TipBasis.POST_TAX:
            return due_pence
        return due_pence - vat_in(due_pence, self.vat_percent)

    def options(self, due_pence: int) -> list[TipOption]:
        """The presets on ``due_pence``, as the tablet offers them (none when tips are off)."""
        if not self.enabled:
            return []
        basis = self.basis_of(due_pence)
        return [TipOption(Decimal(p), percent_of(basis, p)) for p in self.presets]

    def check(self, tip_pence: int, due_pence: int, preset: Percent | None = None) -> int:
        """``tip_pence`` if the site takes it on ``due_pence``; ``TipError`` otherwise.

        With ``preset`` the tip must be that preset's amount (what the tablet showed).
        """
        if isinstance(tip_pence, bool) or not isinstance(tip_pence, int) or tip_pence < 0:
            raise TipError("invalid_tip", "a tip is a whole number of pence, 0 or more")
        if tip_pence == 0:
            return 0
        if not self.enabled:
            raise TipError("tips_disabled", "this site does not take tips")
        basis = self.basis_of(due_pence)
        if preset is not None:
            percent = Decimal(preset)
            if percent not in self.presets or percent_of(basis, percent) != tip_pence:
                raise TipError("invalid_tip", f"{percent}% of {basis} pence is not {tip_pence}")
        elif not self.custom_allowed:
            raise TipError("custom_tip_disabled", "this site takes preset tips only")
        cap = percent_of(max(basis, 0), Decimal(self.max_percent))
        if tip_pence > cap:
            raise TipError(
                "tip_too_large",
                f"a tip of {tip_pence} pence is more than {self.max_percent}% of {basis}",
            )
        return tip_pence
