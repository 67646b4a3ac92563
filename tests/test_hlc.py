"""The hybrid logical clock: monotonic whatever the wall clock does."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sync_protocol.hlc import HybridClock, counter, estimate_offset_ms, pack, wall_ms

HOUR = 3_600_000


class FakeWall:
    """A wall clock the test moves by hand (forwards, backwards, by an hour)."""

    def __init__(self, start: int) -> None:
        self.t = start

    def __call__(self) -> int:
        return self.t


events = st.lists(
    st.tuples(
        st.sampled_from(["tick", "observe"]),
        st.integers(min_value=-HOUR, max_value=HOUR),  # wall clock jump
        st.integers(min_value=-2 * HOUR, max_value=2 * HOUR),  # remote offset
        st.integers(min_value=0, max_value=70_000),  # remote counter (can overflow 16 bits)
    ),
    min_size=1,
    max_size=200,
)


@given(events)
def test_timestamps_strictly_increase_and_pass_every_observed_one(evts: list) -> None:
    wall = FakeWall(1_700_000_000_000)
    clock = HybridClock(wall)
    last = 0
    for kind, jump, offset, remote_counter in evts:
        wall.t = max(0, wall.t + jump)
        if kind == "tick":
            ts = clock.now()
        else:
            remote = pack(max(0, wall.t + offset)) + remote_counter
            ts = clock.observe(remote)
            assert ts > remote
        assert ts > last
        assert wall_ms(ts) >= wall.t  # never behind the physical clock
        last = ts


def test_a_clock_an_hour_slow_still_orders_after_what_it_has_seen() -> None:
    cloud_wall = FakeWall(1_700_000_000_000)
    edge_wall = FakeWall(cloud_wall.t - HOUR)
    cloud, edge = HybridClock(cloud_wall), HybridClock(edge_wall)
    seen = cloud.now()
    assert edge.now() < seen  # before syncing, the slow clock is behind
    edge.observe(seen)
    assert edge.last_skew_ms == HOUR
    assert edge.now() > seen  # causality holds after it has seen the cloud's write


def test_a_far_ahead_peer_is_measured_but_not_adopted_when_bounded() -> None:
    wall = FakeWall(1_700_000_000_000)
    clock = HybridClock(wall, max_forward_ms=5 * 60_000)
    ahead = pack(wall.t + HOUR)
    ts = clock.observe(ahead)
    assert clock.last_skew_ms == HOUR and clock.refused == 1
    assert wall_ms(ts) == wall.t
    unbounded = HybridClock(FakeWall(wall.t))
    assert unbounded.observe(ahead) > ahead


def test_counter_overflow_carries_into_wall() -> None:
    wall = FakeWall(1000)
    clock = HybridClock(wall)
    stamps = [clock.now() for _ in range(70_000)]
    assert stamps == sorted(set(stamps))
    assert counter(stamps[0]) == 0 and wall_ms(stamps[-1]) == 1001


def test_offset_estimate_uses_the_round_trip_midpoint() -> None:
    assert estimate_offset_ms(sent_ms=1000, received_ms=1100, server_ms=1050 - HOUR) == HOUR
