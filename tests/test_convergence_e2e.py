"""Convergence on the real stores: random offline edits and sync steps (``tests.scenarios``)
drive two real edges of one site (SQLite + uplink) and the real cloud over HTTP (Postgres),
for every strategy. After the network heals, both edges hold exactly the cloud's rows, and
under ``manual`` every parked conflict is listed, by both APIs and in both edges' mirrors.

One cloud serves every example of a strategy; each example gets a fresh site and two fresh
edges, so examples never see each other's data. Push and pull steps move at most three
changes or feed entries, like the pure model's (``tests.model``); with ``overlap`` a push
runs concurrently with a pull of the same edge, as the uplink's two tasks do. A scenario is
one to three of ``scenarios.steps`` back to back (a day with several offline spells).
"""

from __future__ import annotations

import asyncio
import itertools
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.apply import apply_all, load_states
from shared.registry import FIXED_STRATEGIES, default_registry
from sync_protocol import Strategy

from .harness import Edge, Fleet, edge_settings, fleet
from .scenarios import Step, Sync, Write, plan, steps, whole_discounts

EXAMPLES = 40

Parked = tuple[str, str, str, int, tuple[str, ...], Any, Any]


def _parked(c: Any) -> Parked:
    """A conflict (listed by the API) as a comparable tuple."""
    return (
        c["table"],
        c["pk"],
        c["change_origin"],
        c["change_seq"],
        tuple(c["columns"]),
        c["local"],
        c["remote"],
    )


async def _push(edge: Edge) -> None:
    # One push step: a batch of at most batch_max_changes (3), and in a backlog more pipelined
    # behind it (up to the session's window), as the uplink's push task does per step.
    await edge.uplink._push_step()


async def _pull(edge: Edge) -> None:
    # One pull page of at most pull_limit (3) entries, as the uplink's pull task does.
    await edge.uplink._pull_step(0)


async def push_step(f: Fleet, edge: Edge, overlap: bool, parked: list[Parked] | None) -> None:
    """One push (with a concurrent pull when ``overlap``); adds what it parks to ``parked``.

    What a push parks is predicted with the cloud's own ``apply_all`` on the cloud's rows as
    they stood before it, for the changes the push turned out to carry.
    """
    store = f.cloud.store
    acked = edge.store.cursors().acked_through
    # Every pending change: a push step slides its window on while batches come back full,
    # so one step may send the whole outbox.
    pending = edge.store.cursors().last_seq - acked
    candidates = await edge.store.outbox_after(acked, max(1, pending))
    keys = [(c.table, c.pk) for c in candidates]
    async with store.pool.acquire() as conn:
        states = await load_states(conn, store.io, edge.site, keys)
    head = await f.cloud.head(edge.site)
    if overlap:
        await asyncio.gather(_push(edge), _pull(edge))
    else:
        await _push(edge)
    if parked is None:
        return
    sent = [c for c in candidates if acked < c.seq <= edge.store.cursors().acked_through]
    pairs = [(store.registry.get(c.table), c) for c in sent]
    parked += [
        (c.table, c.pk, c.change_origin, c.change_seq, c.columns, dict(c.local), dict(c.remote))
        for c in apply_all(pairs, states, head).conflicts
    ]


async def run_example(
    f: Fleet, number: int, strategy: Strategy, scenario: list[Step], overlap: bool
) -> None:
    site = await f.cloud.add_site(f"example {number}", f"ex{number}")
    small = edge_settings(batch_max_changes=3, pull_limit=3)
    a = await f.add_edge(site, f"a{number}", settings=small)
    b = await f.add_edge(site, f"b{number}", settings=small)
    edges = {"a": a, "b": b}
    predicted: list[Parked] = []
    parked = predicted if strategy is Strategy.MANUAL else None
    try:
        for edge in edges.values():
            await edge.sync()  # opens the uplink's HTTP session; the site is empty
        for step in scenario:
            if isinstance(step, Sync):
                edge = edges[step.who]
                if step.step == "pull":
                    await _pull(edge)
                    continue
                await push_step(f, edge, overlap, parked)
                continue
            assert isinstance(step, Write)
            if step.who == "cloud":
                exists = step.pk in await f.cloud.rows(site, step.table)
                planned = plan(step, exists)
                if planned:
                    op, fields = planned
                    await f.cloud.write(site, (step.table, step.pk, op.name.lower(), fields))
            else:
                edge = edges[step.who]
                planned = plan(step, await edge.store.get(step.table, step.pk) is not None)
                if planned:
                    await edge.write(step.table, step.pk, *planned)
        # The network heals: drain, predicting what the remaining pushes park.
        for _ in range(40):
            for edge in edges.values():
                await push_step(f, edge, False, parked)
                await _pull(edge)
            head = await f.cloud.head(site)
            if all([await e.drained(head) for e in edges.values()]):
                break
        else:
            raise AssertionError("the edges did not drain")
        await f.drain([a, b])  # full sync_once rounds: refreshes the conflict mirrors too

        sums = await f.assert_converged([a, b])
        for table in ("orders", "order_lines", "stock_levels", "menu_items"):
            cloud_rows = await f.cloud.rows(site, table)
            assert await a.rows(table) == cloud_rows == await b.rows(table), table
            assert sums[table][0] == len(cloud_rows)
        assert whole_discounts(await f.cloud.rows(site, "orders"))

        listed = await f.cloud.conflicts(site)
        assert sorted(map(_parked, listed)) == sorted(predicted)
        if strategy is not Strategy.MANUAL:
            assert listed == []
        assert await f.cloud.device_conflicts(a.token) == listed
        for edge in (a, b):
            assert sorted(c["id"] for c in await edge.store.conflicts()) == sorted(
                c["id"] for c in listed
            )
            assert (await edge.status())["open_conflicts"] == len(listed)
    finally:
        for edge in (a, b):
            await f.retire(edge)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_real_edges_and_cloud_converge(
    tmp_path: Path, pg_database: str, strategy: Strategy
) -> None:
    strategies = {
        name: strategy.value
        for name in default_registry().names()
        if name not in FIXED_STRATEGIES  # money stays manual whatever is configured
    }
    numbers = itertools.count(1)
    with asyncio.Runner() as runner:
        stack = AsyncExitStack()
        f = runner.run(stack.enter_async_context(fleet(pg_database, tmp_path, strategies)))

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        )
        @given(spells=st.lists(steps, min_size=1, max_size=3), overlap=st.booleans())
        def check(spells: list[list[Step]], overlap: bool) -> None:
            scenario = [step for spell in spells for step in spell]
            runner.run(run_example(f, next(numbers), strategy, scenario, overlap))

        try:
            check()
        finally:
            runner.run(stack.aclose())
