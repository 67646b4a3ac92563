"""A real edge (app, SQLite file, HTTP on loopback) with staff and paired devices, for API tests."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from argon2 import PasswordHasher

from edge.api.auth import pair_device, permissions_json, start_session
from edge.app import STORE_KEY, create_app
from edge.config import EdgeConfig, MdnsSettings
from edge.store import EdgeStore, wall_clock_ms
from edge.tx import Tx
from sync_protocol.changes import Op

#: employee id -> role id, for a small restaurant
STAFF = {"mia": "manager", "sam": "server", "kai": "kitchen", "bo": "bartender", "ola": "owner"}


@dataclass
class Tablet:
    """A paired device, and the session of whoever is logged in on it."""

    device_id: str
    device_token: str
    access: dict[str, str] = field(default_factory=dict)  # employee -> access token

    def headers(self, employee: str | None = None, **extra: str) -> dict[str, str]:
        """Headers for a request from this device (as ``employee``, when given)."""
        out = {"X-Fynlo-Device": self.device_token, **extra}
        if employee is not None:
            out["Authorization"] = f"Bearer {self.access[employee]}"
        return out


_PIN_HASHES: dict[str, str] = {}  # one argon2 hash per PIN for all tests (hashing is slow)


def pin_hash(pin: str) -> str:
    """An argon2id hash of ``pin`` (cached: every employee with this PIN shares it)."""
    if pin not in _PIN_HASHES:
        _PIN_HASHES[pin] = PasswordHasher().hash(pin)
    return _PIN_HASHES[pin]


@dataclass
class Edge:
    """A running edge app and a client for it."""

    url: str
    app: web.Application
    http: aiohttp.ClientSession
    path: Path
    tablets: dict[str, Tablet] = field(default_factory=dict)

    @property
    def store(self) -> EdgeStore:
        """The edge's store."""
        return self.app[STORE_KEY]

    async def call(
        self, method: str, path: str, headers: dict[str, str] | None = None, **kw: Any
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """One request; returns (status, JSON body or None, response)."""
        async with self.http.request(method, self.url + path, headers=headers, **kw) as resp:
            raw = await resp.read()
            body = json.loads(raw) if raw and resp.content_type == "application/json" else None
            return resp.status, body, resp

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of ``query`` on the edge's SQLite file, read (or changed) from outside the app."""
        conn = sqlite3.connect(self.path / "edge.sqlite", isolation_level=None)
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def set_wall_clock(self, now_ms: int) -> None:
        """Pin the edge's wall clock at ``now_ms`` (sessions started before may expire)."""
        self.store.clock.now_ms = lambda: now_ms

    async def pair(self, name: str, kind: str = "tablet") -> Tablet:
        """Pair a device directly through the store (the pairing flow has its own tests)."""
        device_id, token = await self.store.transaction(
            lambda tx: pair_device(tx, name, kind, None)
        )
        tablet = Tablet(device_id, token)
        self.tablets[name] = tablet
        return tablet

    async def set_pins(self, **pins: str) -> None:
        """Give employees PINs (``mia="1234"``), stored as argon2id hashes."""
        await self.store.write_many(
            [
                ("employees", who, Op.UPDATE, {"pin_hash": pin_hash(pin)})
                for who, pin in pins.items()
            ]
        )

    async def login(self, tablet: Tablet, employee: str) -> str:
        """Start ``employee``'s session on ``tablet``; returns the access token."""
        _, access, _, _ = await self.store.transaction(
            lambda tx: start_session(tx, employee, tablet.device_id)
        )
        tablet.access[employee] = access
        return access


def _seed_staff(tx: Tx) -> None:
    for employee, role in STAFF.items():
        tx.write("employees", employee, Op.INSERT, {"name": employee.title(), "role_id": role})


async def seed_menu(store: EdgeStore) -> None:
    """A category and three items."""
    await store.write_many(
        [
            ("menu_categories", "mains", Op.INSERT, {"name": "Mains"}),
            ("menu_items", "soup", Op.INSERT, {"name": "Soup", "price_pence": 450,
                                                  "category_id": "mains"}),
            ("menu_items", "steak", Op.INSERT, {"name": "Steak", "price_pence": 2200,
                                                   "category_id": "mains"}),
            ("menu_items", "ipa", Op.INSERT, {"name": "IPA", "price_pence": 550,
                                                 "category_id": "mains", "station": "bar"}),
        ]
    )  # fmt: skip


async def seed_modifiers(store: EdgeStore) -> None:
    """A 'Cooking' group (exactly one choice) and a 'Sauces' group (up to two) for the steak."""
    await store.write_many(
        [
            ("modifier_groups", "cooking", Op.INSERT, {"name": "Cooking", "min_choices": 1,
                                                         "max_choices": 1}),
            ("modifier_groups", "sauces", Op.INSERT, {"name": "Sauces", "min_choices": 0,
                                                        "max_choices": 2, "position": 1}),
            ("modifiers", "rare", Op.INSERT, {"group_id": "cooking", "name": "Rare"}),
            ("modifiers", "well", Op.INSERT, {"group_id": "cooking", "name": "Well done",
                                               "position": 1}),
            ("modifiers", "pepper", Op.INSERT, {"group_id": "sauces", "name": "Peppercorn",
                                                 "price_pence": 250}),
            ("modifiers", "bearnaise", Op.INSERT, {"group_id": "sauces", "name": "Bearnaise",
                                                    "price_pence": 300, "position": 1}),
            ("modifiers", "aioli", Op.INSERT, {"group_id": "sauces", "name": "Aioli",
                                                "price_pence": 150, "position": 2}),
            ("menu_items", "steak", Op.UPDATE, {"modifier_group_ids": '["cooking", "sauces"]'}),
        ]
    )  # fmt: skip


@asynccontextmanager
async def serving(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """``app`` served on a free port of 127.0.0.1 (its base URL) until the block ends."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_edge(tmp_path: Path, **config: Any) -> AsyncIterator[Edge]:
    """An edge app on 127.0.0.1 with staff, a menu, and no cloud or mDNS."""
    settings = EdgeConfig(
        db_path=str(tmp_path / "edge.sqlite"),
        site_id="site-1",
        node_id="edge-1",
        mdns=MdnsSettings(enabled=False),
    )
    app = create_app(dataclasses.replace(settings, **config))
    async with serving(app, access_log=None) as url, aiohttp.ClientSession() as http:
        edge = Edge(url, app, http, tmp_path)
        await edge.store.transaction(_seed_staff)
        await seed_menu(edge.store)
        yield edge


def role_permissions(role: str, permissions: list[str]) -> tuple[str, str, Op, dict[str, Any]]:
    """A write that gives ``role`` exactly ``permissions``."""
    return ("roles", role, Op.INSERT, {"name": role, "permissions": permissions_json(permissions)})  # type: ignore[arg-type]


# -- live updates and kitchen tickets (additive helpers) ---------------------------------------


def ticket(
    ticket_id: str,
    station: str = "kitchen",
    *,
    fired_at_ms: int | None = None,
    items: list[Any] | None = None,
    table_name: str = "T1",
) -> tuple[str, str, Op, dict[str, Any]]:
    """A store write that fires a ticket to ``station``, as firing an order does."""
    lines = items if items is not None else [{"name": "Steak", "qty": 1, "modifiers": ["rare"]}]
    return ("tickets", ticket_id, Op.INSERT, {
        "order_id": f"order-{ticket_id}", "check_number": 1, "table_name": table_name,
        "station": station, "course": 1, "items": json.dumps(lines),
        "fired_at_ms": wall_clock_ms() if fired_at_ms is None else fired_at_ms,
        "fired_by": "sam",
    })  # fmt: skip


def edge_settings(tmp_path: Path, **config: Any) -> EdgeConfig:
    """The settings ``running_edge`` uses (one SQLite file under ``tmp_path``)."""
    settings = EdgeConfig(
        db_path=str(tmp_path / "edge.sqlite"),
        site_id="site-1",
        node_id="edge-1",
        mdns=MdnsSettings(enabled=False),
    )
    return dataclasses.replace(settings, **config)


class EdgeServer:
    """An edge on one SQLite file that a test can stop and start again on the same port."""

    def __init__(self, tmp_path: Path, http: aiohttp.ClientSession, **config: Any) -> None:
        self.tmp_path = tmp_path
        self.http = http
        self.settings = edge_settings(tmp_path, **config)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self, seed: bool = False) -> Edge:
        """Serve (on the port of the first start); ``seed`` adds the staff and the menu."""
        app = create_app(self.settings)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        edge = Edge(f"http://127.0.0.1:{self.port}", app, self.http, self.tmp_path)
        if seed:
            await edge.store.transaction(_seed_staff)
            await seed_menu(edge.store)
        return edge

    async def stop(self) -> None:
        """Stop serving and close the store (open connections are closed)."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()


@asynccontextmanager
async def edge_server(tmp_path: Path, **config: Any) -> AsyncIterator[tuple[EdgeServer, Edge]]:
    """A started, seeded ``EdgeServer`` and its first ``Edge``; stopped on the way out."""
    connector = aiohttp.TCPConnector(limit=0)  # many WebSockets at once
    async with aiohttp.ClientSession(connector=connector) as http:
        server = EdgeServer(tmp_path, http, **config)
        try:
            edge = await server.start(seed=True)
            yield server, edge
        finally:
            await server.stop()
