"""mDNS between real processes: an edge is found, follows its address, and says goodbye.

How it works: every party is its own process, exchanging real mDNS packets. The network is
the loopback interface when the kernel loops multicast over 127.0.0.1 (probed first), or
else a veth pair between two network namespaces that the test creates (needs root); with
neither the test is skipped, saying why. ``FYNLO_TEST_MDNS_NET=loopback|netns`` forces one.
Nothing is ever sent on the machine's other interfaces: every process binds to the test's
own addresses. Each process gets an address of its own, as separate hosts on a LAN have:
mDNS answers some questions (QU, and probes) by unicast to the asker's address and port
5353, and processes sharing one address would receive each other's answers.

This module is also the helper program those processes run:
``python -m tests.test_mdns advertise ...`` runs an ``Advertiser`` whose address source is a
list that stdin commands change (``addr A[,B]``, then ``stop``); ``python -m tests.test_mdns
watch ...`` is a long-lived browser (a tablet) printing ``added|updated ADDRS NAME`` and
``removed NAME``. The discovery client is the real ``python -m edge.discover``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import queue
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest
from aiohttp import web

from edge.config import EdgeConfig, MdnsSettings, load_edge_config
from edge.discover import EXIT_NONE_FOUND, Found
from edge.mdns import (
    MDNS_KEY,
    SERVICE_TYPE,
    Advertiser,
    advertiser_for,
    host_name,
    instance_name,
    mdns_ctx,
)

ROOT = Path(__file__).resolve().parent.parent
MDNS_GROUP = "224.0.0.251"
PORT = 8471


# -- the network the processes share --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Net:
    """Where the advertiser and the clients run, and the addresses they use."""

    how: str
    server_prefix: tuple[str, ...]  # command prefix that runs a program on the edges' side
    client_prefix: tuple[str, ...]  # ... and on the tablets' side
    edge: str  # the edge's address: its mDNS sockets use it and it announces it first
    moved: str  # the address the edge moves to
    twin: str  # a second edge's address
    tablet: str  # a long-lived browser's address
    client: str  # the discovery client's address


LOOPBACK = Net("loopback", (), (), "127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def loopback_multicast_works(sender: str, receiver: str) -> bool:
    """Whether a multicast datagram sent out of ``sender`` reaches a member on ``receiver``."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("", 0))
        membership = socket.inet_aton(MDNS_GROUP) + socket.inet_aton(receiver)
        rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
        rx.settimeout(1.0)
        tx.bind((sender, 0))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(sender))
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        token = secrets.token_bytes(8)
        tx.sendto(token, (MDNS_GROUP, rx.getsockname()[1]))
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if rx.recv(64) == token:
                return True
        return False
    except OSError:
        return False
    finally:
        rx.close()
        tx.close()


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=10)


@dataclass
class _Namespaces:
    names: tuple[str, str]
    veth: tuple[str, str]

    def create(self) -> None:
        for ns in self.names:
            _ip("netns", "add", ns)
        _ip("link", "add", self.veth[0], "type", "veth", "peer", "name", self.veth[1])
        sides = (("198.18.47.1", "198.18.47.2", "198.18.47.3"), ("198.18.47.4", "198.18.47.5"))
        for ns, dev, addresses in zip(self.names, self.veth, sides, strict=True):
            _ip("link", "set", dev, "netns", ns)
            for address in addresses:
                _ip("-n", ns, "addr", "add", f"{address}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def delete(self) -> None:
        for ns in self.names:  # deleting a namespace deletes its end of the veth pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


def _netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    return None


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    """Loopback when it carries multicast, else a veth pair between two namespaces."""
    choice = os.environ.get("FYNLO_TEST_MDNS_NET", "auto")
    if choice in ("auto", "loopback") and loopback_multicast_works(LOOPBACK.edge, LOOPBACK.client):
        yield LOOPBACK
        return
    if choice == "loopback":
        pytest.fail("FYNLO_TEST_MDNS_NET=loopback but multicast over 127.0.0.0/8 does not work")
    reason = _netns_unavailable()
    if reason is not None:
        pytest.skip(f"multicast does not work over loopback here, and no netns pair: {reason}")
    tag = f"{os.getpid() % 10_000_000}"
    spaces = _Namespaces((f"fynlo-mdns-e{tag}", f"fynlo-mdns-t{tag}"), (f"fyme{tag}", f"fymt{tag}"))
    try:
        spaces.create()
    except subprocess.CalledProcessError as exc:
        spaces.delete()
        pytest.skip(f"multicast does not work over loopback and netns failed: {exc.stderr}")
    try:
        yield Net(
            "netns",
            ("ip", "netns", "exec", spaces.names[0]),
            ("ip", "netns", "exec", spaces.names[1]),
            *("198.18.47.1", "198.18.47.2", "198.18.47.3", "198.18.47.4", "198.18.47.5"),
        )
    finally:
        spaces.delete()


# -- processes ----------------------------------------------------------------------------


class Proc:
    """A helper process whose output lines are awaited with a deadline."""

    def __init__(self, argv: Sequence[str]) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        assert self.popen.stdout is not None
        threading.Thread(target=self._pump, args=(self.popen.stdout,), daemon=True).start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def send(self, line: str) -> None:
        """Write one command line to the process."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(line + "\n")
        self.popen.stdin.flush()

    def expect(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """The first output line matching ``pattern``, waiting up to ``timeout`` s for it."""
        for line in self.lines:  # lines already read count too
            if match := re.search(pattern, line):
                return match
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                got = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if got is None:
                self._fail(f"exited ({self.popen.wait()}) before printing /{pattern}/")
            self.lines.append(got)
            if match := re.search(pattern, got):
                return match
        self._fail(f"printed no line matching /{pattern}/ in {timeout} s")

    def _fail(self, why: str) -> NoReturn:
        self._stderr.seek(0)
        pytest.fail(
            f"{' '.join(self.argv)}\n{why}\nstdout:\n"
            + "\n".join(self.lines)
            + f"\nstderr:\n{self._stderr.read()[-4000:]}",
            pytrace=False,
        )

    def close(self) -> None:
        """End the process if it is still running."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                stream.close()
        self._stderr.close()


def helper(prefix: Sequence[str], *args: str) -> Proc:
    """Start this module as a helper program, in the network of ``prefix``."""
    return Proc([*prefix, sys.executable, "-m", "tests.test_mdns", *args])


def advertise(net: Net, address: str, *, site: str, node: str) -> Proc:
    """Start an edge advertiser on the edges' side, bound to and announcing ``address``."""
    return helper(
        net.server_prefix,
        "advertise",
        *("--site", site, "--name", "Trattoria Test", "--node", node, "--port", str(PORT)),
        *("--interface", address, "--address", address),
    )


def run_discover(net: Net, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m edge.discover`` on the tablets' side."""
    argv = [*net.client_prefix, sys.executable, "-m", "edge.discover"]
    argv += ["--interface", net.client, *args]
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)


def discovered(result: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The edges a ``--json`` discovery printed (it must have exited 0)."""
    assert result.returncode == 0, f"discover exited {result.returncode}: {result.stderr}"
    edges: list[dict[str, Any]] = json.loads(result.stdout)
    return edges


# -- the test -----------------------------------------------------------------------------


def test_edge_is_discovered_follows_its_address_and_says_goodbye(net: Net) -> None:
    site = f"site-{secrets.token_hex(4)}"
    node = f"node{secrets.token_hex(4)}"  # 12 characters: only the first 8 name the instance
    tablet = helper(net.client_prefix, "watch", "--interface", net.tablet)
    edge = advertise(net, net.edge, site=site, node=node)
    twin: Proc | None = None
    try:
        name = edge.expect(r"^registered (.+)$").group(1)
        assert name == f"Trattoria Test ({node[:8]}).{SERVICE_TYPE}"
        # A second edge whose instance name would be the same (same site name, same node id
        # prefix) probes, finds the name taken and registers under the next one. It runs
        # while the steps below do.
        twin = advertise(net, net.twin, site=f"{site}-twin", node=f"{node}-twin")

        # 1. A discovery client in another process finds the edge of its site and its URL.
        edges = discovered(run_discover(net, "--json", "--site", site, "--timeout", "1.5"))
        assert [(e["site"], e["name"], e["node"], e["url"]) for e in edges] == [
            (site, "Trattoria Test", node, f"http://{net.edge}:{PORT}/v1")
        ]
        assert edges[0]["api"] == "1" and edges[0]["host"] == host_name(node)
        tablet.expect(rf"^added {re.escape(net.edge)} {re.escape(name)}$")

        # 2. The machine's address changes: the advertiser's own periodic re-read notices it,
        # a fresh discovery sees the new address, and the live browser hears the update.
        edge.send(f"addr {net.moved}")
        deadline = time.monotonic() + 10
        while True:
            edges = discovered(run_discover(net, "--json", "--site", site, "--first"))
            if edges[0]["addresses"] == [net.moved]:
                break
            assert time.monotonic() < deadline, f"still announced at {edges[0]['addresses']}"
        assert edges[0]["url"] == f"http://{net.moved}:{PORT}/v1"
        tablet.expect(rf"^updated \S*{re.escape(net.moved)}\S* {re.escape(name)}$")

        twin_name = twin.expect(r"^registered (.+)$").group(1)
        assert twin_name == f"Trattoria Test ({node[:8]})-2.{SERVICE_TYPE}"
        tablet.expect(rf"^added {re.escape(net.twin)} {re.escape(twin_name)}$")

        # 3. Stop: goodbye packets make the live browser drop the edge now, not after the
        # records' TTL (120 s for the address and SRV, 75 min for the PTR).
        edge.send("stop")
        edge.expect(r"^stopped$")
        assert edge.popen.wait(timeout=10) == 0
        tablet.expect(rf"^removed {re.escape(name)}$", timeout=5)

        # 4. A fresh discovery now finds nothing and says so with its own exit code.
        result = run_discover(net, "--site", site, "--timeout", "0.5")
        assert result.returncode == EXIT_NONE_FOUND, result
        assert result.stdout == "" and "no Fynlo edge found for site" in result.stderr
    finally:
        for proc in (edge, tablet, twin):
            if proc is not None:
                proc.close()


# -- in-process parts ------------------------------------------------------------------


def test_instance_and_host_names_are_valid_dns_labels() -> None:
    assert instance_name("Trattoria Roma", "node-7") == "Trattoria Roma (node-7)"
    assert instance_name("St. John's\tBar", "n.1") == "St John's Bar (n 1)"
    assert instance_name("", "abcdefghijk") == "Fynlo edge (abcdefgh)"
    long = instance_name("Café " * 40, "node-7")
    assert len(long.encode()) <= 60 and long.endswith(" (node-7)")  # room left for "-NN"
    assert host_name("Node_7.A") == "fynlo-node-7-a.local."
    assert len(host_name("x" * 200).split(".")[0]) <= 63


def test_advertiser_refuses_what_it_cannot_announce() -> None:
    base: dict[str, Any] = {"site_id": "s", "site_name": "S", "node_id": "n", "port": PORT}
    Advertiser(**base)
    for bad in ({"port": 0}, {"site_id": ""}, {"path": "v1"}, {"refresh_s": 0},
                {"interfaces": ["fe80::1"]}, {"site_id": "s" * 300}):  # fmt: skip
        with pytest.raises(ValueError):
            Advertiser(**(base | bad))


def test_advertiser_follows_the_config() -> None:
    config = EdgeConfig(site_id="s1", node_id="n1", host="0.0.0.0", port=9000)
    advertiser = advertiser_for(config)
    assert advertiser.instance_name == f"Fynlo s1 (n1).{SERVICE_TYPE}"
    assert advertiser._interfaces == ()  # every non-loopback interface
    pinned = EdgeConfig(site_id="s1", node_id="n1", host="10.1.2.3", mdns=MdnsSettings(name="Bar"))
    assert advertiser_for(pinned)._interfaces == ("10.1.2.3",)
    assert advertiser_for(pinned).instance_name == f"Bar (n1).{SERVICE_TYPE}"


def test_mdns_ctx_advertises_while_the_app_runs() -> None:
    async def run(config: EdgeConfig) -> tuple[bool, tuple[str, ...], bool]:
        app = web.Application()
        app.cleanup_ctx.append(mdns_ctx(config))
        runner = web.AppRunner(app)
        await runner.setup()  # runs the cleanup_ctx start-up half
        advertiser = app.get(MDNS_KEY)
        try:
            if advertiser is None:
                return False, (), False
            return advertiser.registered, advertiser.addresses, True
        finally:
            await runner.cleanup()
            assert advertiser is None or not advertiser.registered

    on = EdgeConfig(site_id="s1", node_id="n1", mdns=MdnsSettings(interfaces=("127.0.0.1",)))
    assert asyncio.run(run(on)) == (True, ("127.0.0.1",), True)
    off = EdgeConfig(site_id="s1", node_id="n1", mdns=MdnsSettings(enabled=False))
    assert asyncio.run(run(off)) == (False, (), False)
    assert asyncio.run(run(dataclasses.replace(on, port=0))) == (False, (), False)


def test_mdns_settings_load_from_toml_and_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "edge.toml"
    path.write_text('[mdns]\nname = "Bar"\ninterfaces = ["eth0"]\n', encoding="utf-8")
    monkeypatch.setenv("FYNLO_EDGE_MDNS_REFRESH_S", "5")
    monkeypatch.setenv("FYNLO_EDGE_MDNS_INTERFACES", "eth0, wlan0")
    config = load_edge_config(path)
    assert config.mdns == MdnsSettings(True, "Bar", ("eth0", "wlan0"), 5.0)
    with pytest.raises(ValueError):
        MdnsSettings(refresh_s=0)


def test_found_builds_urls_and_refuses_unreachable_edges() -> None:
    edge = Found("Bar (n1)", "s1", "Bar", "n1", "1", "/v1", "fynlo-n1.local.", PORT,
                 ("192.0.2.7", "fd00::7"))  # fmt: skip
    assert edge.urls == (f"http://192.0.2.7:{PORT}/v1", f"http://[fd00::7]:{PORT}/v1")
    assert edge.to_dict()["url"] == edge.url and edge.to_dict()["addresses"] == list(edge.addresses)
    with pytest.raises(ValueError):
        Found("Bar", "s1", "Bar", "n1", "1", "/v1", "h.local.", PORT, ())


# -- the helper program -------------------------------------------------------------------


async def _advertise(args: argparse.Namespace) -> None:
    current: list[str] = [args.address]
    advertiser = Advertiser(
        site_id=args.site,
        site_name=args.name,
        node_id=args.node,
        port=args.port,
        interfaces=[args.interface],
        addresses=lambda: current,
        refresh_s=0.1,
    )
    await advertiser.start()
    print("registered", advertiser.instance_name, flush=True)
    loop = asyncio.get_running_loop()
    while True:
        command, _, arg = (await loop.run_in_executor(None, sys.stdin.readline)).partition(" ")
        if command != "addr":
            break  # "stop", or the test went away
        current[:] = arg.strip().split(",")
    await advertiser.stop()
    print("stopped", flush=True)


async def _watch(args: argparse.Namespace) -> None:
    from zeroconf import ServiceStateChange, Zeroconf
    from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()
    async with AsyncZeroconf(interfaces=[args.interface]) as aiozc:

        async def report(name: str, change: ServiceStateChange) -> None:
            info = AsyncServiceInfo(SERVICE_TYPE, name)
            await info.async_request(aiozc.zeroconf, 3000)
            print(change.name.lower(), ",".join(info.parsed_addresses()), name, flush=True)

        def on_change(
            zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
        ) -> None:
            if state_change is ServiceStateChange.Removed:
                print("removed", name, flush=True)
                return
            task = loop.create_task(report(name, state_change))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        async with AsyncServiceBrowser(aiozc.zeroconf, SERVICE_TYPE, handlers=[on_change]):
            await loop.run_in_executor(None, sys.stdin.read)  # until the test closes stdin


def _helper_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.test_mdns")
    sub = parser.add_subparsers(dest="role", required=True)
    adv = sub.add_parser("advertise")
    for flag in ("--site", "--name", "--node", "--interface", "--address"):
        adv.add_argument(flag, required=True)
    adv.add_argument("--port", type=int, required=True)
    watch = sub.add_parser("watch")
    watch.add_argument("--interface", required=True)
    args = parser.parse_args(argv)
    asyncio.run(_advertise(args) if args.role == "advertise" else _watch(args))


if __name__ == "__main__":
    _helper_main(sys.argv[1:])
