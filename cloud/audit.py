"""Checking a site's synced audit trail: every edge node's hash chain, walked in Postgres.

Each edge writes its own chain into the synced ``audit_log`` table, with row ids
``<node>:<position, 12 digits>`` (see ``edge.api.audit``). ``verify_site`` reads the site's
live entries through a server-side cursor (``FETCH_ROWS`` at a time) inside one read-only,
repeatable-read transaction, so a long trail is never held in memory and every chain is
checked against one snapshot. Rows come in primary-key order, so each node's entries come in
position order; each node's chain has its own ``ChainWalk``, so the order *between* nodes
(which a database collation may interleave) does not matter. A removed entry (deleted, or
marked deleted) is a gap the walk names; a truncated tail cannot be told from a shorter trail.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from shared.audit_chain import CHAINED_FIELDS, ChainWalk, Verdict

from .schema import quote

#: rows fetched per round trip while walking a trail
FETCH_ROWS = 500

_COLUMNS = ", ".join(quote(name) for name in ("id", *CHAINED_FIELDS, "prev_hash", "hash"))


@dataclass(frozen=True, slots=True)
class NodeVerdict:
    """One edge node's chain: whether it checks out, and where it first breaks if not."""

    node_id: str
    verdict: Verdict


def chain_node(entry_id: str) -> str:
    """The node whose chain an entry id belongs to (``<node>:<position>``)."""
    node, sep, _ = entry_id.rpartition(":")
    return node if sep else entry_id


async def verify_site(pool: asyncpg.Pool, site_id: str) -> list[NodeVerdict]:
    """The verdict on each chain of a site's audit trail (every registered node), by node id."""
    walks: dict[str, ChainWalk] = {}
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        for record in await conn.fetch("SELECT node_id FROM devices WHERE site_id = $1", site_id):
            walks[str(record["node_id"])] = ChainWalk()
        cursor = conn.cursor(
            f"SELECT {_COLUMNS} FROM audit_log WHERE site_id = $1 AND NOT _deleted ORDER BY id",
            site_id,
            prefetch=FETCH_ROWS,
        )
        async for record in cursor:
            walk = walks.setdefault(chain_node(record["id"]), ChainWalk())
            if walk.ok:
                walk.add(dict(record))
    return [NodeVerdict(node, walks[node].verdict()) for node in sorted(walks)]
