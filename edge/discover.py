"""Find Fynlo edges on the LAN by mDNS: ``python -m edge.discover`` or ``await discover()``.

How it works: a zeroconf browser asks for ``_fynlo._tcp.local.`` services (see
``edge.mdns`` for the records an edge announces). Each instance that appears or changes is
resolved (SRV for host and port, TXT for site, name, node, api and path, A for the
addresses) into a ``Found``; instances whose TXT names another site are skipped, and an
instance that says goodbye is dropped. After ``timeout`` seconds, or at the first match
when ``first`` is set, browsing stops and the edges found are returned, sorted.

The command prints one line per edge, ``http://ADDR:PORT/PATH  site=...  name=...``, or a
JSON array with ``--json``. Exit codes: 0 an edge was found, 1 mDNS could not be used
(socket error), 2 bad arguments, 3 no edge found in time.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from zeroconf import InterfaceChoice, NotRunningException, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .mdns import SERVICE_TYPE, system_addresses

__all__ = ["EXIT_ERROR", "EXIT_FOUND", "EXIT_NONE_FOUND", "Found", "discover", "main"]

EXIT_FOUND = 0
EXIT_ERROR = 1
EXIT_NONE_FOUND = 3


@dataclass(frozen=True, slots=True)
class Found:
    """One edge seen on the network, as its mDNS records describe it."""

    instance: str  # DNS-SD instance name, without the service type
    site: str
    name: str
    node: str
    api: str
    path: str  # API base path, starts with "/"
    host: str  # mDNS host name from the SRV record
    port: int
    addresses: tuple[str, ...]  # IPv4 first, then IPv6

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"bad port {self.port}")
        if not self.path.startswith("/"):
            raise ValueError(f"bad API path {self.path!r}")
        if not self.addresses:
            raise ValueError("an edge without an address cannot be reached")
        for address in self.addresses:
            ipaddress.ip_address(address)

    @property
    def urls(self) -> tuple[str, ...]:
        """The API base URL at each address, ``http://ADDR:PORT/PATH``."""
        return tuple(
            f"http://{f'[{a}]' if ':' in a else a}:{self.port}{self.path}" for a in self.addresses
        )

    @property
    def url(self) -> str:
        """The API base URL at the first address."""
        return self.urls[0]

    def to_dict(self) -> dict[str, Any]:
        """This edge as a JSON-ready dict, with its URLs."""
        fields = asdict(self)
        fields["addresses"] = list(self.addresses)
        return {"url": self.url, "urls": list(self.urls), **fields}

    @classmethod
    def from_info(cls, info: AsyncServiceInfo) -> Found | None:
        """The edge a resolved service describes, or None if its records are unusable."""
        txt = info.decoded_properties
        site = txt.get("site")
        if not site or info.port is None or info.server is None:
            return None
        suffix = "." + SERVICE_TYPE
        instance = info.name[: -len(suffix)] if info.name.endswith(suffix) else info.name
        addresses = tuple(info.parsed_addresses())
        try:
            return cls(
                instance=instance,
                site=site,
                name=txt.get("name") or instance,
                node=txt.get("node") or "",
                api=txt.get("api") or "",
                path=txt.get("path") or "/",
                host=info.server,
                port=info.port,
                addresses=tuple(sorted(addresses, key=lambda a: ":" in a)),
            )
        except ValueError:
            return None


def _interfaces(interfaces: Sequence[str]) -> list[str] | InterfaceChoice:
    if not interfaces:
        return InterfaceChoice.All
    return list(system_addresses(interfaces))


async def discover(
    timeout: float = 3.0,  # noqa: ASYNC109 - how long to listen, not a deadline to enforce
    site: str | None = None,
    *,
    first: bool = False,
    interfaces: Sequence[str] = (),
) -> list[Found]:
    """Browse for edges (of ``site``) for ``timeout`` seconds, or until the first if ``first``."""
    if timeout <= 0:
        raise ValueError("timeout must be positive")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    found: dict[str, Found] = {}
    resolving: dict[str, asyncio.Task[None]] = {}
    matched = asyncio.Event()
    aiozc = AsyncZeroconf(interfaces=_interfaces(interfaces))

    async def resolve(name: str) -> None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        remaining_ms = max(0.0, deadline - loop.time()) * 1000
        if not await info.async_request(aiozc.zeroconf, remaining_ms):
            return
        edge = Found.from_info(info)
        if edge is not None and (site is None or edge.site == site):
            found[name] = edge
            if first:
                matched.set()

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        previous = resolving.pop(name, None)
        if previous is not None:
            previous.cancel()
        if state_change is ServiceStateChange.Removed:
            found.pop(name, None)
            return
        resolving[name] = loop.create_task(resolve(name))

    try:
        browser = AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change])
        try:
            async with asyncio.timeout_at(deadline):
                await matched.wait()
        except TimeoutError:
            pass
        finally:
            await browser.async_cancel()
            tasks = list(resolving.values())
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
        errors = [task.exception() for task in tasks if not task.cancelled()]
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise error
    finally:
        await aiozc.async_close()
    return sorted(found.values(), key=lambda e: (e.site, e.name, e.instance))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fynlo-discover",
        description="Find Fynlo edge servers on this network (mDNS service _fynlo._tcp).",
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to listen (default: 3)")
    parser.add_argument("--site", help="only edges of this site id")
    parser.add_argument("--first", action="store_true", help="stop at the first edge found")
    parser.add_argument("--json", action="store_true", help="print a JSON array")
    parser.add_argument(
        "--interface",
        action="append",
        default=[],
        metavar="NAME_OR_ADDR",
        help="browse only on this interface (name or IPv4 address); repeatable; default: all",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fynlo-discover`` / ``python -m edge.discover``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.interface and not system_addresses(args.interface):
        parser.error(f"no IPv4 address on --interface {', '.join(args.interface)}")
    try:
        edges = asyncio.run(
            discover(args.timeout, args.site, first=args.first, interfaces=args.interface)
        )
    except (OSError, NotRunningException) as exc:
        print(f"fynlo-discover: cannot browse by mDNS: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps([edge.to_dict() for edge in edges], indent=2))
    else:
        for edge in edges:
            print(f"{edge.url}  site={edge.site}  name={edge.name}  node={edge.node}")
    if not edges:
        which = f" for site {args.site!r}" if args.site else ""
        print(
            f"fynlo-discover: no Fynlo edge found{which} in {args.timeout:g} s; check that the "
            "edge runs with [mdns] enabled = true and that this device is on the same network",
            file=sys.stderr,
        )
        return EXIT_NONE_FOUND
    return EXIT_FOUND


if __name__ == "__main__":
    sys.exit(main())
