"""Sync benchmark: the real edge store and uplink against the real cloud service and Postgres.

Run ``.venv/bin/python bench/sync.py`` (``--quick`` for a smoke run, ``--help`` for options).
Everything is measured on this machine with the production components; nothing is simulated.

Set-up. A throwaway *durable* Postgres (``TemporaryPostgres(fast=False)``: fsync,
synchronous_commit and full_page_writes on) unless ``--dsn`` names one; the cloud service in
its own process (``python -m cloud run``, configured by ``FYNLO_CLOUD_*`` variables, ready
when ``/healthz`` answers), so the edge and the cloud run on separate cores as in production
(here Postgres shares them; in production it has its own machine); a site and a device
registered through the owners' HTTP API. Edge stores are real SQLite files in a temporary
directory, opened with the default ``synchronous`` (FULL).

What is measured.

(c, offline) local write: ``store.write`` latency of single-row writes (three order-line
    inserts to one stock-counter decrement) on a fresh store with no uplink, back to back.
(a) catch-up: a fresh store takes N order-line inserts while offline (``write_many`` in
    chunks; timed separately, not part of the figure). Then the uplink starts and the clock
    runs until the cloud has committed the last change: the node's ledger watermark in
    Postgres reaches N (checked on each feed NOTIFY). Also shown: when the edge learnt it
    (``acked_through == last_seq``), and how long the edge then needs to pull its own N rows
    back from the feed. The rows are counted in Postgres at the end.
    ceiling: the same N rows (read back from the cloud's ``order_lines``) loaded into a fresh
    table of the same shape by COPY into a temporary staging table plus one
    ``INSERT … SELECT … ON CONFLICT (site_id, id) DO UPDATE``, in one durable transaction.
    Catch-up is reported as a fraction of that rate.
    Both vary by a quarter from run to run on a shared machine, so this is done ``--rounds``
    times (3), each on a new site and store with the ceiling right after its catch-up; every
    round is printed, and the round with the median fraction gives the headline figures.
(b) live: after a ``VACUUM (ANALYZE)`` (the rounds grew the tables from nothing; autovacuum
    would otherwise vacuum them during this phase, and until it has, queries can run plans
    made for empty tables), with the uplink online and idle, ``--rate`` single-row writes per
    second for ``--live-seconds`` (same mix as above). For each write, the latency from just before
    ``store.write`` is called to the row being visible in Postgres. A separate connection
    LISTENs on the cloud's feed channel; each notification triggers one query for which
    pending rows are visible (order lines by ``id = ANY``; a counter decrement once
    ``on_hand`` has reached the value it implies), stamped with the notification's arrival
    time (a row whose write started after that notification waits for the next one). A
    stamp is off by at most one check query either way (their times are reported), plus any
    delay of the edge's event loop in running the notification callback (its lag is
    reported too: the watcher shares the loop with the edge, as a tablet's request would).
(c, online) local write: the ``store.write`` latencies of (b), with the uplink running.
(c) baselines for it, same rate, same run: the store with no uplink, and the machine's floor,
    one-row commits on a bare sqlite3 connection (WAL, synchronous FULL, one thread). Paced
    writes are slower than back-to-back ones at the tail because the idle threads (and the
    fsync's completion) must be woken each time; these two lines show how much of the online
    figure is that, and how much is the uplink's. A third floor has no I/O at all: pure
    arithmetic sized to the offline write's p50, paced the same way. On a virtual machine its
    p99 is often ten times its p50 (a core idle between calls runs slow for a few ms), which
    bounds what any paced figure here can show.

Other work on the machine competes for the same cores, so each phase also reports the
core-seconds used by the benchmark's processes (this one, the cloud, the throwaway Postgres)
and by everything else (with ``--dsn``, a local Postgres counts as "else").

Everything started is removed at exit (cloud process, Postgres, temporary files), also on
Ctrl-C, SIGTERM or error. The last line of output is one JSON object with the figures, the
machine, the targets and whether each is met.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TypeVar

from cloud.pgtemp import TemporaryPostgres
from shared import eventloop

# ``bench/`` is not a package and this script is run by path: make ``synclib`` importable.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from probe import cpu_slow_windows  # noqa: E402
from synclib.common import BenchError, Options  # noqa: E402
from synclib.phases import run  # noqa: E402
from synclib.report import print_table, report  # noqa: E402

N = TypeVar("N", int, float)


# -- options ---------------------------------------------------------------------------------


def parse_options(argv: Sequence[str] | None) -> Options:
    """Options from the command line (``--quick`` changes the defaults, not explicit values)."""
    parser = argparse.ArgumentParser(
        prog="bench/sync.py", description="Measure edge→cloud sync on this machine."
    )
    parser.add_argument("--changes", type=int, help="changes in the catch-up (default 100000)")
    parser.add_argument("--live-seconds", type=float, help="length of the live phase (default 20)")
    parser.add_argument("--rate", type=float, default=100.0, help="live writes per second")
    parser.add_argument(
        "--offline-writes", type=int, help="writes of the offline local-write run (default 2000)"
    )
    parser.add_argument(
        "--rounds", type=int, help="catch-up rounds, each on a fresh site (default 3; median)"
    )
    parser.add_argument(
        "--dsn",
        help="use this Postgres instead of a throwaway one (the bench site's data is left in it)",
    )
    parser.add_argument("--quick", action="store_true", help="small numbers: a smoke run")
    ns = parser.parse_args(argv)
    quick = ns.quick
    options = Options(
        changes=_pick(ns.changes, 5_000 if quick else 100_000),
        live_seconds=_pick(ns.live_seconds, 3.0 if quick else 20.0),
        rate=ns.rate,
        offline_writes=_pick(ns.offline_writes, 300 if quick else 2_000),
        dsn=ns.dsn,
        rounds=_pick(ns.rounds, 1 if quick else 3),
    )
    if options.changes < 1 or options.rate <= 0 or options.live_seconds <= 0:
        parser.error("--changes, --rate and --live-seconds must be positive")
    if options.offline_writes < 1 or options.rounds < 1:
        parser.error("--offline-writes and --rounds must be positive")
    return options


def _pick(given: N | None, default: N) -> N:
    return default if given is None else given


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; prints a table, then the JSON summary as the last line."""
    options = parse_options(argv)
    print("probing the CPU for slow windows (bench/probe.py)…", flush=True)
    probe = cpu_slow_windows(2.0 if options.changes < 100_000 else 5.0)
    try:
        with ExitStack() as stack:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fynlo-bench-")))
            dsn, pg_data = options.dsn, None
            if dsn is None:
                print("starting a throwaway durable Postgres…", flush=True)
                server = stack.enter_context(TemporaryPostgres(fast=False))
                dsn, pg_data = server.dsn, server.data_dir
            results = eventloop.run(run(options, dsn, workdir, pg_data))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = report(options, results)
    summary["machine"]["cpu_slow_windows"] = probe
    print_table(summary)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
