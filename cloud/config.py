"""The cloud service's settings: read once from ``cloud.toml``, overridable by environment.

Every key is documented in its field's ``doc`` and in ``cloud.toml``; every one can be set
with ``FYNLO_CLOUD_<KEY>`` (top level) or ``FYNLO_CLOUD_<SECTION>_<KEY>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.config import load_config
from shared.registry import default_registry, parse_strategies
from sync_protocol.schema import Registry
from sync_protocol.wire import Limits

ENV_PREFIX = "FYNLO_CLOUD"


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """Bounds and timings of the sync endpoints."""

    max_frame_bytes: int = field(
        default=16 * 1024 * 1024,
        metadata={"doc": "Largest push frame accepted, in bytes (also the HTTP body limit)."},
    )
    max_payload_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata={"doc": "Largest decompressed payload accepted or sent, in bytes."},
    )
    max_records: int = field(
        default=50_000, metadata={"doc": "Most changes accepted in one push frame."}
    )
    pull_limit_default: int = field(
        default=5000, metadata={"doc": "Feed entries per pull page when the edge names no limit."}
    )
    pull_limit_max: int = field(
        default=20_000, metadata={"doc": "Most feed entries per pull page (larger limits clamp)."}
    )
    long_poll_max_s: float = field(
        default=30.0, metadata={"doc": "Longest a pull with wait=S is held, in seconds."}
    )
    max_forward_ms: int = field(
        default=300_000,
        metadata={
            "doc": "An edge HLC further ahead of the cloud clock than this is not adopted (ms)."
        },
    )

    def __post_init__(self) -> None:
        if self.max_frame_bytes <= 0 or self.max_payload_bytes <= 0 or self.max_records <= 0:
            raise ValueError("frame, payload and record bounds must be positive")
        if self.max_records > 1_000_000:
            raise ValueError("max_records is at most 1,000,000 (one batch's revision span)")
        if not 0 < self.pull_limit_default <= self.pull_limit_max <= self.max_records:
            raise ValueError(
                "need 0 < pull_limit_default <= pull_limit_max <= max_records "
                "(an edge refuses pages with more entries than max_records)"
            )
        if self.long_poll_max_s < 0 or self.max_forward_ms < 0:
            raise ValueError("long_poll_max_s and max_forward_ms must not be negative")

    @property
    def limits(self) -> Limits:
        """The wire bounds these settings describe."""
        return Limits(self.max_frame_bytes, self.max_payload_bytes, self.max_records)


@dataclass(frozen=True, slots=True)
class PaymentSettings:
    """The payment providers the cloud takes card and bank payments with for the edges."""

    bank: Literal["simbank", "off"] = field(
        default="simbank",
        metadata={
            "doc": "Pay-by-bank provider: 'simbank' (the simulated bank, for demos and tests: "
            "no real money) or 'off'."
        },
    )
    simbank_url: str = field(
        default="",
        metadata={
            "doc": "The simulated bank's URL; empty runs one inside this cloud, on "
            "simbank_port, with its webhooks sent to this cloud."
        },
    )
    simbank_port: int = field(
        default=8499, metadata={"doc": "Port of the simulated bank run inside this cloud."}
    )
    simbank_public_url: str = field(
        default="",
        metadata={
            "doc": "Base URL guests' phones reach the simulated bank's pay page on (a LAN "
            "address); empty: the address the bank was asked on."
        },
    )
    simbank_secret_key: str = field(
        default="", metadata={"doc": "The simulated bank's API key; empty generates one."}
    )
    simbank_webhook_secret: str = field(
        default="", metadata={"doc": "The simulated bank's webhook secret; empty generates one."}
    )
    stripe_api_key: str = field(
        default="",
        metadata={"doc": "Stripe secret key for card and Apple Pay payments; empty: no cards."},
    )
    stripe_api_base: str = field(
        default="",
        metadata={"doc": "Stripe API base URL; empty: Stripe's own (tests use localstripe)."},
    )
    stripe_webhook_secret: str = field(
        default="", metadata={"doc": "Signing secret of the Stripe webhook endpoint."}
    )
    applepay_merchant_id: str = field(
        default="",
        metadata={"doc": "Apple Pay merchant identifier (merchant.com.…); empty: no Apple Pay."},
    )
    applepay_display_name: str = field(
        default="", metadata={"doc": "The name Apple Pay shows the guest."}
    )
    applepay_domain: str = field(
        default="", metadata={"doc": "The domain of the pay page, as registered with Apple."}
    )
    applepay_identity_certificate: str = field(
        default="",
        metadata={"doc": "PEM file: the merchant identity certificate (and intermediates)."},
    )
    applepay_identity_key: str = field(
        default="", metadata={"doc": "PEM file: the merchant identity certificate's key."}
    )
    applepay_payment_certificate: str = field(
        default="",
        metadata={"doc": "PEM file: the payment processing certificate (decrypts tokens)."},
    )
    applepay_payment_key: str = field(
        default="", metadata={"doc": "PEM file: the payment processing certificate's key."}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.simbank_port <= 65535:
            raise ValueError("simbank_port must be 0..65535")
        if self.stripe_api_key and not self.stripe_webhook_secret:
            raise ValueError("stripe_webhook_secret is needed with stripe_api_key")
        files = (
            self.applepay_identity_certificate,
            self.applepay_identity_key,
            self.applepay_payment_certificate,
            self.applepay_payment_key,
        )
        if self.applepay_merchant_id and not (
            all(files) and self.applepay_display_name and self.applepay_domain
        ):
            raise ValueError(
                "Apple Pay needs its display name, domain, and certificate and key files"
            )


@dataclass(frozen=True, slots=True)
class CloudConfig:
    """Settings of one cloud worker."""

    host: str = field(default="127.0.0.1", metadata={"doc": "Address the HTTP server binds."})
    port: int = field(default=8470, metadata={"doc": "TCP port of the HTTP server (0: any)."})
    dsn: str | None = field(
        default=None,
        metadata={
            "doc": "Postgres DSN; empty or unset starts a throwaway local Postgres (demo only)."
        },
    )
    admin_token: str | None = field(
        default=None,
        metadata={"doc": "Owner API bearer token; unset generates one at start and prints it."},
    )
    strategies: str = field(
        default="",
        metadata={
            "doc": "Per-table conflict strategy overrides, e.g. "
            '"orders=manual,menu_items=server_wins"; unnamed tables keep their default.'
        },
    )
    pool_min: int = field(default=2, metadata={"doc": "Postgres connections kept open."})
    pool_max: int = field(default=10, metadata={"doc": "Most Postgres connections in the pool."})
    sync: SyncSettings = field(
        default_factory=SyncSettings, metadata={"doc": "Bounds and timings of sync."}
    )
    payments: PaymentSettings = field(
        default_factory=PaymentSettings, metadata={"doc": "Card and bank payment providers."}
    )

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be 0..65535")
        if not 0 <= self.pool_min <= self.pool_max or self.pool_max < 1:
            raise ValueError("need 0 <= pool_min <= pool_max and pool_max >= 1")
        parse_strategies(self.strategies)  # fail at start-up, not at the first push

    def registry(self) -> Registry:
        """The synced tables with this config's strategy overrides."""
        return default_registry().with_strategies(parse_strategies(self.strategies))


def load(path: str | Path | None) -> CloudConfig:
    """Read the cloud config from ``path`` (optional) and ``FYNLO_CLOUD_*`` variables."""
    return load_config(CloudConfig, path, ENV_PREFIX)
