"""The push/pull session state machines (no I/O: bytes in, bytes and decisions out).

An edge runs two channels to the cloud at once. The push channel sends its change log in
order; the pull channel reads the site's feed after a cursor. Each is a small table of
states; a driver (the edge uplink) feeds in what happened and does what the session says::

    push:  IDLE --send--> SENDING --ack--> IDLE
                          SENDING --fail--> BACKOFF --retry--> IDLE
           (up to ``window`` batches, 3 by default, may be out at once; answers are taken
           oldest first)
    pull:  IDLE --request--> WAITING --page--> APPLYING --applied--> IDLE
                             WAITING --fail--> BACKOFF --retry--> IDLE

Cursors only move when the driver reports that what they cover is durable, so a crash at
any point resumes from the last committed position: the cloud's dedupe watermark makes a
resent push harmless, and re-applying a feed page writes the same row states again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from .changes import Change
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .wire import (
    DEFAULT_LIMITS,
    Limits,
    PackedChange,
    PullPage,
    PushAck,
    decode_ack,
    decode_pull,
    encode_push,
    encode_push_packed,
)


class State(StrEnum):
    """Where a channel is."""

    IDLE = "idle"
    SENDING = "sending"
    WAITING = "waiting"
    APPLYING = "applying"
    BACKOFF = "backoff"


PUSH_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "send"): State.SENDING,
    (State.IDLE, "fail"): State.BACKOFF,
    (State.SENDING, "send"): State.SENDING,  # a second batch while the first is on the wire
    (State.SENDING, "ack"): State.IDLE,
    (State.SENDING, "ack_some"): State.SENDING,  # the oldest answered, another still out
    (State.SENDING, "fail"): State.BACKOFF,
    (State.SENDING, "abort"): State.IDLE,
    (State.BACKOFF, "retry"): State.IDLE,
    (State.BACKOFF, "abort"): State.IDLE,
}

PULL_TRANSITIONS: dict[tuple[State, str], State] = {
    (State.IDLE, "request"): State.WAITING,
    (State.IDLE, "fail"): State.BACKOFF,
    (State.WAITING, "page"): State.APPLYING,
    (State.WAITING, "fail"): State.BACKOFF,
    (State.WAITING, "abort"): State.IDLE,
    (State.APPLYING, "applied"): State.IDLE,
    (State.APPLYING, "fail"): State.BACKOFF,
    (State.APPLYING, "abort"): State.IDLE,
    (State.BACKOFF, "retry"): State.IDLE,
    (State.BACKOFF, "abort"): State.IDLE,
}


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter; the random draw in [0, 1) is passed in."""

    base_s: float = 0.25
    cap_s: float = 30.0

    def delay(self, attempt: int, draw: float) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based)."""
        return float(draw * min(self.cap_s, self.base_s * (2 ** min(attempt, 30))))


class _Channel:
    table: dict[tuple[State, str], State]

    def __init__(self, backoff: Backoff) -> None:
        self.state = State.IDLE
        self.backoff = backoff
        self.failures = 0

    def _move(self, event: str) -> None:
        try:
            self.state = self.table[(self.state, event)]
        except KeyError:
            raise LocalProtocolError(
                ErrorCode.SESSION_STATE, f"cannot {event} while {self.state.value}"
            ) from None

    def fail(self, draw: float) -> float:
        """The request failed (network, 5xx, refusal): back off; returns the delay."""
        self._move("fail")
        delay = self.backoff.delay(self.failures, draw)
        self.failures += 1
        return delay

    def retry(self) -> None:
        """The backoff delay has passed."""
        self._move("retry")

    def abort(self) -> None:
        """The request was cancelled (shutdown): back to idle, cursors untouched."""
        if self.state is not State.IDLE:
            self._move("abort")


@dataclass(frozen=True, slots=True)
class InFlight:
    """The batch a push channel is waiting on."""

    first: int
    last: int
    body: bytes


class PushSession(_Channel):
    """Sends a node's change log in order and tracks what the cloud has acknowledged."""

    table = PUSH_TRANSITIONS

    def __init__(
        self,
        site: str,
        node: str,
        acked_through: int,
        limits: Limits = DEFAULT_LIMITS,
        backoff: Backoff = Backoff(),
        window: int = 3,
    ) -> None:
        super().__init__(backoff)
        self.site, self.node, self.limits = site, node, limits
        self.acked_through = acked_through
        self.window = window
        #: batches sent and not yet answered, oldest first
        self.in_flight: list[InFlight] = []

    @property
    def next_seq(self) -> int:
        """The seq the next batch must start at (after everything acknowledged or sent)."""
        return (self.in_flight[-1].last if self.in_flight else self.acked_through) + 1

    def _check_next(self, first: int) -> None:
        if first != self.next_seq:
            raise LocalProtocolError(
                ErrorCode.SESSION_STATE, f"next batch must start at seq {self.next_seq}"
            )
        if len(self.in_flight) >= self.window:
            raise LocalProtocolError(ErrorCode.SESSION_STATE, "the send window is full")

    def send(self, changes: Sequence[Change], codec: str = "zlib") -> bytes:
        """Frame the next batch; it must start right after what is acknowledged or sent."""
        if not changes:
            raise LocalProtocolError(ErrorCode.SESSION_STATE, "a batch carries changes")
        self._check_next(changes[0].seq)
        body = encode_push(self.site, self.node, changes, codec, self.limits)
        self._move("send")
        self.in_flight.append(InFlight(changes[0].seq, changes[-1].seq, body))
        return body

    def prepare(self, rows: Sequence[PackedChange], codec: str = "zlib") -> InFlight:
        """Frame changes stored packed by their writer (``wire.PackedChange``), without sending.

        Framing touches no state, so a driver can prepare the next batch while the current
        one is on the wire, then ``send_prepared`` it.
        """
        if not rows:
            raise LocalProtocolError(ErrorCode.SESSION_STATE, "a batch carries changes")
        first, last = rows[0][0], rows[-1][0]
        if last - first + 1 != len(rows):
            raise LocalProtocolError(ErrorCode.SESSION_STATE, "a batch's seqs must be contiguous")
        return InFlight(
            first, last, encode_push_packed(self.site, self.node, rows, codec, self.limits)
        )

    def send_prepared(self, batch: InFlight) -> bytes:
        """Send a prepared batch; it must start right after what is acknowledged or sent."""
        self._check_next(batch.first)
        self._move("send")
        self.in_flight.append(batch)
        return batch.body

    def send_packed(self, rows: Sequence[PackedChange], codec: str = "zlib") -> bytes:
        """``send`` for changes stored packed by their writer."""
        return self.send_prepared(self.prepare(rows, codec))

    def receive_ack(self, body: bytes) -> PushAck:
        """Take the answer to the oldest batch out; the acknowledged watermark moves forward."""
        if not self.in_flight:
            raise LocalProtocolError(ErrorCode.SESSION_STATE, "no batch in flight")
        ack = decode_ack(body)
        if ack.acked_through < self.in_flight[0].first - 1:
            raise RemoteProtocolError(ErrorCode.MALFORMED, "ack goes backwards")
        self.in_flight.pop(0)
        self._move("ack_some" if self.in_flight else "ack")
        self.failures = 0
        self.acked_through = max(self.acked_through, ack.acked_through)
        return ack

    def fail(self, draw: float) -> float:
        """A request failed: every batch out is forgotten (resent from the watermark)."""
        self.in_flight = []
        return super().fail(draw)

    def resync(self, acked_through: int) -> None:
        """Adopt a watermark learnt elsewhere (the store, or a gap answer); idle only."""
        if self.state is not State.IDLE:
            raise LocalProtocolError(ErrorCode.SESSION_STATE, "resync only while idle")
        self.acked_through = acked_through

    def abort(self) -> None:
        """The push was cancelled: forget the batches in flight."""
        super().abort()
        self.in_flight = []

    def receive_gap(self, expected: int, draw: float) -> float:
        """The cloud wants seq ``expected`` next: resume from there (after a short wait)."""
        self.acked_through = expected - 1
        return self.fail(draw)


class PullSession(_Channel):
    """Reads a site's feed page by page after a durable cursor."""

    table = PULL_TRANSITIONS

    def __init__(
        self,
        site: str,
        node: str,
        cursor: int,
        limits: Limits = DEFAULT_LIMITS,
        backoff: Backoff = Backoff(),
    ) -> None:
        super().__init__(backoff)
        self.site, self.node, self.limits = site, node, limits
        self.cursor = cursor

    def request(self) -> int:
        """Start a pull; returns the cursor to ask from."""
        self._move("request")
        return self.cursor

    def receive_page(self, body: bytes) -> PullPage:
        """Verify a page; it must continue from our cursor."""
        page = decode_pull(body, self.limits)
        if page.cursor != self.cursor or page.next < page.cursor:
            raise RemoteProtocolError(ErrorCode.INVALID_CURSOR, "page does not continue our cursor")
        self._move("page")
        return page

    def applied(self, page: PullPage) -> None:
        """The page is committed locally: move the cursor past it."""
        self._move("applied")
        self.failures = 0
        self.cursor = page.next
