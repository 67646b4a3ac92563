"""The demo's cloud: ``python -m cloud run`` as a child process, its owner API, the seed."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from sync_protocol.changes import Value

from .common import CLOUD_STOP_TIMEOUT_S, HOST, SITE_ID, DemoError

CATEGORIES = (("cat-coffee", "Coffee"), ("cat-food", "Food"), ("cat-sweet", "Sweet things"))
#: (id, category, name, price in pence, station)
MENU = (
    ("item-espresso", "cat-coffee", "Espresso", 250, "bar"),
    ("item-flat-white", "cat-coffee", "Flat white", 340, "bar"),
    ("item-cappuccino", "cat-coffee", "Cappuccino", 360, "bar"),
    ("item-croque", "cat-food", "Croque monsieur", 850, "kitchen"),
    ("item-shakshuka", "cat-food", "Shakshuka", 1150, "kitchen"),
    ("item-soup", "cat-food", "Soup of the day", 650, "kitchen"),
    ("item-brownie", "cat-sweet", "Brownie", 375, "pass"),
    ("item-tart", "cat-sweet", "Lemon tart", 450, "pass"),
)
STOCK_START = 150
PAR_LEVEL = 40  #: below this many portions (as the cloud sees it), the owner books a delivery
DELIVERY = 150  #: portions a delivery brings


# -- the cloud: a child process and its owner API ----------------------------------------------


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it can be bound on HOST now, else a port that was free a moment ago."""
    for port in dict.fromkeys((preferred, 0)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            found: int = sock.getsockname()[1]
            return found
    raise DemoError(f"no free TCP port on {HOST}")


class CloudProcess:
    """``python -m cloud run`` on a free port, no DSN (a throwaway Postgres), output to files."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.token = secrets.token_urlsafe(24)
        self.stderr_path = workdir / "cloud.err"
        self._stdout_path = workdir / "cloud.out"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the cloud, configured through ``FYNLO_CLOUD_*`` variables only."""
        env = os.environ | {
            "FYNLO_CLOUD_HOST": HOST,
            "FYNLO_CLOUD_PORT": str(self.port),
            "FYNLO_CLOUD_ADMIN_TOKEN": self.token,
            "FYNLO_CLOUD_DSN": "",  # none: the cloud starts (and deletes) its own Postgres
            "FYNLO_CLOUD_PAYMENTS_SIMBANK_PORT": "0",  # its simulated bank: any free port
            "PYTHONUNBUFFERED": "1",
        }
        with self._stdout_path.open("wb") as out, self.stderr_path.open("wb") as err:
            # A session of its own, so the terminal's Ctrl-C reaches only the demo: it still
            # needs the cloud to drain and compare checksums before it stops it.
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "cloud", "run"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                start_new_session=True,
            )

    def exit_code(self) -> int | None:
        """The exit status once the cloud has exited, else None."""
        return None if self._proc is None else self._proc.poll()

    def stop(self, timeout_s: float = CLOUD_STOP_TIMEOUT_S) -> int | None:
        """SIGTERM the cloud (it stops its Postgres) and wait; kill it after ``timeout_s``."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def stderr_tail(self, lines: int = 10) -> str:
        """The last lines the cloud wrote to stderr, indented."""
        try:
            tail = self.stderr_path.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            tail = []
        return "\n".join("    " + line for line in tail) or "    (nothing)"


def change(table: str, pk: str, op: str, **fields: Value) -> dict[str, Any]:
    """One change for the owner API's ``POST /v1/sites/{site}/changes``."""
    return {"table": table, "id": pk, "op": op, "fields": fields}


class Owner:
    """The cloud's owner API (JSON; ``docs/sync-http.md``)."""

    def __init__(self, http: aiohttp.ClientSession, url: str, token: str) -> None:
        self._http, self._url = http, url
        self._headers = {"Authorization": f"Bearer {token}"}

    async def call(self, method: str, path: str, body: object = None) -> dict[str, Any]:
        """One request; an error answer raises ``DemoError`` with the cloud's code."""
        async with self._http.request(
            method,
            self._url + path,
            json=body,
            headers=self._headers,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            answer: dict[str, Any] = await resp.json(content_type=None)
        if resp.status != 200:
            error = answer.get("error") or {}
            raise DemoError(f"{method} {path}: {error.get('code')}: {error.get('message')}")
        return answer

    async def write(self, *changes: dict[str, Any]) -> int:
        """Cloud-authored writes in one transaction; returns the feed head after them."""
        body = {"changes": list(changes)}
        return int((await self.call("POST", f"/v1/sites/{SITE_ID}/changes", body))["rev"])

    async def feed_head(self) -> int:
        """The demo site's feed head (``/v1/status``)."""
        for site in (await self.call("GET", "/v1/status"))["sites"]:
            if site["site_id"] == SITE_ID:
                return int(site["feed_head"])
        raise DemoError(f"the cloud does not list site {SITE_ID!r}")

    async def rows(self, table: str) -> dict[str, dict[str, Any]]:
        """The demo site's live rows of ``table`` in the cloud, by id (every page)."""
        rows: dict[str, dict[str, Any]] = {}
        after: str | None = ""
        while after is not None:
            query = urlencode({"after": after})
            page = await self.call("GET", f"/v1/sites/{SITE_ID}/rows/{table}?{query}")
            rows |= page["rows"]
            after = page["next"]
        return rows

    async def checksums(self) -> dict[str, tuple[int, int]]:
        """Per-table (count, total) checksums of the demo site in the cloud."""
        answer = await self.call("GET", f"/v1/sites/{SITE_ID}/checksums")
        return {t: (int(c["count"]), int(c["total"])) for t, c in answer.items()}


def seed(stock: int = STOCK_START) -> list[dict[str, Any]]:
    """The menu and ``stock`` portions of each item."""
    out = [
        change("menu_categories", cat, "insert", name=name, position=i, active=True)
        for i, (cat, name) in enumerate(CATEGORIES)
    ]
    for item, cat, name, price, station in MENU:
        fields: dict[str, Value] = {"category_id": cat, "name": name, "price_pence": price}
        out.append(change("menu_items", item, "insert", **fields, station=station))
        out.append(change("stock_levels", item, "insert", on_hand=stock, par_level=PAR_LEVEL))
    return out


def deliveries(stock: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A delivery of ``DELIVERY`` portions for each item below its par level: a counter
    delta, which adds up with the tablets' sales made meanwhile, wherever they are."""
    return [
        change("stock_levels", item, "update", on_hand=DELIVERY)
        for item, row in sorted(stock.items())
        if int(row.get("on_hand") or 0) < int(row.get("par_level") or 0)
    ]
