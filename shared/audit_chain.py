"""The audit trail's hash chain, as pure functions both the edge and the cloud check it with.

An edge numbers its audit entries ``position`` 1, 2, … and gives each a ``hash``: SHA-256
over the previous entry's hash (``GENESIS`` before the first) and this entry's canonical
JSON (the ``CHAINED_FIELDS``, sorted keys, no spaces). Changing, removing or reordering any
entry therefore breaks the chain from there on. ``ChainWalk`` checks a chain one entry at a
time (so a long trail can be streamed through it); ``verify`` walks a whole iterable.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from typing import Any

GENESIS = "0" * 64
#: the entry's columns its hash covers (``prev_hash`` enters separately, ``hash`` is the result)
CHAINED_FIELDS = ("position", "at_ms", "employee_id", "device_id", "action", "detail")


def entry_hash(prev_hash: str, entry: Mapping[str, Any]) -> str:
    """The hash of an entry given the previous entry's hash."""
    return hashlib.sha256(f"{prev_hash}\n{canonical_json(entry)}".encode()).hexdigest()


def canonical_json(entry: Mapping[str, Any]) -> str:
    """The entry's ``CHAINED_FIELDS`` (absent: null) as ``json.dumps`` writes them with sorted
    keys and no spaces (non-ASCII escaped): the text the hash covers.

    Every entry is written on a hot path (one per mutation), so the usual values (text, an
    integer, null) are written here directly, with the escaping ``json.dumps`` itself uses;
    any other value goes through ``json.dumps``. Both give the same text.
    """
    parts = []
    for name in _SORTED_FIELDS:
        value = entry.get(name)
        kind = type(value)
        if value is None:
            text = "null"
        elif kind is str:
            text = _escape(value)
        elif kind is int:
            text = int.__repr__(value)
        else:
            body = {name: entry.get(name) for name in CHAINED_FIELDS}
            return json.dumps(body, sort_keys=True, separators=(",", ":"))
        parts.append(f'"{name}":{text}')
    return "{" + ",".join(parts) + "}"


_SORTED_FIELDS = tuple(sorted(CHAINED_FIELDS))
_escape = encode_basestring_ascii  # json.dumps's own (ensure_ascii=True)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The result of walking the chain."""

    ok: bool
    entries: int
    first_bad_position: int | None = None
    reason: str | None = None


class ChainWalk:
    """Checks one chain entry by entry, in position order; stops at the first bad entry.

    ``entries`` in the verdict counts the entries checked, the bad one included.
    """

    __slots__ = ("_prev", "_count", "_failure")

    def __init__(self) -> None:
        self._prev = GENESIS
        self._count = 0
        self._failure: Verdict | None = None

    @property
    def ok(self) -> bool:
        """Whether every entry so far checks out."""
        return self._failure is None

    def add(self, entry: Mapping[str, Any]) -> bool:
        """Check the next entry; returns whether the chain still checks out (no-op once bad)."""
        if self._failure is not None:
            return False
        self._count += 1
        expected = self._count
        if entry.get("position") != expected:
            reason = f"entry {expected} is missing or out of order"
        elif entry.get("prev_hash") != self._prev:
            reason = "it does not follow the entry before it"
        elif entry.get("hash") != entry_hash(self._prev, entry):
            reason = "its content does not match its hash"
        else:
            self._prev = str(entry["hash"])
            return True
        self._failure = Verdict(False, self._count, expected, reason)
        return False

    def verdict(self) -> Verdict:
        """The verdict on the entries added so far."""
        return self._failure or Verdict(True, self._count)


def verify(entries: Iterable[Mapping[str, Any]]) -> Verdict:
    """Check a chain given its entries in position order."""
    walk = ChainWalk()
    for entry in entries:
        if not walk.add(entry):
            break
    return walk.verdict()
