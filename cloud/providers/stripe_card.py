"""Card payments through Stripe PaymentIntents: the ``PaymentProvider`` the cloud takes cards with.

How it works. Every call goes through stripe-python's ``StripeClient`` (its async methods,
over aiohttp, the HTTP client the cloud already runs on); ``api_base`` points it somewhere
other than ``https://api.stripe.com`` (a test server). A payment is one PaymentIntent:

* ``create`` makes it for our attempt: ``idempotency_key`` and ``metadata["payment_id"]``
  are our payment id, ``capture_method`` is automatic or manual, and only cards are taken:
  ``allowed_payment_method_types=["card"]``, or its predecessor ``payment_method_types``
  when ``stripe_version`` pins an API version older than 2026-07-29 (versions from
  2026-09-30 refuse the old name). Creating the same attempt again (a retry, a recovery
  after a crash) gives back the same PaymentIntent, never a second one; stripe-python's own
  retries of a failed request (``max_network_retries``) send the same key.
* ``confirm`` takes the payment method the tablet or terminal collected (a ``pm_...`` id or
  a test token such as ``pm_card_visa``): it sets it on the intent, then confirms. A confirm
  repeated after its answer was lost returns the payment as it is (authorised, taken or
  cancelled) instead of an error; an attempt that failed is never confirmed again (a failed
  attempt is final: the till starts a new one, with a new payment id).
* ``capture`` takes the money of an authorised (manual-capture) payment, all or part of it.
* ``get`` reads it; ``find`` looks our payment id up among the most recent PaymentIntents
  (``find_scan_limit``, newest first) by their metadata. The list API is used, not the
  Search API: search is eventually consistent (Stripe documents delays of a minute, more
  during incidents), and ``find`` exists for the read-after-write case of an answer lost
  moments ago.
* ``cancel`` cancels an intent that has not completed.
* ``refund`` refunds part or all of a taken payment, ``idempotency_key`` and
  ``metadata["refund_id"]`` being our refund id. It first reads the payment and its refunds:
  a refund id already there is answered with that refund (so a retry never refunds twice,
  even after Stripe forgot the key, 24 hours on), and more than is left to refund is refused
  here, before Stripe is asked.

Statuses (PaymentIntent ``status`` -> ``PaymentState``):

=========================  =================================================================
Stripe                     ours
=========================  =================================================================
requires_payment_method    pending; failed after a failed attempt (``last_payment_error``:
                           ``failure_code`` is its ``decline_code``, else its ``code``)
requires_confirmation      pending
processing                 pending
requires_action            requires_action (``action_url``: the 3-D Secure page, if Stripe
                           gives its address)
requires_capture           authorized
succeeded                  succeeded
canceled                   cancelled
=========================  =================================================================

``captured_pence`` is the intent's ``amount_received`` (else its charge's
``amount_captured``); ``refunded_pence`` is what was given back of it: the charge's
``amount_refunded`` less the part of a hold that was never captured (Stripe counts that
released part as refunded). Every read asks for the latest charge expanded, so both are
known; a webhook's PaymentIntent names its charge only, so there ``refunded_pence`` is 0.
Currencies go to Stripe in lower case and come back in upper case (``GBP``), as the till
writes them.

Errors (``ProviderError.code``): a declined card is ``card_declined`` (the message names
Stripe's decline code); other refusals carry Stripe's error code (``resource_missing``,
``payment_intent_unexpected_state``, ...; ``invalid_request`` when Stripe gives none);
``unauthorized`` for a refused API key, ``idempotency_key_reused`` for a key reused with
other parameters; a connection failure, a timeout, a 5xx, a rate limit or an unreadable
answer is ``provider_unavailable`` (``retryable=True``). The adapter's own refusals:
``invalid_amount``, ``payment_failed`` (confirming a failed attempt),
``payment_not_succeeded`` and ``refund_exceeds_payment`` (refunds). Messages never carry an
API key or a card number: Stripe's text is passed on with anything that looks like either
blanked out.

Webhooks are verified by stripe-python (``construct_event``: HMAC-SHA256 of
``"{t}.{body}"`` with the endpoint's secret, ``t`` no older than ``signature_tolerance_s``);
a missing or wrong signature, or an old one, is ``ProviderError("invalid_signature")``.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping
from typing import Any, Literal, TypeVar, cast

import aiohttp
import stripe
from stripe.params import (
    PaymentIntentCaptureParams,
    PaymentIntentConfirmParams,
    PaymentIntentCreateParams,
    PaymentIntentListParams,
    RefundCreateParams,
    RefundListParams,
)

from shared.payment_states import PaymentState

from .base import ProviderError, ProviderPayment, ProviderRefund, WebhookEvent

T = TypeVar("T")

#: the first Stripe API version that takes ``allowed_payment_method_types``
_ALLOWED_TYPES_SINCE = "2026-07-29"

#: every PaymentIntent read asks for its charge, for the captured and refunded amounts
_EXPAND = ["latest_charge"]

_REFUND_STATES: dict[str, Literal["pending", "succeeded", "failed"]] = {
    "pending": "pending",
    "requires_action": "pending",
    "succeeded": "succeeded",
    "failed": "failed",
    "canceled": "failed",
}

#: API keys, webhook secrets and client secrets, and runs of 12-19 digits (card numbers)
_SECRETS = re.compile(
    r"\b(?:sk|rk|pk|whsec)_[A-Za-z0-9_*]+|\bpi_[A-Za-z0-9]+_secret_[A-Za-z0-9]+"
    r"|\b(?:\d[ -]?){11,18}\d\b"
)


def _scrub(text: str | None) -> str:
    return _SECRETS.sub("[redacted]", text or "").strip()


class StripeCardProvider:
    """``PaymentProvider`` for card payments (and Apple Pay) through Stripe PaymentIntents."""

    name = "stripe"
    kind: Literal["bank", "card"] = "card"

    def __init__(
        self,
        api_key: str,
        webhook_secret: str,
        *,
        api_base: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout_s: float = 30.0,
        max_network_retries: int = 2,
        signature_tolerance_s: int = 300,
        find_scan_limit: int = 500,
        find_page_size: int = 100,
        stripe_version: str | None = None,
        descriptions: bool = True,
    ) -> None:
        """``session``: an aiohttp session to share (else the provider opens and closes its own).

        ``stripe_version`` pins the API version (default: the one stripe-python is built for).
        ``descriptions`` False leaves a payment's description out (localstripe refuses it).
        """
        self.stripe_version = stripe_version or stripe.api_version
        self.descriptions = descriptions
        self._webhook_secret = webhook_secret
        self.signature_tolerance_s = signature_tolerance_s
        self.find_scan_limit = find_scan_limit
        self.find_page_size = max(1, min(100, find_page_size))
        self._http = stripe.AIOHTTPClient(
            timeout=aiohttp.ClientTimeout(total=timeout_s), session=session
        )
        self.client = stripe.StripeClient(
            api_key,
            base_addresses={"api": api_base} if api_base else None,
            http_client=self._http,
            max_network_retries=max_network_retries,
            stripe_version=self.stripe_version,
        )

    async def aclose(self) -> None:
        """Close the HTTP session the provider opened (a shared one is left open)."""
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def __aenter__(self) -> StripeCardProvider:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    # -- payments -------------------------------------------------------------------------

    async def create(
        self,
        payment_id: str,
        amount_pence: int,
        currency: str,
        *,
        description: str = "",
        capture: Literal["automatic", "manual"] = "automatic",
    ) -> ProviderPayment:
        """Create (or, for a payment id seen before, return) the attempt's PaymentIntent."""
        _check_amount(amount_pence)
        types = (
            "allowed_payment_method_types"
            if self.stripe_version[:10] >= _ALLOWED_TYPES_SINCE
            else "payment_method_types"
        )
        params: dict[str, Any] = {
            "amount": amount_pence,
            "currency": currency.lower(),
            "capture_method": "manual" if capture == "manual" else "automatic",
            types: ["card"],
            "metadata": {"payment_id": payment_id},
            "expand": _EXPAND,
        }
        if description and self.descriptions:
            params["description"] = description
        intents = self.client.v1.payment_intents
        intent = await _call(
            intents.create_async(
                cast(PaymentIntentCreateParams, params), {"idempotency_key": payment_id}
            )
        )
        return _payment(intent.to_dict())

    async def confirm(
        self, provider_ref: str, payment_method: str, return_url: str | None = None
    ) -> ProviderPayment:
        """Pay with ``payment_method``; ``return_url``: where 3-D Secure sends the guest back."""
        current = await self.get(provider_ref)
        if current.state is PaymentState.FAILED:
            raise ProviderError(
                "payment_failed",
                f"payment {provider_ref} failed ({current.failure_code}): start a new attempt",
            )
        if current.state in (
            PaymentState.AUTHORIZED,
            PaymentState.SUCCEEDED,
            PaymentState.CANCELLED,
        ):
            return current  # confirmed (or cancelled) already: a repeated confirm
        intents = self.client.v1.payment_intents
        await _call(intents.update_async(provider_ref, {"payment_method": payment_method}))
        params: PaymentIntentConfirmParams = {"expand": _EXPAND}
        if return_url:
            params["return_url"] = return_url
        intent = await _call(intents.confirm_async(provider_ref, params))
        return _payment(intent.to_dict())

    async def capture(self, provider_ref: str, amount_pence: int | None = None) -> ProviderPayment:
        """Take the money of an authorised payment: all of it, or ``amount_pence`` of it."""
        params: PaymentIntentCaptureParams = {"expand": _EXPAND}
        if amount_pence is not None:
            _check_amount(amount_pence)
            params["amount_to_capture"] = amount_pence
        intents = self.client.v1.payment_intents
        intent = await _call(intents.capture_async(provider_ref, params))
        return _payment(intent.to_dict())

    async def get(self, provider_ref: str) -> ProviderPayment:
        """The payment as Stripe holds it now."""
        intents = self.client.v1.payment_intents
        intent = await _call(intents.retrieve_async(provider_ref, {"expand": _EXPAND}))
        return _payment(intent.to_dict())

    async def find(self, payment_id: str) -> ProviderPayment | None:
        """The PaymentIntent made for our attempt, among the ``find_scan_limit`` newest."""
        params: PaymentIntentListParams = {
            "limit": self.find_page_size,
            "expand": [f"data.{path}" for path in _EXPAND],
        }
        page = await _call(self.client.v1.payment_intents.list_async(params))
        seen = 0
        while True:
            for intent in page.data:
                data = intent.to_dict()
                if (data.get("metadata") or {}).get("payment_id") == payment_id:
                    return _payment(data)
                seen += 1
                if seen >= self.find_scan_limit:
                    return None
            if not page.has_more or not page.data:
                return None
            params["starting_after"] = page.data[-1].id
            page = await _call(self.client.v1.payment_intents.list_async(params))

    async def cancel(self, provider_ref: str) -> ProviderPayment:
        """Cancel a payment that has not completed (pending, awaiting 3-D Secure, or authorised)."""
        intents = self.client.v1.payment_intents
        intent = await _call(intents.cancel_async(provider_ref, {"expand": _EXPAND}))
        return _payment(intent.to_dict())

    # -- refunds --------------------------------------------------------------------------

    async def refund(self, provider_ref: str, refund_id: str, amount_pence: int) -> ProviderRefund:
        """Give back ``amount_pence`` of a taken payment (``refund_id`` is the idempotency key)."""
        _check_amount(amount_pence)
        payment = await self.get(provider_ref)
        if payment.state is not PaymentState.SUCCEEDED:
            raise ProviderError(
                "payment_not_succeeded", f"payment {provider_ref} is {payment.state}: no refund"
            )
        listing: RefundListParams = {"payment_intent": provider_ref, "limit": 100}
        refunds = await _call(self.client.v1.refunds.list_async(listing))
        for existing in refunds.data:
            data = existing.to_dict()
            if (data.get("metadata") or {}).get("refund_id") == refund_id:
                return _refund(data, provider_ref)
        left = payment.captured_pence - payment.refunded_pence
        if amount_pence > left:
            raise ProviderError(
                "refund_exceeds_payment",
                f"{amount_pence} pence asked, {left} of payment {provider_ref} left to refund",
            )
        params: RefundCreateParams = {
            "payment_intent": provider_ref,
            "amount": amount_pence,
            "metadata": {"refund_id": refund_id, "payment_id": payment.payment_id},
        }
        created = await _call(
            self.client.v1.refunds.create_async(params, {"idempotency_key": refund_id})
        )
        return _refund(created.to_dict(), provider_ref)

    # -- webhooks -------------------------------------------------------------------------

    def verify_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """The event in a webhook delivery, or ``ProviderError("invalid_signature")``."""
        signature = next((v for k, v in headers.items() if k.lower() == "stripe-signature"), None)
        if not signature:
            raise ProviderError("invalid_signature", "no Stripe-Signature header")
        if not self._webhook_secret:
            raise ProviderError("invalid_signature", "no webhook secret is configured")
        try:
            event = self.client.construct_event(
                body, signature, self._webhook_secret, self.signature_tolerance_s
            )
        except (stripe.SignatureVerificationError, UnicodeDecodeError) as exc:
            raise ProviderError("invalid_signature", _scrub(str(exc))) from None
        except ValueError:
            raise ProviderError("invalid_payload", "the signed body is not an event") from None
        raw = event.to_dict()
        data = raw.get("data")
        obj = data.get("object") if isinstance(data, Mapping) else None
        payment: ProviderPayment | None = None
        refund: ProviderRefund | None = None
        if isinstance(obj, Mapping):
            if obj.get("object") == "payment_intent":
                payment = _payment(obj)
            elif obj.get("object") == "refund":
                refund = _refund(obj, "")
            elif obj.get("object") == "charge" and raw.get("type") == "charge.refunded":
                # the charge lists its refunds newest first (when the API version includes them)
                listed = (obj.get("refunds") or {}).get("data") or []
                if listed and isinstance(listed[0], Mapping):
                    refund = _refund(listed[0], str(obj.get("payment_intent") or ""))
        created = raw.get("created")
        return WebhookEvent(
            event_id=str(raw.get("id", "")),
            kind=str(raw.get("type", "")),
            payment=payment,
            refund=refund,
            created_ms=int(created) * 1000 if isinstance(created, int) else 0,
            raw=raw,
        )


# -- Stripe's answers, in our terms --------------------------------------------------------


def _check_amount(amount_pence: int) -> None:
    if isinstance(amount_pence, bool) or not isinstance(amount_pence, int) or amount_pence <= 0:
        raise ProviderError("invalid_amount", "an amount is a whole number of pence, 1 or more")


async def _call(request: Awaitable[T]) -> T:
    """Await a Stripe call, turning its failures into ``ProviderError``."""
    try:
        return await request
    except stripe.StripeError as exc:
        raise _provider_error(exc) from None
    except (TimeoutError, aiohttp.ClientError) as exc:
        # a failure while reading an answer (stripe-python wraps those while sending)
        raise ProviderError(
            "provider_unavailable",
            f"Stripe's answer was cut off ({type(exc).__name__})",
            retryable=True,
        ) from None


def _provider_error(exc: stripe.StripeError) -> ProviderError:
    """A Stripe error as a ``ProviderError``, its message free of keys and card numbers."""
    request = f" (request {exc.request_id})" if exc.request_id else ""
    text = _scrub(exc.user_message)
    if isinstance(exc, stripe.CardError):
        error = exc.error
        decline = (error.decline_code if error is not None else None) or exc.code or "declined"
        return ProviderError("card_declined", f"the card was declined: {decline}{request}")
    if (
        isinstance(exc, (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError))
        or exc.http_status is None
        or exc.http_status >= 500
    ):
        # APIError: a 5xx, a 409 (a concurrent request on the same key) or an unreadable answer
        reason = "rate limited" if isinstance(exc, stripe.RateLimitError) else "unreachable"
        return ProviderError(
            "provider_unavailable", f"Stripe is {reason}: {text}{request}", retryable=True
        )
    if isinstance(exc, (stripe.AuthenticationError, stripe.PermissionError)):
        return ProviderError("unauthorized", f"Stripe refused the API key{request}")
    if isinstance(exc, stripe.IdempotencyError):
        return ProviderError("idempotency_key_reused", f"{text}{request}")
    code = exc.code or ("resource_missing" if exc.http_status == 404 else "invalid_request")
    return ProviderError(code, f"{text or 'refused'}{request}")


def _unreadable(what: str) -> ProviderError:
    return ProviderError(
        "provider_unavailable", f"Stripe sent {what} we cannot read", retryable=True
    )


def _payment(intent: Mapping[str, Any]) -> ProviderPayment:
    """A PaymentIntent (as a dict) in our terms."""
    ref, amount, status = intent.get("id"), intent.get("amount"), intent.get("status")
    if not isinstance(ref, str) or not isinstance(amount, int) or not isinstance(status, str):
        raise _unreadable("a payment")
    failure_code: str | None = None
    action_url: str | None = None
    if status == "requires_payment_method":
        error = intent.get("last_payment_error")
        if isinstance(error, Mapping) and error:
            state = PaymentState.FAILED
            failure_code = str(error.get("decline_code") or error.get("code") or "payment_failed")
        else:
            state = PaymentState.PENDING
    elif status in ("requires_confirmation", "processing"):
        state = PaymentState.PENDING
    elif status == "requires_action":
        state = PaymentState.REQUIRES_ACTION
        action_url = _action_url(intent.get("next_action"))
    elif status == "requires_capture":
        state = PaymentState.AUTHORIZED
    elif status == "succeeded":
        state = PaymentState.SUCCEEDED
    elif status == "canceled":
        state = PaymentState.CANCELLED
    else:
        raise _unreadable(f"a payment status {status!r}")
    charge = intent.get("latest_charge")
    captured, refunded = _amounts(intent, charge if isinstance(charge, Mapping) else None)
    metadata = intent.get("metadata") or {}
    return ProviderPayment(
        provider_ref=ref,
        payment_id=str(metadata.get("payment_id", "")),
        state=state,
        amount_pence=amount,
        currency=str(intent.get("currency", "")).upper(),
        action_url=action_url,
        failure_code=failure_code,
        captured_pence=captured,
        refunded_pence=refunded,
    )


def _action_url(next_action: object) -> str | None:
    """The address of the 3-D Secure page, when Stripe gives one."""
    if not isinstance(next_action, Mapping):
        return None
    redirect = next_action.get("redirect_to_url")
    if next_action.get("type") == "redirect_to_url" and isinstance(redirect, Mapping):
        url = redirect.get("url")
        return url if isinstance(url, str) and url else None
    sdk = next_action.get("use_stripe_sdk")
    if isinstance(sdk, Mapping):
        url = sdk.get("stripe_js")
        if isinstance(url, str) and url.startswith(("https://", "http://")):
            return url
    return None


def _amounts(intent: Mapping[str, Any], charge: Mapping[str, Any] | None) -> tuple[int, int]:
    """(captured, refunded) pence of a PaymentIntent and, when expanded, its latest charge."""
    received = intent.get("amount_received")
    if isinstance(received, int):
        captured = received
    elif charge is not None and isinstance(charge.get("amount_captured"), int):
        captured = int(charge["amount_captured"])
    elif charge is not None and charge.get("captured") and charge.get("status") == "succeeded":
        captured = int(charge.get("amount") or 0)
    else:
        captured = 0
    refunded = 0
    if charge is not None and captured > 0:
        # Stripe counts the part of a hold that was not captured as refunded
        released = max(0, int(charge.get("amount") or captured) - captured)
        refunded = max(0, int(charge.get("amount_refunded") or 0) - released)
    return captured, refunded


def _refund(refund: Mapping[str, Any], payment_ref: str) -> ProviderRefund:
    """A Refund (as a dict) in our terms."""
    ref, amount = refund.get("id"), refund.get("amount")
    if not isinstance(ref, str) or not isinstance(amount, int):
        raise _unreadable("a refund")
    metadata = refund.get("metadata") or {}
    return ProviderRefund(
        provider_ref=ref,
        refund_id=str(metadata.get("refund_id", "")),
        payment_ref=str(refund.get("payment_intent") or payment_ref),
        amount_pence=amount,
        state=_REFUND_STATES.get(str(refund.get("status")), "pending"),
    )
