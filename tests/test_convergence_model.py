"""Convergence of random offline edits on two edges and the cloud, on the pure model."""

from __future__ import annotations

import pytest
from hypothesis import given, settings

from shared.registry import default_registry
from sync_protocol import Strategy
from sync_protocol.merge import initial_values

from .model import ModelCloud, ModelEdge
from .scenarios import Step, Sync, Write, plan, steps, whole_discounts


def run(strategy: Strategy, scenario: list[Step]) -> tuple[ModelCloud, ModelEdge, ModelEdge]:
    registry = default_registry().with_strategies({n: strategy for n in default_registry().names()})
    cloud = ModelCloud(registry)
    edges = {"a": ModelEdge("edge-a", registry), "b": ModelEdge("edge-b", registry)}
    for step in scenario:
        if isinstance(step, Sync):
            edge = edges[step.who]
            edge.push(cloud, limit=3) if step.step == "push" else edge.pull(cloud, limit=3)
            continue
        assert isinstance(step, Write)
        if step.who == "cloud":
            live = cloud.live()
            planned = plan(step, (step.table, step.pk) in live)
            if planned:
                cloud.write(step.table, step.pk, *planned)
        else:
            edge = edges[step.who]
            planned = plan(step, (step.table, step.pk) in edge.values)
            if planned:
                edge.write(step.table, step.pk, *planned)
    for _ in range(50):  # the network heals: drain every queue
        for edge in edges.values():
            edge.push(cloud, limit=3)
            edge.pull(cloud, limit=3)
        if all(e.cursor == cloud.head and not e.outbox for e in edges.values()):
            break
    return cloud, edges["a"], edges["b"]


@pytest.mark.parametrize("strategy", list(Strategy))
@settings(max_examples=150, deadline=None)
@given(scenario=steps)
def test_two_edges_and_the_cloud_converge(strategy: Strategy, scenario: list[Step]) -> None:
    cloud, a, b = run(strategy, scenario)
    assert not a.outbox and not b.outbox, "queues did not drain"
    live = cloud.live()
    assert a.values == live
    assert b.values == live
    assert whole_discounts({pk: row for (table, pk), row in live.items() if table == "orders"})
    for conflict in cloud.conflicts:
        assert strategy is Strategy.MANUAL
        assert (conflict.table, conflict.pk) in cloud.rows


def test_defaults_fill_a_new_row() -> None:
    spec = default_registry().get("orders")
    assert initial_values(spec)["status"] == "open"
