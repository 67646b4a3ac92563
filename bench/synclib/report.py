"""Statistics, the JSON summary and the table of the sync benchmark."""

from __future__ import annotations

import math
import os
import platform
import sqlite3
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .common import TARGETS, BenchError, Options, Results

# -- statistics ------------------------------------------------------------------------------


def percentile(samples: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile."""
    ordered = sorted(samples)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def summary_ms(samples_s: Sequence[float]) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, as milliseconds."""
    if not samples_s:
        raise BenchError("no samples")
    return {
        "p50": round(percentile(samples_s, 50) * 1000, 2),
        "p99": round(percentile(samples_s, 99) * 1000, 2),
        "max": round(max(samples_s) * 1000, 2),
        "n": len(samples_s),
    }


def code_version() -> dict[str, Any]:
    """The git commit measured, and whether the work tree had changes (None: not a checkout)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "dirty": None if status is None else bool(status),
    }


# -- reporting -------------------------------------------------------------------------------


def report(options: Options, r: Results) -> dict[str, Any]:
    """The JSON summary."""
    head = r.median_round()
    catchup_rate = r.changes / head.catchup_s
    ceiling_rate = r.changes / head.ceiling_s
    fraction = head.fraction()
    local_p50 = max(r.local_online_ms["p50"], r.local_offline_ms["p50"])
    local_p99 = max(r.local_online_ms["p99"], r.local_offline_ms["p99"])
    figures = {
        "catchup_changes_per_s": round(catchup_rate),
        "catchup_fraction": round(fraction, 3),
        "live_p99_ms": r.live_ms["p99"],
        "local_write_p99_ms": local_p99,
    }
    return {
        "changes": r.changes,
        "catchup_changes_per_s": round(catchup_rate),
        "catchup_s": round(head.catchup_s, 3),
        "catchup_acked_s": round(head.catchup_acked_s, 3),
        "catchup_pull_settled_s": round(head.pull_settle_s, 3),
        "outbox_fill_s": round(head.setup_s, 3),
        "copy_upsert_rows_per_s": round(ceiling_rate),
        "copy_upsert_s": round(head.ceiling_s, 3),
        "catchup_fraction_of_copy_upsert": round(fraction, 3),
        "catchup_rounds": [
            {
                "changes_per_s": round(r.changes / one.catchup_s),
                "copy_upsert_rows_per_s": round(r.changes / one.ceiling_s),
                "fraction": round(one.fraction(), 3),
            }
            for one in r.rounds
        ],
        "live_writes": options.live_writes,
        "live_rate_per_s": round(r.live_rate, 1),
        "live_ms": r.live_ms,
        "live_p50_ms": r.live_ms["p50"],
        "live_p99_ms": r.live_ms["p99"],
        "live_max_ms": r.live_ms["max"],
        "live_check_query_ms": r.live_check_ms,
        "live_edge_loop_lag_ms": r.loop_lag_ms,
        "local_write_p50_ms": local_p50,
        "local_write_p99_ms": local_p99,
        "local_write_online": r.local_online_ms,
        "local_write_offline": r.local_offline_ms,
        "local_write_paced_no_uplink": r.local_paced_ms,
        "bare_sqlite_commit_paced": r.sqlite_floor_ms,
        "cpu_work_paced": r.cpu_floor_ms,
        "cpu": r.cpu,
        "code": code_version(),
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "sqlite": sqlite3.sqlite_version,
            "postgres": r.postgres,
            "loadavg_at_start": r.loadavg,
            "postgres_mode": "--dsn" if options.dsn else "throwaway, durable (fast=False)",
            "edge_synchronous": "FULL",
        },
        "targets": TARGETS,
        "targets_met": {
            name: (figures[name] >= goal if name.startswith("catchup") else figures[name] <= goal)
            for name, goal in TARGETS.items()
        },
    }


def print_table(summary: dict[str, Any]) -> None:
    """A short human-readable table of the results."""
    s, met = summary, summary["targets_met"]
    on, off = s["local_write_online"], s["local_write_offline"]

    def target(name: str) -> str:
        return f"target {TARGETS[name]:g}: " + ("met" if met[name] else "NOT met")

    def spread(ms: dict[str, float]) -> str:
        return f"p50 {ms['p50']} ms  p99 {ms['p99']} ms  max {ms['max']} ms"

    catchup = f"{s['catchup_changes_per_s']:,} changes/s ({s['changes']:,} in {s['catchup_s']}s)"
    rounds = s["catchup_rounds"]
    rows = [
        (
            f"catch-up rounds ({len(rounds)})",
            "  ".join(f"{o['changes_per_s']:,}/{o['copy_upsert_rows_per_s']:,}" for o in rounds),
            "catch-up/ceiling per s; the median round below",
        ),
        ("catch-up, outbox → Postgres", catchup, target("catchup_changes_per_s")),
        ("  edge has the ack", f"{s['catchup_acked_s']}s", ""),
        ("  edge pulled its rows back", f"{s['catchup_pull_settled_s']}s", ""),
        ("COPY + upsert ceiling", f"{s['copy_upsert_rows_per_s']:,} rows/s", ""),
        (
            "catch-up / ceiling",
            f"{s['catchup_fraction_of_copy_upsert']}",
            target("catchup_fraction"),
        ),
        ("live write → visible", spread(s["live_ms"]), target("live_p99_ms")),
        ("  visibility check query", spread(s["live_check_query_ms"]), ""),
        ("  edge event-loop lag", spread(s["live_edge_loop_lag_ms"]), ""),
        ("local write, online", spread(on), ""),
        ("local write, offline", spread(off), ""),
        ("  baseline: paced, no uplink", spread(s["local_write_paced_no_uplink"]), ""),
        ("  floor: bare sqlite3, paced", spread(s["bare_sqlite_commit_paced"]), ""),
        ("  floor: CPU work, paced", spread(s["cpu_work_paced"]), "offline p50 of work, no I/O"),
        (
            "local write, worse of both",
            f"p99 {s['local_write_p99_ms']} ms",
            target("local_write_p99_ms"),
        ),
    ]
    for phase, use in s["cpu"].items():
        if "other_cpu_s" not in use:
            continue
        cores = (s["machine"]["cpu_count"] or 1) * use["wall_s"]
        rows.append(
            (
                f"CPU during {phase}",
                f"bench {use['bench_cpu_s']} core-s ({_parts(use)}),"
                f" other processes {use['other_cpu_s']} (of {cores:.0f} in {use['wall_s']}s)",
                "busy machine: figures pessimistic" if use["other_cpu_s"] > 0.1 * cores else "",
            )
        )
    probe = s["machine"].get("cpu_slow_windows")
    if probe is not None:
        from probe import describe  # bench/probe.py; bench/ is on the path when run

        rows.append(("CPU slow windows (probe)", describe(probe), "p99 figures land in these"))
    width = max(len(name) for name, _, _ in rows)
    print()
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<48} {note}".rstrip())


def _parts(use: dict[str, float]) -> str:
    """``edge 1.2, cloud 3.4, postgres 0.5`` from a phase's CPU figures."""
    return ", ".join(
        f"{key.removesuffix('_cpu_s')} {value}"
        for key, value in use.items()
        if key.endswith("_cpu_s") and key not in ("machine_cpu_s", "bench_cpu_s", "other_cpu_s")
    )
