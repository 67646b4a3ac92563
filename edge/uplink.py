"""The sync daemon: pushes the edge's outbox to the cloud and pulls the site's feed.

How it works. Two tasks share one ``aiohttp.ClientSession`` for as long as the edge runs;
each is driven by its ``sync_protocol.session`` state machine, which frames and verifies
bytes and says how long to back off. The I/O is all here.

* Push: wait on the store's ``changed`` event (set after every committed local write), then
  send the outbox after the acknowledged watermark in batches of ``batch_max_changes``, as the
  stored msgpack blobs, and record each ack; loop while more is waiting. In a backlog the
  session's window of batches is out at once and slides: each answer lets the next batch go,
  so the cloud (which applies them in order) always has one queued, and the batches beyond
  the window are read and framed while it travels. ``sequence_gap`` resumes from the cloud's
  ``expected`` (``decide_gap``); a refusal (4xx) is shown in the status and retried with
  backoff, keeping every change.
* Pull: long-poll ``GET /v1/sync/pull`` after the durable cursor (saying up to which seq the
  node holds its own changes, so its own new rows are not sent back), apply each page in one
  store transaction, and ask again at once (without waiting while the page says ``more``).
  When a page may have changed the open conflicts, the local conflicts mirror is refreshed.

Network errors, timeouts and 5xx back off with full jitter and retry forever. Every step is
one store transaction and cursors move only after it commits, so cancelling either task at
any await leaves the store consistent: a resent batch is deduplicated by the cloud and a
re-pulled page writes the same rows again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

import aiohttp
import msgpack

from sync_protocol.errors import ErrorCode, LocalProtocolError, RemoteProtocolError, SyncError
from sync_protocol.hlc import estimate_offset_ms
from sync_protocol.session import Backoff, InFlight, PullSession, PushSession, State
from sync_protocol.wire import PullPage, decode_error

from .config import SyncSettings
from .errors import EdgeError, EdgeErrorCode, StorageError
from .store import EdgeStore, wall_clock_ms

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/x-fynlo-sync"
PUSH_PATH = "/v1/sync/push"
PULL_PATH = "/v1/sync/pull"
CONFLICTS_PATH = "/v1/sync/conflicts"

#: failures that are the link's fault, not the request's: retried without being a refusal
_NETWORK_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)
#: what a sync step can fail with and still be retried
_STEP_ERRORS = (*_NETWORK_ERRORS, SyncError, sqlite3.Error, StorageError)


# -- pure decisions -----------------------------------------------------------------------


class GapAction(StrEnum):
    """What to do when the cloud answers a push with ``sequence_gap``."""

    ADVANCE = "advance"  #: the cloud already holds more than we thought: move the watermark up
    RESEND = "resend"  #: the cloud holds less: send again from ``expected``
    RETRY = "retry"  #: nothing to correct; try the same batch again
    STUCK = "stuck"  #: cannot continue without a person (see the message)


@dataclass(frozen=True, slots=True)
class GapDecision:
    """The action for a sequence gap and why."""

    action: GapAction
    message: str = ""
    code: EdgeErrorCode | None = None  #: for STUCK: which condition stops pushing


def decide_gap(expected: int, acked_through: int, last_seq: int, oldest_kept: int) -> GapDecision:
    """Decide how to resume after ``sequence_gap`` (``oldest_kept``: lowest seq in the outbox)."""
    have = expected - 1
    if have > last_seq:
        return GapDecision(
            GapAction.STUCK,
            f"the cloud holds seq {have} of this node, which wrote only {last_seq}",
            EdgeErrorCode.CLOUD_AHEAD,
        )
    if have > acked_through:
        return GapDecision(GapAction.ADVANCE)
    if have == acked_through:
        return GapDecision(GapAction.RETRY)
    if expected >= oldest_kept:
        return GapDecision(GapAction.RESEND)
    return GapDecision(
        GapAction.STUCK,
        f"the cloud wants seq {expected} but the outbox keeps only seq {oldest_kept} onwards",
        EdgeErrorCode.CHANGES_LOST,
    )


def is_transient(status: int) -> bool:
    """Whether an HTTP status means "try again" rather than "this request is refused"."""
    return status >= 500 or status in (408, 425, 429)


class RateMeter:
    """Changes per second over a sliding window; times are passed in (ms)."""

    def __init__(self, window_ms: int = 10_000) -> None:
        self.window_ms = window_ms
        self._events: deque[tuple[int, int]] = deque()
        self.total = 0

    def add(self, now_ms: int, count: int) -> None:
        """Count ``count`` changes done at ``now_ms``."""
        self.total += count
        self._events.append((now_ms, count))
        self._trim(now_ms)

    def rate(self, now_ms: int) -> float:
        """Changes per second over the window ending at ``now_ms``."""
        self._trim(now_ms)
        if not self._events:
            return 0.0
        span_ms = max(now_ms - self._events[0][0], 1000)
        return round(sum(n for _, n in self._events) * 1000 / span_ms, 1)

    def _trim(self, now_ms: int) -> None:
        while self._events and self._events[0][0] < now_ms - self.window_ms:
            self._events.popleft()


# -- status -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LinkError:
    """The last failure of a channel, as shown in the status."""

    channel: str  #: "push", "pull" or "conflicts"
    code: str  #: the cloud's error code, or network / timeout / http_<status>
    message: str
    at_ms: int
    http_status: int | None = None


@dataclass(frozen=True, slots=True)
class Catchup:
    """Progress of this run: what moved and what is left."""

    pushed: int  #: changes acknowledged by the cloud since the uplink started
    push_backlog: int  #: changes written here that the cloud has not acknowledged
    push_rate: float  #: changes acknowledged per second, recent
    pulled: int  #: feed entries applied since the uplink started
    pull_backlog: int  #: feed revisions between the pull cursor and the cloud head last seen
    pull_rate: float  #: feed entries applied per second, recent


@dataclass(frozen=True, slots=True)
class UplinkStatus:
    """The live part of sync health."""

    running: bool
    online: bool  #: the last request to the cloud succeeded
    last_ok_ms: int | None  #: when a request last succeeded
    last_error: LinkError | None  #: the latest failure not since cleared by a success
    clock_skew_ms: int | None  #: how far this edge's clock runs ahead of the cloud's
    stuck: str | None  #: why pushing has stopped for good, if it has
    catchup: Catchup

    def to_dict(self) -> dict[str, Any]:
        """The status as a JSON-ready dict."""
        return asdict(self)


class UplinkError(Exception):
    """A sync step failed (``sync_once`` raises it; the loops back off and retry)."""

    def __init__(self, error: LinkError, delay_s: float = 0.0) -> None:
        super().__init__(f"{error.channel}: {error.code}: {error.message}")
        self.error = error
        self.delay_s = delay_s


# -- the daemon ---------------------------------------------------------------------------


class Uplink:
    """Keeps one edge store in sync with the cloud: a push task and a pull task."""

    def __init__(
        self,
        store: EdgeStore,
        url: str,
        token: str,
        settings: SyncSettings | None = None,
        *,
        rand: Callable[[], float] = random.random,
        now_ms: Callable[[], int] = wall_clock_ms,
    ) -> None:
        self.store = store
        self.url = url.rstrip("/")
        self.settings = settings or SyncSettings()
        self._token = token
        self._rand = rand
        self._now_ms = now_ms
        self._backoff = Backoff(self.settings.backoff_base_s, self.settings.backoff_cap_s)
        self._batch = self.settings.batch_max_changes
        self._http: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._push = self._new_push()
        self._pull = self._new_pull()
        self._mirrored_conflicts: int | None = None
        self._errors: dict[str, LinkError] = {}
        self._online = False
        self._last_ok_ms: int | None = None
        self._skew_ms: int | None = None
        self._stuck: str | None = None
        #: until a push is acknowledged, a change never sent goes alone (see ``_push_step``)
        self._probe = True
        #: the next window of batches, read and framed while a push is on the wire, by the
        #: seq each follows: (limit, task)
        self._prefetch: dict[int, tuple[int, asyncio.Future[InFlight | None]]] = {}
        self._pushed = RateMeter()
        self._pulled = RateMeter()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the push and pull tasks (they run until ``stop``)."""
        if self._tasks:
            return
        self._open_http()
        self._ready_sessions()
        for name, loop in (("push", self._push_loop), ("pull", self._pull_loop)):
            task = asyncio.create_task(loop(), name=f"fynlo-uplink-{name}")
            task.add_done_callback(self._task_done)
            self._tasks.append(task)

    async def stop(self) -> None:
        """Cancel both tasks, wait for them, and close the HTTP session."""
        self._drop_prefetch()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._online = False  # a stopped uplink is not talking to the cloud

    async def sync_once(self) -> None:
        """Push everything, then pull until the feed has no more; raises ``UplinkError``."""
        if self._tasks:
            raise RuntimeError("sync_once while the uplink tasks are running")
        self._open_http()
        self._ready_sessions()
        while await self._push_step():
            pass
        while (await self._pull_step(wait_s=0)).more:
            pass

    def status(self) -> UplinkStatus:
        """Online state, last error, clock skew and catch-up progress."""
        now = self._now_ms()
        cursors = self.store.cursors()
        latest = max(self._errors.values(), key=lambda e: e.at_ms, default=None)
        return UplinkStatus(
            running=bool(self._tasks),
            online=self._online,
            last_ok_ms=self._last_ok_ms,
            last_error=latest,
            clock_skew_ms=self._skew_ms,
            stuck=self._stuck,
            catchup=Catchup(
                pushed=self._pushed.total,
                push_backlog=cursors.last_seq - cursors.acked_through,
                push_rate=self._pushed.rate(now),
                pulled=self._pulled.total,
                pull_backlog=max(0, cursors.cloud_head - cursors.pull_cursor),
                pull_rate=self._pulled.rate(now),
            ),
        )

    def _ready_sessions(self) -> None:
        """Bring both channels to IDLE at the store's cursors, keeping their failure counts."""
        for channel in (self._push, self._pull):
            if channel.state is State.BACKOFF:
                channel.retry()
        if self._push.state is not State.IDLE:  # interrupted mid-request by a cancellation
            self._push = self._new_push()
        if self._pull.state is not State.IDLE:
            self._pull = self._new_pull()
        self._pull.cursor = self.store.cursors().pull_cursor

    def _new_push(self) -> PushSession:
        c = self.store.cursors()
        return PushSession(
            self.store.site_id, self.store.node_id, c.acked_through, backoff=self._backoff
        )

    def _new_pull(self) -> PullSession:
        c = self.store.cursors()
        return PullSession(
            self.store.site_id, self.store.node_id, c.pull_cursor, backoff=self._backoff
        )

    def _open_http(self) -> None:
        if self._http is None:
            self._http = aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {self._token}", "Accept": CONTENT_TYPE}
            )

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("uplink task %s died", task.get_name(), exc_info=exc)
            self._fail_status(task.get_name(), "uplink_crashed", repr(exc))

    # -- loops -----------------------------------------------------------------------------

    async def _push_loop(self) -> None:
        local_failures = 0
        while True:
            self.store.changed.clear()
            try:
                more = await self._push_step()
                local_failures = 0
            except UplinkError as exc:
                await asyncio.sleep(exc.delay_s)
                self._push.retry()
                continue
            except (StorageError, sqlite3.Error) as exc:  # the file failed us: try again later
                self._push.abort()  # batches out are sent again from the stored cursors
                self._fail_status("push", _network_code(exc), str(exc))
                await asyncio.sleep(self._backoff.delay(local_failures, self._rand()))
                local_failures += 1
                continue
            except (EdgeError, SyncError) as exc:  # the store or the protocol forbids going on
                self._stuck = exc.message
                self._fail_status("push", str(exc.code), exc.message)
                log.error("pushing stopped: %s", exc.message)
                return
            if not more:
                await self.store.changed.wait()

    async def _pull_loop(self) -> None:
        wait_s = 0.0  # the first pull answers at once, so status is known straight away
        while True:
            try:
                page = await self._pull_step(wait_s)
            except UplinkError as exc:
                await asyncio.sleep(exc.delay_s)
                self._pull.retry()
                continue
            wait_s = 0 if page.more else self.settings.long_poll_s

    # -- push ------------------------------------------------------------------------------

    async def _push_step(self) -> bool:
        """Send the next batch (a sliding window of them in a backlog), record the acks.

        Returns False when there was nothing to send.
        """
        cursors = self.store.cursors()
        self._push.acked_through = cursors.acked_through
        # A database restored from an older copy reuses sequence numbers the cloud already
        # holds, which it would skip as duplicates. A change never sent that the cloud calls
        # a duplicate proves it; the first such push after start carries one change only,
        # so that nothing new is applied before the edge stops.
        never_sent = cursors.sent_through <= cursors.acked_through
        probing = self._probe and never_sent
        limit = 1 if probing else self._batch
        try:
            batch = await self._next_batch(cursors.acked_through, limit)
            if batch is None:
                return False
        except LocalProtocolError as exc:
            if exc.code is ErrorCode.BATCH_TOO_LARGE and self._batch > 1:
                self._batch = max(1, min(self._batch, limit) // 2)
                return True  # try again at once with the smaller batch
            raise
        batches = [batch]
        while not probing and _full(batches[-1], limit) and len(batches) < self._push.window:
            # A backlog: the next batch goes out at once, so the cloud decodes and checks it
            # while it applies the one ahead (it applies them in order).
            try:
                following = await self._next_batch(batches[-1].last, limit)
            except LocalProtocolError:
                following = None  # sent on its own next time, where its error counts
            if following is None:
                break
            batches.append(following)
        sliding = not probing and _full(batches[-1], limit)
        if sliding:  # likely more: frame the next window while this one travels
            self._prefetch_outbox(batches[-1].last)
        http = self._require_http()
        out: deque[tuple[InFlight, asyncio.Future[tuple[int, bytes, int]], int, int]] = deque()

        async def send(group: list[InFlight], sent_before: int) -> None:
            """Mark ``group`` sent (durably, before any byte leaves), then post each batch."""
            bodies = [self._push.send_prepared(b) for b in group]
            try:
                await self.store.mark_sent(group[-1].last)
            except BaseException:
                self._push.abort()
                raise
            sent = self._now_ms()
            for batch, body in zip(group, bodies, strict=True):
                out.append(
                    (batch, asyncio.ensure_future(self._post(http, body)), sent, sent_before)
                )

        first = True
        try:
            await send(batches, cursors.sent_through)
            while out:
                batch, post, sent, sent_before = out.popleft()
                try:
                    status, data, received = await post
                except _STEP_ERRORS as exc:
                    raise self._failed(self._push, "push", _network_code(exc), str(exc)) from exc
                if status != 200:
                    if not first and decode_error(data)[0] == ErrorCode.SEQUENCE_GAP:
                        # Checked before the batch ahead of it committed (another worker):
                        # not a loss, just send it again.
                        self._push.abort()
                        return True
                    return await self._push_refused(status, data)
                first = False
                await self._take_ack(batch, data, sent_before, sent, received)
                if sliding:
                    # A sliding window: the answer freed a place, so the next batch goes out
                    # now and the cloud, which applies batches in order, always has one queued.
                    tail = out[-1][0] if out else batch
                    sliding = await self._slide(tail, limit, send)
        finally:
            for _, post, _, _ in out:
                post.cancel()
            await asyncio.gather(*(post for _, post, _, _ in out), return_exceptions=True)
        self._probe = False
        if self._batch < self.settings.batch_max_changes:
            self._batch = min(self.settings.batch_max_changes, self._batch * 2)
        return True

    async def _slide(
        self,
        tail: InFlight,
        limit: int,
        send: Callable[[list[InFlight], int], Awaitable[None]],
    ) -> bool:
        """Send the full batch after ``tail``, if there is one; False once the backlog ends."""
        try:
            following = await self._next_batch(tail.last, limit)
        except LocalProtocolError:
            return False  # sent on its own by the next step, where its error counts
        if following is None:
            return False
        await send([following], self.store.cursors().sent_through)
        if not _full(following, limit):
            return False
        if following.last not in self._prefetch:
            self._prefetch_outbox(following.last)
        return True

    async def _post(self, http: aiohttp.ClientSession, body: bytes) -> tuple[int, bytes, int]:
        async with http.post(
            self.url + PUSH_PATH,
            data=body,
            headers={"Content-Type": CONTENT_TYPE},
            timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s),
        ) as resp:
            return resp.status, await resp.read(), self._now_ms()

    async def _take_ack(
        self, batch: InFlight, data: bytes, sent_before: int, sent: int, received: int
    ) -> None:
        """Check and record the answer to ``batch``."""
        try:
            ack = self._push.receive_ack(data)
        except RemoteProtocolError as exc:
            raise self._failed(self._push, "push", str(exc.code), exc.message) from exc
        self._observe(ack.hlc, sent, received, ack.server_ms)
        duplicates = ack.outcomes.get("duplicate", 0)
        held_through = batch.first + duplicates - 1
        if duplicates and held_through > sent_before:
            raise EdgeError(
                EdgeErrorCode.CLOUD_AHEAD,
                f"the cloud already holds seq {held_through} of this node, which never sent "
                "it: this database was restored from an older copy",
                held_through=held_through,
                sent_through=sent_before,
            )
        acked_before = self.store.cursors().acked_through
        await self.store.record_ack(ack)
        self._pushed.add(received, max(0, ack.acked_through - acked_before))
        self._succeeded("push")

    def _prefetch_outbox(self, after: int) -> None:
        """Read and frame the window of batches after ``after`` while the current one travels.

        So the next window goes out as soon as this one is answered, and the cloud, which
        applies batches in order, is not left waiting while the edge reads and frames.
        """
        self._drop_prefetch()
        limit, last_seq = self._batch, self.store.cursors().last_seq

        async def read_and_frame(start: int) -> InFlight | None:
            rows = await self.store.outbox_rows_after(start, limit)
            # A short read reached the end of the outbox as it was then: writes may have come
            # since, so only a full batch is worth framing ahead.
            return self._push.prepare(rows) if len(rows) == limit else None

        for k in range(self._push.window):
            start = after + k * limit
            if start + limit > last_seq:
                break  # not a full batch written yet
            task = asyncio.ensure_future(read_and_frame(start))
            task.add_done_callback(_retrieve)  # an unused prefetch's error is not an error
            self._prefetch[start] = (limit, task)

    def _drop_prefetch(self) -> None:
        for _, task in self._prefetch.values():
            task.cancel()
        self._prefetch.clear()

    async def _next_batch(self, after: int, limit: int) -> InFlight | None:
        """The next framed batch: one prepared while the last push travelled, if it fits."""
        ahead = self._prefetch.pop(after, None)
        if after >= self.store.cursors().last_seq:  # nothing written since: no outbox read
            if ahead is not None:
                ahead[1].cancel()
            return None
        if ahead is not None:
            ahead_limit, task = ahead
            if ahead_limit <= limit and not task.cancelled():
                try:
                    batch = await task
                except (sqlite3.Error, SyncError):
                    batch = None  # read it again below, where a failure counts
                if batch is not None:
                    return batch
            else:
                task.cancel()
        rows = await self.store.outbox_rows_after(after, limit)
        return self._push.prepare(rows) if rows else None

    async def _push_refused(self, status: int, data: bytes) -> bool:
        code, message, details = decode_error(data)
        if not is_transient(status):
            await self.store.mark_unsent()  # a refused batch is refused whole: none of it landed
        if code == ErrorCode.SEQUENCE_GAP and type(details.get("expected")) is int:
            return await self._resume_after_gap(details["expected"], message)
        if code == ErrorCode.BATCH_TOO_LARGE and self._batch > 1:
            self._batch = max(1, self._batch // 2)
        raise self._failed(self._push, "push", code or f"http_{status}", message, status)

    async def _resume_after_gap(self, expected: int, message: str) -> bool:
        c = self.store.cursors()
        decision = decide_gap(expected, c.acked_through, c.last_seq, c.reflected_through + 1)
        log.warning("push: sequence gap, cloud expects %d: %s", expected, decision.action)
        if decision.action is GapAction.STUCK:
            self._stuck = decision.message
            self._fail_status("push", str(ErrorCode.SEQUENCE_GAP), decision.message, 409)
            self._push.fail(self._rand())
            raise EdgeError(decision.code or EdgeErrorCode.CHANGES_LOST, decision.message)
        if decision.action is GapAction.ADVANCE:
            await self.store.record_watermark(expected - 1)
        elif decision.action is GapAction.RESEND:
            await self.store.rewind_acked(expected - 1)
        delay = self._push.receive_gap(expected, self._rand())
        error = self._fail_status("push", str(ErrorCode.SEQUENCE_GAP), message, 409)
        raise UplinkError(error, delay)

    # -- pull ------------------------------------------------------------------------------

    async def _pull_step(self, wait_s: float) -> PullPage:
        """Fetch and apply one page (waiting up to ``wait_s`` for news); returns it."""
        # The store's cursor is the truth: a page's transaction outlives a cancelled step (it
        # is shielded), so it may have moved the cursor after this session was built.
        self._pull.cursor = self.store.cursors().pull_cursor
        cursor = self._pull.request()
        http = self._require_http()
        params = {
            "cursor": str(cursor),
            "limit": str(self.settings.pull_limit),
            "wait": str(round(wait_s)),
            # the rows this node created itself need not come back to it
            "holds": str(self.store.cursors().last_seq),
        }
        timeout = aiohttp.ClientTimeout(total=wait_s + self.settings.request_timeout_s)
        try:
            sent = self._now_ms()
            async with http.get(self.url + PULL_PATH, params=params, timeout=timeout) as resp:
                status, data = resp.status, await resp.read()
            received = self._now_ms()
        except _STEP_ERRORS as exc:
            raise self._failed(self._pull, "pull", _network_code(exc), str(exc)) from exc
        if status != 200:
            code, message, _ = decode_error(data)
            raise self._failed(self._pull, "pull", code or f"http_{status}", message, status)
        try:
            page = self._pull.receive_page(data)
            # A held request was stamped by the cloud when it answered, not midway.
            self._observe(page.hlc, received if wait_s else sent, received, page.server_ms)
            written = await self.store.apply_page(page)
        except (SyncError, StorageError, sqlite3.Error) as exc:
            raise self._failed(self._pull, "pull", _network_code(exc), str(exc)) from exc
        self._pull.applied(page)
        self._pulled.add(received, written)
        self._succeeded("pull")
        # Parking or settling a conflict also gives its row a feed entry, so a page with
        # entries while conflicts are open may change the set even when the count stays.
        open_before = self._mirrored_conflicts
        if page.conflicts != open_before or (page.entries and (page.conflicts or open_before)):
            await self._refresh_conflicts()
        return page

    async def _refresh_conflicts(self) -> None:
        """Mirror the site's open conflicts locally; a failure is retried with the next page."""
        http = self._require_http()
        try:
            async with http.get(
                self.url + CONFLICTS_PATH,
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s),
            ) as resp:
                status, data = resp.status, await resp.read()
            if status != 200:
                code, message, _ = decode_error(data)
                self._fail_status("conflicts", code or f"http_{status}", message, status)
                return
            conflicts = _parse_conflicts(data)
            await self.store.replace_conflicts(conflicts)
        except _STEP_ERRORS as exc:
            self._fail_status("conflicts", _network_code(exc), str(exc))
            return
        self._mirrored_conflicts = len(conflicts)
        self._succeeded("conflicts")

    # -- bookkeeping -----------------------------------------------------------------------

    def _require_http(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("the uplink is not started")
        return self._http

    def _observe(self, remote_hlc: int, sent_ms: int, received_ms: int, server_ms: int) -> None:
        self.store.observe(remote_hlc)
        if server_ms:
            self._skew_ms = estimate_offset_ms(sent_ms, received_ms, server_ms)

    def _succeeded(self, channel: str) -> None:
        self._online = True
        self._last_ok_ms = self._now_ms()
        self._errors.pop(channel, None)

    def _fail_status(
        self, channel: str, code: str, message: str, http_status: int | None = None
    ) -> LinkError:
        error = LinkError(channel, code, message, self._now_ms(), http_status)
        self._errors[channel] = error
        if http_status is None:
            self._online = False  # the cloud did not answer at all
        else:
            self._online = True
            self._last_ok_ms = error.at_ms
        return error

    def _failed(
        self,
        channel: PushSession | PullSession,
        name: str,
        code: str,
        message: str,
        http_status: int | None = None,
    ) -> UplinkError:
        """Move ``channel`` to backoff and describe the failure; the caller raises it."""
        error = self._fail_status(name, code, message, http_status)
        if http_status is not None and is_transient(http_status):
            self._online = False
        delay = channel.fail(self._rand())
        log.warning("%s failed (%s: %s); retrying in %.2fs", name, code, message, delay)
        return UplinkError(error, delay)


def _full(batch: InFlight, limit: int) -> bool:
    return batch.last - batch.first + 1 == limit


def _retrieve(task: asyncio.Future[InFlight | None]) -> None:
    if not task.cancelled():
        task.exception()


def _network_code(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (SyncError, StorageError)):
        return str(exc.code)
    if isinstance(exc, sqlite3.Error):
        return "store_error"
    return "network"


def _parse_conflicts(data: bytes) -> list[Mapping[str, Any]]:
    try:
        body = msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise RemoteProtocolError(ErrorCode.MALFORMED, f"conflicts: not msgpack: {exc}") from None
    items = body.get("conflicts") if isinstance(body, dict) else None
    if not isinstance(items, list) or not all(isinstance(c, dict) for c in items):
        raise RemoteProtocolError(ErrorCode.MALFORMED, "conflicts: expected a list of maps")
    return items
