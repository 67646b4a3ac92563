"""An in-memory cloud and edge built from the pure core only, for fast property tests.

It drives ``sync_protocol`` the way the real stores do (the cloud applies pushed changes
with ``apply_change`` and publishes row states; an edge adopts them and rebases its own
unreflected changes), so a wide random search can check the merge rules converge before
the slower end-to-end tests check the real SQLite and Postgres stores.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sync_protocol import Author, Change, Conflict, Op, RowState, apply_change, rebase
from sync_protocol.merge import apply_local, validate_change
from sync_protocol.schema import Registry

Key = tuple[str, str]


@dataclass
class ModelCloud:
    registry: Registry
    rows: dict[Key, RowState] = field(default_factory=dict)
    feed: list[tuple[int, str, RowState]] = field(default_factory=list)
    head: int = 0
    watermarks: dict[str, int] = field(default_factory=dict)
    segments: dict[str, list[tuple[int, int, int]]] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    clock: int = 0

    def ingest(self, node: str, changes: list[Change]) -> list[tuple[int, int, int]]:
        """Apply a push; returns the ack's segments (first_seq, last_seq, first_rev)."""
        wm = self.watermarks.get(node, 0)
        assert not changes or changes[0].seq <= wm + 1
        touched: dict[Key, int] = {}
        first_new = wm + 1
        first_rev = self.head + 1
        for change in changes:
            if change.seq <= wm:
                continue
            spec = self.registry.get(change.table)
            validate_change(spec, change, Author.EDGE)
            self.head += 1
            key = (change.table, change.pk)
            out = apply_change(spec, self.rows.get(key), change, self.head)
            self.rows[key] = out.state
            touched[key] = self.head
            if out.conflict:
                self.conflicts.append(out.conflict)
            wm = change.seq
            self.clock = max(self.clock, change.hlc)
        self.feed.extend(sorted((rev, k[0], self.rows[k]) for k, rev in touched.items()))
        self.watermarks[node] = wm
        if wm >= first_new:
            self.segments.setdefault(node, []).append((first_new, wm, first_rev))
        lo, hi = changes[0].seq, changes[-1].seq
        return [s for s in self.segments.get(node, []) if s[1] >= lo and s[0] <= hi]

    def write(self, table: str, pk: str, op: Op, fields: dict[str, object]) -> None:
        spec = self.registry.get(table)
        self.clock += 1
        change = Change("cloud", self.head + 1, table, pk, op, fields, self.head, self.clock)
        validate_change(spec, change, Author.CLOUD)
        self.head += 1
        self.rows[(table, pk)] = apply_change(
            spec, self.rows.get((table, pk)), change, self.head
        ).state
        self.feed.append((self.head, table, self.rows[(table, pk)]))

    def live(self) -> dict[Key, dict[str, object]]:
        return {k: dict(s.values) for k, s in self.rows.items() if not s.deleted}


@dataclass
class ModelEdge:
    node: str
    registry: Registry
    values: dict[Key, dict[str, object]] = field(default_factory=dict)
    outbox: list[Change] = field(default_factory=list)
    seq: int = 0
    acked_through: int = 0
    revs: dict[int, int] = field(default_factory=dict)  # seq -> feed revision it took effect
    cursor: int = 0
    clock: int = 0

    def write(self, table: str, pk: str, op: Op, fields: dict[str, object]) -> Change:
        spec = self.registry.get(table)
        current = self.values.get((table, pk))
        old = {k: current.get(k) for k in fields} if current and op is Op.UPDATE else None
        self.clock += 1
        change = Change(
            self.node, self.seq + 1, table, pk, op, fields, self.cursor, self.clock, old
        )
        validate_change(spec, change, Author.EDGE)
        self.seq += 1
        if op is Op.DELETE:
            self.values.pop((table, pk), None)
        else:
            self.values[(table, pk)] = apply_local(spec, current, op, fields)
        self.outbox.append(change)
        return change

    def push(self, cloud: ModelCloud, limit: int = 1000) -> None:
        batch = [c for c in self.outbox if c.seq > self.acked_through][:limit]
        if batch:
            for first_seq, last_seq, first_rev in cloud.ingest(self.node, batch):
                for seq in range(first_seq, last_seq + 1):
                    self.revs[seq] = first_rev + seq - first_seq
            self.acked_through = batch[-1].seq

    def pull(self, cloud: ModelCloud, limit: int = 1000) -> None:
        page = [e for e in cloud.feed if e[0] > self.cursor][:limit]
        if not page:
            return
        self.cursor = page[-1][0]
        self.clock = max(self.clock, cloud.clock)
        for rev, table, state in page:
            mine = [
                c
                for c in self.outbox
                if (c.table, c.pk) == (table, state.pk) and self.revs.get(c.seq, rev + 1) > rev
            ]
            final = rebase(self.registry.get(table), state, mine)
            if final.deleted:
                self.values.pop((table, state.pk), None)
            else:
                self.values[(table, state.pk)] = dict(final.values)
        self.outbox = [
            c for c in self.outbox if self.revs.get(c.seq, self.cursor + 1) > self.cursor
        ]
