"""The sync engine's pure core: records, clock, wire format, merges and sessions.

Nothing here performs I/O or reads a clock or a random generator: those come in as
arguments, so the same code runs in the edge, in the cloud and in tests.
"""

from .changes import Change, Conflict, FeedEntry, Op, RowState, Value, Values, Version
from .errors import ERRORS, ErrorCode, LocalProtocolError, RemoteProtocolError, SyncError
from .hlc import HybridClock
from .merge import STRATEGIES, Outcome, OutcomeKind, apply_change, rebase, validate_change
from .schema import Author, Column, ColumnType, Merge, Registry, Strategy, TableSpec, TieBreak
from .wire import PROTOCOL_VERSION, Limits

__all__ = [
    "ERRORS",
    "PROTOCOL_VERSION",
    "STRATEGIES",
    "Author",
    "Change",
    "Column",
    "ColumnType",
    "Conflict",
    "ErrorCode",
    "FeedEntry",
    "HybridClock",
    "Limits",
    "LocalProtocolError",
    "Merge",
    "Op",
    "Outcome",
    "OutcomeKind",
    "Registry",
    "RemoteProtocolError",
    "RowState",
    "Strategy",
    "SyncError",
    "TableSpec",
    "TieBreak",
    "Value",
    "Values",
    "Version",
    "apply_change",
    "rebase",
    "validate_change",
]
