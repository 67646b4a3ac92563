"""Idempotency keys: the first answer to a change, kept for a day, and which keys have one.

A tablet sends each change with an ``Idempotency-Key``. ``Ctx.mutate`` stores the answer in
the change's own transaction (table ``idempotency``, per device and key, with a fingerprint
of method, path and body), and a retry gets that answer back before anything is checked
again. ``AnsweredKeys`` remembers which keys have a stored answer, so that a new key (nearly
every request) costs no read before its transaction: it is loaded from the table at start-up
and grows as answers commit. Only this process writes the table, so a key it does not hold
has no answer yet; one still in flight (or expired and not pruned yet) is caught inside the
transaction, which looks again.

Answers older than ``KEEP_MS`` (a day, as card processors keep theirs: a tablet retries
within seconds, or at worst after a night off) are deleted every ``PRUNE_EVERY_S`` seconds,
in transactions of at most ``CHUNK`` keys so that writers never wait long.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web

from ..store import EdgeStore

log = logging.getLogger(__name__)

KEEP_MS = 24 * 3600 * 1000
PRUNE_EVERY_S = 600.0
CHUNK = 5000


class AnsweredKeys:
    """The (device, key) pairs with a stored answer."""

    def __init__(self) -> None:
        self._keys: set[tuple[str, str]] = set()

    def __len__(self) -> int:
        return len(self._keys)

    async def load(self, store: EdgeStore, keep_ms: int = KEEP_MS) -> None:
        """Start from the keys in the table that have not expired (the rest are pruned)."""
        rows = await store.query(
            "SELECT device_id, key FROM idempotency WHERE at_ms >= ?",
            (store.clock.now_ms() - keep_ms,),
        )
        self._keys = {(str(device), str(key)) for device, key in rows}

    def may_have(self, device_id: str, key: str) -> bool:
        """False when ``key`` of ``device_id`` certainly has no stored answer."""
        return (device_id, key) in self._keys

    def add(self, device_id: str, key: str) -> None:
        """An answer for ``key`` committed."""
        self._keys.add((device_id, key))

    def discard(self, pairs: list[tuple[str, str]]) -> None:
        """These answers were deleted."""
        self._keys.difference_update(pairs)


async def prune(store: EdgeStore, keys: AnsweredKeys, keep_ms: int = KEEP_MS) -> int:
    """Delete answers older than ``keep_ms``; returns how many."""
    before = store.clock.now_ms() - keep_ms
    deleted = 0
    while True:
        gone: list[tuple[str, str]] = await store.transaction(
            lambda tx: [
                (str(device), str(key))
                for device, key in tx.query(
                    "DELETE FROM idempotency WHERE rowid IN"
                    " (SELECT rowid FROM idempotency WHERE at_ms < ? LIMIT ?)"
                    " RETURNING device_id, key",
                    (before, CHUNK),
                )
            ],
            heavy=True,
        )
        keys.discard(gone)
        deleted += len(gone)
        if len(gone) < CHUNK:
            return deleted


ANSWERED = web.AppKey("idempotency_answered", AnsweredKeys)


@asynccontextmanager
async def keeping(
    store: EdgeStore, keys: AnsweredKeys, every_s: float = PRUNE_EVERY_S
) -> AsyncIterator[None]:
    """Load the keys, prune now and every ``every_s`` until the generator is closed."""
    await keys.load(store)

    async def prune_forever() -> None:
        while True:
            try:
                await prune(store, keys)
            except Exception:  # housekeeping: log it, try again next time
                log.exception("pruning idempotency answers failed")
            await asyncio.sleep(every_s)

    task = asyncio.create_task(prune_forever(), name="fynlo-idempotency-prune")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
