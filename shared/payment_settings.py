"""A site's payment rules as settings: fee rates per tender, fee pass-through, tips, refunds.

The edge reads them from its ``[payments]`` section (``edge.toml``); the owner may change the
ones in ``SITE_EDITABLE`` for a site from the cloud, which checks them here before they are
written (``with_overrides``) and syncs them to the edge as the ``site_settings`` row
``payments``. Rates are decimal strings of percent ("2.9" is 2.9%), never floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .fees import FeeError, FeeSchedule, Rate, Tender
from .gratuity import GratuitySettings, TipBasis, TipError
from .money import check_percent


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True, slots=True)
class PaymentSettings:
    """The site's payment rules: fee rates per tender, fee pass-through, tips, refunds.

    Rates are decimal strings of percent ("2.9" is 2.9%), never floats.
    """

    jurisdiction: str = field(
        default="GB",
        metadata=_doc(
            "Where the site trades (ISO country, or US-XX state): decides whether fees may "
            "be passed on to guests."
        ),
    )
    pass_through: bool = field(
        default=False,
        metadata=_doc(
            "Guests pay the payment fees (a surcharge). Off by default; refused where "
            "consumer surcharges are banned (the UK, the EEA, some US states)."
        ),
    )
    bank_percent: str = field(default="0.2", metadata=_doc("Pay-by-bank fee, % of a payment."))
    bank_fixed_pence: int = field(default=0, metadata=_doc("Pay-by-bank fee per payment."))
    card_percent: str = field(default="2.9", metadata=_doc("Card fee, % of a payment."))
    card_fixed_pence: int = field(default=30, metadata=_doc("Card fee per payment, in pence."))
    apple_pay_percent: str = field(default="2.9", metadata=_doc("Apple Pay fee, %."))
    apple_pay_fixed_pence: int = field(default=30, metadata=_doc("Apple Pay fee per payment."))
    platform_percent: str = field(
        default="1", metadata=_doc("The platform's fee on bank, card and Apple Pay payments, %.")
    )
    tips: bool = field(default=True, metadata=_doc("Whether the site takes tips."))
    tip_presets: tuple[str, ...] = field(
        default=("5", "10", "20"), metadata=_doc("Tip buttons the tablets offer, in %.")
    )
    custom_tips: bool = field(default=True, metadata=_doc("Whether a tip of any amount is taken."))
    tip_basis: Literal["pre_tax", "post_tax"] = field(
        default="pre_tax",
        metadata=_doc("A % tip on the bill before VAT (pre_tax) or as the guest sees it."),
    )
    vat_percent: str = field(
        default="20", metadata=_doc("VAT included in menu prices, % (for pre_tax tips).")
    )
    max_tip_percent: int = field(
        default=200, metadata=_doc("The largest tip taken, % of its basis (catches slips).")
    )
    refund_approval_above_pence: int = field(
        default=2000,
        metadata=_doc("Refunds above this need payment.refund_large or a manager's PIN."),
    )
    poll_s: float = field(
        default=5.0,
        metadata=_doc(
            "Seconds between the edge's checks of card and bank payments still pending "
            "(the backstop for a webhook that is late or lost)."
        ),
    )
    push_timeout_s: float = field(
        default=3.0,
        metadata=_doc(
            "Seconds a card or bank payment waits for its attempt to reach the cloud before "
            "it is refused as offline."
        ),
    )

    def __post_init__(self) -> None:
        self.fees()  # fail at start-up, not at the first payment
        self.gratuity()
        if self.refund_approval_above_pence < 0:
            raise ValueError("refund_approval_above_pence must be 0 or more")
        if self.poll_s <= 0 or self.push_timeout_s <= 0:
            raise ValueError("poll_s and push_timeout_s must be positive")

    def fees(self) -> FeeSchedule:
        """The fee schedule these settings give."""
        platform = check_percent(self.platform_percent, "platform_percent")

        def rate(percent: str, fixed: int) -> Rate:
            return Rate(check_percent(percent), fixed, platform)

        try:
            return FeeSchedule(
                self.jurisdiction,
                self.pass_through,
                {
                    Tender.BANK: rate(self.bank_percent, self.bank_fixed_pence),
                    Tender.CARD: rate(self.card_percent, self.card_fixed_pence),
                    Tender.APPLE_PAY: rate(self.apple_pay_percent, self.apple_pay_fixed_pence),
                    Tender.CASH: Rate(),
                },
            )
        except FeeError as error:
            raise ValueError(f"{error.code}: {error.message}") from None

    def gratuity(self) -> GratuitySettings:
        """The tip rules these settings give."""
        try:
            return GratuitySettings(
                self.tips,
                tuple(check_percent(p, "tip preset") for p in self.tip_presets),
                self.custom_tips,
                TipBasis(self.tip_basis),
                check_percent(self.vat_percent, "vat_percent"),
                self.max_tip_percent,
            )
        except TipError as error:
            raise ValueError(f"{error.code}: {error.message}") from None


#: settings the owner may change for a site from the cloud (the others are the edge box's own)
SITE_EDITABLE = frozenset(
    f.name
    for f in dataclasses.fields(PaymentSettings)
    if f.name not in ("poll_s", "push_timeout_s")
)


def with_overrides(base: PaymentSettings, overrides: Mapping[str, Any]) -> PaymentSettings:
    """``base`` with a site's overrides, checked (``ValueError`` naming what is wrong)."""
    unknown = sorted(set(overrides) - SITE_EDITABLE)
    if unknown:
        raise ValueError(f"not a site payment setting: {', '.join(unknown)}")
    values = dict(overrides)
    if isinstance(values.get("tip_presets"), list):
        values["tip_presets"] = tuple(values["tip_presets"])
    for f in dataclasses.fields(PaymentSettings):
        if f.name not in values:
            continue
        value, default = values[f.name], getattr(base, f.name)
        wanted = type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, wanted):
            raise ValueError(f"{f.name} must be a {wanted.__name__}, not {value!r}")
    return dataclasses.replace(base, **values)
