"""Additive per-table checksums that prove two replicas hold the same rows.

Each live row hashes to 64 bits (BLAKE2b over a canonical msgpack of its key and its
values in column order); a table's checksum is the count and the sum of its row hashes
modulo 2**64. Sums combine across ranges or pages by addition, so either side can compute
them in pieces, and order does not matter.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import msgpack

_MOD = 2**64


def row_hash(pk: str, values: Mapping[str, object], columns: Sequence[str]) -> int:
    """The 64-bit hash of one row's key and values (in the given column order)."""
    packed = msgpack.packb([pk, [values.get(c) for c in columns]], use_bin_type=True)
    return int.from_bytes(hashlib.blake2b(packed, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Checksum:
    """Row count and sum of row hashes; ``a + b`` combines two ranges."""

    count: int = 0
    total: int = 0

    def __add__(self, other: Checksum) -> Checksum:
        return Checksum(self.count + other.count, (self.total + other.total) % _MOD)


def table_checksum(
    rows: Iterable[tuple[str, Mapping[str, object]]], columns: Sequence[str]
) -> Checksum:
    """The checksum of a table's live rows given as (pk, values) pairs."""
    count = total = 0
    for pk, values in rows:
        count += 1
        total += row_hash(pk, values, columns)
    return Checksum(count, total % _MOD)
