"""Applying a change to a row: the conflict strategies and the domain merges.

Theory of operation. The cloud is the one place that decides: it applies each pushed change
to its current ``RowState`` with ``apply_change`` and publishes the result in the site's
feed; an edge adopts what the feed says and re-applies its own not-yet-reflected changes on
top with the same function, so its local view predicts the cloud's answer.

A column written at the cloud after the writer's ``base`` revision by another node is
*concurrent* with the change. Domain columns (COUNTER, FORWARD, STICKY, IMMUTABLE) merge by
rules that commute, so they never conflict. For LWW columns the table's strategy decides,
through ``STRATEGIES``:

==============  ==============================================================
server_wins     if anything in the row is concurrent, the cloud's row stands
client_wins     the change is applied whatever happened meanwhile
smart_merge     column by column: unshared edits merge, a column changed on both
                sides falls to the table's tie-break (latest HLC by default)
manual          column by column like smart_merge, but a column changed on both
                sides with different values is parked for a person to decide
==============  ==============================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import NamedTuple

from .changes import Change, Conflict, Op, RowState, Value, Values, Version
from .errors import ErrorCode, RemoteProtocolError
from .schema import (
    INT64_MAX,
    INT64_MIN,
    Author,
    Column,
    Merge,
    Registry,
    Strategy,
    TableSpec,
    TieBreak,
)


class Decision(StrEnum):
    """What happens to one concurrent LWW column (or a concurrent row-level op)."""

    TAKE = "take"
    KEEP = "keep"
    PARK = "park"


class OutcomeKind(StrEnum):
    """How a change landed."""

    APPLIED = "applied"  #: nothing concurrent: applied as written
    MERGED = "merged"  #: concurrent edits combined automatically
    OVERRIDDEN = "overridden"  #: the strategy kept the cloud's values instead
    PARKED = "parked"  #: some columns wait in the manual queue


class Outcome(NamedTuple):
    """The row after a change, how the change landed, and any parked conflict."""

    kind: OutcomeKind
    state: RowState
    conflict: Conflict | None = None


def _later(change: Change, version: Version) -> bool:
    return (change.hlc, change.origin) > (version.hlc, version.origin)


def _tie_break(spec: TableSpec, change: Change, version: Version) -> Decision:
    if spec.tie_break is TieBreak.SERVER:
        return Decision.KEEP
    if spec.tie_break is TieBreak.CLIENT:
        return Decision.TAKE
    return Decision.TAKE if _later(change, version) else Decision.KEEP


Resolver = Callable[[TableSpec, Change, Version, bool], Decision]


def _server_wins(
    spec: TableSpec, change: Change, version: Version, row_concurrent: bool
) -> Decision:
    return Decision.KEEP


def _client_wins(
    spec: TableSpec, change: Change, version: Version, row_concurrent: bool
) -> Decision:
    return Decision.TAKE


def _smart_merge(
    spec: TableSpec, change: Change, version: Version, row_concurrent: bool
) -> Decision:
    return _tie_break(spec, change, version)


def _manual(spec: TableSpec, change: Change, version: Version, row_concurrent: bool) -> Decision:
    return Decision.PARK


#: strategy -> how a concurrent LWW column (or row-level op) is decided
STRATEGIES: dict[Strategy, Resolver] = {
    Strategy.SERVER_WINS: _server_wins,
    Strategy.CLIENT_WINS: _client_wins,
    Strategy.SMART_MERGE: _smart_merge,
    Strategy.MANUAL: _manual,
}

#: strategies that judge a row as a whole: any concurrency makes every LWW column concurrent
ROW_LEVEL = frozenset({Strategy.SERVER_WINS})


def validate_change(spec: TableSpec, change: Change, author: Author) -> None:
    """Refuse a change the table's rules forbid (columns, types, author, add-only)."""
    if spec.author is not Author.BOTH and spec.author is not author:
        raise RemoteProtocolError(
            ErrorCode.NOT_AUTHOR, f"table {spec.name} is written by the {spec.author.value} only"
        )
    if change.op is Op.DELETE:
        if spec.add_only:
            raise RemoteProtocolError(
                ErrorCode.ADD_ONLY, f"{spec.name} rows are never deleted; void them instead"
            )
        return
    fields = change.fields
    if not fields:
        # A write with no columns would leave no trace to order it against a delete.
        raise RemoteProtocolError(ErrorCode.INVALID_CHANGE, "an insert or update names columns")
    by_name = spec.by_name
    for name, value in fields.items():
        column = by_name.get(name)
        if column is None:
            spec.column(name)  # raises UNKNOWN_FIELD
        elif value is not None:
            column.check(value)
    if spec.group_of:
        _check_groups(spec, fields)
    if change.op is Op.UPDATE and not spec.immutable.isdisjoint(fields):
        name = next(n for n in fields if n in spec.immutable)
        raise RemoteProtocolError(
            ErrorCode.ADD_ONLY if spec.add_only else ErrorCode.INVALID_CHANGE,
            f"{spec.name}.{name} is set when the row is added and never changed",
        )
    if change.old is not None:
        for name, value in change.old.items():
            if name not in by_name or not isinstance(value, _PLAIN):
                raise RemoteProtocolError(
                    ErrorCode.INVALID_CHANGE, f"old value of {name!r} is not a known plain value"
                )


_PLAIN = (str, int, bytes, type(None))  # bool is an int


def _check_groups(spec: TableSpec, fields: Mapping[str, object]) -> None:
    """Refuse a write that sets part of a ``together`` group."""
    for name in fields:
        group = spec.group_of.get(name)
        if group is not None and not all(member in fields for member in group):
            missing = ", ".join(member for member in group if member not in fields)
            raise RemoteProtocolError(
                ErrorCode.INVALID_CHANGE,
                f"{spec.name}.{name} is written together with {missing}, which are missing",
            )


def validate_changes(
    registry: Registry, changes: Iterable[Change], author: Author
) -> list[TableSpec]:
    """``validate_change`` for each change in order; returns each change's table spec.

    A plain insert or update (every value None or exactly its column's type, no NUL in text,
    integers in range, no ranked column, no ``old``) passes a quick check that makes the
    same decisions in one loop; anything else gets the full ``validate_change``, so the
    first refusal of a batch is the one a change-by-change loop raises.
    """
    known: dict[str, tuple[TableSpec, dict[str, type], bool]] = {}
    specs: list[TableSpec] = []
    append = specs.append
    for change in changes:
        entry = known.get(change.table)
        if entry is None:
            spec = registry.get(change.table)
            authored = spec.author is Author.BOTH or spec.author is author
            entry = known[change.table] = (spec, _plain_types(spec), authored)
        spec, types, authored = entry
        fields, op = change.fields, change.op
        if not (
            authored
            and fields
            and change.old is None
            and (op is Op.INSERT or (op is Op.UPDATE and spec.immutable.isdisjoint(fields)))
            and _plain_values(types, fields)
        ):
            validate_change(spec, change, author)
        append(spec)
    return specs


def _plain_types(spec: TableSpec) -> dict[str, type]:
    """Column name to Python type, for the columns whose check is the type and range alone
    (not a ranked column's states, nor a group's other columns)."""
    grouped = spec.group_of
    return {c.name: c.pytype for c in spec.columns if not c.rank_set and c.name not in grouped}


def _plain_values(types: Mapping[str, type], fields: Values) -> bool:
    """Whether every value passes ``Column.check`` by a quick test (False: not certain)."""
    for name, value in fields.items():
        want = types.get(name)
        if type(value) is want:
            if want is str:
                if "\x00" in value:  # type: ignore[operator]
                    return False
            elif want is int and not INT64_MIN <= value <= INT64_MAX:  # type: ignore[operator]
                return False
        elif value is not None or want is None:
            return False
    return True


def _rank(column: Column, value: Value) -> int:
    return -1 if value is None else column.ranks.index(value)


def merge_domain(column: Column, current: Value, incoming: Value) -> Value:
    """The value of a domain column after an incoming write (commutative rules)."""
    if column.merge is Merge.COUNTER:
        return (current or 0) + (incoming or 0)  # type: ignore[operator]
    if column.merge is Merge.STICKY:
        return bool(current) or bool(incoming)
    if column.merge is Merge.FORWARD:
        return incoming if _rank(column, incoming) > _rank(column, current) else current
    raise ValueError(f"{column.name} is not a domain column")


def apply_local(
    spec: TableSpec, current: Values | None, op: Op, fields: Values
) -> dict[str, Value]:
    """The row's values after a local write at the writer (no concurrency there)."""
    if op is Op.DELETE:
        return dict(current or {})
    before: Values = current if current is not None else spec.defaults  # type: ignore[assignment]
    values = dict(before)
    values.update(fields)
    for name, column in spec.domain.items():  # a table has few domain columns, if any
        if name in fields:
            values[name] = merge_domain(column, before.get(name), fields[name])
    return values


def initial_values(spec: TableSpec) -> dict[str, Value]:
    """Column defaults for a new row (counters start at 0)."""
    return dict(spec.defaults)  # type: ignore[arg-type]


def _concurrent(version: Version, change: Change) -> bool:
    return version.rev > change.base and version.origin != change.origin


def _row_versions(state: RowState) -> Iterable[Version]:
    yield state.version
    yield from state.fv.values()


_NO_VERSIONS: Mapping[str, Version] = MappingProxyType({})

#: the pseudo-column that records whether the row exists; deletes and writes race on it
EXISTS = "_exists"


def apply_change(spec: TableSpec, current: RowState | None, change: Change, rev: int) -> Outcome:
    """Apply ``change`` (already validated) to the cloud's row at revision ``rev``.

    Columns merge one by one. Whether the row exists is one more register, ``EXISTS``: an
    insert or update writes "alive", a delete writes "deleted", and concurrent ones are
    decided like any LWW column. Column writes land even on a deleted row, so a later
    resurrection shows the same values whatever order the changes arrived in.
    """
    if current is None:
        return Outcome(OutcomeKind.APPLIED, new_row(spec, change, rev))

    new_version = Version(rev, change.hlc, change.origin)
    resolver = STRATEGIES[spec.strategy]
    row_level = spec.strategy in ROW_LEVEL
    row_concurrent = any(_concurrent(v, change) for v in _row_versions(current))
    values = dict(current.values)
    taken: list[str] = []
    parked: list[str] = []
    any_concurrent = False

    def decide(names: tuple[str, ...], same: bool) -> Decision:
        """One decision for a register: a column, ``EXISTS``, or a group taken as one."""
        nonlocal any_concurrent
        versions = [current.version_of(name) for name in names]
        concurrent = [v for v in versions if _concurrent(v, change)]
        if not (row_concurrent if row_level else concurrent):
            return Decision.TAKE
        version = max(concurrent or versions, key=lambda v: (v.hlc, v.origin))
        if same and not row_level:
            # Both sides wrote the same value: no conflict; the later version stands so
            # that the outcome does not depend on arrival order.
            return Decision.TAKE if _later(change, version) else Decision.KEEP
        any_concurrent = True
        return resolver(spec, change, version, row_concurrent)

    grouped = spec.group_of
    group_decisions: dict[tuple[str, ...], Decision] = {}

    for name, incoming in change.fields.items():
        column = spec.by_name[name]
        present = values.get(name)
        if column.merge is Merge.IMMUTABLE:
            # Only inserts carry these; of two concurrent inserts the earlier one stands.
            version = current.version_of(name)
            if present is None or (_concurrent(version, change) and not _later(change, version)):
                if incoming != present:
                    values[name] = incoming
                    taken.append(name)
            continue
        if column.merge is not Merge.LWW:
            merged = merge_domain(column, present, incoming)
            if merged != present or column.merge is Merge.COUNTER:
                values[name] = merged
                taken.append(name)
            continue
        group = grouped.get(name) if grouped else None
        if group is None:
            decision = decide((name,), incoming == present)
        else:
            # A group is one register: every column of it is taken, kept or parked alike,
            # so its columns' versions stay in step and no merge splits a writer's set.
            decision = group_decisions.get(group)  # type: ignore[assignment]
            if decision is None:
                same = all(change.fields[c] == values.get(c) for c in group)
                decision = group_decisions[group] = decide(group, same)
        if decision is Decision.TAKE:
            values[name] = incoming
            taken.append(name)
        elif decision is Decision.PARK:
            parked.append(name)

    deleted = current.deleted
    alive = change.op is not Op.DELETE
    exists_parked = False
    decision = decide((EXISTS,), alive == (not current.deleted))
    if decision is Decision.TAKE:
        deleted = not alive
        taken.append(EXISTS)
    elif decision is Decision.PARK:
        exists_parked = True

    conflict = None
    if parked or exists_parked:
        old = change.old or {}
        conflict = Conflict(
            spec.name,
            current.pk,
            change.origin,
            change.seq,
            tuple(parked),
            {k: old.get(k) for k in parked},
            {k: change.fields[k] for k in parked},
            {k: current.values.get(k) for k in parked},
            local_deleted=exists_parked and not alive,
            remote_deleted=exists_parked and current.deleted,
        )
    if not taken:
        kind = (
            OutcomeKind.PARKED
            if conflict
            else (OutcomeKind.OVERRIDDEN if any_concurrent else OutcomeKind.APPLIED)
        )
        return Outcome(kind, current, conflict)
    state = RowState(current.pk, values, new_version, _fv_except(spec, current, taken), deleted)
    if conflict:
        kind = OutcomeKind.PARKED
    elif any_concurrent:
        kind = OutcomeKind.MERGED
    else:
        kind = OutcomeKind.APPLIED
    return Outcome(kind, state, conflict)


def new_row(spec: TableSpec, change: Change, rev: int) -> RowState:
    """The row ``change`` creates at revision ``rev`` where none exists (always ``APPLIED``)."""
    version = Version(rev, change.hlc, change.origin)
    if change.op is Op.DELETE:
        return RowState(change.pk, initial_values(spec), version, {}, True)
    return RowState(change.pk, apply_local(spec, None, change.op, change.fields), version, {})


def _fv_except(spec: TableSpec, current: RowState, taken: Iterable[str]) -> dict[str, Version]:
    """Per-column versions for every column (and EXISTS) the new change did not write."""
    skip = set(taken)
    names = [c.name for c in spec.columns] + [EXISTS]
    return {n: current.version_of(n) for n in names if n not in skip}


def rebase(spec: TableSpec, state: RowState, pending: Iterable[Change]) -> RowState:
    """An edge's predicted row: the cloud's state with its own unreflected changes on top."""
    for change in pending:
        state = apply_change(spec, state, change, state.version.rev).state
    return state


def resolve_values(spec: TableSpec, values: Mapping[str, object]) -> dict[str, Value]:
    """Check a person's resolution of a parked conflict: known LWW columns, right types."""
    out: dict[str, Value] = {}
    for name, value in values.items():
        column = spec.column(name)
        column.check(value)
        if column.merge is not Merge.LWW:
            raise RemoteProtocolError(
                ErrorCode.INVALID_RESOLUTION, f"{spec.name}.{name} merges by itself"
            )
        out[name] = value  # type: ignore[assignment]
    return out
