"""The throwaway Postgres used by tests, the demo and benchmarks really starts and stops."""

from __future__ import annotations

import asyncio
import os
import pwd
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

import cloud.pgtemp as pgtemp
from cloud.pgtemp import PostgresNotFound, TemporaryPostgres

ROOT = Path(__file__).resolve().parent.parent


async def _fetch(dsn: str, query: str) -> object:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return await conn.fetchval(query)
    finally:
        await conn.close()


def fetch(dsn: str, query: str) -> object:
    """Run one query on a short-lived connection and return the first value."""
    return asyncio.run(_fetch(dsn, query))


def postmaster_pid(data_dir: Path) -> int:
    """The server's process id, from the first line of ``postmaster.pid``."""
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


def process_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie waiting for its parent (init) to reap it."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists():
        try:
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (FileNotFoundError, ProcessLookupError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def port_accepts(port: int) -> bool:
    """True if something accepts TCP connections on 127.0.0.1:port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def expected_server_uid() -> int:
    """The uid the server must run as: ours, or the unprivileged account when we are root."""
    if os.geteuid() != 0:
        return os.geteuid()
    return pwd.getpwnam(os.environ.get("FYNLO_PG_USER") or "nobody").pw_uid


def assert_stopped(data_dir: Path, pid: int, port: int) -> None:
    """The server process is gone, its port closed and its files removed."""
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # only to let init reap the orphaned postmaster
    assert not process_alive(pid)
    assert not port_accepts(port)
    assert not data_dir.exists()
    assert not data_dir.parent.exists()


@pytest.fixture
def own_server() -> Iterator[TemporaryPostgres]:
    """A separate cluster that a test may stop itself."""
    server = TemporaryPostgres()
    yield server
    server.stop()


def test_session_server_answers(pg_dsn: str) -> None:
    assert fetch(pg_dsn, "select 1") == 1


def test_fresh_database_is_empty_and_separate(pg_database: str) -> None:
    name = fetch(pg_database, "select current_database()")
    assert isinstance(name, str) and name.startswith("test_")
    tables = "select count(*) from pg_tables where schemaname = 'public'"
    assert fetch(pg_database, tables) == 0


async def _backend_process_owner(dsn: str) -> int:
    """Uid owning the backend process serving a connection (Linux: reads /proc)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        pid = await conn.fetchval("select pg_backend_pid()")
        # Stat while the connection is open: the backend exits when it closes.
        return await asyncio.to_thread(lambda: os.stat(f"/proc/{pid}").st_uid)
    finally:
        await conn.close()


def test_server_runs_unprivileged_with_fast_settings(own_server: TemporaryPostgres) -> None:
    own_server.start()
    dsn = own_server.dsn
    assert dsn == f"postgresql://fynlo@127.0.0.1:{own_server.port}/postgres"
    data_directory = fetch(dsn, "select current_setting('data_directory')")
    assert isinstance(data_directory, str)
    assert Path(data_directory) == own_server.data_dir
    assert os.stat(data_directory).st_uid == expected_server_uid()
    if Path("/proc").is_dir():
        assert asyncio.run(_backend_process_owner(dsn)) == expected_server_uid()
        assert os.stat(f"/proc/{postmaster_pid(own_server.data_dir)}").st_uid != 0
    for setting, value in {
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",
        "shared_buffers": "128MB",
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": str(own_server.data_dir),
    }.items():
        assert fetch(dsn, f"select current_setting('{setting}')") == value, setting


def test_stop_kills_server_and_removes_files(own_server: TemporaryPostgres) -> None:
    with own_server:
        data_dir, port = own_server.data_dir, own_server.port
        pid = postmaster_pid(data_dir)
        assert process_alive(pid)
        assert fetch(own_server.dsn, "select 1") == 1
    assert not own_server.running
    assert_stopped(data_dir, pid, port)
    own_server.stop()  # idempotent


def test_durable_mode_keeps_fsync_on() -> None:
    with TemporaryPostgres(fast=False) as server:
        for setting in ("fsync", "synchronous_commit", "full_page_writes"):
            assert fetch(server.dsn, f"select current_setting('{setting}')") == "on", setting


def test_retries_when_the_chosen_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = pgtemp.free_port
        monkeypatch.setattr(pgtemp, "free_port", lambda: next(ports, None) or real_free_port())
        with TemporaryPostgres() as server:
            assert server.port != taken
            assert fetch(server.dsn, "select 1") == 1


def test_missing_binaries_fail_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("FYNLO_PG_BINDIR", str(tmp_path))
    started = time.monotonic()
    with pytest.raises(PostgresNotFound) as caught:
        TemporaryPostgres().start()
    assert time.monotonic() - started < 5
    assert "apt-get install postgresql" in str(caught.value)
    assert "FYNLO_TEST_PG_DSN" in str(caught.value)
    assert caught.value.code == "postgres_not_found"


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_module_main_prints_dsn_and_stops_on_sigterm() -> None:
    proc = _spawn("-m", "cloud.pgtemp")
    try:
        assert proc.stdout is not None
        dsn = proc.stdout.readline().strip()
        assert dsn.startswith("postgresql://fynlo@127.0.0.1:"), proc.stderr
        assert fetch(dsn, "select 1") == 1
        port = int(dsn.rsplit(":", 1)[1].split("/")[0])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not port_accepts(port)


def test_servers_left_running_are_stopped_at_exit() -> None:
    script = textwrap.dedent(
        """
        from cloud.pgtemp import TemporaryPostgres
        server = TemporaryPostgres().start()
        pid = int((server.data_dir / "postmaster.pid").read_text().split()[0])
        print(server.data_dir, pid, server.port, flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    data_dir, pid, port = done.stdout.split()
    assert_stopped(Path(data_dir), int(pid), int(port))
