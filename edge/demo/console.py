"""The demo's terminal output: event lines, the live status line and the final summary."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from typing import Any, TextIO

from .common import DRAIN_TIMEOUT_S, Sums

# -- terminal ---------------------------------------------------------------------------------


class Console:
    """Event lines, and one live status line redrawn with ``\\r`` on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._out = stream
        self._tty = stream.isatty()
        self._status = ""  #: the last status line shown

    def line(self, text: str) -> None:
        """Print a line of its own (above the live status line on a terminal)."""
        if self._tty and self._status:
            text = "\r\x1b[K" + text + "\n" + self._status
        else:
            text += "\n"
        self._out.write(text)
        self._out.flush()

    def status(self, text: str) -> None:
        """Show the status line: in place on a terminal, as a new line otherwise."""
        if self._tty:
            text = text[: max(20, shutil.get_terminal_size().columns - 1)]
            self._out.write("\r\x1b[K" + text)
        elif text != self._status:  # the final line after a quick drain may repeat the last
            self._out.write(text + "\n")
        self._status = text
        self._out.flush()

    def end_status(self) -> None:
        """Leave the status line as it is and go below it."""
        if self._tty and self._status:
            self._out.write("\n")
            self._out.flush()
        self._status = ""


def status_line(elapsed_s: float, body: dict[str, Any], cloud_head: int | None) -> str:
    """One line from an edge status document (``status_body``) and the cloud's feed head."""
    link = "online" if body["uplink_running"] and body["online"] else "offline"
    skew = body["clock_skew_ms"]
    line = (
        f"t={elapsed_s:3.0f}s  {link:<7}  outbox {body['outbox_depth']:>4} "
        f"(oldest {body['oldest_unsynced_age_ms'] / 1000:4.1f}s)  "
        f"acked {body['acked_through']}/{body['last_seq']}  pulled {body['catchup']['pulled']}  "
        f"cloud head {'?' if cloud_head is None else cloud_head} (edge {body['pull_cursor']})  "
        f"conflicts {body['open_conflicts']}  skew {'?' if skew is None else f'{skew:+d}'}ms"
    )
    if body["stuck"]:
        line += f"  PUSH STOPPED: {body['stuck']}"
    elif body["last_error"] and body["uplink_running"]:
        line += f"  last error: {body['last_error']['channel']} {body['last_error']['code']}"
    return line


# -- summary ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    """What happened, for the summary."""

    reason: str = ""
    error: str | None = None
    ran_s: float = 0.0
    orders: int = 0
    lines: int = 0
    changes: int = 0
    owner_edits: int = 0
    deliveries: int = 0
    paid_by_bank: int = 0
    paid_in_cash: int = 0
    last_seq: int = 0
    acked_through: int = 0
    pulled: int = 0
    conflicts: int = 0
    drained: bool = False
    checksums: Sums = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        """Whether the checksums were compared and every one is equal."""
        return bool(self.checksums) and all(e == c for e, c in self.checksums.values())


def summary(r: Result, cloud_exit: int | None) -> list[str]:
    """The final report."""
    lines = ["", f"summary: stopped by {r.reason or 'an error'} after {r.ran_s:.1f} s of load"]
    if r.checksums:  # the edge ran
        lines.append(
            f"  tablets: {r.orders} orders with {r.lines} lines and their stock deltas "
            f"({r.changes} changes); owner: {r.owner_edits} price edits and "
            f"{r.deliveries} deliveries in the cloud"
        )
        lines.append(
            f"  cashier: {r.paid_by_bank} checks paid by bank (QR, the simulated bank's webhook,"
            f" settled by sync), {r.paid_in_cash} in cash"
        )
        lines.append(
            f"  sync: edge wrote seq {r.last_seq}, cloud acknowledged {r.acked_through}; "
            f"pulled {r.pulled} feed entries; open conflicts {r.conflicts}"
        )
    if r.error:
        lines.append(f"  error: {r.error}")
    if r.checksums:
        lines.append("  checksums, edge vs cloud:")
        for table, (edge, cloud) in r.checksums.items():
            rows = f"{edge[0]} rows" if edge[0] == cloud[0] else f"{edge[0]} vs {cloud[0]} rows"
            lines.append(f"    {table:<16}{rows:>14}   {'equal' if edge == cloud else 'NOT EQUAL'}")
    if r.converged:
        lines.append("  result: edge and cloud hold the same rows (every checksum is equal)")
    elif r.checksums:
        why = "" if r.drained else f" (not drained within {DRAIN_TIMEOUT_S:.0f} s)"
        lines.append(f"  result: edge and cloud DIFFER{why}")
    else:
        lines.append("  result: checksums not compared")
    if cloud_exit == 0:
        lines.append("  cloud: stopped (exit 0); its throwaway Postgres is stopped and deleted")
    elif cloud_exit is not None:
        lines.append(f"  cloud: exited with status {cloud_exit}")
    return lines
