"""Shared fixtures: a real, throwaway Postgres for the session and a fresh database per test.

Tests are plain functions that call ``asyncio.run(...)`` (no pytest-asyncio), so every
fixture here is synchronous and runs its own short event loop for asyncpg calls.
Set ``FYNLO_TEST_PG_DSN`` to use an existing server instead of starting one.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import sys
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from cloud.pgtemp import PgTempError, TemporaryPostgres

_PG_FIXTURES = frozenset({"pg_dsn", "pg_database"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test that uses a Postgres fixture with ``postgres`` (``-m 'not postgres'``)."""
    for item in items:
        if _PG_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.postgres)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Turn "no tests collected" (exit 5) into a failure so CI never passes an empty run."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        message = "no tests ran: treating as failure"
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(message, red=True, bold=True)
        else:
            print(message, file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def pg_dsn() -> Iterator[str]:
    """DSN of the session's Postgres maintenance database (``FYNLO_TEST_PG_DSN`` or temporary)."""
    configured = os.environ.get("FYNLO_TEST_PG_DSN")
    if configured:
        yield configured
        return
    server = TemporaryPostgres()
    try:
        server.start()
    except PgTempError as exc:
        pytest.fail(f"cannot start a throwaway Postgres: {exc}", pytrace=False)
    try:
        yield server.dsn
    finally:
        server.stop()


def dsn_for_database(dsn: str, database: str) -> str:
    """Return ``dsn`` pointing at ``database`` instead (URL-form DSNs only)."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ValueError(f"expected a postgresql:// URL, got {dsn!r}")
    return urlunsplit(parts._replace(path=f"/{database}"))


async def _create_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()


async def _drop_database(dsn: str, name: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
def pg_database(pg_dsn: str) -> Iterator[str]:
    """DSN of a fresh, empty database that is dropped after the test."""
    name = f"test_{secrets.token_hex(6)}"
    asyncio.run(_create_database(pg_dsn, name))
    try:
        yield dsn_for_database(pg_dsn, name)
    finally:
        asyncio.run(_drop_database(pg_dsn, name))
