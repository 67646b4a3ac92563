"""Wake long-polling pulls when a site's feed grows (Postgres ``LISTEN fynlo_feed``).

Every transaction that appends to a site's feed runs ``pg_notify('fynlo_feed', site_id)``,
delivered at commit to every cloud worker. One dedicated connection per worker listens; each
site has at most one pending future that every waiter of that site shares, resolved (and
dropped) when a notification for the site arrives. Waiters take the future *before* they
read the head, so a commit between the read and the wait cannot be missed.

If the listening connection drops, every waiter is woken (they re-read the head) and the
connection is re-opened in the background; until it is back, ``connected`` is false and
waiters re-check the head every ``POLL_S`` seconds instead of relying on notifications.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg

CHANNEL = "fynlo_feed"
POLL_S = 1.0
_RECONNECT_S = (0.2, 0.5, 1.0, 2.0, 5.0)

log = logging.getLogger(__name__)


class FeedListener:
    """One LISTEN connection that wakes per-site waiters."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._closed = False
        self._reconnect: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        """Whether notifications are being received right now."""
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Open the listening connection."""
        conn = await asyncpg.connect(self._dsn)
        await conn.add_listener(CHANNEL, self._notified)
        conn.add_termination_listener(self._lost)
        self._conn = conn

    async def close(self) -> None:
        """Stop listening and wake every waiter."""
        self._closed = True
        if self._reconnect is not None:
            self._reconnect.cancel()
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close()
        self.wake_all()

    def future(self, site_id: str) -> asyncio.Future[None]:
        """The future resolved at the site's next feed notification."""
        fut = self._waiters.get(site_id)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waiters[site_id] = fut
        return fut

    def wake(self, site_id: str) -> None:
        """Resolve the site's pending future (also used by this worker's own commits)."""
        fut = self._waiters.pop(site_id, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def wake_all(self) -> None:
        """Resolve every pending future (waiters re-read their heads)."""
        for site_id in list(self._waiters):
            self.wake(site_id)

    def _notified(self, conn: asyncpg.Connection, pid: int, channel: str, payload: object) -> None:
        self.wake(str(payload))

    def _lost(self, conn: asyncpg.Connection) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self.wake_all()
        if not self._closed:
            log.warning("feed listener connection lost; reconnecting")
            self._reconnect = asyncio.get_running_loop().create_task(self._reopen())

    async def _reopen(self) -> None:
        attempt = 0
        while not self._closed and self._conn is None:
            await asyncio.sleep(_RECONNECT_S[min(attempt, len(_RECONNECT_S) - 1)])
            attempt += 1
            try:
                await self.start()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("feed listener reconnect failed: %s", exc)
        self.wake_all()
