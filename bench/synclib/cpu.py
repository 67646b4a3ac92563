"""Who used the CPU during each phase of the sync benchmark."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .common import now

# -- who used the CPU -----------------------------------------------------------------------


_PROC = Path("/proc/stat")
_TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _machine_busy_s() -> float:
    """CPU seconds this machine has spent busy since boot (Linux ``/proc/stat``)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, _PROC.read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) * _TICK_S


def _process_cpu_s(pid: int) -> float:
    """CPU seconds one process has used (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(stat[1]) == pid:
                out.append(int(entry.name))
    return out


class CpuMeter:
    """Core-seconds used during a phase by the whole machine and by each of our processes.

    Ours are this process (the edge: store, uplink, and the benchmark's own watcher), the
    cloud process and, when the benchmark started it, the throwaway Postgres (postmaster and
    its children). The rest is other work on the machine, which competes for the same cores
    and makes the figures worse than they would be on a quiet one.
    """

    def __init__(self, pids: Callable[[], dict[str, list[int]]]) -> None:
        self._pids = pids
        self._start: tuple[float, float, dict[str, float]] = (0.0, 0.0, {})

    def _sample(self) -> tuple[float, float, dict[str, float]]:
        if not _PROC.exists():  # not Linux: wall time only
            return now(), 0.0, {}
        by_part = {
            part: sum(_process_cpu_s(pid) for pid in pids) for part, pids in self._pids().items()
        }
        return now(), _machine_busy_s(), by_part

    def start(self) -> None:
        """Begin a phase."""
        self._start = self._sample()

    def stop(self) -> dict[str, float]:
        """The phase's wall time and core-seconds: machine, ours (in all and per part), others."""
        (t0, machine0, parts0), (t1, machine1, parts1) = self._start, self._sample()
        if not _PROC.exists():
            return {"wall_s": round(t1 - t0, 2)}
        # A Postgres backend that exited during the phase takes its seconds with it: a part
        # never counts below zero.
        parts = {p: max(0.0, parts1.get(p, 0.0) - parts0.get(p, 0.0)) for p in parts1}
        machine, ours = machine1 - machine0, sum(parts.values())
        return {
            "wall_s": round(t1 - t0, 2),
            "machine_cpu_s": round(machine, 2),
            "bench_cpu_s": round(ours, 2),
            **{f"{part}_cpu_s": round(used, 2) for part, used in parts.items()},
            "other_cpu_s": round(max(0.0, machine - ours), 2),
        }


def bench_pids(cloud_pid: int, pg_data: Path | None) -> Callable[[], dict[str, list[int]]]:
    """The benchmark's processes by part, found afresh at each call (backends come and go)."""

    def pids() -> dict[str, list[int]]:
        found = {"edge": [os.getpid()], "cloud": [cloud_pid]}
        if pg_data is not None:
            try:
                postmaster = int((pg_data / "postmaster.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return found
            found["postgres"] = [postmaster, *_children(postmaster)]
        return found

    return pids
