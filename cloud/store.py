"""The cloud's Postgres store: sites, devices, exactly-once ingest, the change feed,
cloud-authored writes and the manual conflict queue.

Every query is scoped by ``site_id`` (the tenancy invariant); the only cross-site read is
``status`` for the owners' overview. Ingest is exactly-once because the node's dedupe
watermark (``ledger.last_seq``) moves in the same transaction as the rows and the feed:
changes at or below it are skipped, a batch starting past watermark+1 is refused. How a
run of changes is applied is described in ``cloud.apply``; how a pull long-polls, in
``cloud.listen``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Self

import asyncpg

from sync_protocol import checksum, wire
from sync_protocol.changes import Change, Op, Value
from sync_protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from sync_protocol.hlc import HybridClock
from sync_protocol.merge import validate_change, validate_changes
from sync_protocol.schema import Author, Registry, TableSpec

from . import conflicts as conflict_store
from .apply import Applied, Key, apply_all, load_states, lock_site, persist, touch
from .errors import CloudCode, CloudError
from .listen import POLL_S, FeedListener
from .rows import TableIO
from .schema import migrate

CLOUD_ORIGIN = "cloud"
#: no push batch spans more revisions than this (decode limits are far below it)
MAX_BATCH_REVS = 1_000_000
#: from this many rows that only inserts touch, a run takes them to be new without looking
#: (below it, one query to look costs less than the savepoint that guards the guess)
ASSUME_NEW_MIN = 64
#: how long a device credential, once checked, is trusted without asking Postgres again
#: (a revocation through this process applies at once; through another, within this time)
CREDENTIAL_TTL_S = 5.0
#: how long a held pull may wait on after the feed moved by the puller's own changes only
ECHO_HOLD_S = 0.5
_SITE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_DUMMY_HASH = hashlib.sha256(b"no such device").digest()
_TEXT_ERRORS = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)


def wall_clock() -> HybridClock:
    """A hybrid logical clock over this machine's wall clock."""
    return HybridClock(now_ms=lambda: time.time_ns() // 1_000_000)


def _secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class IngestOrder:
    """Lets a node's pipelined pushes take the site lock in seq order within this worker.

    An edge may send its next batch before the answer to the previous one arrives; both
    are decoded and checked concurrently, and this makes the later one wait (briefly) for
    the earlier one to commit instead of being refused with ``sequence_gap``. Across
    workers there is no such wait: the gap answer is still correct, merely slower.
    """

    def __init__(self, wait_s: float = 2.0) -> None:
        self.wait_s = wait_s
        self._next: dict[tuple[str, str], int] = {}
        self._changed = asyncio.Condition()

    def knows(self, key: tuple[str, str]) -> bool:
        """Whether this worker has seen ``key``'s watermark yet."""
        return key in self._next

    async def turn(self, key: tuple[str, str], first: int) -> None:
        """Wait until the batch starting at ``first`` is next for ``key`` (or give up)."""
        if self._next.get(key, first) >= first:
            return
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._next.get(key, first) >= first),
                    self.wait_s,
                )
            except TimeoutError:
                pass  # the database decides: a real gap is refused there

    async def applied(self, key: tuple[str, str], watermark: int) -> None:
        """Record that ``key``'s changes through ``watermark`` are committed."""
        if watermark + 1 > self._next.get(key, 0):
            self._next[key] = watermark + 1
            async with self._changed:
                self._changed.notify_all()


async def _release_connection(conn: asyncpg.Connection) -> None:
    # The store never leaves session state behind (no SET, LISTEN, temporary tables or
    # session locks on pooled connections), so asyncpg's full reset, one more round trip
    # per request, is only needed for a transaction left open by a cancelled request.
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


class CloudStore:
    """Sites, devices, ingest, feed and conflicts over an asyncpg pool."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        registry: Registry,
        clock: HybridClock,
        listener: FeedListener | None,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
    ) -> None:
        self.pool = pool
        self.limits = limits
        self.order = IngestOrder()
        self.registry = registry
        self.clock = clock
        self.listener = listener
        self.io: dict[str, TableIO] = {spec.name: TableIO(spec) for spec in registry}
        self._releasing = False
        # node_id -> (site_id, secret hash, revoked, monotonic time checked)
        self._credentials: dict[str, tuple[str, bytes, bool, float]] = {}

    @classmethod
    async def open(
        cls,
        dsn: str,
        registry: Registry,
        *,
        clock: HybridClock | None = None,
        pool_min: int = 2,
        pool_max: int = 10,
        listen: bool = True,
        limits: wire.Limits = wire.DEFAULT_LIMITS,
    ) -> Self:
        """Connect, run migrations, and start listening for feed notifications."""
        pool = await asyncpg.create_pool(
            dsn,
            min_size=pool_min,
            max_size=pool_max,
            server_settings={"application_name": "fynlo-cloud", "jit": "off"},
            reset=_release_connection,
        )
        listener = FeedListener(dsn) if listen else None
        try:
            async with pool.acquire() as conn:
                await migrate(conn, registry)
            if listener is not None:
                await listener.start()
        except BaseException:
            await pool.close()
            raise
        return cls(pool, registry, clock or wall_clock(), listener, limits)

    def release_waiters(self) -> None:
        """Answer every held long-poll now and hold no more (the service is shutting down)."""
        self._releasing = True
        if self.listener is not None:
            self.listener.wake_all()

    async def close(self) -> None:
        """Stop listening and close the pool."""
        self.release_waiters()
        if self.listener is not None:
            await self.listener.close()
        await self.pool.close()

    # -- sites and devices ------------------------------------------------------------------

    async def register_site(self, name: str, site_id: str | None = None) -> str:
        """Create a site; returns its id (generated when not given)."""
        site_id = site_id or f"site_{secrets.token_hex(6)}"
        if not _SITE_ID.fullmatch(site_id):
            raise CloudError(
                CloudCode.BAD_REQUEST,
                "a site id is 1-64 letters, digits, '_', '.', ':' or '-'",
                site=site_id,
            )
        try:
            await self.pool.execute(
                "INSERT INTO sites (site_id, name) VALUES ($1, $2)", site_id, name
            )
        except asyncpg.UniqueViolationError:
            raise CloudError(CloudCode.SITE_EXISTS, f"site {site_id!r} exists") from None
        return site_id

    async def register_device(self, site_id: str, name: str) -> tuple[str, str]:
        """Register a node (edge box) to a site; returns (node_id, bearer token)."""
        node_id = f"node_{secrets.token_hex(8)}"
        secret = secrets.token_urlsafe(32)
        try:
            await self.pool.execute(
                "INSERT INTO devices (node_id, site_id, name, secret_hash) VALUES ($1, $2, $3, $4)",
                node_id,
                site_id,
                name,
                _secret_hash(secret),
            )
        except asyncpg.ForeignKeyViolationError:
            raise CloudError(CloudCode.SITE_NOT_FOUND, f"no site {site_id!r}") from None
        return node_id, f"{node_id}.{secret}"

    async def revoke_device(self, site_id: str, node_id: str) -> bool:
        """Revoke a node's credential; returns whether it existed."""
        done = await self.pool.execute(
            "UPDATE devices SET revoked = true WHERE site_id = $1 AND node_id = $2",
            site_id,
            node_id,
        )
        self._credentials.pop(node_id, None)
        return bool(done.endswith(" 1"))

    async def authenticate(self, token: str) -> tuple[str, str]:
        """The (site_id, node_id) of a device token, or UNAUTHORIZED."""
        node_id, _, secret = token.partition(".")
        now = time.monotonic()
        known = self._credentials.get(node_id)
        if known is None or now - known[3] > CREDENTIAL_TTL_S:
            row = None
            if node_id and secret:
                row = await self.pool.fetchrow(
                    "SELECT site_id, secret_hash, revoked FROM devices WHERE node_id = $1",
                    node_id,
                )
            if row is None:
                known = None
            else:
                known = (str(row["site_id"]), bytes(row["secret_hash"]), row["revoked"], now)
                self._credentials[node_id] = known
        stored = known[1] if known is not None else _DUMMY_HASH
        matches = hmac.compare_digest(_secret_hash(secret), stored)
        if known is None or not matches or known[2]:
            raise RemoteProtocolError(ErrorCode.UNAUTHORIZED, "unknown or revoked credential")
        return known[0], node_id

    async def head(self, site_id: str) -> int:
        """The site's feed head (highest rev allocated)."""
        head = await self.pool.fetchval("SELECT feed_head FROM sites WHERE site_id = $1", site_id)
        if head is None:
            raise CloudError(CloudCode.SITE_NOT_FOUND, f"no site {site_id!r}", site=site_id)
        return int(head)

    # -- ingest and writes ------------------------------------------------------------------

    def _validate(self, changes: Sequence[Change], author: Author) -> list[TableSpec]:
        return validate_changes(self.registry, changes, author)

    async def _apply(
        self,
        conn: asyncpg.Connection,
        site_id: str,
        specs: Sequence[TableSpec],
        changes: Sequence[Change],
        head: int,
        echo_origin: str | None = None,
    ) -> Applied:
        """Load the rows the changes touch, apply the changes and write the results.

        Rows that only inserts touch are mostly new (a catch-up is made of them), so when
        there are many they are taken not to exist without looking: writing them as new
        rows, under a savepoint, is the proof (the site's lock keeps other writers out). If
        one exists after all, its primary key refuses the write; the attempt is rolled back
        and the run applied again with every row it touches loaded.
        """
        inserted: set[Key] = set()
        other: set[Key] = set()
        for c in changes:
            (inserted if c.op is Op.INSERT else other).add((c.table, c.pk))
        inserted -= other
        try:
            if len(inserted) >= ASSUME_NEW_MIN:
                current = await load_states(conn, self.io, site_id, other)
                try:
                    async with conn.transaction():  # a savepoint
                        pairs = zip(specs, changes, strict=True)
                        applied = apply_all(pairs, dict(current), head, echo_origin)
                        await persist(conn, self.io, site_id, applied)
                    return applied
                except asyncpg.UniqueViolationError:
                    pass  # one of them exists: apply again, with every row loaded
            current = await load_states(conn, self.io, site_id, other | inserted)
            applied = apply_all(zip(specs, changes, strict=True), current, head, echo_origin)
            await persist(conn, self.io, site_id, applied)
        except _TEXT_ERRORS as exc:
            raise RemoteProtocolError(
                ErrorCode.INVALID_CHANGE, f"a text value cannot be stored: {exc}"
            ) from None
        return applied

    async def ingest(
        self, site_id: str, node_id: str, batch: wire.PushBatch, hlc_now: int, server_ms: int
    ) -> wire.PushAck:
        """Apply a node's push batch exactly once; the whole batch or nothing."""
        if batch.site != site_id or batch.node != node_id:
            raise RemoteProtocolError(
                ErrorCode.SITE_MISMATCH, "the batch names another site or node than its sender"
            )
        specs = self._validate(batch.changes, Author.EDGE)
        key = (site_id, node_id)
        if not self.order.knows(key):
            watermark = await self.pool.fetchval(
                "SELECT last_seq FROM ledger WHERE site_id = $1 AND origin = $2", site_id, node_id
            )
            await self.order.applied(key, int(watermark or 0))
        await self.order.turn(key, batch.first)
        async with self.pool.acquire() as conn, conn.transaction():
            head = await lock_site(conn, site_id)
            watermark = await conn.fetchval(
                "SELECT last_seq FROM ledger WHERE site_id = $1 AND origin = $2 FOR UPDATE",
                site_id,
                node_id,
            )
            watermark = int(watermark or 0)
            if batch.first > watermark + 1:
                raise RemoteProtocolError(
                    ErrorCode.SEQUENCE_GAP,
                    f"batch starts at seq {batch.first}; the cloud has applied through {watermark}",
                    expected=watermark + 1,
                )
            segments: list[tuple[int, int, int]] = []
            if batch.first <= watermark:
                # Resent changes: tell the edge at which revs they took effect back then.
                segments = [
                    (r[0], r[1], r[2])
                    for r in await conn.fetch(
                        "SELECT first_seq, last_seq, first_rev FROM segments"
                        " WHERE site_id = $1 AND origin = $2 AND last_seq >= $3"
                        " AND first_seq <= $4 ORDER BY last_seq",
                        site_id,
                        node_id,
                        batch.first,
                        batch.last,
                    )
                ]
            skip = watermark + 1 - batch.first if watermark >= batch.first else 0
            fresh = batch.changes[skip:]
            outcomes: dict[str, int] = {}
            first_new, first_rev = watermark + 1, head + 1
            if fresh:
                applied = await self._apply(
                    conn, site_id, specs[skip:], fresh, head, echo_origin=node_id
                )
                head, watermark = applied.head, batch.last
                outcomes.update(applied.outcomes)
                segments.append((first_new, watermark, first_rev))
            await conn.execute(
                "WITH mark AS ("
                "  INSERT INTO ledger (site_id, origin, last_seq) VALUES ($1, $2, $3)"
                "  ON CONFLICT (site_id, origin)"
                "  DO UPDATE SET last_seq = EXCLUDED.last_seq, updated_at = now()"
                "  WHERE ledger.last_seq <> EXCLUDED.last_seq),"
                " segment AS ("
                "  INSERT INTO segments (site_id, origin, first_seq, last_seq, first_rev)"
                "  SELECT $1, $2, $4::bigint, $3::bigint, $5::bigint WHERE $3 >= $4)"
                " UPDATE devices SET last_push_at = now() WHERE site_id = $1 AND node_id = $2",
                site_id,
                node_id,
                watermark,
                first_new,
                first_rev,
            )
        await self.order.applied(key, watermark)
        if fresh:
            self._wake(site_id)
        outcomes["duplicate"] = len(batch.changes) - len(fresh)
        return wire.PushAck(watermark, head, outcomes, server_ms, hlc_now, tuple(segments))

    async def write(
        self,
        site_id: str,
        writes: Sequence[tuple[str, str, Op, Mapping[str, Value]]],
        origin: str = CLOUD_ORIGIN,
    ) -> int:
        """Apply cloud-authored (table, pk, op, fields) in one transaction; returns the head."""
        async with self.pool.acquire() as conn, conn.transaction():
            head = await lock_site(conn, site_id)
            if not writes:
                return head
            changes = [
                Change(origin, head + i, table, pk, Op(op), dict(fields), head, self.clock.now())
                for i, (table, pk, op, fields) in enumerate(writes, start=1)
            ]
            specs = self._validate(changes, Author.CLOUD)
            applied = await self._apply(conn, site_id, specs, changes, head)
        self._wake(site_id)
        return applied.head

    def _wake(self, site_id: str) -> None:
        # This worker's own commits wake its waiters at once (NOTIFY also arrives, later).
        if self.listener is not None:
            self.listener.wake(site_id)

    # -- feed -------------------------------------------------------------------------------

    async def pull(
        self, site_id: str, node_id: str | None, cursor: int, limit: int, holds_through: int = 0
    ) -> bytes:
        """A pull frame with the site's feed entries after ``cursor``, at most ``limit``.

        ``holds_through``: the puller's own changes up to this seq are in its store, so the
        entries that merely echo rows it created with them are left out (their revs are not).
        """
        if limit < 1:
            raise CloudError(CloudCode.BAD_REQUEST, "limit must be positive")
        async with self.pool.acquire() as conn:
            records = await conn.fetch(
                "SELECT s.feed_head,"
                " (SELECT count(*) FROM conflicts c"
                "  WHERE c.site_id = $1 AND c.resolved_at IS NULL) AS open_conflicts,"
                " f.rev, f.entry"
                " FROM sites s LEFT JOIN LATERAL ("
                # an entry echoing the puller's own new row is skipped, not its revision
                "  SELECT rev, CASE WHEN echo_of = $4 AND echo_seq <= $5 THEN NULL"
                "  ELSE entry END AS entry"
                "  FROM feed WHERE site_id = $1 AND rev > $2"
                "  ORDER BY rev LIMIT $3) f ON true"
                " WHERE s.site_id = $1 ORDER BY f.rev",
                site_id,
                cursor,
                limit + 1,
                node_id,
                holds_through,
            )
            if not records:
                raise CloudError(CloudCode.SITE_NOT_FOUND, f"no site {site_id!r}", site=site_id)
            head, open_conflicts = int(records[0][0]), int(records[0][1])
            if cursor < 0 or cursor > head:
                raise RemoteProtocolError(
                    ErrorCode.INVALID_CURSOR,
                    f"cursor {cursor} is outside the feed (head {head})",
                    head=head,
                )
            if node_id is not None:
                await conn.execute(
                    "UPDATE devices SET pull_cursor = $3, last_pull_at = now()"
                    " WHERE site_id = $1 AND node_id = $2",
                    site_id,
                    node_id,
                    cursor,
                )
            rows = [(r[2], r[3]) for r in records if r[2] is not None]
            more = len(rows) > limit
            rows = rows[:limit]
            segments: list[tuple[int, int, int]] = []
            if node_id is not None and rows:
                # Read after the feed: an ingest committed in between has revs past the page.
                segments = [
                    (r[0], r[1], r[2])
                    for r in await conn.fetch(
                        "SELECT first_seq, last_seq, first_rev FROM segments"
                        " WHERE site_id = $1 AND origin = $2 AND first_rev <= $4"
                        # a segment spans at most one batch of revs: keeps the scan short
                        " AND first_rev > $3::bigint - $5::bigint"
                        " AND first_rev + (last_seq - first_seq) > $3 ORDER BY first_rev",
                        site_id,
                        node_id,
                        cursor,
                        rows[-1][0],
                        MAX_BATCH_REVS,
                    )
                ]
        return self._pull_frame(
            site_id, node_id or "", cursor, head, open_conflicts, rows, more, segments
        )

    def _pull_frame(
        self,
        site_id: str,
        node_id: str,
        cursor: int,
        head: int,
        open_conflicts: int,
        rows: list[tuple[int, bytes | None]],
        more: bool,
        segments: list[tuple[int, int, int]],
    ) -> bytes:
        while True:
            try:
                return wire.encode_pull(
                    site_id,
                    node_id,
                    cursor,
                    head,
                    [entry for _, entry in rows if entry is not None],
                    next_cursor=rows[-1][0] if rows else cursor,
                    more=more,
                    conflicts=open_conflicts,
                    server_ms=self.clock.now_ms(),
                    hlc=self.clock.now(),
                    segments=segments,
                    limits=self.limits,
                )
            except LocalProtocolError as exc:
                # Huge rows: a shorter page always continues correctly from its last rev.
                if exc.code is not ErrorCode.BATCH_TOO_LARGE or len(rows) < 2:
                    raise
                rows, more = rows[: len(rows) // 2], True

    async def wait_for_feed(
        self, site_id: str, after_rev: int, wait_s: float, node_id: str | None = None
    ) -> int:
        """Wait until the site's head passes ``after_rev`` or ``wait_s`` pass; returns the head.

        For a device (``node_id``), news that is only its own changes coming back is held
        up to ``ECHO_HOLD_S`` more, so that an edge busy writing gets one answer per burst
        rather than one per push; anything else (another writer's change) answers at once.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        seen = after_rev
        while True:
            listener = self.listener
            fut = listener.future(site_id) if listener is not None else None
            head = await self.head(site_id)
            if self._releasing:
                return head
            if head != seen:
                if head < seen or node_id is None:  # a bad cursor, or an owner's read
                    return head
                if not await self._only_echoes(site_id, node_id, seen, head):
                    return head
                deadline = min(deadline, loop.time() + ECHO_HOLD_S)
                seen = head
            remaining = deadline - loop.time()
            if remaining <= 0:
                return head
            if fut is None or listener is None or not listener.connected:
                await asyncio.sleep(min(remaining, POLL_S))  # no notifications: poll the head
                continue
            try:
                await asyncio.wait_for(asyncio.shield(fut), remaining)
            except TimeoutError:
                pass

    async def _only_echoes(self, site_id: str, node_id: str, after: int, upto: int) -> bool:
        """Whether every feed entry in ``(after, upto]`` echoes a change of ``node_id``."""
        found = await self.pool.fetchval(
            "SELECT NOT EXISTS (SELECT 1 FROM feed WHERE site_id = $1 AND rev > $2"
            " AND rev <= $3 AND echo_of IS DISTINCT FROM $4)",
            site_id,
            after,
            upto,
            node_id,
        )
        return bool(found)

    # -- conflicts --------------------------------------------------------------------------

    async def conflicts(self, site_id: str, open_only: bool = True) -> list[dict[str, Any]]:
        """The site's parked conflicts, oldest first."""
        where = " WHERE site_id = $1" + (" AND resolved_at IS NULL" if open_only else "")
        records = await self.pool.fetch(conflict_store.SELECT_SQL + where + " ORDER BY id", site_id)
        return [conflict_store.conflict_dict(r) for r in records]

    async def resolve_conflict(
        self,
        site_id: str,
        conflict_id: int,
        choose: object,
        values: object = None,
        by: str = "",
    ) -> tuple[dict[str, Any], int]:
        """Resolve a parked conflict; returns the resolved conflict and the feed rev."""
        choice, chosen = conflict_store.parse_choice(choose, values)
        async with self.pool.acquire() as conn, conn.transaction():
            head = await lock_site(conn, site_id)
            record = await conn.fetchrow(
                conflict_store.SELECT_SQL + " WHERE site_id = $1 AND id = $2 FOR UPDATE",
                site_id,
                conflict_id,
            )
            if record is None:
                raise RemoteProtocolError(
                    ErrorCode.CONFLICT_NOT_FOUND, f"no conflict {conflict_id} at this site"
                )
            conflict = conflict_store.conflict_dict(record)
            if conflict["resolved_at_ms"] is not None:
                raise RemoteProtocolError(
                    ErrorCode.CONFLICT_RESOLVED, f"conflict {conflict_id} is already resolved"
                )
            spec = self.registry.get(conflict["table"])
            key: Key = (spec.name, conflict["pk"])
            current = (await load_states(conn, self.io, site_id, [key])).get(key)
            write = conflict_store.resolution_write(spec, conflict, current, choice, chosen)
            if write is None:
                # Keep the cloud's row, but publish it again so every edge re-reads it.
                applied = touch(key, current, head) if current is not None else Applied(head)
                await persist(conn, self.io, site_id, applied)
            else:
                op, fields = write
                change = Change(
                    CLOUD_ORIGIN, head + 1, spec.name, key[1], op, fields, head, self.clock.now()
                )
                if fields or op is Op.DELETE:
                    # A person may settle any table (hence its own author). A bare revival
                    # (no columns) only flips the row's existence: nothing to check.
                    validate_change(spec, change, spec.author)
                applied = await self._apply(conn, site_id, [spec], [change], head)
            resolution = {"choose": choice.value, "values": dict(write[1]) if write else {}}
            record = await conn.fetchrow(
                "UPDATE conflicts SET resolved_at = now(), resolution = $3::jsonb,"
                f" resolved_by = $4 WHERE site_id = $1 AND id = $2"
                f" RETURNING {conflict_store.COLUMNS}",
                site_id,
                conflict_id,
                conflict_store.dumps(resolution),
                by,
            )
        self._wake(site_id)
        return conflict_store.conflict_dict(record), applied.head

    # -- reading ----------------------------------------------------------------------------

    async def rows(self, site_id: str, table: str) -> dict[str, dict[str, Value]]:
        """The live rows of one synced table of a site: ``{pk: {column: value}}``."""
        io = self.io[self.registry.get(table).name]
        async with self.pool.acquire() as conn:
            return await io.live_rows(conn, site_id)

    async def rows_page(
        self, site_id: str, table: str, after: str = "", limit: int = 1000
    ) -> tuple[dict[str, dict[str, Value]], str | None]:
        """A page of a table's live rows in id order, after id ``after``, and the id to ask
        after for the next page (None: this was the last)."""
        io = self.io[self.registry.get(table).name]
        async with self.pool.acquire() as conn:
            rows = await io.live_page(conn, site_id, after, limit + 1)
        if len(rows) <= limit:
            return rows, None
        rows.popitem()  # the first row of the next page: it proves there is one
        return rows, next(reversed(rows))

    async def checksums(self, site_id: str) -> dict[str, checksum.Checksum]:
        """Per-table checksums of a site's live rows (columns in spec order)."""
        out: dict[str, checksum.Checksum] = {}
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            for name, io in self.io.items():
                out[name] = await io.live_checksum(conn, site_id)
        return out

    async def status(self, site_id: str | None = None) -> list[dict[str, Any]]:
        """Per-site lag: feed head, each node's watermark and pull cursor, open conflicts."""
        async with self.pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
            sites = await conn.fetch(
                "SELECT s.site_id, s.name, s.feed_head,"
                " (SELECT count(*) FROM conflicts c"
                "  WHERE c.site_id = s.site_id AND c.resolved_at IS NULL) AS open_conflicts"
                " FROM sites s WHERE $1::text IS NULL OR s.site_id = $1 ORDER BY s.site_id",
                site_id,
            )
            nodes = await conn.fetch(
                "SELECT d.site_id, d.node_id, d.name, d.revoked, d.pull_cursor,"
                " d.last_push_at, d.last_pull_at, COALESCE(l.last_seq, 0) AS watermark"
                " FROM devices d LEFT JOIN ledger l"
                "  ON l.site_id = d.site_id AND l.origin = d.node_id"
                " WHERE $1::text IS NULL OR d.site_id = $1 ORDER BY d.site_id, d.node_id",
                site_id,
            )
        by_site: dict[str, list[dict[str, Any]]] = {}
        heads = {s["site_id"]: int(s["feed_head"]) for s in sites}
        for n in nodes:
            cursor = n["pull_cursor"]
            by_site.setdefault(n["site_id"], []).append(
                {
                    "node_id": n["node_id"],
                    "name": n["name"],
                    "revoked": n["revoked"],
                    "watermark": int(n["watermark"]),
                    "pull_cursor": cursor,
                    "lag_revs": heads.get(n["site_id"], 0) - (cursor or 0),
                    "last_push_at_ms": _ms(n["last_push_at"]),
                    "last_pull_at_ms": _ms(n["last_pull_at"]),
                }
            )
        return [
            {
                "site_id": s["site_id"],
                "name": s["name"],
                "feed_head": int(s["feed_head"]),
                "open_conflicts": int(s["open_conflicts"]),
                "nodes": by_site.get(s["site_id"], []),
            }
            for s in sites
        ]


def _ms(value: Any) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)
