"""What taking a payment costs: provider and platform fees per tender, and who pays them.

How it works. Each tender has a provider fee (a percentage of the amount plus a fixed fee in
pence) and a platform fee (a percentage); both are rounded half up to the penny by
``shared.money`` separately, once each, so a receipt, the edge and the cloud's reports add the
same pennies. ``FeeSchedule`` is a site's rates; the defaults are the product's plan:

=========  ==============  ============
tender     provider fee    platform fee
=========  ==============  ============
bank       0.2%            1%
card       2.9% + 30p      1%
apple_pay  2.9% + 30p      1% (a card payment through the card provider)
cash       none            none
=========  ==============  ============

Who pays. By default the restaurant absorbs the fees: the guest pays the bill and the
restaurant nets the bill less fees. With ``pass_through`` on, the guest pays them: the
charge is grossed up so that, after the fees on the whole charge, the restaurant nets the
bill (or a penny over, where no charge nets it exactly). Surcharging consumers for paying by
card or bank is unlawful in the UK and the EEA (and in some US states), so ``pass_through``
is off by default and refused (``FeeError``, code ``pass_through_banned``) for a
jurisdiction in ``SURCHARGE_BANNED``.

``compare`` is what a tablet shows before the guest picks a tender: each tender's fees on
the bill, and what paying by bank saves over card (the guest's saving with pass-through,
the restaurant's otherwise).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from enum import StrEnum
from types import MappingProxyType

from .money import Percent, check_percent, percent_of


class Tender(StrEnum):
    """How a guest pays."""

    BANK = "bank"  #: pay by bank (open banking), from a QR code
    CARD = "card"
    APPLE_PAY = "apple_pay"
    CASH = "cash"


#: where consumer surcharges for a payment method are banned: the UK, the EEA (PSD2), and US
#: states that ban card surcharges (ISO 3166-1 country or ISO 3166-2 subdivision codes)
SURCHARGE_BANNED = frozenset(
    {
        "GB",
        *"AT BE BG HR CY CZ DK EE FI FR DE GR HU IE IT LV LT LU MT NL PL PT RO SK SI ES SE".split(),
        *"IS LI NO".split(),
        "US-CT",
        "US-MA",
        "US-ME",
        "PR",
    }
)


class FeeError(ValueError):
    """A fee setting that cannot be used; ``code`` is stable, ``message`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Rate:
    """A provider's fee for one tender, and the platform's on top."""

    percent: Decimal = Decimal(0)
    fixed_pence: int = 0
    platform_percent: Decimal = Decimal(0)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "percent", check_percent(self.percent, "percent"))
            object.__setattr__(
                self, "platform_percent", check_percent(self.platform_percent, "platform_percent")
            )
        except ValueError as error:
            raise FeeError("invalid_rate", str(error)) from None
        fixed = self.fixed_pence
        if isinstance(fixed, bool) or not isinstance(fixed, int) or not 0 <= fixed <= 10_000:
            raise FeeError("invalid_rate", f"fixed_pence must be 0 to 10000, not {fixed!r}")
        if self.percent + self.platform_percent >= 100:
            raise FeeError("invalid_rate", "fees cannot take the whole payment")


def _rate(percent: str, fixed: int = 0, platform: str = "1") -> Rate:
    return Rate(Decimal(percent), fixed, Decimal(platform))


#: the product plan's rates
DEFAULT_RATES: Mapping[Tender, Rate] = MappingProxyType(
    {
        Tender.BANK: _rate("0.2"),
        Tender.CARD: _rate("2.9", 30),
        Tender.APPLE_PAY: _rate("2.9", 30),
        Tender.CASH: Rate(),
    }
)


@dataclass(frozen=True)
class Fees:
    """The fees on one charge, in pence."""

    provider_pence: int
    platform_pence: int

    @property
    def total_pence(self) -> int:
        return self.provider_pence + self.platform_pence


@dataclass(frozen=True)
class Charge:
    """What the guest is charged for ``bill_pence`` by one tender, and what the site nets."""

    tender: Tender
    bill_pence: int
    charge_pence: int  #: what the guest pays: the bill, plus the fees with pass-through
    fees: Fees  #: on the whole charge
    surcharge_pence: int  #: charge - bill (0 unless the fees are passed through)

    @property
    def net_pence(self) -> int:
        """What the restaurant keeps of the charge after fees."""
        return self.charge_pence - self.fees.total_pence


@dataclass(frozen=True)
class FeeSchedule:
    """A site's fee rates per tender, and whether guests pay the fees."""

    jurisdiction: str = "GB"
    pass_through: bool = False
    rates: Mapping[Tender, Rate] = field(default_factory=lambda: DEFAULT_RATES)

    def __post_init__(self) -> None:
        missing = [t.value for t in Tender if t not in self.rates]
        if missing:
            raise FeeError("invalid_rate", f"no rate for {', '.join(missing)}")
        if self.pass_through and self.jurisdiction.upper() in SURCHARGE_BANNED:
            raise FeeError(
                "pass_through_banned",
                f"passing payment fees on to guests is unlawful in {self.jurisdiction}",
            )
        object.__setattr__(self, "rates", MappingProxyType(dict(self.rates)))

    def with_rate(self, tender: Tender, rate: Rate) -> FeeSchedule:
        """This schedule with ``tender``'s rate replaced."""
        return replace(self, rates={**self.rates, tender: rate})

    def fees(self, tender: Tender, charge_pence: int) -> Fees:
        """The fees on a charge of ``charge_pence`` by ``tender`` (none on nothing)."""
        if charge_pence < 0:
            raise FeeError("invalid_amount", "a charge is never negative")
        if charge_pence == 0:
            return Fees(0, 0)
        rate = self.rates[tender]
        provider = percent_of(charge_pence, rate.percent) + rate.fixed_pence
        return Fees(provider, percent_of(charge_pence, rate.platform_percent))

    def charge(self, tender: Tender, bill_pence: int) -> Charge:
        """What the guest pays for ``bill_pence`` by ``tender``, and the fees on it."""
        if bill_pence < 0:
            raise FeeError("invalid_amount", "a charge is never negative")
        charge = bill_pence
        if self.pass_through and bill_pence:
            charge = self._gross_up(tender, bill_pence)
        return Charge(tender, bill_pence, charge, self.fees(tender, charge), charge - bill_pence)

    def _gross_up(self, tender: Tender, bill: int) -> int:
        """The least charge whose net after its own fees is at least ``bill``."""
        rate = self.rates[tender]
        kept = 1 - (rate.percent + rate.platform_percent) / 100
        charge = int((bill + rate.fixed_pence) / kept)  # within a few pence of the answer
        while charge - self.fees(tender, charge).total_pence < bill:
            charge += 1
        while charge > bill and charge - 1 - self.fees(tender, charge - 1).total_pence >= bill:
            charge -= 1
        return charge

    def compare(self, bill_pence: int) -> Comparison:
        """Each tender's charge for the bill, and what paying by bank saves over card."""
        charges = {tender: self.charge(tender, bill_pence) for tender in Tender}
        if self.pass_through:
            saving = charges[Tender.CARD].charge_pence - charges[Tender.BANK].charge_pence
        else:
            saving = charges[Tender.BANK].net_pence - charges[Tender.CARD].net_pence
        return Comparison(charges, saving, "guest" if self.pass_through else "restaurant")


@dataclass(frozen=True)
class Comparison:
    """What a tablet shows before the guest chooses how to pay."""

    charges: Mapping[Tender, Charge]
    bank_saves_pence: int  #: over card
    saved_by: str  #: "guest" (fees passed through) or "restaurant"


def parse_rate(settings: Mapping[str, object]) -> Rate:
    """A ``Rate`` from settings such as ``{"percent": "2.9", "fixed_pence": 30}``."""
    unknown = set(settings) - {"percent", "fixed_pence", "platform_percent"}
    if unknown:
        raise FeeError("invalid_rate", f"unknown fee settings: {', '.join(sorted(unknown))}")
    try:
        return Rate(
            check_percent(settings.get("percent", 0), "percent"),
            settings.get("fixed_pence", 0),  # type: ignore[arg-type]
            check_percent(settings.get("platform_percent", 0), "platform_percent"),
        )
    except ValueError as error:
        if isinstance(error, FeeError):
            raise
        raise FeeError("invalid_rate", str(error)) from None


__all__ = [
    "DEFAULT_RATES",
    "SURCHARGE_BANNED",
    "Charge",
    "Comparison",
    "FeeError",
    "FeeSchedule",
    "Fees",
    "Percent",
    "Rate",
    "Tender",
    "parse_rate",
]
