"""``fynlo-demo`` end to end: a real cloud subprocess with a throwaway Postgres, a real edge,
an outage in the middle, and edge and cloud converged at the end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cloud.pgtemp import PostgresNotFound, find_binaries
from edge.demo.cloud_process import DELIVERY, PAR_LEVEL, deliveries
from shared.registry import TABLES

#: a status line: "t=  3s  offline  outbox   12 (oldest  0.9s)  acked 36/48  …"
STATUS = re.compile(r"^t=\s*(\d+)s\s+(online|offline)\s+outbox\s+(\d+) .*?acked (\d+)/(\d+)", re.M)
TIMEOUT_S = 90  # the run takes about 12 s; this only stops a hung demo


def _run_demo(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run ``python -m edge.demo`` like a user would; SIGTERM it (it stops its cloud) if hung."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FYNLO_EDGE_", "FYNLO_CLOUD_"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge.demo", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"fynlo-demo did not finish within {TIMEOUT_S} s:\n{out}")
    return proc.returncode, out


@pytest.mark.postgres
def test_demo_keeps_selling_through_an_outage_and_converges(tmp_path: Path) -> None:
    try:
        find_binaries()
    except PostgresNotFound as exc:
        if os.environ.get("FYNLO_TEST_PG_DSN"):
            pytest.skip(f"the demo needs local Postgres binaries: {exc}")
        raise
    data = tmp_path / "demo"
    # every item opens at its par level: the first portion sold makes the owner book a delivery
    args = ["--seconds", "8", "--offline-at", "2", "--online-at", "4", "--stock", str(PAR_LEVEL)]
    code, out = _run_demo([*args, "--data", str(data)], tmp_path)
    log = data / "demo.log"
    context = f"output:\n{out}\ndemo.log:\n{log.read_text() if log.exists() else '(none)'}"
    assert code == 0, context

    lines = [(int(t), link, *map(int, rest)) for t, link, *rest in STATUS.findall(out)]
    links = [line[1] for line in lines]
    assert "offline" in links, context
    first_off = links.index("offline")
    last_off = len(links) - 1 - links[::-1].index("offline")
    assert "online" in links[:first_off] and "online" in links[last_off + 1 :], context
    assert all(1 <= t <= 5 for t, link, *_ in lines if link == "offline"), context
    # A second into the outage nothing is acknowledged any more (an ack in flight as the
    # uplink stopped may still land just after); after the drain everything is.
    acked_offline = {acked for t, link, _, acked, _ in lines if link == "offline" and t >= 3}
    assert len(acked_offline) == 1, context
    *_, (_, last_link, last_depth, last_acked, last_seq) = lines
    assert last_link == "online" and last_depth == 0 and last_acked == last_seq > 0, context

    assert "link DOWN" in out and "link UP" in out, context
    # every price edit reached the edge, those made during the outage once the link was back
    edits = re.findall(r"owner: (.+) \d+p -> (\d+p) in the cloud", out)
    arrived = re.findall(r"edge: (.+) (\d+p) arrived here, \d+ ms after the edit", out)
    assert edits and sorted(arrived) == sorted(edits), context
    # deliveries booked in the cloud while the tablets sold: the stock counters converge below
    assert re.search(r"owner: deliveries booked in the cloud \(rev \d+\): \w", out), context
    booked = re.search(r"owner: \d+ price edits and (\d+) deliveries in the cloud", out)
    assert booked is not None and int(booked[1]) > 0, context
    sums = re.findall(r"^ {4}(\w+) +(\d+) rows +(equal|NOT EQUAL)$", out, re.M)
    assert {table for table, _, _ in sums} == {spec.name for spec in TABLES}, context
    assert all(verdict == "equal" for _, _, verdict in sums), context
    assert dict((t, int(n)) for t, n, _ in sums)["orders"] > 0, context
    # the cashier paid by bank while the link was up, in cash while it was down, and every
    # payment reached the cloud
    cashier = re.search(r"cashier: (\d+) checks paid by bank .*, (\d+) in cash", out)
    assert cashier is not None and int(cashier[1]) > 0, context
    assert re.search(r"cashier: check \d+ £[\d.]+ paid in cash \(link down", out), context
    paid = int(cashier[1]) + int(cashier[2])
    assert dict((t, int(n)) for t, n, _ in sums)["payments"] >= paid, context
    assert "result: edge and cloud hold the same rows" in out, context
    assert "cloud: stopped (exit 0)" in out, context


def test_the_owner_restocks_what_falls_below_its_par_level() -> None:
    stock = {
        "espresso": {"on_hand": 39, "par_level": 40},
        "brownie": {"on_hand": 40, "par_level": 40},
        "soup": {"on_hand": -3, "par_level": 10},  # oversold while offline
        "tart": {"on_hand": 0, "par_level": None},  # no par level: never restocked
    }
    assert deliveries(stock) == [
        {"table": "stock_levels", "id": item, "op": "update", "fields": {"on_hand": DELIVERY}}
        for item in ("espresso", "soup")
    ]


def test_demo_refuses_bad_options(tmp_path: Path) -> None:
    code, out = _run_demo(["--online-at", "3"], tmp_path)
    assert code == 2 and "--online-at needs --offline-at" in out
    code, out = _run_demo(["--offline-at", "3", "--online-at", "2"], tmp_path)
    assert code == 2 and "later than --offline-at" in out
    code, out = _run_demo(["--stock", "-1"], tmp_path)
    assert code == 2 and "--stock must be from 0" in out
