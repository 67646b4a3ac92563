"""Advertise the edge on the restaurant's LAN by mDNS / DNS-SD, so tablets find it.

How it works: an ``Advertiser`` owns one ``AsyncZeroconf`` whose sockets are bound to the
configured interfaces, and registers one DNS-SD service of type ``_fynlo._tcp.local.``:

* instance name ``<site name> (<first 8 chars of the node id>)``, cut to fit DNS's 63-byte
  label. Registration probes first (RFC 6762 section 8); if another responder already
  holds the name, zeroconf renames this one ``<name>-2`` (``-3`` ...). (zeroconf has no
  tie-break for two probes at the same instant, section 8.2; the node id in the name
  keeps that case to a misconfigured pair of edges.);
* host name ``fynlo-<node id>.local.``, with one A record per announced IPv4 address;
* SRV port: the edge's HTTP port;
* TXT record: ``key=value`` strings (RFC 6763 section 6), short keys, UTF-8 values:

  - ``site``: the site (restaurant) id, as registered in the cloud;
  - ``name``: the site's display name (the instance name may be a shortened copy);
  - ``node``: this edge's node id;
  - ``api``: the version of the edge's HTTP API (``API_VERSION``, "1");
  - ``path``: the API's base path (``API_PATH``, "/v1"); the edge's API is at
    ``http://ADDR:PORT`` + path, ADDR from the A records and PORT from the SRV record.

Every ``refresh_s`` seconds it re-reads the addresses to announce (by default the IPv4
addresses of the configured interfaces, from ``ifaddr``; tests inject their own source).
When they change it re-binds zeroconf's sockets to the interfaces as they now are, then
publishes the new A records with ``async_update_service`` (they carry the cache-flush bit,
so browsers drop the old address within a second). With no address left the service is
withdrawn (goodbye) until one comes back. ``stop()`` unregisters the service, which sends
goodbye packets (TTL 0), so browsers drop the edge at once rather than when its TTL runs out.

Only IPv4 addresses are announced: every tablet on a restaurant LAN has IPv4, and IPv6
link-local addresses need a scope that URLs handle badly.

``mdns_ctx(config)`` is the aiohttp ``cleanup_ctx`` entry that runs an advertiser for the
edge app's lifetime.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from types import TracebackType
from typing import Self

import ifaddr
from aiohttp import web
from zeroconf import InterfaceChoice, NotRunningException, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from .config import EdgeConfig

__all__ = [
    "API_PATH",
    "API_VERSION",
    "MDNS_KEY",
    "SERVICE_TYPE",
    "AddressSource",
    "Advertiser",
    "advertiser_for",
    "host_name",
    "instance_name",
    "mdns_ctx",
    "system_addresses",
]

log = logging.getLogger(__name__)

SERVICE_TYPE = "_fynlo._tcp.local."
API_VERSION = "1"
API_PATH = "/v1"

AddressSource = Callable[[], Iterable[str]]
"""Returns the IPv4 addresses to announce now; called once per refresh."""

_LABEL_MAX = 63  # bytes in one DNS label (RFC 1035)
_RENAME_ROOM = 3  # bytes kept free for zeroconf's "-2" ... "-99" collision suffix
_TXT_ITEM_MAX = 255  # bytes in one TXT "key=value" string (RFC 6763 section 6.1)
_NAME_TXT_MAX = 200  # bytes of the site name kept in the TXT record
_ANY_HOSTS = frozenset({"", "0.0.0.0", "::"})


# -- names and addresses ------------------------------------------------------------------


def _cut_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` UTF-8 bytes, never inside a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")


def _clean_label(text: str) -> str:
    """``text`` with dots (zeroconf splits names on them) and control characters as spaces."""
    spaced = "".join(" " if ch == "." or not ch.isprintable() else ch for ch in text)
    return " ".join(spaced.split())


def instance_name(site_name: str, node_id: str) -> str:
    """The DNS-SD instance label: ``<site name> (<node id short>)``, at most 60 bytes."""
    suffix = f" ({_clean_label(node_id)[:8]})"
    budget = _LABEL_MAX - _RENAME_ROOM - len(suffix.encode("utf-8"))
    head = _cut_utf8(_clean_label(site_name) or "Fynlo edge", budget).rstrip()
    return head + suffix


def host_name(node_id: str) -> str:
    """The edge's mDNS host name, ``fynlo-<node id>.local.`` (letters, digits, hyphens)."""
    label = re.sub(r"[^a-z0-9]+", "-", node_id.lower()).strip("-")[: _LABEL_MAX - 6] or "edge"
    return f"fynlo-{label.rstrip('-')}.local."


def _ipv4(text: str) -> ipaddress.IPv4Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address if isinstance(address, ipaddress.IPv4Address) else None


def system_addresses(interfaces: Sequence[str] = ()) -> tuple[str, ...]:
    """IPv4 addresses of ``interfaces`` (names or addresses); if empty, every non-loopback one."""
    literal = [entry for entry in interfaces if _ipv4(entry) is not None]
    names = {entry for entry in interfaces if _ipv4(entry) is None}
    found: set[str] = set(literal)
    if names or not interfaces:
        for adapter in ifaddr.get_adapters():
            if interfaces and adapter.name not in names and adapter.nice_name not in names:
                continue
            for ip in adapter.ips:
                if not ip.is_IPv4 or not isinstance(ip.ip, str):
                    continue
                if not interfaces and ipaddress.IPv4Address(ip.ip).is_loopback:
                    continue
                found.add(ip.ip)
    return tuple(sorted(found, key=ipaddress.IPv4Address))


def _normalise(addresses: Iterable[str]) -> tuple[str, ...]:
    """Sorted, de-duplicated IPv4 addresses; anything else is refused."""
    out: set[ipaddress.IPv4Address] = set()
    for text in addresses:
        address = _ipv4(text)
        if address is None:
            raise ValueError(f"not an IPv4 address: {text!r}")
        out.add(address)
    return tuple(str(a) for a in sorted(out))


# -- the advertiser -----------------------------------------------------------------------


class Advertiser:
    """Announces one edge as a ``_fynlo._tcp`` service and keeps its addresses current."""

    def __init__(
        self,
        *,
        site_id: str,
        site_name: str,
        node_id: str,
        port: int,
        api_version: str = API_VERSION,
        path: str = API_PATH,
        interfaces: Sequence[str] = (),
        addresses: AddressSource | None = None,
        refresh_s: float = 30.0,
    ) -> None:
        if not site_id or not node_id:
            raise ValueError("mDNS needs a site id and a node id")
        if not 1 <= port <= 65535:
            raise ValueError(f"mDNS needs the edge's real port (1-65535), got {port}")
        if not path.startswith("/"):
            raise ValueError(f"the API path must start with '/', got {path!r}")
        if refresh_s <= 0:
            raise ValueError("refresh_s must be positive")
        for entry in interfaces:
            if not entry.strip() or (":" in entry and _ipv4(entry) is None):
                raise ValueError(f"interface {entry!r}: give a name or an IPv4 address")
        self._txt: dict[str, str] = {
            "site": site_id,
            "name": _cut_utf8(site_name, _NAME_TXT_MAX),
            "node": node_id,
            "api": api_version,
            "path": path,
        }
        for key, value in self._txt.items():
            if len(f"{key}={value}".encode()) > _TXT_ITEM_MAX:
                raise ValueError(f"mDNS TXT value {key!r} is longer than {_TXT_ITEM_MAX} bytes")
        self._name = f"{instance_name(site_name, node_id)}.{SERVICE_TYPE}"
        self._host = host_name(node_id)
        self._port = port
        self._interfaces = tuple(interfaces)
        self._source: AddressSource = addresses or (lambda: system_addresses(self._interfaces))
        self._refresh_s = refresh_s
        self._zc: AsyncZeroconf | None = None
        self._bound: list[str] = []
        self._info: ServiceInfo | None = None
        self._addresses: tuple[str, ...] = ()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._broadcasts: set[asyncio.Future[object]] = set()

    @property
    def instance_name(self) -> str:
        """The full service name announced (after any collision rename)."""
        return self._name

    @property
    def addresses(self) -> tuple[str, ...]:
        """The addresses announced now; empty while withdrawn or stopped."""
        return self._addresses

    @property
    def registered(self) -> bool:
        """Whether the service is announced right now."""
        return self._info is not None

    async def start(self) -> None:
        """Open the mDNS sockets, register the service and start watching the addresses."""
        if self._zc is not None:
            raise RuntimeError("the advertiser is already running")
        if self._interfaces:
            self._bound = list(system_addresses(self._interfaces))
            self._zc = AsyncZeroconf(interfaces=self._bound)
        else:
            self._zc = AsyncZeroconf(interfaces=InterfaceChoice.All)
        try:
            await self.refresh()
        except BaseException:
            zc, self._zc = self._zc, None
            await zc.async_close()
            raise
        self._task = asyncio.create_task(self._refresh_forever(), name="fynlo-mdns-refresh")

    async def refresh(self) -> bool:
        """Re-read the addresses; republish if they changed (True). No-op when not running."""
        async with self._lock:
            zc = self._zc
            if zc is None:
                return False
            addresses = _normalise(self._source())
            changed = addresses != self._addresses
            # Sockets first, so that a (re-)registration probes on the interfaces as they are.
            await self._rebind(zc, changed)
            if changed:
                await self._publish(zc, addresses)
            return changed

    async def stop(self) -> None:
        """Withdraw the service (goodbye packets) and close the sockets; safe to repeat."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        async with self._lock:
            zc, self._zc = self._zc, None
            if zc is not None:
                try:
                    await self._publish(zc, ())
                finally:
                    await zc.async_close()
        if task is not None and not task.cancelled() and task.exception() is not None:
            raise RuntimeError("the mDNS refresh task had failed") from task.exception()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- internals ------------------------------------------------------------------------

    def _service_info(self, addresses: tuple[str, ...]) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            self._name,
            port=self._port,
            properties=dict(self._txt),
            server=self._host,
            parsed_addresses=list(addresses),
        )

    def _track(self, broadcast: Awaitable[object]) -> None:
        """Keep a reference to zeroconf's announcement task until it ends."""
        future = asyncio.ensure_future(broadcast)
        self._broadcasts.add(future)
        future.add_done_callback(self._broadcasts.discard)

    async def _publish(self, zc: AsyncZeroconf, addresses: tuple[str, ...]) -> None:
        """Register, update or withdraw the service so that it announces ``addresses``."""
        # An announcement still being repeated must not go out after a newer record (or
        # after the goodbye), or browsers would see the old state again.
        for future in list(self._broadcasts):
            future.cancel()
        if not addresses:
            if self._info is not None:
                goodbye = await zc.async_unregister_service(self._info)
                self._info = None
                await goodbye
                log.info("mDNS: withdrew %s", self._name)
        elif self._info is None:
            info = self._service_info(addresses)
            self._track(await zc.async_register_service(info, allow_name_change=True))
            self._info, self._name = info, info.name  # probing may have renamed it
            log.info("mDNS: announced %s at %s port %d", self._name, addresses, self._port)
        else:
            info = self._service_info(addresses)
            self._track(await zc.async_update_service(info))
            self._info = info
            log.info("mDNS: %s moved to %s", self._name, addresses)
        self._addresses = addresses

    async def _rebind(self, zc: AsyncZeroconf, addresses_changed: bool) -> None:
        """Move zeroconf's sockets to the interfaces' current addresses, if they moved."""
        if not self._interfaces:
            if addresses_changed:  # InterfaceChoice.All: let zeroconf rescan the adapters
                await zc.async_update_interfaces()
            return
        bound = list(system_addresses(self._interfaces))
        if bound and bound != self._bound:
            await zc.async_update_interfaces(bound)
            self._bound = bound

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)  # a timer, not a wait for an event
            try:
                await self.refresh()
            except OSError as exc:
                log.warning("mDNS: could not re-read or re-announce addresses (retrying): %s", exc)


# -- the edge app's resource --------------------------------------------------------------

MDNS_KEY = web.AppKey("mdns", Advertiser)


def advertiser_for(config: EdgeConfig) -> Advertiser:
    """The advertiser for the edge that ``config`` describes (``[mdns]`` settings)."""
    settings = config.mdns
    interfaces = settings.interfaces
    if not interfaces and config.host not in _ANY_HOSTS and _ipv4(config.host) is not None:
        interfaces = (config.host,)  # the server listens on one address: announce only that
    return Advertiser(
        site_id=config.site_id,
        site_name=settings.name or f"Fynlo {config.site_id}",
        node_id=config.effective_node_id,
        port=config.port,
        interfaces=interfaces,
        refresh_s=settings.refresh_s,
    )


def mdns_ctx(config: EdgeConfig) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry that advertises the edge while the app runs."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        if not config.mdns.enabled:
            yield
            return
        if config.port == 0:
            log.warning("mDNS: not advertising, the edge's port is chosen at random (port = 0)")
            yield
            return
        advertiser = advertiser_for(config)
        try:
            await advertiser.start()
        except (OSError, NotRunningException) as exc:
            # Selling goes on without discovery: tablets that know the address still work.
            log.error("mDNS: cannot advertise this edge, tablets will not find it: %s", exc)
            yield
            return
        app[MDNS_KEY] = advertiser
        try:
            yield
        finally:
            await advertiser.stop()

    return ctx
