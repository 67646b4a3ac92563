"""The records the engine moves: changes (edge to cloud) and row states (cloud to edge).

A ``Change`` is what one node wrote: its id is ``(origin, seq)``, unique forever because
each node numbers its own changes 1, 2, 3… with no gaps. ``base`` is the cloud revision the
writer had seen when it wrote (its pull cursor): a cloud write with a higher revision, by
another node, is concurrent with this change. For COUNTER columns ``fields`` holds deltas.

A ``RowState`` is a row as the cloud holds it, with a version per column, so merges are
exact per field. Versions are kept sparse: ``fv`` only lists columns whose last write was
not the row's last change; every other column carries the row-level version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

from .errors import ErrorCode, RemoteProtocolError

Value = None | bool | int | str | bytes
Values = Mapping[str, Value]

MAX_ID_LEN = 128
INT64_MAX = 2**63 - 1


class Op(IntEnum):
    """What a change does to its row."""

    INSERT = 1
    UPDATE = 2
    DELETE = 3


def _bad(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID_CHANGE, message)


def check_id(kind: str, value: object) -> str:
    """Refuse an id that is not a non-empty short string without NUL characters."""
    if type(value) is not str or not 0 < len(value) <= MAX_ID_LEN or "\x00" in value:
        raise _bad(f"{kind} must be a non-empty string of at most {MAX_ID_LEN} characters")
    return value


class Version(NamedTuple):
    """Who last wrote a column: the cloud revision, the writer's HLC and its node.

    A named tuple rather than a dataclass: one is built per applied change, on the hot path.
    """

    rev: int
    hlc: int
    origin: str


@dataclass(frozen=True, slots=True)
class Change:
    """One write by one node: the unit of the change log, of push batches and of dedupe."""

    origin: str
    seq: int
    table: str
    pk: str
    op: Op
    fields: Values
    base: int
    hlc: int
    old: Values | None = None  #: the values the writer saw before (updates; for manual review)

    def __post_init__(self) -> None:
        origin, table, pk = self.origin, self.table, self.pk
        if not (
            type(origin) is str
            and type(table) is str
            and type(pk) is str
            and 0 < len(origin) <= MAX_ID_LEN
            and 0 < len(table) <= MAX_ID_LEN
            and 0 < len(pk) <= MAX_ID_LEN
            and "\x00" not in origin
            and "\x00" not in table
            and "\x00" not in pk
        ):
            check_id("origin", origin)
            check_id("table", table)
            check_id("primary key", pk)
        if type(self.seq) is not int or not 0 < self.seq <= INT64_MAX:
            raise _bad("seq must be a positive 64-bit integer")
        if type(self.base) is not int or not 0 <= self.base <= INT64_MAX:
            raise _bad("base must be a non-negative 64-bit integer")
        if type(self.hlc) is not int or not 0 <= self.hlc <= INT64_MAX:
            raise _bad("hlc must be a non-negative 64-bit integer")
        if not isinstance(self.fields, Mapping):
            raise _bad("fields must be a map")
        if self.op is Op.DELETE and self.fields:
            raise _bad("a delete carries no fields")
        if self.old is not None and not isinstance(self.old, Mapping):
            raise _bad("old must be a map")

    @property
    def id(self) -> tuple[str, int]:
        """The change's globally unique id."""
        return (self.origin, self.seq)


# A frozen dataclass sets each field through ``object.__setattr__``; the slots' own setters
# do the same job at half the cost, which matters for a push of 5,000 changes.
_new = object.__new__
(_origin, _seq, _table, _pk, _op, _fields, _base, _hlc, _old) = (
    Change.__dict__[name].__set__
    for name in ("origin", "seq", "table", "pk", "op", "fields", "base", "hlc", "old")
)


def prechecked_change(
    origin: str,
    seq: int,
    table: str,
    pk: str,
    op: Op,
    fields: Values,
    base: int,
    hlc: int,
    old: Values | None,
) -> Change:
    """A ``Change`` whose values the caller has checked exactly as ``__post_init__`` would.

    For decoders that check a whole batch in one loop (``wire.decode_push``); anything else
    builds ``Change(...)``.
    """
    change: Change = _new(Change)
    _origin(change, origin)
    _seq(change, seq)
    _table(change, table)
    _pk(change, pk)
    _op(change, op)
    _fields(change, fields)
    _base(change, base)
    _hlc(change, hlc)
    _old(change, old)
    return change


@dataclass(frozen=True, slots=True)
class RowState:
    """A row as the cloud holds it: values plus per-column versions."""

    pk: str
    values: Values
    version: Version  #: the row's last change
    fv: Mapping[str, Version] = field(default_factory=dict)  #: columns not written by it
    deleted: bool = False

    def version_of(self, column: str) -> Version:
        """The version of one column."""
        return self.fv.get(column, self.version)


@dataclass(frozen=True, slots=True)
class FeedEntry:
    """A row state at a point in a site's change feed (what edges pull)."""

    rev: int
    table: str
    state: RowState


@dataclass(frozen=True, slots=True)
class Conflict:
    """Columns of a change parked for a person: base, local (the change) and remote values."""

    table: str
    pk: str
    change_origin: str
    change_seq: int
    columns: tuple[str, ...]
    base: Values
    local: Values
    remote: Values
    local_deleted: bool = False
    remote_deleted: bool = False
