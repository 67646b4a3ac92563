"""The ``fynlo-edge`` command: run the edge server, or show its sync status."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import aiohttp
from aiohttp import web

from shared.config import ConfigError

from .app import create_app, status_body
from .config import DEFAULT_PATH, EdgeConfig, load_edge_config
from .store import status_from_file, wall_clock_ms


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fynlo-edge", description="Fynlo edge server.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the edge server and its sync daemon")
    run.add_argument("--config", default=DEFAULT_PATH, help="TOML config file (edge.toml)")
    status = sub.add_parser("status", help="show sync status (from the running edge, or its file)")
    status.add_argument("--config", default=DEFAULT_PATH, help="TOML config file (edge.toml)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        app = create_app(config)
    except ValueError as exc:
        print(f"fynlo-edge: {exc}", file=sys.stderr)
        return 2
    web.run_app(app, host=config.host, port=config.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
