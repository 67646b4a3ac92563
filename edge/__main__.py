"""The ``fynlo-edge`` command: run the edge server, show its sync status, set up its first staff.

A fresh edge has no device and, until the cloud sends them, no employee. A manager bootstraps
it from the machine itself: ``add-employee`` (with the edge stopped: it writes a synced row,
and a running edge numbers its changes in memory) then ``pair``, which prints a pairing code
to type on the first tablet (it writes only the edge's own table, so the edge may be running).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import getpass
import json
import logging
import re
import sys
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import aiohttp
from aiohttp import web

from shared.config import ConfigError
from shared.eventloop import new_event_loop
from shared.registry import default_registry

from .api import audit
from .api.errors import ApiError
from .api.people import (
    DEVICE_KINDS,
    ID_PATTERN,
    PIN_PATTERN,
    add_employee,
    create_pairing_code,
    hash_pin,
)
from .app import access_log_options, create_app, status_body
from .config import DEFAULT_PATH, EdgeConfig, load_edge_config
from .errors import EdgeError
from .store import EdgeStore, status_from_file, wall_clock_ms
from .tx import Tx


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fynlo-edge", description="Fynlo edge server.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the edge server and its sync daemon")
    run.add_argument("--config", default=DEFAULT_PATH, help="TOML config file (edge.toml)")
    status = sub.add_parser("status", help="show sync status (from the running edge, or its file)")
    status.add_argument("--config", default=DEFAULT_PATH, help="TOML config file (edge.toml)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    pair = sub.add_parser("pair", help="print a single-use pairing code for a new device")
    pair.add_argument("--config", default=DEFAULT_PATH, help="TOML config file (edge.toml)")
    pair.add_argument("--name", default="", help="the device it is for (a reminder only)")
    pair.add_argument("--kind", choices=DEVICE_KINDS, default="tablet", help="kind of device")
    add = sub.add_parser("add-employee", help="add an employee (with the edge stopped)")
    add.add_argument("--config", default=DEFAULT_PATH, help="TOML config file (edge.toml)")
    add.add_argument("--id", required=True, help="employee id, e.g. 'mia'")
    add.add_argument("--name", required=True, help="the name tablets show")
    add.add_argument("--role", required=True, help="role id, e.g. 'manager'")
    add.add_argument("--pin", help="4-8 digits; asked for (or read from stdin) when not given")
    return parser


async def _fetch_status(config: EdgeConfig, timeout_s: float = 3.0) -> dict[str, Any]:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else config.host
    url = f"http://{host}:{config.port}/v1/sync/status"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http:
        async with http.get(url) as resp:
            resp.raise_for_status()
            body: dict[str, Any] = await resp.json()
            return body


def _ago(ms: int | None) -> str:
    if ms is None:
        return "never"
    seconds = max(0, wall_clock_ms() - ms) / 1000
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


def summary(body: dict[str, Any], source: str) -> str:
    """A short human summary of a status document."""
    catchup = body.get("catchup") or {}
    lines = [
        f"source:         {source}",
        f"online:         {'yes' if body.get('online') else 'no'}"
        + ("" if body.get("uplink_running") else " (uplink not running)"),
        f"outbox:         {body['outbox_depth']} unsynced"
        + (
            f" (oldest {body['oldest_unsynced_age_ms'] / 1000:.1f}s old)"
            if body["outbox_depth"]
            else ""
        ),
        f"last success:   {_ago(body.get('last_success_ms'))}",
        f"acked through:  seq {body['acked_through']} of {body.get('last_seq', '?')}",
        f"pull cursor:    rev {body['pull_cursor']} (cloud head {body.get('cloud_head', '?')})",
        f"open conflicts: {body['open_conflicts']}",
    ]
    if body.get("clock_skew_ms") is not None:
        lines.append(f"clock skew:     {body['clock_skew_ms']} ms ahead of the cloud")
    if catchup.get("pushed") or catchup.get("pulled"):
        lines.append(
            f"this run:       pushed {catchup['pushed']} ({catchup['push_rate']}/s), "
            f"pulled {catchup['pulled']} ({catchup['pull_rate']}/s)"
        )
    error = body.get("last_error")
    if error:
        lines.append(f"last error:     {error['channel']}: {error['code']}: {error['message']}")
    if body.get("stuck"):
        lines.append(f"PUSH STOPPED:   {body['stuck']}")
    return "\n".join(lines)


def _status(config: EdgeConfig, as_json: bool) -> int:
    try:
        body = asyncio.run(_fetch_status(config))
        source = f"running edge on port {config.port}"
    except (aiohttp.ClientError, TimeoutError, OSError):
        try:
            body = status_body(status_from_file(config.db_path, wall_clock_ms()), None)
        except FileNotFoundError:
            print(f"the edge is not running and {config.db_path} does not exist", file=sys.stderr)
            return 1
        source = f"edge not running; read from {config.db_path}"
    if as_json:
        print(json.dumps({"source": source, **body}, indent=2))
    else:
        print(summary(body, source))
    return 0


async def _open_store(config: EdgeConfig) -> EdgeStore:
    if not config.site_id or not config.effective_node_id:
        raise ValueError("site_id and node_id (or a '<node_id>.<secret>' token) are required")
    registry = config.registry(default_registry())
    return await EdgeStore.open(
        config.db_path,
        registry,
        config.site_id,
        config.effective_node_id,
        synchronous=config.synchronous,
        max_db_bytes=config.max_db_bytes,
    )


def _pair(config: EdgeConfig, name: str, kind: str) -> int:
    async def create() -> tuple[str, int]:
        async with await _open_store(config) as store:
            return await store.transaction(lambda tx: create_pairing_code(tx, kind, "cli"))

    code, expires_ms = asyncio.run(create())
    until = datetime.fromtimestamp(expires_ms / 1000).astimezone().strftime("%H:%M:%S")
    label = f" for {name!r}" if name else ""
    print(f"pairing code{label} ({kind}): {code}")
    print(f"type it on the device before {until}; it works once")
    return 0


def _read_pin() -> str:
    if not sys.stdin.isatty():
        return sys.stdin.readline().strip()
    pin = getpass.getpass("PIN (4-8 digits): ")
    if getpass.getpass("PIN again: ") != pin:
        raise ValueError("the PINs differ")
    return pin


def _add_employee(config: EdgeConfig, args: argparse.Namespace) -> int:
    pin = args.pin if args.pin is not None else _read_pin()
    if not re.fullmatch(PIN_PATTERN, pin) or not re.fullmatch(ID_PATTERN, args.id):
        raise ValueError(f"the PIN must be 4-8 digits and the id match {ID_PATTERN}")
    if not 0 < len(args.name) <= 80:
        raise ValueError("the name must be 1-80 characters")
    try:
        asyncio.run(_fetch_status(config, timeout_s=1.0))
    except (aiohttp.ClientError, TimeoutError, OSError):
        pass  # not running: safe to write
    else:
        print(
            f"fynlo-edge: the edge is running on port {config.port}: stop it first, or add "
            "employees from a manager's tablet (POST /v1/employees)",
            file=sys.stderr,
        )
        return 1

    async def add() -> None:
        pin_hash = await hash_pin(pin)

        def write(tx: Tx) -> None:
            add_employee(tx, args.id, args.name, args.role, pin_hash)
            audit.record(tx, "add_employee", None, None)

        async with await _open_store(config) as store:
            await store.transaction(write)

    try:
        asyncio.run(add())
    except ApiError as exc:
        print(f"fynlo-edge: {exc.message}", file=sys.stderr)
        return 1
    print(f"added {args.id} ({args.role}); they log in on a paired device with their PIN")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fynlo-edge``."""
    args = _parser().parse_args(argv)
    try:
        config = load_edge_config(args.config)
    except ConfigError as exc:
        print(f"fynlo-edge: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        return _status(config, args.json)
    try:
        if args.command == "pair":
            return _pair(config, args.name, args.kind)
        if args.command == "add-employee":
            return _add_employee(config, args)
    except (ValueError, EdgeError) as exc:
        print(f"fynlo-edge: {exc}", file=sys.stderr)
        return 2
    _quiet_log_records()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        app = create_app(config)
    except ValueError as exc:
        print(f"fynlo-edge: {exc}", file=sys.stderr)
        return 2
    app.on_startup.append(_freeze_heap)  # after the store, the caches and the hub are up
    web.run_app(
        app,
        host=config.host,
        port=config.port,
        loop=new_event_loop(),
        **access_log_options(config.access_log),
    )
    return 0


async def _freeze_heap(app: web.Application) -> None:
    """Leave everything start-up made (modules, the app, caches) out of later collections.

    The cyclic garbage collector's full passes walk every tracked object; with the start-up
    heap in them, each held the whole process (event loop and writer thread) for about
    35 ms every couple of seconds under load: the tail of every request in flight then.
    """
    gc.collect()
    gc.freeze()


def _quiet_log_records() -> None:
    """Skip what our log format never shows: the caller's frame, thread and process names.

    The access log writes a record per request; these are the savings the logging manual
    lists ("Optimization").
    """
    logging._srcfile = None  # documented: no sys._getframe per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


if __name__ == "__main__":
    sys.exit(main())
