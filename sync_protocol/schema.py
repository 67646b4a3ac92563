"""How a synced table is described to the sync engine.

The engine is generic; each table says its columns, who may author it, its conflict
strategy, and how each column merges. Domain-aware merges (``COUNTER``, ``FORWARD``,
``STICKY``, ``IMMUTABLE``) converge on their own, whatever the table's strategy; only
``LWW`` columns are subject to the strategy. Columns that only mean something together (a
discount's amount, reason and who gave it) are declared ``together``: every write sets all of
them, so concurrent writes merge to one writer's whole set under every strategy, and a
person resolving a parked conflict decides them as one. ``shared.registry`` declares the
real tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from .errors import ErrorCode, RemoteProtocolError


class ColumnType(StrEnum):
    """The value types a synced column can hold (no floats: money is integer pence)."""

    TEXT = "text"
    INT = "int"
    BOOL = "bool"
    BYTES = "bytes"


class Merge(StrEnum):
    """How a column's concurrent writes combine."""

    LWW = "lww"  #: last writer wins, subject to the table's strategy
    COUNTER = "counter"  #: changes carry deltas; concurrent deltas add up
    FORWARD = "forward"  #: an ordered state (e.g. order status) that only moves forward
    STICKY = "sticky"  #: a flag that, once true, stays true (e.g. a voided line)
    IMMUTABLE = "immutable"  #: set when the row is inserted, never changed after


class Author(StrEnum):
    """Which side may write a table."""

    EDGE = "edge"
    CLOUD = "cloud"
    BOTH = "both"


class Strategy(StrEnum):
    """Conflict strategies for LWW columns; see ``merge.STRATEGIES``."""

    SERVER_WINS = "server_wins"
    CLIENT_WINS = "client_wins"
    SMART_MERGE = "smart_merge"
    MANUAL = "manual"


class TieBreak(StrEnum):
    """Who wins when ``smart_merge`` finds the same column changed on both sides."""

    LATEST = "latest"  #: the later hybrid-logical-clock timestamp (then origin id)
    SERVER = "server"
    CLIENT = "client"


#: the one Python type each column type accepts (exactly: a bool is not an int here)
_PY_TYPES: dict[ColumnType, type] = {
    ColumnType.TEXT: str,
    ColumnType.INT: int,
    ColumnType.BOOL: bool,
    ColumnType.BYTES: bytes,
}

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
PyType = type


@dataclass(frozen=True, slots=True)
class Column:
    """One synced column: its type, how it merges, and (for FORWARD) its states in order."""

    name: str
    type: ColumnType
    merge: Merge = Merge.LWW
    ranks: tuple[str, ...] = ()
    default: object = None
    doc: str = ""
    pytype: PyType = field(init=False, repr=False, compare=False)
    rank_set: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pytype", _PY_TYPES[self.type])
        object.__setattr__(self, "rank_set", frozenset(self.ranks))
        if not self.name.isidentifier() or self.name.startswith("_"):
            raise ValueError(f"bad column name {self.name!r}")
        if self.merge is Merge.FORWARD and not self.ranks:
            raise ValueError(f"FORWARD column {self.name} needs its ranks")
        if self.merge is Merge.COUNTER and self.type is not ColumnType.INT:
            raise ValueError(f"COUNTER column {self.name} must be INT")
        if self.merge is Merge.STICKY and self.type is not ColumnType.BOOL:
            raise ValueError(f"STICKY column {self.name} must be BOOL")

    def check(self, value: object) -> None:
        """Refuse a value of the wrong type (None is allowed: columns are nullable)."""
        if value is None:
            return
        kind = type(value)
        if kind is not self.pytype:
            raise RemoteProtocolError(
                ErrorCode.INVALID_CHANGE,
                f"column {self.name} wants {self.type.value}, got {kind.__name__}",
            )
        if kind is int:
            if not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
                raise RemoteProtocolError(
                    ErrorCode.INVALID_CHANGE, f"column {self.name} out of range"
                )
        elif kind is str:
            if "\x00" in value:  # type: ignore[operator]
                raise RemoteProtocolError(
                    ErrorCode.INVALID_CHANGE, f"column {self.name}: text holds a NUL character"
                )
            if self.rank_set and value not in self.rank_set:
                raise RemoteProtocolError(
                    ErrorCode.INVALID_CHANGE, f"column {self.name}: unknown state {value!r}"
                )


@dataclass(frozen=True)
class TableSpec:
    """A synced table: primary key ``id`` (text), columns, author, strategy, tie-break."""

    name: str
    columns: tuple[Column, ...]
    author: Author = Author.BOTH
    strategy: Strategy = Strategy.SMART_MERGE
    tie_break: TieBreak = TieBreak.LATEST
    add_only: bool = False
    doc: str = ""
    #: groups of LWW columns every write sets all of (see the module's docstring)
    together: tuple[tuple[str, ...], ...] = ()
    by_name: Mapping[str, Column] = field(init=False, repr=False, compare=False)
    #: a new row's values: column defaults, counters at 0
    defaults: Mapping[str, object] = field(init=False, repr=False, compare=False)
    #: columns that merge by a domain rule (COUNTER, FORWARD, STICKY)
    domain: Mapping[str, Column] = field(init=False, repr=False, compare=False)
    immutable: frozenset[str] = field(init=False, repr=False, compare=False)
    #: each column of a ``together`` group to its whole group
    group_of: Mapping[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name.startswith("_"):
            raise ValueError(f"bad table name {self.name!r}")
        names = [c.name for c in self.columns]
        if len(set(names)) != len(names) or "id" in names:
            raise ValueError(f"table {self.name}: duplicate column or a column named id")
        object.__setattr__(self, "by_name", {c.name: c for c in self.columns})
        defaults = {
            c.name: 0 if c.merge is Merge.COUNTER and c.default is None else c.default
            for c in self.columns
        }
        object.__setattr__(self, "defaults", defaults)
        plain = (Merge.LWW, Merge.IMMUTABLE)
        domain = {c.name: c for c in self.columns if c.merge not in plain}
        object.__setattr__(self, "domain", domain)
        immutable = frozenset(c.name for c in self.columns if c.merge is Merge.IMMUTABLE)
        object.__setattr__(self, "immutable", immutable)
        group_of: dict[str, tuple[str, ...]] = {}
        for group in self.together:
            for name in group:
                column = self.by_name.get(name)
                if len(group) < 2 or column is None or column.merge is not Merge.LWW:
                    raise ValueError(
                        f"table {self.name}: a group written together names two or more of "
                        f"its LWW columns, not {group!r}"
                    )
                if name in group_of:
                    raise ValueError(f"table {self.name}: {name} is in two groups")
                group_of[name] = group
        object.__setattr__(self, "group_of", group_of)

    def column(self, name: str) -> Column:
        """The column called ``name``, or UNKNOWN_FIELD."""
        try:
            return self.by_name[name]
        except KeyError:
            raise RemoteProtocolError(
                ErrorCode.UNKNOWN_FIELD, f"table {self.name} has no column {name!r}"
            ) from None

    def with_strategy(self, strategy: Strategy, tie_break: TieBreak | None = None) -> TableSpec:
        """A copy of this spec under another strategy (config overrides use this)."""
        return TableSpec(
            self.name,
            self.columns,
            self.author,
            strategy,
            tie_break or self.tie_break,
            self.add_only,
            self.doc,
            self.together,
        )


class Registry:
    """The synced tables a node knows, by name; unknown names are refused."""

    def __init__(self, specs: Iterable[TableSpec]) -> None:
        self._specs: dict[str, TableSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"table {spec.name} registered twice")
            self._specs[spec.name] = spec

    def get(self, name: object) -> TableSpec:
        """The spec of table ``name``, or UNKNOWN_TABLE."""
        spec = self._specs.get(name) if isinstance(name, str) else None
        if spec is None:
            raise RemoteProtocolError(ErrorCode.UNKNOWN_TABLE, f"table {name!r} is not synced")
        return spec

    def __iter__(self) -> Iterator[TableSpec]:
        return iter(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        """Table names in registration order."""
        return list(self._specs)

    def with_strategies(self, strategies: Mapping[str, str]) -> Registry:
        """A registry whose tables use the given strategies (``{table: strategy}``)."""
        unknown = set(strategies) - set(self._specs)
        if unknown:
            raise ValueError(f"strategy set for unknown tables: {sorted(unknown)}")
        return Registry(
            spec.with_strategy(Strategy(strategies[spec.name])) if spec.name in strategies else spec
            for spec in self._specs.values()
        )
