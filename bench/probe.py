"""How steady this machine's CPU is: windows in which the same work runs several times slower.

Run ``python bench/probe.py`` (``--seconds``; default 5). Both benchmarks run it first and
print its figures beside theirs.

It times a fixed piece of pure-Python arithmetic (about 0.2 ms) back to back in one thread,
with no I/O, no allocation to speak of and nothing else of ours running. On a dedicated core
every piece takes about the same time. On a virtual machine whose host shares or caps its
cores, there are *slow windows*: stretches of tens of milliseconds in which each piece takes
several times as long, also as counted by the thread's own CPU clock, so the guest cannot
tell it apart from real work. Any tail latency measured here (a p99 over a few seconds) lands
in those windows once they cover a few per cent of the time; the benchmarks' p99 figures must
be read against them.

Reported: the piece's p50, how many windows (runs of pieces slower than ``SLOW`` × p50, gaps
under ``JOIN_S`` joined), their median length, how often they start, the median slowdown in
them, and the share of the time they cover.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

SLOW = 4.0  #: a piece this many times its p50 is slow
JOIN_S = 0.02  #: slow pieces closer than this belong to one window
UNIT_S = 0.0002  #: the piece's size on this machine, back to back


def spin(n: int) -> int:
    """The arithmetic: ``n`` multiply-adds in a Python loop."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def sized(unit_s: float) -> int:
    """The ``spin`` count that takes about ``unit_s`` here (the median of five tries, so a
    slow window during the sizing does not shrink it)."""
    n = 1000
    while True:
        tries = []
        for _ in range(5):
            began = time.perf_counter()
            spin(n)
            tries.append(time.perf_counter() - began)
        took = statistics.median(tries)
        if took >= unit_s / 4:
            return max(1, round(n * unit_s / took))
        n *= 2


def cpu_slow_windows(seconds: float = 5.0, unit_s: float = UNIT_S) -> dict[str, Any]:
    """Time ``unit_s`` pieces of arithmetic back to back for ``seconds``; the slow windows."""
    n = sized(unit_s)
    pieces: list[tuple[float, float]] = []
    began = time.perf_counter()
    end = began + seconds
    while True:
        start = time.perf_counter()
        if start >= end:
            break
        spin(n)
        pieces.append((start - began, time.perf_counter() - start))
    p50 = statistics.median(took for _, took in pieces)
    windows: list[list[tuple[float, float]]] = []
    for at, took in pieces:
        if took <= SLOW * p50:
            continue
        if windows and at - (windows[-1][-1][0] + windows[-1][-1][1]) < JOIN_S:
            windows[-1].append((at, took))
        else:
            windows.append([(at, took)])
    lengths = [w[-1][0] + w[-1][1] - w[0][0] for w in windows]
    starts = [w[0][0] for w in windows]
    slowdowns = [took / p50 for w in windows for _, took in w]
    return {
        "seconds": round(seconds, 1),
        "piece_p50_ms": round(p50 * 1000, 3),
        "windows": len(windows),
        "window_ms_p50": round(statistics.median(lengths) * 1000, 1) if lengths else 0.0,
        "every_s": round(statistics.mean(b - a for a, b in pairwise(starts)), 2)
        if len(starts) > 1
        else None,
        "slowdown_p50": round(statistics.median(slowdowns), 1) if slowdowns else 1.0,
        "time_in_windows_pct": round(100 * sum(lengths) / seconds, 1),
    }


def describe(probe: dict[str, Any]) -> str:
    """One line for the benchmarks' tables."""
    if not probe["windows"]:
        return f"no slow windows in {probe['seconds']}s"
    every = f" every {probe['every_s']}s" if probe["every_s"] else ""
    plural = "s" if probe["windows"] > 1 else ""
    return (
        f"{probe['windows']} window{plural} in {probe['seconds']}s{every},"
        f" {probe['window_ms_p50']} ms each,"
        f" {probe['slowdown_p50']}x slower, {probe['time_in_windows_pct']}% of the time"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Print the probe's figures, then the JSON object as the last line."""
    parser = argparse.ArgumentParser(prog="bench/probe.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    ns = parser.parse_args(argv)
    if ns.seconds <= 0:
        parser.error("--seconds must be positive")
    probe = cpu_slow_windows(ns.seconds)
    print(f"CPU slow windows: {describe(probe)}")
    print(json.dumps(probe))
    return 0


if __name__ == "__main__":
    sys.exit(main())
