"""What the demo's modules share: where it runs, its timings, ``DemoError``."""

from __future__ import annotations

HOST = "127.0.0.1"
SITE_ID = "demo"
TABLETS = 3
OWNER_EVERY_S = 3.0
PAY_EVERY_S = 1.0  #: how often the cashier settles the oldest open check
CLOUD_START_TIMEOUT_S = 60.0
SEED_TIMEOUT_S = 20.0
DRAIN_TIMEOUT_S = 30.0
CLOUD_STOP_TIMEOUT_S = 30.0
EXIT_INTERRUPTED = 130

Sums = dict[str, tuple[tuple[int, int], tuple[int, int]]]  #: table -> (edge, cloud) checksums


class DemoError(Exception):
    """The demo cannot go on; the message says why."""
