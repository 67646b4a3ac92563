"""Edge API benchmark: a real edge process, loaded from a separate process, against baselines.

Run ``.venv/bin/python bench/edge_api.py`` (``--quick`` for a smoke run, ``--help`` for options).

Set-up. A fresh SQLite file is prepared through the edge's own store (a manager, a paired
tablet and its session, a small menu; synchronous = FULL, the default), then the edge runs as
``python -m edge run`` (no cloud, no mDNS) on a free port. Loads come from
``bench/edgelib/load.py``, a second process, so client and server do not share an event loop
(they do share the machine's 2 cores, as the baselines do).

What is measured.

(a) API: ``--conns`` (64) keep-alive connections, each opening an order and adding lines to it
    back to back (a new order every 25 lines) for ``--seconds``: line adds per second and
    their latency p50/p99 (request sent → answer read). Baseline, same client, same
    connections: a plain aiohttp app answering ``GET /item`` with one SQLite read.
(a') the same at steady offered rates (``--paced-rates``, default 250, 500, 1000 and 1500
    requests/s, ``--paced-seconds`` 5 each), open-loop: the 64 connections share a schedule and
    each latency runs from the request's scheduled time, so a server that falls behind pays
    for the wait it causes. This is the latency a tablet sees below saturation, and the rate
    at which it breaks down. Run after (b), so that (b) and its RSS figure are unchanged.
(b) live: ``--clients`` (2000) WebSocket clients subscribed to the kitchen station, while a
    ticket is fired every ``--interval`` s (``--fires`` times): per client and ticket, the time
    from the ticket's commit (its ``fired_at_ms``, stamped in the transaction) to its bytes
    arriving at the client. The clients are ``edgelib/wsclient.py`` sockets, which stamp each
    message as it arrives and parse after the run: 2,000 full aiohttp clients in one process
    stamp the last copy of a message 50-100 ms late through their own work. Baseline, same
    clients: a bare aiohttp broadcast of one message to as many sockets.
(c) the edge's peak RSS during (b), sampled from ``/proc`` every 50 ms.

The last line of output is one JSON object: ``api_rps``, ``api_p50_ms``, ``api_p99_ms``,
``ws_clients``, ``ws_p50_ms``, ``ws_p99_ms``, ``edge_rss_mb``, ``api_paced`` (per offered
rate: line adds/s achieved, p50, p99) and ``api_paced_max_rate_p99_within_target``, the
baselines, the targets and whether each is met (the targets judge the closed-loop figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.edgelib.baseline import make_db  # noqa: E402
from bench.probe import cpu_slow_windows, describe  # noqa: E402
from cloud.pgtemp import free_port  # noqa: E402
from edge.api.auth import pair_device, start_session  # noqa: E402
from edge.store import EdgeStore  # noqa: E402
from edge.tx import Tx  # noqa: E402
from shared.registry import default_registry  # noqa: E402
from sync_protocol.changes import Op  # noqa: E402

TARGETS = {"api_rps": 1500, "api_p99_ms": 25, "ws_clients": 2000, "ws_p99_ms": 50,
           "edge_rss_mb": 250}  # fmt: skip
LOAD = ROOT / "bench" / "edgelib" / "load.py"
BASELINE = ROOT / "bench" / "edgelib" / "baseline.py"
SITE, NODE = "bench-site", "bench-edge"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (nearest rank) of ``values``, rounded to 0.01."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def seed(db: Path) -> dict[str, str]:
    """A manager, a tablet with her session, a kitchen screen, a menu; returns credentials."""
    store = await EdgeStore.open(db, default_registry(), SITE, NODE)
    try:
        await store.write_many(
            [
                ("employees", "mia", Op.INSERT, {"name": "Mia", "role_id": "manager"}),
                ("menu_categories", "mains", Op.INSERT, {"name": "Mains"}),
                ("menu_items", "soup", Op.INSERT,
                 {"name": "Soup", "price_pence": 450, "category_id": "mains"}),
            ]
        )  # fmt: skip

        def devices(tx: Tx) -> dict[str, str]:
            tablet_id, tablet = pair_device(tx, "bench tablet", "tablet", None)
            _, kds = pair_device(tx, "bench kds", "kds", None)
            _, access, _, _ = start_session(tx, "mia", tablet_id)
            return {"tablet": tablet, "kds": kds, "access": access}

        return await store.transaction(devices)
    finally:
        await store.close()


class Process:
    """A child process in its own session, stopped (and waited for) at exit."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        with log.open("wb") as out:  # a file, not a pipe: a full pipe would stall the server
            self.proc = subprocess.Popen(
                args, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, cwd=ROOT,
            )  # fmt: skip

    def stop(self) -> None:
        """Terminate and reap."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def rss_mb(self) -> float:
        """Resident memory now (0 when gone)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0


async def wait_http(url: str, server: Process, timeout_s: float = 30.0) -> None:
    """Until ``url`` answers (an error with the server's output if it exits first)."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    await resp.read()
                    return
            except aiohttp.ClientError:
                if server.proc.poll() is not None:
                    tail = server.log.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"the server exited: {tail}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer within {timeout_s}s") from None
                await asyncio.sleep(0.1)


async def load(*args: str) -> dict[str, Any]:
    """Run the load generator with ``args``; its JSON result.

    The result (hundreds of kilobytes for the live phase) comes back in a file, not through
    a pipe: one run's piped result once arrived with a line break in it.
    """
    with tempfile.TemporaryDirectory(prefix="fynlo-load-") as tmp:
        out = Path(tmp) / "result.json"
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(LOAD), *args, "--out", str(out),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
        result: dict[str, Any] = json.loads(out.read_bytes())
    return result


def api_figures(result: dict[str, Any]) -> dict[str, float]:
    """Rate and latency of a ``http`` load."""
    lat = result["latencies_ms"]
    return {"rps": round(len(lat) / result["seconds"]), "p50_ms": percentile(lat, 0.5),
            "p99_ms": percentile(lat, 0.99), "errors": sum(result["errors"].values())}  # fmt: skip


def ws_figures(result: dict[str, Any]) -> dict[str, float]:
    """Delivery latency of a ``ws`` load."""
    lat = result["latencies_ms"]
    return {"clients": result["clients"], "delivered": result["delivered"],
            "missing": result["missing"], "p50_ms": percentile(lat, 0.5),
            "p99_ms": percentile(lat, 0.99), "max_ms": percentile(lat, 1.0)}  # fmt: skip


async def run(ns: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Every phase; the summary."""
    conns, seconds = str(ns.conns), str(ns.seconds)
    ws = ["--clients", str(ns.clients), "--fires", str(ns.fires), "--interval", str(ns.interval)]
    # -- baselines ------------------------------------------------------------------------
    db = workdir / "baseline.sqlite"
    make_db(db)
    port = free_port()
    server = Process(
        [sys.executable, str(BASELINE), "get", "--port", str(port), "--db", str(db)],
        workdir / "baseline-get.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/item?id=1", server)
        print(f"(a) baseline: GET + one SQLite read, {conns} connections, {seconds}s", flush=True)
        base_api = api_figures(await load("http", "--target", "baseline", "--url", url,
                                          "--conns", conns, "--seconds", seconds))  # fmt: skip
    finally:
        server.stop()
    port = free_port()
    server = Process(
        [sys.executable, str(BASELINE), "broadcast", "--port", str(port)],
        workdir / "baseline-broadcast.log",
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/fire", server)
        print(f"(b) baseline: bare broadcast to {ns.clients} sockets", flush=True)
        ws_url = url.replace("http", "ws") + "/ws"
        base_ws = ws_figures(
            await load("ws", "--target", "baseline", "--url", url, "--ws-url", ws_url, *ws)
        )
    finally:
        server.stop()
    # -- the edge -------------------------------------------------------------------------
    edge_db = workdir / "edge.sqlite"
    creds = await seed(edge_db)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FYNLO_EDGE_")}
    env |= {"FYNLO_EDGE_DB_PATH": str(edge_db), "FYNLO_EDGE_SITE_ID": SITE,
            "FYNLO_EDGE_NODE_ID": NODE, "FYNLO_EDGE_HOST": "127.0.0.1",
            "FYNLO_EDGE_PORT": str(port), "FYNLO_EDGE_MDNS_ENABLED": "false"}  # fmt: skip
    config = workdir / "edge.toml"
    config.write_text("# everything from FYNLO_EDGE_* variables\n")
    edge = Process(
        [sys.executable, "-m", "edge", "run", "--config", str(config)], workdir / "edge.log", env
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url + "/v1/sync/status", edge)
        headers = json.dumps({"X-Fynlo-Device": creds["tablet"],
                              "Authorization": f"Bearer {creds['access']}"})  # fmt: skip
        print(f"(a) edge: open orders and add lines, {conns} connections, {seconds}s", flush=True)
        api = api_figures(await load("http", "--target", "edge", "--url", url, "--headers",
                                     headers, "--conns", conns, "--seconds", seconds))  # fmt: skip
        print(f"(b) edge: {ns.clients} kitchen screens, a ticket every {ns.interval}s", flush=True)
        peak = 0.0
        sampling = True

        async def sample() -> None:
            nonlocal peak
            while sampling:
                peak = max(peak, edge.rss_mb())
                await asyncio.sleep(0.05)

        sampler = asyncio.ensure_future(sample())
        ws_url = url.replace("http", "ws") + f"/v1/live?device={creds['kds']}"
        live = ws_figures(await load("ws", "--target", "edge", "--url", url, "--ws-url", ws_url,
                                     "--headers", headers, *ws))  # fmt: skip
        sampling = False
        await sampler
        paced = []
        for rate in ns.paced_rates:
            print(f"(a') edge: requests at {rate:g}/s offered, {conns} connections,"
                  f" {ns.paced_seconds:g}s", flush=True)  # fmt: skip
            got = api_figures(await load("http", "--target", "edge", "--url", url, "--headers",
                                         headers, "--conns", conns, "--seconds",
                                         str(ns.paced_seconds), "--rate", str(rate)))  # fmt: skip
            paced.append({"offered_per_s": rate, "line_adds_per_s": got["rps"],
                          "p50_ms": got["p50_ms"], "p99_ms": got["p99_ms"],
                          "errors": got["errors"]})  # fmt: skip
    finally:
        edge.stop()
    figures: dict[str, Any] = {
        "api_rps": api["rps"], "api_p50_ms": api["p50_ms"], "api_p99_ms": api["p99_ms"],
        "api_errors": api["errors"], "ws_clients": live["clients"],
        "ws_delivered": live["delivered"], "ws_missing": live["missing"],
        "ws_p50_ms": live["p50_ms"], "ws_p99_ms": live["p99_ms"], "ws_max_ms": live["max_ms"],
        "edge_rss_mb": round(peak, 1),
        "api_paced": paced,
        "api_paced_max_rate_p99_within_target": max(
            (p["offered_per_s"] for p in paced if p["p99_ms"] <= TARGETS["api_p99_ms"]),
            default=None,
        ),
        "baseline_get_rps": base_api["rps"], "baseline_get_p99_ms": base_api["p99_ms"],
        "baseline_broadcast_p50_ms": base_ws["p50_ms"],
        "baseline_broadcast_p99_ms": base_ws["p99_ms"],
    }  # fmt: skip
    met = {
        "api_rps": figures["api_rps"] >= TARGETS["api_rps"],
        "api_p99_ms": figures["api_p99_ms"] <= TARGETS["api_p99_ms"],
        "ws_clients": figures["ws_clients"] >= TARGETS["ws_clients"] and live["missing"] == 0,
        "ws_p99_ms": figures["ws_p99_ms"] <= TARGETS["ws_p99_ms"],
        "edge_rss_mb": figures["edge_rss_mb"] <= TARGETS["edge_rss_mb"],
    }
    machine = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
               "sqlite": sqlite3.sqlite_version, "loadavg_at_end": os.getloadavg()}  # fmt: skip
    return {**figures, "targets": TARGETS, "targets_met": met, "machine": machine}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; the last line printed is the JSON summary."""
    parser = argparse.ArgumentParser(prog="bench/edge_api.py", description=__doc__.split("\n")[0])
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--fires", type=int)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument(
        "--paced-rates",
        help="comma-separated offered rates for the open-loop runs (default 250,500,1000,1500)",
    )
    parser.add_argument("--paced-seconds", type=float, help="length of each open-loop run (5)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: small and short")
    ns = parser.parse_args(argv)
    rates = ns.paced_rates or ("200" if ns.quick else "250,500,1000,1500")
    try:
        ns.paced_rates = [float(r) for r in rates.split(",") if r.strip()]
    except ValueError:
        parser.error("--paced-rates must be numbers separated by commas")
    if any(r <= 0 for r in ns.paced_rates):
        parser.error("--paced-rates must be positive")
    ns.paced_seconds = ns.paced_seconds or (2.0 if ns.quick else 5.0)
    ns.seconds = ns.seconds or (2.0 if ns.quick else 10.0)
    ns.clients = ns.clients or (100 if ns.quick else 2000)
    ns.fires = ns.fires or (4 if ns.quick else 20)
    workdir = Path(tempfile.mkdtemp(prefix="fynlo-edge-bench-"))
    # SIGTERM unwinds like Ctrl-C, so the servers started are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    print("probing the CPU for slow windows (bench/probe.py)…", flush=True)
    probe = cpu_slow_windows(2.0 if ns.quick else 5.0)
    try:
        summary = asyncio.run(run(ns, workdir))
        summary["machine"]["cpu_slow_windows"] = probe
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = [
        ("line adds (64 conns)", f"{summary['api_rps']}/s  p50 {summary['api_p50_ms']} ms  "
         f"p99 {summary['api_p99_ms']} ms", "api_rps", "api_p99_ms"),
        ("  baseline GET + read", f"{summary['baseline_get_rps']}/s  "
         f"p99 {summary['baseline_get_p99_ms']} ms", None, None),
        *((f"  at {p['offered_per_s']:g}/s offered", f"{p['line_adds_per_s']}/s  "
           f"p50 {p['p50_ms']} ms  p99 {p['p99_ms']} ms", None, None)
          for p in summary["api_paced"]),
        (f"tickets to {summary['ws_clients']} screens", f"p50 {summary['ws_p50_ms']} ms  "
         f"p99 {summary['ws_p99_ms']} ms  missing {summary['ws_missing']}", "ws_clients",
         "ws_p99_ms"),
        ("  baseline broadcast", f"p50 {summary['baseline_broadcast_p50_ms']} ms  "
         f"p99 {summary['baseline_broadcast_p99_ms']} ms", None, None),
        ("edge peak RSS", f"{summary['edge_rss_mb']} MB", "edge_rss_mb", None),
        ("CPU slow windows (probe)", describe(probe), None, None),
    ]  # fmt: skip
    print()
    for name, value, *keys in rows:
        verdicts = [f"{k}: {'met' if summary['targets_met'][k] else 'NOT met'}" for k in keys if k]
        print(f"{name:<26} {value:<48} {'; '.join(verdicts)}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
