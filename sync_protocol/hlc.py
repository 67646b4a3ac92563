"""Hybrid logical clock (Kulkarni et al.), packed into one integer.

A timestamp is ``wall_ms << 16 | counter``. Packing makes comparison plain integer
comparison, and a counter that overflows simply carries into the wall part, which keeps
every timestamp unique and strictly increasing without a special case. The clock never
reads time itself: ``now_ms`` is passed in, so tests can skew it by an hour.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

COUNTER_BITS = 16
_COUNTER_MASK = (1 << COUNTER_BITS) - 1


def pack(wall_ms: int, counter: int = 0) -> int:
    """Pack a wall-clock millisecond and a counter into one timestamp."""
    return (wall_ms << COUNTER_BITS) + counter


def wall_ms(ts: int) -> int:
    """The wall-clock part of a timestamp, in ms since the epoch."""
    return ts >> COUNTER_BITS


def counter(ts: int) -> int:
    """The logical counter part of a timestamp."""
    return ts & _COUNTER_MASK


@dataclass(slots=True)
class HybridClock:
    """A node's hybrid logical clock; ``now_ms`` is the node's wall clock."""

    now_ms: Callable[[], int]
    last: int = 0
    #: measured offset of the last remote timestamp ahead of our wall clock, in ms
    last_skew_ms: int = 0
    #: a remote timestamp further ahead than this is not adopted (None: always adopt)
    max_forward_ms: int | None = None
    refused: int = 0

    def now(self) -> int:
        """A timestamp for a local event: greater than every one issued or observed."""
        self.last = max(self.last + 1, pack(self.now_ms()))
        return self.last

    def observe(self, remote: int) -> int:
        """Merge a remote timestamp; returns the new local timestamp."""
        physical = self.now_ms()
        if remote <= 0:  # a peer that sent no timestamp tells us nothing
            return self.now()
        self.last_skew_ms = wall_ms(remote) - physical
        if self.max_forward_ms is not None and self.last_skew_ms > self.max_forward_ms:
            # A peer whose clock runs far ahead must not drag ours along with it.
            self.refused += 1
            remote = 0
        self.last = max(self.last + 1, remote + 1, pack(physical))
        return self.last


def estimate_offset_ms(sent_ms: int, received_ms: int, server_ms: int) -> int:
    """How far our clock runs ahead of a server's (NTP-style midpoint estimate)."""
    return (sent_ms + received_ms) // 2 - server_ms
