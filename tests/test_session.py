"""The push/pull session state machines, driven by hand as an uplink would."""

from __future__ import annotations

import pytest

from sync_protocol import Change, ErrorCode, LocalProtocolError, Op, RemoteProtocolError
from sync_protocol.session import (
    PULL_TRANSITIONS,
    PUSH_TRANSITIONS,
    Backoff,
    PullSession,
    PushSession,
    State,
)
from sync_protocol.wire import PushAck, decode_push, encode_ack, encode_pull


def changes(first: int, n: int) -> list[Change]:
    return [
        Change("edge-a", s, "orders", f"o{s}", Op.INSERT, {"covers": 2}, 0, s)
        for s in range(first, first + n)
    ]


def test_push_sends_in_order_and_moves_the_watermark_on_ack() -> None:
    push = PushSession("site", "edge-a", acked_through=0, window=2)
    body = push.send(changes(1, 3))
    assert push.state is State.SENDING and decode_push(body).last == 3
    push.send(changes(4, 2))  # a second batch may follow the first onto the wire
    with pytest.raises(LocalProtocolError) as err:
        push.send(changes(6, 1))  # but the window holds two
    assert err.value.code is ErrorCode.SESSION_STATE
    push.receive_ack(encode_ack("site", "edge-a", PushAck(3, 3, {}, 0, 0, ((1, 3, 1),))))
    assert (push.state, push.acked_through, push.next_seq) == (State.SENDING, 3, 6)
    push.receive_ack(encode_ack("site", "edge-a", PushAck(5, 5, {}, 0, 0, ((4, 5, 4),))))
    assert (push.state, push.acked_through, push.in_flight) == (State.IDLE, 5, [])
    with pytest.raises(LocalProtocolError):
        push.send(changes(7, 1))  # must continue right after the watermark


def test_push_failure_backs_off_with_growing_capped_jitter() -> None:
    push = PushSession("site", "edge-a", 0, backoff=Backoff(base_s=1, cap_s=8))
    delays = []
    for _ in range(6):
        push.send(changes(1, 1))
        delays.append(push.fail(draw=0.5))
        push.retry()
    assert delays == [0.5, 1, 2, 4, 4, 4]
    push.send(changes(1, 1))
    push.receive_ack(encode_ack("site", "edge-a", PushAck(1, 1, {}, 0, 0)))
    push.send(changes(2, 1))
    assert push.fail(draw=0.5) == 0.5  # success resets the attempt count


def test_push_gap_resumes_from_what_the_cloud_expects_and_abort_forgets() -> None:
    push = PushSession("site", "edge-a", 10)
    push.send(changes(11, 2))
    push.receive_gap(expected=8, draw=0.0)
    assert push.state is State.BACKOFF and push.acked_through == 7
    push.retry()
    push.send(changes(8, 5))
    push.abort()
    assert push.state is State.IDLE and push.in_flight == []
    push.resync(12)
    assert push.acked_through == 12


def test_an_ack_that_goes_backwards_is_refused() -> None:
    push = PushSession("site", "edge-a", 5)
    push.send(changes(6, 2))
    with pytest.raises(RemoteProtocolError):
        push.receive_ack(encode_ack("site", "edge-a", PushAck(2, 9, {}, 0, 0)))


def test_pull_cursor_moves_only_after_the_page_is_applied() -> None:
    pull = PullSession("site", "edge-a", cursor=4)
    assert pull.request() == 4
    page_body = encode_pull(
        "site", "edge-a", 4, 9, [], next_cursor=9, more=False, conflicts=0, server_ms=0, hlc=0
    )
    page = pull.receive_page(page_body)
    assert pull.state is State.APPLYING and pull.cursor == 4
    pull.applied(page)
    assert (pull.state, pull.cursor) == (State.IDLE, 9)
    pull.request()
    stale = encode_pull(
        "site", "edge-a", 1, 9, [], next_cursor=9, more=False, conflicts=0, server_ms=0, hlc=0
    )
    with pytest.raises(RemoteProtocolError) as err:
        pull.receive_page(stale)
    assert err.value.code is ErrorCode.INVALID_CURSOR


def test_transition_tables_name_only_known_states() -> None:
    for table in (PUSH_TRANSITIONS, PULL_TRANSITIONS):
        for (state, _event), target in table.items():
            assert isinstance(state, State) and isinstance(target, State)


def test_packed_batches_follow_the_same_rules() -> None:
    push = PushSession("site", "edge-a", acked_through=4)
    row = (5, "orders", "o5", 1, b"\x81\xa6covers\x02", 0, 5, None)
    with pytest.raises(LocalProtocolError):
        push.send_packed([(6, *row[1:])])  # must start right after the watermark
    with pytest.raises(LocalProtocolError):
        push.send_packed([row, (7, *row[1:])])  # and have no gaps
    batch = decode_push(push.send_packed([row, (6, *row[1:])]))
    assert [c.seq for c in batch.changes] == [5, 6] and batch.changes[0].fields == {"covers": 2}
    assert push.state is State.SENDING
