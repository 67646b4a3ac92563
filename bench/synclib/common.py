"""Shared pieces of the sync benchmark: errors, the clock, targets, options, workload, results."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sync_protocol.changes import Op, Value

Write = tuple[str, str, Op, dict[str, Value]]

TARGETS: dict[str, float] = {
    "catchup_changes_per_s": 25_000,
    "catchup_fraction": 0.30,
    "live_p99_ms": 50,
    "local_write_p99_ms": 5,
}
STOCK_ITEMS = tuple(f"stk-{k:02d}" for k in range(20))
STOCK_START = 1_000_000
MENU = (
    ("itm-margherita", "Margherita", 950),
    ("itm-fries", "Fries", 350),
    ("itm-lager", "Lager (pint)", 520),
    ("itm-tiramisu", "Tiramisu", 675),
    ("itm-burger", "Cheeseburger", 1250),
)
SETUP_CHUNK = 1000
READY_TIMEOUT_S = 30.0
SETTLE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0


class BenchError(RuntimeError):
    """The benchmark could not run or its result failed verification."""


def now() -> float:
    """The benchmark's clock (monotonic seconds)."""
    return time.perf_counter()


# -- options ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Options:
    """What to run."""

    changes: int
    live_seconds: float
    rate: float
    offline_writes: int
    dsn: str | None
    rounds: int = 3

    @property
    def live_writes(self) -> int:
        """How many writes the live phase makes."""
        return max(1, round(self.live_seconds * self.rate))


# -- the workload ----------------------------------------------------------------------------


def order_line(pk: str, i: int, at_ms: int) -> Write:
    """An order-line insert with every column a till would fill."""
    item_id, name, price = MENU[i % len(MENU)]
    fields: dict[str, Value] = {
        "order_id": f"ord-{i // 4:07d}",
        "item_id": item_id,
        "name": name,
        "quantity": 1 + i % 3,
        "unit_price_pence": price,
        "modifiers": "[]" if i % 5 else '["no onions"]',
        "notes": "",
        "course": 1 + i % 3,
        "seat": 1 + i % 4,
        "added_by": "server-7",
        "added_at_ms": at_ms,
        "voided": False,
    }
    return ("order_lines", pk, Op.INSERT, fields)


def stock_rows() -> list[Write]:
    """The stock rows the single-row mix decrements."""
    return [
        ("stock_levels", pk, Op.INSERT, {"on_hand": STOCK_START, "par_level": 50, "unit": "each"})
        for pk in STOCK_ITEMS
    ]


@dataclass(frozen=True, slots=True)
class Expect:
    """What makes a write visible in Postgres: a line's id, or a counter reaching a value."""

    table: str
    pk: str
    on_hand: int | None = None


class Mix:
    """Single-row writes: three order-line inserts to one stock-counter decrement."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.on_hand = dict.fromkeys(STOCK_ITEMS, STOCK_START)
        self.count = 0

    def next(self) -> tuple[Write, Expect]:
        """The next write and how to recognise it in Postgres."""
        i, self.count = self.count, self.count + 1
        if i % 4 == 3:
            pk = STOCK_ITEMS[(i // 4) % len(STOCK_ITEMS)]
            self.on_hand[pk] -= 1
            write: Write = ("stock_levels", pk, Op.UPDATE, {"on_hand": -1})
            return write, Expect("stock_levels", pk, self.on_hand[pk])
        pk = f"{self.prefix}-{i:07d}"
        return order_line(pk, i, time.time_ns() // 1_000_000), Expect("order_lines", pk)


# -- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class CatchUpRound:
    """One catch-up (a fresh site and store) and the ceiling measured right after it."""

    setup_s: float = 0.0
    catchup_s: float = 0.0
    catchup_acked_s: float = 0.0
    pull_settle_s: float = 0.0
    ceiling_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    def fraction(self) -> float:
        """Catch-up rate over the ceiling's (same rows, so the ratio of the times)."""
        return self.ceiling_s / self.catchup_s


@dataclass(slots=True)
class Results:
    """Every figure the run produced."""

    changes: int = 0
    rounds: list[CatchUpRound] = field(default_factory=list)
    live_rate: float = 0.0
    live_ms: dict[str, float] = field(default_factory=dict)
    live_check_ms: dict[str, float] = field(default_factory=dict)
    loop_lag_ms: dict[str, float] = field(default_factory=dict)
    local_online_ms: dict[str, float] = field(default_factory=dict)
    local_offline_ms: dict[str, float] = field(default_factory=dict)
    local_paced_ms: dict[str, float] = field(default_factory=dict)
    sqlite_floor_ms: dict[str, float] = field(default_factory=dict)
    cpu_floor_ms: dict[str, float] = field(default_factory=dict)
    postgres: str = ""
    loadavg: tuple[float, float, float] = (0.0, 0.0, 0.0)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)

    def median_round(self) -> CatchUpRound:
        """The round with the median catch-up/ceiling fraction (the lower one of an even
        count): its figures are the headline ones."""
        ordered = sorted(self.rounds, key=CatchUpRound.fraction)
        return ordered[(len(ordered) - 1) // 2]
