"""A real edge (app, SQLite file, HTTP on loopback) with staff and paired devices, for API tests."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from edge.api.auth import pair_device, permissions_json, start_session
from edge.app import STORE_KEY, create_app
from edge.config import EdgeConfig, MdnsSettings
from edge.store import EdgeStore
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

    async def pair(self, name: str, kind: str = "tablet") -> Tablet:
        """Pair a device directly through the store (the pairing flow has its own tests)."""
        device_id, token = await self.store.transaction(
            lambda tx: pair_device(tx, name, kind, None)
        )
        tablet = Tablet(device_id, token)
        self.tablets[name] = tablet
        return tablet

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
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with aiohttp.ClientSession() as http:
            edge = Edge(f"http://127.0.0.1:{port}", app, http, tmp_path)
            await edge.store.transaction(_seed_staff)
            await seed_menu(edge.store)
            yield edge
    finally:
        await runner.cleanup()


def role_permissions(role: str, permissions: list[str]) -> tuple[str, str, Op, dict[str, Any]]:
    """A write that gives ``role`` exactly ``permissions``."""
    return ("roles", role, Op.INSERT, {"name": role, "permissions": permissions_json(permissions)})  # type: ignore[arg-type]
