"""The edge server's settings: read once from ``edge.toml`` plus ``FYNLO_EDGE_*`` overrides.

Every key is documented in its field's ``metadata["doc"]`` and in ``edge.toml``;
``load_edge_config`` is the one way to read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from shared.config import load_config
from shared.payment_settings import PaymentSettings
from shared.registry import parse_strategies
from sync_protocol.schema import Registry

ENV_PREFIX = "FYNLO_EDGE"
DEFAULT_PATH = "edge.toml"


@dataclass(frozen=True, slots=True)
class CloudSettings:
    """Where the cloud is and how this edge proves who it is."""

    url: str = field(
        default="http://127.0.0.1:8470",
        metadata={"doc": "Base URL of the cloud service; empty runs the edge offline."},
    )
    token: str = field(
        default="",
        metadata={
            "doc": "Device credential '<node_id>.<secret>' issued when this edge was "
            "registered; empty runs the edge offline (no uplink)."
        },
    )


@dataclass(frozen=True, slots=True)
class SyncSettings:
    """How the uplink pushes and pulls."""

    batch_max_changes: int = field(
        default=5000, metadata={"doc": "Most changes sent in one push batch (1-50000)."}
    )
    pull_limit: int = field(
        default=5000, metadata={"doc": "Most feed entries asked for in one pull page (1-20000)."}
    )
    long_poll_s: float = field(
        default=20.0,
        metadata={"doc": "Seconds the cloud may hold a pull open waiting for news (0-30)."},
    )
    backoff_base_s: float = field(
        default=0.25,
        metadata={"doc": "First retry delay after a failure; doubles per failure, with jitter."},
    )
    backoff_cap_s: float = field(
        default=30.0, metadata={"doc": "Longest retry delay after repeated failures."}
    )
    request_timeout_s: float = field(
        default=30.0,
        metadata={
            "doc": "Seconds a push (or a pull, on top of long_poll_s) may take before it is "
            "abandoned and retried."
        },
    )

    def __post_init__(self) -> None:
        if not 1 <= self.batch_max_changes <= 50_000:
            raise ValueError("sync.batch_max_changes must be between 1 and 50000")
        if not 1 <= self.pull_limit <= 20_000:
            raise ValueError("sync.pull_limit must be between 1 and 20000")
        if not 0 <= self.long_poll_s <= 30:
            raise ValueError("sync.long_poll_s must be between 0 and 30")
        if self.backoff_base_s <= 0 or self.backoff_cap_s < self.backoff_base_s:
            raise ValueError("sync.backoff_base_s must be > 0 and <= sync.backoff_cap_s")
        if self.request_timeout_s <= 0:
            raise ValueError("sync.request_timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class MdnsSettings:
    """How the edge announces itself on the LAN (mDNS / DNS-SD), so tablets find it."""

    enabled: bool = field(
        default=True,
        metadata={"doc": "Advertise this edge by mDNS (service _fynlo._tcp) so tablets find it."},
    )
    name: str = field(
        default="",
        metadata={"doc": "Name tablets show for this edge; empty uses 'Fynlo <site_id>'."},
    )
    interfaces: tuple[str, ...] = field(
        default=(),
        metadata={
            "doc": "Interface names (e.g. 'eth0') or IPv4 addresses to announce on; empty: "
            "every non-loopback interface, or only `host` when that is one address."
        },
    )
    refresh_s: float = field(
        default=30.0,
        metadata={
            "doc": "Seconds between re-reads of the machine's addresses; a change is "
            "re-announced (0.1-3600)."
        },
    )

    def __post_init__(self) -> None:
        if not 0.1 <= self.refresh_s <= 3600:
            raise ValueError("mdns.refresh_s must be between 0.1 and 3600")
        if any(not entry.strip() for entry in self.interfaces):
            raise ValueError("mdns.interfaces must not hold empty names")


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    """Everything the edge server reads at start-up."""

    db_path: str = field(
        default="var/edge.sqlite", metadata={"doc": "The SQLite file holding this edge's data."}
    )
    host: str = field(
        default="0.0.0.0", metadata={"doc": "Address the edge's HTTP server listens on."}
    )
    port: int = field(default=8471, metadata={"doc": "Port the edge's HTTP server listens on."})
    site_id: str = field(default="", metadata={"doc": "The site (restaurant) this edge serves."})
    node_id: str = field(
        default="",
        metadata={
            "doc": "This edge's node id, as registered in the cloud; empty takes it from the "
            "token's '<node_id>.' prefix."
        },
    )
    synchronous: Literal["OFF", "NORMAL", "FULL", "EXTRA"] = field(
        default="FULL",
        metadata={
            "doc": "SQLite synchronous mode. FULL: an acknowledged write survives power loss. "
            "NORMAL is faster but may lose the last writes on power loss."
        },
    )
    access_log: Literal["all", "slow", "off"] = field(
        default="slow",
        metadata={
            "doc": "Which requests the access log lists: 'all'; 'slow' (the default): only "
            "those refused or failed (status 400 and up) or answered in 250 ms or more; 'off'."
        },
    )
    max_db_mb: int = field(
        default=0,
        metadata={
            "doc": "Cap on the SQLite file in MiB (0: none). At the cap writes are refused with "
            "storage_full (HTTP 507) and nothing of them is kept, so the box's disk never fills."
        },
    )
    strategies: str = field(
        default="",
        metadata={
            "doc": "Conflict strategy overrides, 'table=strategy' comma-separated "
            "(e.g. 'orders=manual'); must match the cloud's so local predictions agree."
        },
    )
    cloud: CloudSettings = field(default_factory=CloudSettings, metadata={"doc": "The cloud."})
    sync: SyncSettings = field(default_factory=SyncSettings, metadata={"doc": "The uplink."})
    mdns: MdnsSettings = field(
        default_factory=MdnsSettings, metadata={"doc": "Discovery on the LAN."}
    )
    payments: PaymentSettings = field(
        default_factory=PaymentSettings, metadata={"doc": "Fees, tips and refunds."}
    )

    def __post_init__(self) -> None:
        parse_strategies(self.strategies)
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be between 0 and 65535")
        if self.max_db_mb < 0:
            raise ValueError("max_db_mb must be 0 (no cap) or more")
        if (
            self.node_id
            and self.cloud.token
            and not self.cloud.token.startswith(self.node_id + ".")
        ):
            raise ValueError("node_id does not match the token's '<node_id>.' prefix")

    @property
    def effective_node_id(self) -> str:
        """The node id: configured, or else the token's prefix."""
        if self.node_id:
            return self.node_id
        prefix, dot, _ = self.cloud.token.partition(".")
        return prefix if dot else ""

    @property
    def max_db_bytes(self) -> int | None:
        """The database cap in bytes, or None for none."""
        return self.max_db_mb * 1024 * 1024 if self.max_db_mb else None

    @property
    def uplink_enabled(self) -> bool:
        """Whether the edge has what it needs to sync with the cloud."""
        return bool(self.cloud.url and self.cloud.token)

    def registry(self, base: Registry) -> Registry:
        """``base`` with this config's strategy overrides applied."""
        overrides = parse_strategies(self.strategies)
        return base.with_strategies(overrides)


def load_edge_config(path: str | Path | None = DEFAULT_PATH) -> EdgeConfig:
    """Read the edge config from ``path`` (TOML) and ``FYNLO_EDGE_*`` environment variables."""
    return load_config(EdgeConfig, path, env_prefix=ENV_PREFIX)
