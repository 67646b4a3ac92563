"""Pull frames built from feed entries that are stored already packed.

The feed keeps each entry as its packed wire row, so a page is the frame header, the
payload's scalar fields and the stored bytes joined: nothing is unpacked and packed again
(that round trip was most of a pull's cost). The result is byte-for-byte what
``wire.encode_pull`` makes from the same rows; ``tests/test_cloud_store.py`` pins that, so
a change to the wire format cannot drift past this module unnoticed.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import msgpack

from sync_protocol.errors import ErrorCode, LocalProtocolError
from sync_protocol.wire import DEFAULT_LIMITS, PROTOCOL_VERSION, Limits


def encode_pull_packed(
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
    limits: Limits = DEFAULT_LIMITS,
) -> bytes:
    """``wire.encode_pull`` for entries given as packed ``entry_row`` bytes."""
    fields = {
        "cursor": cursor,
        "next": next_cursor,
        "head": head,
        "more": more,
        "conflicts": conflicts,
        "server_ms": server_ms,
        "hlc": hlc,
    }
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack_map_header(len(fields) + 1)]
    for key, value in fields.items():
        parts += (packer.pack(key), packer.pack(value))
    parts += (packer.pack("entries"), packer.pack_array_header(len(entries)), *entries)
    raw = b"".join(parts)
    if len(raw) > limits.max_payload_bytes:
        raise LocalProtocolError(ErrorCode.BATCH_TOO_LARGE, "payload exceeds the bound")
    body = zlib.compress(raw, 1)
    frame: bytes = msgpack.packb(
        {
            "v": PROTOCOL_VERSION,
            "kind": "pull",
            "site": site,
            "node": node,
            "codec": "zlib",
            "sha256": hashlib.sha256(body).digest(),
            "body": body,
        },
        use_bin_type=True,
    )
    if len(frame) > limits.max_frame_bytes:
        raise LocalProtocolError(ErrorCode.BATCH_TOO_LARGE, "frame exceeds the bound")
    return frame
