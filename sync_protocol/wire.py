"""The batch wire format: msgpack frames with a version, a codec and a content hash.

A frame is a msgpack map::

    {"v": PROTOCOL_VERSION, "kind": "push" | "pull" | "ack", "site": str, "node": str,
     "codec": "none" | "zlib", "sha256": 32 bytes, "body": bytes}

``body`` is the (compressed) msgpack payload; ``sha256`` is the hash of ``body`` exactly as
sent, verified before anything is decompressed or applied. The receiver checks, in order:
frame size, msgpack well-formedness, version, kind, codec, hash, decompressed size, then
every record. Any failure raises ``RemoteProtocolError`` with its own code and nothing is
applied. Payloads:

push
    ``{"first": seq, "last": seq, "changes": [[seq, table, pk, op, fields, base, hlc, old]…]}``
    — all changes from ``node``, sequence numbers contiguous from ``first`` to ``last``.
pull
    ``{"cursor": rev, "next": rev, "head": rev, "more": bool, "conflicts": int,
    "server_ms": int, "hlc": int, "segments": [[first_seq, last_seq, first_rev]…],
    "entries": [[rev, table, pk, deleted, values, vrev, vhlc, vorigin, fv]…]}`` where ``fv``
    is ``{column: [rev, hlc, origin]}`` or nil, and ``segments`` are the pulling node's own
    ingests whose revisions fall in ``(cursor, next]`` (see ``PushAck``).
ack
    ``{"acked_through": seq, "head": rev, "outcomes": {kind: count}, "server_ms": int,
    "hlc": int, "segments": [[first_seq, last_seq, first_rev]…]}`` — the answer to a push.
    ``segments`` say at which feed revision each change of the batch took effect (this
    push's and, for resent duplicates, an earlier one's): change ``seq`` in a segment has
    revision ``first_rev + seq - first_seq``. An edge needs that to know exactly which of
    its own changes a feed state already contains.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import msgpack
import msgspec

from .changes import (
    INT64_MAX,
    MAX_ID_LEN,
    Change,
    FeedEntry,
    Op,
    RowState,
    Version,
    prechecked_change,
)
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

PROTOCOL_VERSION = 1
CODECS = ("none", "zlib")
KINDS = ("push", "pull", "ack")


@dataclass(frozen=True, slots=True)
class Limits:
    """Size bounds a receiver enforces (and a sender respects)."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_payload_bytes: int = 64 * 1024 * 1024
    max_records: int = 50_000


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True, slots=True)
class Frame:
    """A verified, decoded frame."""

    kind: str
    site: str
    node: str
    payload: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PushBatch:
    """A node's contiguous run of changes."""

    site: str
    node: str
    first: int
    last: int
    changes: list[Change]


@dataclass(frozen=True, slots=True)
class PullPage:
    """A page of a site's feed after ``cursor``, up to ``next``."""

    cursor: int
    next: int
    head: int
    more: bool
    conflicts: int
    server_ms: int
    hlc: int
    entries: list[FeedEntry]
    #: the pulling node's own ingests with revisions in (cursor, next]: which of its changes
    #: these states contain, exactly, even while its push answer is still on the way
    segments: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class PushAck:
    """The cloud's answer to a push."""

    acked_through: int
    head: int
    outcomes: dict[str, int]
    server_ms: int
    hlc: int
    segments: tuple[tuple[int, int, int], ...] = ()

    def rev_of(self, seq: int) -> int | None:
        """The feed revision at which change ``seq`` took effect, if this ack says."""
        for first_seq, last_seq, first_rev in self.segments:
            if first_seq <= seq <= last_seq:
                return first_rev + seq - first_seq
        return None


def _malformed(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.MALFORMED, message)


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as exc:
        raise _malformed(f"not valid msgpack: {exc}") from None


def encode_frame(
    kind: str,
    site: str,
    node: str,
    payload: Mapping[str, Any],
    codec: str = "zlib",
    limits: Limits = DEFAULT_LIMITS,
    level: int = 1,
) -> bytes:
    """Encode, compress and hash a payload into a frame."""
    raw = cast(bytes, msgpack.packb(payload, use_bin_type=True))
    return _frame_from_raw(kind, site, node, raw, codec, limits, level)


def _frame_from_raw(
    kind: str, site: str, node: str, raw: bytes, codec: str, limits: Limits, level: int
) -> bytes:
    if kind not in KINDS or codec not in CODECS:
        raise LocalProtocolError(ErrorCode.WRONG_KIND, f"cannot send kind={kind} codec={codec}")
    if len(raw) > limits.max_payload_bytes:
        raise LocalProtocolError(ErrorCode.BATCH_TOO_LARGE, "payload exceeds the bound")
    body = zlib.compress(raw, level) if codec == "zlib" else raw
    frame = cast(
        bytes,
        msgpack.packb(
            {
                "v": PROTOCOL_VERSION,
                "kind": kind,
                "site": site,
                "node": node,
                "codec": codec,
                "sha256": hashlib.sha256(body).digest(),
                "body": body,
            },
            use_bin_type=True,
        ),
    )
    if len(frame) > limits.max_frame_bytes:
        raise LocalProtocolError(ErrorCode.BATCH_TOO_LARGE, "frame exceeds the bound")
    return frame


def decode_frame(data: bytes, expect_kind: str, limits: Limits = DEFAULT_LIMITS) -> Frame:
    """Verify and decode a frame; raise ``RemoteProtocolError`` on any defect."""
    kind, site, node, raw = _open_frame(data, expect_kind, limits)
    payload = _unpack(raw)
    if not isinstance(payload, dict):
        raise _malformed("a payload is a map")
    return Frame(kind, site, node, payload)


def _open_frame(data: bytes, expect_kind: str, limits: Limits) -> tuple[str, str, str, bytes]:
    """Check a frame's envelope, hash and bounds; its kind, site, node and raw payload."""
    if len(data) > limits.max_frame_bytes:
        raise RemoteProtocolError(
            ErrorCode.BATCH_TOO_LARGE,
            f"frame of {len(data)} bytes exceeds {limits.max_frame_bytes}",
        )
    outer = _unpack(data)
    if not isinstance(outer, dict):
        raise _malformed("a frame is a map")
    version = outer.get("v")
    if version != PROTOCOL_VERSION:
        raise RemoteProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"protocol version {version!r} is not supported (this side speaks {PROTOCOL_VERSION})",
            supported=[PROTOCOL_VERSION],
        )
    kind, site, node = outer.get("kind"), outer.get("site"), outer.get("node")
    if kind != expect_kind:
        raise RemoteProtocolError(ErrorCode.WRONG_KIND, f"expected a {expect_kind} frame")
    if not isinstance(site, str) or not isinstance(node, str):
        raise _malformed("site and node must be strings")
    codec, digest, body = outer.get("codec"), outer.get("sha256"), outer.get("body")
    if codec not in CODECS:
        raise RemoteProtocolError(ErrorCode.UNSUPPORTED_CODEC, f"codec {codec!r} is not known")
    if not isinstance(body, bytes) or not isinstance(digest, bytes):
        raise _malformed("body and sha256 must be bytes")
    if hashlib.sha256(body).digest() != digest:
        raise RemoteProtocolError(ErrorCode.HASH_MISMATCH, "body does not match its sha256")
    if codec == "zlib":
        inflater = zlib.decompressobj()
        try:
            raw = inflater.decompress(body, limits.max_payload_bytes)
        except zlib.error as exc:
            raise _malformed(f"body does not inflate: {exc}") from None
        if inflater.unconsumed_tail:
            raise RemoteProtocolError(ErrorCode.BATCH_TOO_LARGE, "payload inflates past the bound")
    else:
        raw = body
    return kind, site, node, raw


# -- push -------------------------------------------------------------------------------


def change_row(change: Change) -> list[Any]:
    """A change as its wire row (origin travels once, in the frame)."""
    return [
        change.seq,
        change.table,
        change.pk,
        int(change.op),
        dict(change.fields),
        change.base,
        change.hlc,
        None if change.old is None else dict(change.old),
    ]


def encode_push(
    site: str,
    node: str,
    changes: Sequence[Change],
    codec: str = "zlib",
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Encode a node's contiguous changes as a push frame."""
    if not changes:
        raise LocalProtocolError(ErrorCode.INVALID_CHANGE, "a push carries at least one change")
    if len(changes) > limits.max_records:
        raise LocalProtocolError(ErrorCode.BATCH_TOO_LARGE, "too many changes for one batch")
    payload = {
        "first": changes[0].seq,
        "last": changes[-1].seq,
        "changes": [change_row(c) for c in changes],
    }
    return encode_frame("push", site, node, payload, codec, limits)


#: a change as stored by its writer, ready to send: (seq, table, pk, op, fields, base, hlc,
#: old) where ``fields`` and ``old`` are already msgpack-packed maps (``old`` may be None)
PackedChange = tuple[int, str, str, int, bytes, int, int, bytes | None]

_NIL = b"\xc0"


def encode_push_packed(
    site: str,
    node: str,
    rows: Sequence[PackedChange],
    codec: str = "zlib",
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """``encode_push`` for changes whose column maps are stored packed (no unpack, no repack).

    The receiver sees exactly the frame ``encode_push`` makes from the same changes.
    """
    if not rows:
        raise LocalProtocolError(ErrorCode.INVALID_CHANGE, "a push carries at least one change")
    if len(rows) > limits.max_records:
        raise LocalProtocolError(ErrorCode.BATCH_TOO_LARGE, "too many changes for one batch")
    packer = msgpack.Packer(use_bin_type=True)
    pack = packer.pack
    row_header = packer.pack_array_header(8)
    parts = [
        packer.pack_map_header(3),
        pack("first"),
        pack(rows[0][0]),
        pack("last"),
        pack(rows[-1][0]),
        pack("changes"),
        packer.pack_array_header(len(rows)),
    ]
    append = parts.append
    for seq, table, pk, op, fields, base, hlc, old in rows:
        append(row_header)
        append(pack(seq))
        append(pack(table))
        append(pack(pk))
        append(pack(op))
        append(fields)
        append(pack(base))
        append(pack(hlc))
        append(_NIL if old is None else old)
    return _frame_from_raw("push", site, node, b"".join(parts), codec, limits, 1)


def _int(value: object, what: str) -> int:
    if type(value) is not int:
        raise _malformed(f"{what} must be an integer")
    return value


_OPS = {int(op): op for op in Op}


class _PushPayload(msgspec.Struct, frozen=True):
    """A push payload of the expected shape (``decode_push``'s fast path)."""

    first: int
    last: int
    changes: list[tuple[int, str, str, int, dict[str, Any], int, int, dict[str, Any] | None]]


_PUSH_PAYLOAD = msgspec.msgpack.Decoder(_PushPayload)


def decode_push(data: bytes, limits: Limits = DEFAULT_LIMITS) -> PushBatch:
    """Verify and decode a push frame into changes with contiguous sequence numbers.

    The payload is read straight into its expected shape (msgspec: typed, in one pass, about
    twice as fast as a generic unpack, the largest cost of ingesting a catch-up). Anything
    that does not fit is read again generically, so that the checks below name its defect
    with the code they always have.
    """
    _, site, node, raw = _open_frame(data, "push", limits)
    rows: Any
    try:
        typed = _PUSH_PAYLOAD.decode(raw)
    except (ValueError, RecursionError):  # msgspec's decode and validation errors included
        payload = _unpack(raw)
        if not isinstance(payload, dict):
            raise _malformed("a payload is a map") from None
        rows, first, last = payload.get("changes"), payload.get("first"), payload.get("last")
    else:  # rows are tuples: as lists, the checks below see what a generic unpack gives
        rows, first, last = typed.changes, typed.first, typed.last
    if not isinstance(rows, list) or not rows:
        raise _malformed("changes must be a non-empty list")
    if len(rows) > limits.max_records:
        raise RemoteProtocolError(
            ErrorCode.BATCH_TOO_LARGE, f"{len(rows)} changes exceed {limits.max_records}"
        )
    first, last = _int(first, "first"), _int(last, "last")
    changes = _plain_changes(node, first, rows)
    if changes is None:
        rows = [list(row) if type(row) is tuple else row for row in rows]
        changes = _checked_changes(node, first, rows)
    if last != first + len(changes) - 1:
        raise _malformed("last does not match the changes carried")
    return PushBatch(site, node, first, last, changes)


def _plain_changes(node: str, first: int, rows: list[Any]) -> list[Change] | None:
    """The rows as changes if every one is plainly well formed, else None.

    The checks of ``_checked_changes`` (row shape, contiguous seq, op) and of
    ``Change.__post_init__``, made in one tight loop and more strictly (a map must be a
    ``dict``, as msgpack gives): a batch that fails any of them is left to
    ``_checked_changes``, which refuses it with the code the change-by-change order gives.
    """
    if not (_plain_id(node) and 0 < first <= INT64_MAX - len(rows) + 1):
        return None
    ops, build = _OPS, prechecked_change
    changes: list[Change] = []
    append = changes.append
    expected = first
    for row in rows:
        if type(row) not in (list, tuple) or len(row) != 8:
            return None
        seq, table, pk, op, fields, base, hlc, old = row
        if not (
            seq == expected
            and type(seq) is int
            and type(table) is str
            and 0 < len(table) <= MAX_ID_LEN
            and "\x00" not in table
            and type(pk) is str
            and 0 < len(pk) <= MAX_ID_LEN
            and "\x00" not in pk
            and type(op) is int
            and op in ops
            and type(fields) is dict
            and (op != Op.DELETE or not fields)
            and type(base) is int
            and 0 <= base <= INT64_MAX
            and type(hlc) is int
            and 0 <= hlc <= INT64_MAX
            and (old is None or type(old) is dict)
        ):
            return None
        append(build(node, seq, table, pk, ops[op], fields, base, hlc, old))
        expected += 1
    return changes


def _plain_id(value: object) -> bool:
    """Whether ``changes.check_id`` accepts ``value``."""
    return type(value) is str and 0 < len(value) <= MAX_ID_LEN and "\x00" not in value


def _checked_changes(node: str, first: int, rows: list[Any]) -> list[Change]:
    """The rows as changes, checked one by one: the first defect is refused with its code."""
    changes: list[Change] = []
    expected = first
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 8:
            raise _malformed(f"change {index} is not an 8-item row")
        seq, table, pk, op, fields, base, hlc, old = row
        if seq != expected:
            raise RemoteProtocolError(
                ErrorCode.SEQUENCE_GAP, f"change {index} has seq {seq}, expected {expected}"
            )
        kind = _OPS.get(op) if type(op) is int else None
        if kind is None:
            raise RemoteProtocolError(ErrorCode.INVALID_CHANGE, f"unknown op {op!r}")
        changes.append(Change(node, seq, table, pk, kind, fields, base, hlc, old))
        expected += 1
    return changes


# -- pull -------------------------------------------------------------------------------


def state_row(rev: int, table: str, state: RowState) -> list[Any]:
    """A row state at feed revision ``rev`` as its wire row (versions pack as arrays)."""
    values = state.values
    v = state.version
    return [
        rev,
        table,
        state.pk,
        state.deleted,
        values if type(values) is dict else dict(values),
        v.rev,
        v.hlc,
        v.origin,
        (state.fv if type(state.fv) is dict else dict(state.fv)) or None,
    ]


def pack_entry(entry: FeedEntry) -> bytes:
    """A feed entry packed as its wire row: stored once, served as is in every page."""
    return cast(bytes, msgpack.packb(state_row(entry.rev, entry.table, entry.state)))


def encode_pull(
    site: str,
    node: str,
    cursor: int,
    head: int,
    entries: Sequence[bytes],
    *,
    next_cursor: int,
    more: bool,
    conflicts: int,
    server_ms: int,
    hlc: int,
    segments: Sequence[tuple[int, int, int]] = (),
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """Encode a page of feed entries, given packed (``pack_entry``), as a pull frame.

    The payload is assembled around the packed entries, so nothing is unpacked and packed
    again: a page costs little more than joining the stored bytes and compressing them.
    """
    fields = {
        "cursor": cursor,
        "next": next_cursor,
        "head": head,
        "more": more,
        "conflicts": conflicts,
        "server_ms": server_ms,
        "hlc": hlc,
        "segments": [list(s) for s in segments],
    }
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(fields) + 1)]
    for key, value in fields.items():
        parts += (packer.pack(key), packer.pack(value))
    parts += (packer.pack("entries"), packer.pack_array_header(len(entries)), *entries)
    return _frame_from_raw("pull", site, node, b"".join(parts), "zlib", limits, 1)


def decode_pull(data: bytes, limits: Limits = DEFAULT_LIMITS) -> PullPage:
    """Verify and decode a pull frame into feed entries."""
    payload = decode_frame(data, "pull", limits).payload
    rows = payload.get("entries")
    if not isinstance(rows, list):
        raise _malformed("entries must be a list")
    if len(rows) > limits.max_records:
        raise RemoteProtocolError(ErrorCode.BATCH_TOO_LARGE, "too many entries")
    entries: list[FeedEntry] = []
    for index, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != 9:
            raise _malformed(f"entry {index} is not a 9-item row")
        rev, table, pk, deleted, values, vrev, vhlc, vorigin, fv = row
        if not isinstance(values, dict) or not isinstance(table, str) or not isinstance(pk, str):
            raise _malformed(f"entry {index} is not well formed")
        versions = {k: Version(*x) for k, x in fv.items()} if fv else {}
        state = RowState(pk, values, Version(vrev, vhlc, vorigin), versions, bool(deleted))
        entries.append(FeedEntry(_int(rev, "rev"), table, state))
    return PullPage(
        cursor=_int(payload.get("cursor"), "cursor"),
        next=_int(payload.get("next"), "next"),
        head=_int(payload.get("head"), "head"),
        more=bool(payload.get("more")),
        conflicts=_int(payload.get("conflicts", 0), "conflicts"),
        server_ms=_int(payload.get("server_ms", 0), "server_ms"),
        hlc=_int(payload.get("hlc", 0), "hlc"),
        entries=entries,
        segments=_segments(payload),
    )


# -- ack --------------------------------------------------------------------------------


def encode_ack(site: str, node: str, ack: PushAck) -> bytes:
    """Encode the cloud's answer to a push."""
    payload = {
        "acked_through": ack.acked_through,
        "head": ack.head,
        "outcomes": ack.outcomes,
        "server_ms": ack.server_ms,
        "hlc": ack.hlc,
        "segments": [list(s) for s in ack.segments],
    }
    return encode_frame("ack", site, node, payload, "none")


def decode_ack(data: bytes) -> PushAck:
    """Verify and decode a push answer."""
    payload = decode_frame(data, "ack").payload
    outcomes = payload.get("outcomes") or {}
    if not isinstance(outcomes, dict):
        raise _malformed("outcomes must be a map")
    return PushAck(
        acked_through=_int(payload.get("acked_through"), "acked_through"),
        head=_int(payload.get("head"), "head"),
        outcomes=outcomes,
        server_ms=_int(payload.get("server_ms", 0), "server_ms"),
        hlc=_int(payload.get("hlc", 0), "hlc"),
        segments=_segments(payload),
    )


def _segments(payload: Mapping[str, Any]) -> tuple[tuple[int, int, int], ...]:
    segments = payload.get("segments") or []
    if not isinstance(segments, list) or not all(
        isinstance(s, list) and len(s) == 3 and all(type(x) is int for x in s) for s in segments
    ):
        raise _malformed("segments must be [first_seq, last_seq, first_rev] triples")
    return tuple((a, b, c) for a, b, c in segments)


# -- errors -----------------------------------------------------------------------------


def encode_error(code: str, message: str, details: Mapping[str, object] | None = None) -> bytes:
    """An error body (msgpack map), as sent with a 4xx/5xx status."""
    body: dict[str, object] = {"code": code, "message": message}
    if details:
        body["details"] = dict(details)
    return cast(bytes, msgpack.packb({"error": body}, use_bin_type=True))


def decode_error(data: bytes) -> tuple[str, str, dict[str, Any]]:
    """Read an error body: (code, message, details); tolerant of non-msgpack bodies."""
    try:
        outer = msgpack.unpackb(data, raw=False)
        err = outer["error"]
        return str(err["code"]), str(err.get("message", "")), dict(err.get("details") or {})
    except (ValueError, TypeError, KeyError, msgpack.UnpackException):
        return "malformed_error", data[:200].decode("utf-8", "replace"), {}
