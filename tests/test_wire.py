"""The batch wire format: round trips, and every way a frame is refused."""

from __future__ import annotations

import hashlib
import zlib
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cloud import rows as cloud_rows
from edge.tables import pack as stored_blob
from sync_protocol import Change, ErrorCode, FeedEntry, Op, RemoteProtocolError, RowState, Version
from sync_protocol.wire import (
    DEFAULT_LIMITS,
    PROTOCOL_VERSION,
    Limits,
    PushAck,
    change_row,
    decode_ack,
    decode_error,
    decode_pull,
    decode_push,
    encode_ack,
    encode_error,
    encode_pull,
    encode_push,
    encode_push_packed,
    pack_entry,
)

from .generators import change_runs, ids, scalars


@given(change_runs(), st.sampled_from(["none", "zlib"]))
def test_packed_push_is_the_same_frame(changes: list[Change], codec: str) -> None:
    rows = [
        (
            c.seq,
            c.table,
            c.pk,
            int(c.op),
            stored_blob(c.fields) or b"",  # as the edge's outbox stores them (never None)
            c.base,
            c.hlc,
            stored_blob(c.old),
        )
        for c in changes
    ]
    origin = changes[0].origin
    packed = encode_push_packed("site-1", origin, rows, codec)
    assert packed == encode_push("site-1", origin, changes, codec)


@given(change_runs(), st.sampled_from(["none", "zlib"]))
def test_push_round_trip(changes: list[Change], codec: str) -> None:
    frame = encode_push("site-1", changes[0].origin, changes, codec)
    batch = decode_push(frame)
    assert batch.site == "site-1" and batch.node == changes[0].origin
    assert batch.changes == changes
    assert (batch.first, batch.last) == (changes[0].seq, changes[-1].seq)


states = st.builds(
    RowState,
    ids,
    st.dictionaries(st.text(min_size=1, max_size=8), scalars, max_size=5),
    st.builds(Version, st.integers(0, 2**40), st.integers(0, 2**60), ids),
    st.dictionaries(
        st.text(min_size=1, max_size=8),
        st.builds(Version, st.integers(0, 2**40), st.integers(0, 2**60), ids),
        max_size=3,
    ),
    st.booleans(),
)


@given(st.lists(st.tuples(st.integers(1, 2**40), ids, states), max_size=20), st.booleans())
def test_pull_round_trip(rows: list[tuple[int, str, RowState]], more: bool) -> None:
    entries = [FeedEntry(rev, table, state) for rev, table, state in rows]
    frame = encode_pull(
        "s",
        "n",
        5,
        99,
        [pack_entry(e) for e in entries],
        next_cursor=77,
        more=more,
        conflicts=2,
        server_ms=123,
        hlc=456,
    )
    page = decode_pull(frame)
    assert page.entries == entries
    assert (page.cursor, page.next, page.head, page.more, page.conflicts) == (5, 77, 99, more, 2)
    assert (page.server_ms, page.hlc) == (123, 456)


@given(st.integers(1, 2**40), ids, states)
def test_the_clouds_feed_entries_are_the_wire_rows_bytes(
    rev: int, table: str, state: RowState
) -> None:
    """The cloud packs entries with msgspec: byte for byte what the wire's packer writes."""
    assert cloud_rows.pack_entry(rev, table, state) == pack_entry(FeedEntry(rev, table, state))
    created = (dict(state.values), rev, state.version.hlc, state.version.origin, 1)
    new_state = RowState(state.pk, dict(state.values), Version(rev, *created[2:4]), {}, False)
    assert cloud_rows.pack_new_entry(table, state.pk, created) == pack_entry(
        FeedEntry(rev, table, new_state)
    )


def test_ack_round_trip() -> None:
    ack = PushAck(
        41, 900, {"applied": 3, "duplicate": 1}, 1700, 1 << 20, ((30, 38, 800), (39, 41, 898))
    )
    assert decode_ack(encode_ack("s", "n", ack)) == ack
    assert (ack.rev_of(30), ack.rev_of(38), ack.rev_of(40), ack.rev_of(42)) == (800, 808, 899, None)


def test_error_body_round_trip_and_garbage() -> None:
    assert decode_error(encode_error("hash_mismatch", "bad", {"a": 1})) == (
        "hash_mismatch",
        "bad",
        {"a": 1},
    )
    assert decode_error(b"<html>502</html>")[0] == "malformed_error"


def _change(seq: int = 1, **kw: object) -> Change:
    base: dict[str, object] = dict(
        origin="edge-a",
        seq=seq,
        table="orders",
        pk="o1",
        op=Op.INSERT,
        fields={"covers": 2},
        base=0,
        hlc=1,
    )
    base.update(kw)
    return Change(**base)  # type: ignore[arg-type]


def _outer(frame: bytes) -> dict[str, object]:
    return msgpack.unpackb(frame, raw=False)  # type: ignore[no-any-return]


def _repack(outer: dict[str, object]) -> bytes:
    return msgpack.packb(outer, use_bin_type=True)


def _code(data: bytes, limits: Limits = DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(RemoteProtocolError) as err:
        decode_push(data, limits)
    return err.value.code


def test_refusals_each_have_their_own_code() -> None:
    good = encode_push("s", "edge-a", [_change(1), _change(2, pk="o2")])
    assert _code(b"\xc1\x00garbage") is ErrorCode.MALFORMED
    assert _code(msgpack.packb([1, 2, 3])) is ErrorCode.MALFORMED

    outer = _outer(good)
    outer["v"] = PROTOCOL_VERSION + 1
    assert _code(_repack(outer)) is ErrorCode.UNSUPPORTED_VERSION

    outer = _outer(good)
    outer["codec"] = "brotli"
    assert _code(_repack(outer)) is ErrorCode.UNSUPPORTED_CODEC

    outer = _outer(good)
    body = bytearray(outer["body"])  # type: ignore[arg-type]
    body[-1] ^= 0xFF
    outer["body"] = bytes(body)
    assert _code(_repack(outer)) is ErrorCode.HASH_MISMATCH

    outer = _outer(good)
    outer["kind"] = "pull"
    assert _code(_repack(outer)) is ErrorCode.WRONG_KIND

    assert _code(good, Limits(max_frame_bytes=len(good) - 1)) is ErrorCode.BATCH_TOO_LARGE
    assert _code(good, Limits(max_records=1)) is ErrorCode.BATCH_TOO_LARGE


def test_decompression_bomb_is_refused_before_it_inflates() -> None:
    raw = msgpack.packb({"first": 1, "last": 1, "changes": [], "pad": b"\0" * 10_000_000})
    body = zlib.compress(raw, 9)
    frame = _repack(
        {
            "v": PROTOCOL_VERSION,
            "kind": "push",
            "site": "s",
            "node": "n",
            "codec": "zlib",
            "sha256": hashlib.sha256(body).digest(),
            "body": body,
        }
    )
    assert len(frame) < 100_000
    assert _code(frame, Limits(max_payload_bytes=1_000_000)) is ErrorCode.BATCH_TOO_LARGE


def _frame_with(payload: dict[str, object]) -> bytes:
    body = msgpack.packb(payload, use_bin_type=True)
    return _repack(
        {
            "v": PROTOCOL_VERSION,
            "kind": "push",
            "site": "s",
            "node": "n",
            "codec": "none",
            "sha256": hashlib.sha256(body).digest(),
            "body": body,
        }
    )


def test_change_rows_are_checked() -> None:
    row = [1, "orders", "o1", 1, {"covers": 2}, 0, 5, None]
    assert decode_push(_frame_with({"first": 1, "last": 1, "changes": [row]})).changes

    gap = _frame_with({"first": 1, "last": 3, "changes": [row, [3, *row[1:]]]})
    assert _code(gap) is ErrorCode.SEQUENCE_GAP
    bad_op = _frame_with(
        {"first": 1, "last": 1, "changes": [[1, "orders", "o1", 9, {}, 0, 5, None]]}
    )
    assert _code(bad_op) is ErrorCode.INVALID_CHANGE
    empty_pk = _frame_with(
        {"first": 1, "last": 1, "changes": [[1, "orders", "", 1, {}, 0, 5, None]]}
    )
    assert _code(empty_pk) is ErrorCode.INVALID_CHANGE
    nul_pk = _frame_with(
        {"first": 1, "last": 1, "changes": [[1, "orders", "o\x001", 1, {}, 0, 5, None]]}
    )
    assert _code(nul_pk) is ErrorCode.INVALID_CHANGE
    big_hlc = _frame_with(
        {"first": 1, "last": 1, "changes": [[1, "orders", "o", 1, {}, 0, 2**63, None]]}
    )
    assert _code(big_hlc) is ErrorCode.INVALID_CHANGE
    neg_base = _frame_with(
        {"first": 1, "last": 1, "changes": [[1, "orders", "o", 1, {}, -1, 5, None]]}
    )
    assert _code(neg_base) is ErrorCode.INVALID_CHANGE
    short = _frame_with({"first": 1, "last": 1, "changes": [[1, "orders"]]})
    assert _code(short) is ErrorCode.MALFORMED
    assert _code(_frame_with({"first": 1, "last": 1, "changes": []})) is ErrorCode.MALFORMED
    wrong_last = _frame_with({"first": 1, "last": 2, "changes": [row]})
    assert _code(wrong_last) is ErrorCode.MALFORMED
    delete_with_fields = _frame_with(
        {"first": 1, "last": 1, "changes": [[1, "orders", "o", 3, {"a": 1}, 0, 5, None]]}
    )
    assert _code(delete_with_fields) is ErrorCode.INVALID_CHANGE


# -- the bulk checks of a push agree with the change-by-change ones ---------------------------

#: values that break one rule or another wherever they land in a change row
ODD_VALUES: st.SearchStrategy[object] = st.sampled_from(
    [None, True, False, 0, -1, 1.0, 2**63, 2**64 - 1, "", "x" * 129, "a\x00b", b"pk", [1], {}]
)


@st.composite
def push_rows(draw: st.DrawFn) -> tuple[str, int, int, list[object]]:
    """A push payload's (node, first, last, rows), often with one or two odd items in it."""
    changes = draw(change_runs())
    rows: list[object] = [change_row(c) for c in changes]
    first, last = changes[0].seq, changes[-1].seq
    for _ in range(draw(st.integers(0, 2))):
        index = draw(st.integers(0, len(rows) - 1))
        kind = draw(st.sampled_from(["item", "shape", "seq"]))
        row = change_row(changes[index])
        if kind == "item":
            row[draw(st.integers(0, 7))] = draw(ODD_VALUES)
            rows[index] = row
        elif kind == "shape":
            rows[index] = draw(st.sampled_from([row[:7], [*row, None], tuple(row), "row"]))
        else:
            row[0] = draw(st.sampled_from([row[0] + 1, row[0] - 1, 0, -5, 2**63]))
            rows[index] = row
    node = draw(st.sampled_from([changes[0].origin, changes[0].origin, "", "n\x00de"]))
    return node, first, last, rows


def _decode_one_by_one(node: str, first: int, last: int, rows: list[Any]) -> list[Change]:
    """The push rules change by change, as ``decode_push`` must apply them (the reference)."""
    changes: list[Change] = []
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 8:
            raise RemoteProtocolError(ErrorCode.MALFORMED, f"change {index} is not an 8-item row")
        seq, table, pk, op, fields, base, hlc, old = row
        if seq != first + index:
            raise RemoteProtocolError(ErrorCode.SEQUENCE_GAP, "gap")
        if type(op) is not int or op not in (1, 2, 3):
            raise RemoteProtocolError(ErrorCode.INVALID_CHANGE, f"unknown op {op!r}")
        changes.append(Change(node, seq, table, pk, Op(op), fields, base, hlc, old))
    if last != first + len(rows) - 1:
        raise RemoteProtocolError(ErrorCode.MALFORMED, "last")
    return changes


@settings(max_examples=500)
@given(push_rows())
def test_decode_push_refuses_exactly_what_the_rules_refuse(
    payload: tuple[str, int, int, list[object]],
) -> None:
    node, first, last, rows = payload
    body = msgpack.packb({"first": first, "last": last, "changes": rows}, use_bin_type=True)
    frame = _repack(
        {
            "v": PROTOCOL_VERSION,
            "kind": "push",
            "site": "s",
            "node": node,
            "codec": "none",
            "sha256": hashlib.sha256(body).digest(),
            "body": body,
        }
    )
    try:
        want: list[Change] | ErrorCode = _decode_one_by_one(
            node, first, last, msgpack.unpackb(body, raw=False)["changes"]
        )
    except RemoteProtocolError as exc:
        want = exc.code
    try:
        got: list[Change] | ErrorCode = decode_push(frame).changes
    except RemoteProtocolError as exc:
        got = exc.code
    assert got == want
    if isinstance(got, list):
        assert all(type(c) is Change for c in got)
