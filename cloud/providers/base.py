"""The one interface of a payment provider: create, read, cancel, capture, refund, webhooks.

How it works. Every call names our payment attempt's id (``payment_id``), which is also the
idempotency key the provider is given: creating the same attempt twice (a retry, or a
recovery after a crash between the provider's answer and our record) gives back the same
provider payment, never a second charge. ``find`` looks an attempt up by that id, so an
attempt whose answer was lost is recovered exactly once. Statuses come back as
``shared.payment_states.PaymentState``; each adapter keeps its provider's own statuses to
itself.

A refusal by the provider (a decline, an invalid request) is a ``ProviderError`` with a
stable ``code``; a provider that cannot be reached is ``ProviderError("provider_unavailable")``
so a caller can tell "the money was refused" from "we do not know yet".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from shared.payment_states import PaymentState


class ProviderError(Exception):
    """A provider refused or failed a call; ``code`` is stable, ``message`` is for people."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class ProviderPayment:
    """A payment as the provider holds it."""

    provider_ref: str  #: the provider's id for it
    payment_id: str  #: ours (the idempotency key)
    state: PaymentState
    amount_pence: int
    currency: str
    #: where the guest goes next: the bank's pay page (shown as a QR), or a 3-D Secure page
    action_url: str | None = None
    expires_at_ms: int | None = None
    failure_code: str | None = None
    captured_pence: int = 0
    refunded_pence: int = 0


@dataclass(frozen=True)
class ProviderRefund:
    """A refund as the provider holds it."""

    provider_ref: str
    refund_id: str  #: ours (the idempotency key)
    payment_ref: str
    amount_pence: int
    state: Literal["pending", "succeeded", "failed"]


@dataclass(frozen=True)
class WebhookEvent:
    """A verified notification from the provider."""

    event_id: str  #: unique per event: a redelivery carries the same one
    kind: str  #: the provider's event type
    payment: ProviderPayment | None = None
    refund: ProviderRefund | None = None
    created_ms: int = 0
    raw: Mapping[str, object] = field(default_factory=dict)


class PaymentProvider(Protocol):
    """What the cloud needs from any payment provider."""

    name: str
    kind: Literal["bank", "card"]

    async def create(
        self,
        payment_id: str,
        amount_pence: int,
        currency: str,
        *,
        description: str = "",
        capture: Literal["automatic", "manual"] = "automatic",
    ) -> ProviderPayment:
        """Create (or, for a payment id seen before, return) the provider's payment."""
        ...

    async def get(self, provider_ref: str) -> ProviderPayment:
        """The payment as the provider holds it now."""
        ...

    async def find(self, payment_id: str) -> ProviderPayment | None:
        """The provider's payment for our attempt id, if it ever created one."""
        ...

    async def cancel(self, provider_ref: str) -> ProviderPayment:
        """Cancel a payment that has not completed."""
        ...

    async def refund(self, provider_ref: str, refund_id: str, amount_pence: int) -> ProviderRefund:
        """Give back part or all of a completed payment (``refund_id`` is the idempotency key)."""
        ...

    def verify_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """The event in a webhook delivery, or ``ProviderError("invalid_signature")``."""
        ...
