"""``fynlo-cloud``: run the cloud service, or register sites and devices against its DSN.

fynlo-cloud run [--config cloud.toml]
fynlo-cloud add-site NAME [--site-id ID] [--config cloud.toml]
fynlo-cloud add-device SITE NAME [--config cloud.toml]
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import secrets
import sys
from pathlib import Path

import asyncpg
from aiohttp import web

from shared import eventloop
from shared.config import ConfigError

from .app import create_app
from .config import CloudConfig, load
from .errors import CloudError
from .pgtemp import PgTempError
from .store import CloudStore

DEFAULT_CONFIG = Path("cloud.toml")


def _config(path: str | None) -> CloudConfig:
    if path is None and DEFAULT_CONFIG.exists():
        path = str(DEFAULT_CONFIG)
    return load(path)


def run(config: CloudConfig) -> None:
    """Serve the cloud until interrupted (a throwaway Postgres when no DSN is set)."""
    if not config.admin_token:
        config = dataclasses.replace(config, admin_token=secrets.token_urlsafe(24))
        # Only a generated token is shown: a configured one is a secret kept out of logs.
        print(f"owner token: {config.admin_token}", flush=True)
    if not config.dsn:
        print("no dsn configured: starting a throwaway Postgres (data is lost at exit)")
    app = create_app(config)
    # Start-up objects live for the whole process: keep them out of the cyclic GC's scans.
    app.on_startup.append(_freeze_gc)
    web.run_app(
        app, host=config.host, port=config.port, print=print, loop=eventloop.new_event_loop()
    )


async def _freeze_gc(app: web.Application) -> None:
    gc.freeze()
    # A push batch allocates tens of thousands of short-lived objects that reference
    # counting frees; a young-generation collection every 700 allocations only rescans
    # them. Every 20,000 cut the cyclic GC's share of ingest CPU from ~8 % to ~1 %.
    gc.set_threshold(20_000, 50, 50)


async def _open(config: CloudConfig) -> CloudStore:
    if not config.dsn:
        raise SystemExit("add-site and add-device need a dsn (cloud.toml or FYNLO_CLOUD_DSN)")
    registry = config.registry()
    return await CloudStore.open(config.dsn, registry, pool_min=1, pool_max=2, listen=False)


async def add_site(config: CloudConfig, name: str, site_id: str | None) -> str:
    """Register a site directly in the database; returns its id."""
    store = await _open(config)
    try:
        return await store.register_site(name, site_id)
    finally:
        await store.close()


async def add_device(config: CloudConfig, site_id: str, name: str) -> tuple[str, str]:
    """Register a device directly in the database; returns (node_id, token)."""
    store = await _open(config)
    try:
        return await store.register_device(site_id, name)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        help="TOML config (default: ./cloud.toml if present)",
    )
    parser = argparse.ArgumentParser(
        prog="fynlo-cloud", description="Fynlo cloud service.", parents=[common]
    )
    parser.set_defaults(config=None)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="serve the sync and owner APIs", parents=[common])
    site = commands.add_parser("add-site", help="register a site", parents=[common])
    site.add_argument("name")
    site.add_argument("--site-id", help="choose the id (default: generated)")
    device = commands.add_parser(
        "add-device", help="register an edge node; prints its token", parents=[common]
    )
    device.add_argument("site")
    device.add_argument("name")
    options = parser.parse_args(argv)
    try:
        config = _config(options.config)
        if options.command == "run":
            run(config)
        elif options.command == "add-site":
            print(asyncio.run(add_site(config, options.name, options.site_id)))
        else:
            node_id, token = asyncio.run(add_device(config, options.site, options.name))
            print(f"node_id: {node_id}\ntoken: {token}")
    except (ConfigError, CloudError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PgTempError as exc:
        print(f"error: cannot start a local Postgres: {exc}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"error: cannot use the database: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
