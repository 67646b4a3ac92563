"""``fynlo-demo``: a cloud and an edge on this machine, syncing under load, with live status.

The cloud runs as a child process (the edge never imports the cloud), the real edge app on a
fresh SQLite file; tablets, an owner and an outage load them, and at the end the per-table
checksums of edge and cloud are compared. Exit status 0 means every checksum matched. How it
works in detail: ``edge.demo.run``.
"""

from __future__ import annotations

from .run import main

__all__ = ["main"]
