"""A throwaway PostgreSQL cluster for tests, the local demo and benchmarks.

How it works: find the server binaries (``FYNLO_PG_BINDIR``, then ``PATH``, then
``pg_config --bindir``, then the newest ``/usr/lib/postgresql/*/bin``), ``initdb`` a fresh
cluster (trust auth, superuser ``fynlo``) into ``<mkdtemp>/data``, append our settings to its
``postgresql.conf`` and start it with ``pg_ctl -w`` on 127.0.0.1 and a free TCP port; the
Unix socket lives in the data directory, so nothing is shared with a system server.

initdb and postgres refuse to run as root. When we are root (CI), every server command runs
as an unprivileged user (``nobody``, or ``FYNLO_PG_USER``) via ``subprocess``'s ``user=`` /
``group=`` arguments, and the temporary directory is chown'ed to that user.

``stop()`` kills the server (``pg_ctl stop -m immediate``) and removes the directory; it is
idempotent and also runs at interpreter exit for every cluster still running.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

SUPERUSER = "fynlo"
HOST = "127.0.0.1"
DEFAULT_UNPRIVILEGED_USER = "nobody"
_PORT_ATTEMPTS = 5
_START_TIMEOUT_S = 60
_COMMAND_TIMEOUT_S = 120
_LOG_TAIL_LINES = 30

_INSTALL_HINT = (
    "Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; macOS: "
    "`brew install postgresql`), or set FYNLO_PG_BINDIR to the directory holding initdb, "
    "pg_ctl and postgres, or point the tests at an existing server with "
    "FYNLO_TEST_PG_DSN=postgresql://user@host:port/postgres."
)


class PgTempError(RuntimeError):
    """The throwaway cluster could not be created, started or stopped."""

    code = "pgtemp_failed"


class PostgresNotFound(PgTempError):
    """No PostgreSQL server binaries could be found."""

    code = "postgres_not_found"


@dataclass(frozen=True, slots=True)
class PgBinaries:
    """Paths of the server programs we run, all from one directory."""

    bindir: Path

    @property
    def initdb(self) -> Path:
        """Path of ``initdb``."""
        return self.bindir / "initdb"

    @property
    def pg_ctl(self) -> Path:
        """Path of ``pg_ctl``."""
        return self.bindir / "pg_ctl"

    @property
    def postgres(self) -> Path:
        """Path of ``postgres``."""
        return self.bindir / "postgres"


_PROGRAMS = ("initdb", "pg_ctl", "postgres")


def _complete_bindir(directory: Path) -> bool:
    return all(os.access(directory / name, os.X_OK) for name in _PROGRAMS)


def _version_key(path: Path) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", path.parent.name)
    return tuple(int(n) for n in numbers) or (-1,)


def find_binaries() -> PgBinaries:
    """Locate initdb/pg_ctl/postgres, or raise PostgresNotFound with an install hint."""
    configured = os.environ.get("FYNLO_PG_BINDIR")
    if configured:
        directory = Path(configured)
        if _complete_bindir(directory):
            return PgBinaries(directory)
        raise PostgresNotFound(
            f"FYNLO_PG_BINDIR={configured!r} does not contain executable "
            f"{', '.join(_PROGRAMS)}. {_INSTALL_HINT}"
        )

    on_path = shutil.which("initdb")
    if on_path:
        # PATH often holds symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin);
        # the real directory is where pg_ctl looks for postgres anyway.
        for directory in (Path(on_path).resolve().parent, Path(on_path).parent):
            if _complete_bindir(directory):
                return PgBinaries(directory)

    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            done = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            done = None
        if done is not None and done.returncode == 0 and done.stdout.strip():
            directory = Path(done.stdout.strip())
            if _complete_bindir(directory):
                return PgBinaries(directory)

    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key)
    for directory in reversed(candidates):
        if _complete_bindir(directory):
            return PgBinaries(directory)

    raise PostgresNotFound(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH, via "
        f"pg_config --bindir, or under /usr/lib/postgresql/*/bin. {_INSTALL_HINT}"
    )


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no server log)"
    return "\n".join(text.splitlines()[-lines:]) or "(server log is empty)"


@dataclass(frozen=True, slots=True)
class _RunAs:
    """The unprivileged account server commands run as when we are root."""

    name: str
    uid: int
    gid: int


def _unprivileged_account() -> _RunAs | None:
    if os.geteuid() != 0:
        return None
    name = os.environ.get("FYNLO_PG_USER") or DEFAULT_UNPRIVILEGED_USER
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise PgTempError(
            f"running as root, and the unprivileged user {name!r} to run PostgreSQL as does "
            "not exist; create it or set FYNLO_PG_USER to an existing non-root user"
        ) from None
    if entry.pw_uid == 0:
        raise PgTempError(f"FYNLO_PG_USER={name!r} is root; PostgreSQL refuses to run as root")
    return _RunAs(name, entry.pw_uid, entry.pw_gid)


def _check_traversable(directory: Path, account: _RunAs) -> None:
    """Fail early when ``account`` cannot reach ``directory`` (e.g. TMPDIR under /root)."""
    for parent in directory.resolve().parents:
        mode = parent.stat()
        if mode.st_uid == account.uid:
            ok = bool(mode.st_mode & stat.S_IXUSR)
        elif mode.st_gid == account.gid:
            ok = bool(mode.st_mode & stat.S_IXGRP)
        else:
            ok = bool(mode.st_mode & stat.S_IXOTH)
        if not ok:
            raise PgTempError(
                f"user {account.name!r} cannot traverse {parent} to reach {directory}; "
                "set TMPDIR to a world-traversable directory such as /tmp"
            )


class TemporaryPostgres:
    """A private PostgreSQL cluster on 127.0.0.1, removed again by ``stop()``."""

    def __init__(
        self,
        *,
        fast: bool = True,
        max_connections: int = 200,
        shared_buffers: str = "128MB",
        binaries: PgBinaries | None = None,
    ) -> None:
        self.fast = fast
        self.max_connections = max_connections
        self.shared_buffers = shared_buffers
        self._binaries = binaries
        self._base: Path | None = None
        self._port: int | None = None
        self._running = False
        self._account: _RunAs | None = None

    # -- public surface -------------------------------------------------------------------

    @property
    def port(self) -> int:
        """TCP port the running server listens on."""
        if self._port is None or not self._running:
            raise PgTempError("the temporary PostgreSQL server is not running")
        return self._port

    @property
    def dsn(self) -> str:
        """Connection string for the ``postgres`` maintenance database."""
        return f"postgresql://{SUPERUSER}@{HOST}:{self.port}/postgres"

    @property
    def data_dir(self) -> Path:
        """The cluster's data directory (also holds its Unix socket)."""
        if self._base is None:
            raise PgTempError("the temporary PostgreSQL server has not been started")
        return self._base / "data"

    @property
    def log_path(self) -> Path:
        """The server log written by ``pg_ctl -l``."""
        if self._base is None:
            raise PgTempError("the temporary PostgreSQL server has not been started")
        return self._base / "server.log"

    @property
    def running(self) -> bool:
        """True between a successful ``start()`` and ``stop()``."""
        return self._running

    def start(self) -> Self:
        """Create and start the cluster; a no-op when it is already running."""
        if self._running:
            return self
        binaries = self._binaries or find_binaries()
        self._account = _unprivileged_account()
        self._base = Path(tempfile.mkdtemp(prefix="fynlo-pg-"))
        _LIVE.add(self)
        try:
            self._prepare_base()
            self._initdb(binaries)
            self._write_settings()
            self._start_server(binaries)
        except BaseException:
            self._cleanup(binaries)
            raise
        return self

    def stop(self) -> None:
        """Stop the server at once and delete its files; safe to call more than once."""
        self._cleanup(self._binaries)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port={self._port}" if self._running else "stopped"
        return f"<TemporaryPostgres {state} fast={self.fast}>"

    # -- steps ----------------------------------------------------------------------------

    def _prepare_base(self) -> None:
        assert self._base is not None
        if self._account is not None:
            _check_traversable(self._base, self._account)
            os.chown(self._base, self._account.uid, self._account.gid)

    def _initdb(self, binaries: PgBinaries) -> None:
        args = [
            str(binaries.initdb),
            "-D", str(self.data_dir),
            "-A", "trust",
            "-U", SUPERUSER,
            "--no-sync",
            "-E", "UTF8",
            "--locale=C",
        ]  # fmt: skip
        done = self._run(args, cwd=self._base)
        if done.returncode != 0:
            raise PgTempError(f"initdb failed (exit {done.returncode}):\n{done.stdout.strip()}")

    def _write_settings(self) -> None:
        settings: dict[str, str] = {
            "listen_addresses": _conf_quote(HOST),
            "unix_socket_directories": _conf_quote(str(self.data_dir)),
            "max_connections": str(self.max_connections),
            "shared_buffers": _conf_quote(self.shared_buffers),
            "logging_collector": "off",
        }
        if self.fast:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        lines = "".join(f"{key} = {value}\n" for key, value in settings.items())
        # Appending keeps the file's owner (the unprivileged user when we are root).
        with (self.data_dir / "postgresql.conf").open("a", encoding="utf-8") as conf:
            conf.write("\n# added by cloud.pgtemp\n" + lines)

    def _start_server(self, binaries: PgBinaries) -> None:
        for attempt in range(1, _PORT_ATTEMPTS + 1):
            port = free_port()
            args = [
                str(binaries.pg_ctl),
                "-D", str(self.data_dir),
                "-l", str(self.log_path),
                "-w", "-t", str(_START_TIMEOUT_S),
                "-o", f"-p {port}",
                "start",
            ]  # fmt: skip
            done = self._run(args, cwd=self._base, timeout=_START_TIMEOUT_S + 30)
            if done.returncode == 0:
                self._port = port
                self._running = True
                return
            log = _tail(self.log_path)
            if "already in use" in log and attempt < _PORT_ATTEMPTS:
                self._truncate_log()
                continue
            raise PgTempError(
                f"pg_ctl start failed (exit {done.returncode}): {done.stdout.strip()}\n"
                f"--- tail of {self.log_path} ---\n{log}"
            )

    def _truncate_log(self) -> None:
        try:
            with self.log_path.open("w"):
                pass
        except OSError:
            pass

    def _cleanup(self, binaries: PgBinaries | None) -> None:
        _LIVE.discard(self)
        base, self._base = self._base, None
        was_running, self._running = self._running, False
        if base is None:
            return
        data_dir = base / "data"
        if was_running or (data_dir / "postmaster.pid").exists():
            try:
                bins = binaries or find_binaries()
            except PostgresNotFound:
                bins = None
            if bins is not None:
                stop_args = [
                    str(bins.pg_ctl), "-D", str(data_dir), "-m", "immediate", "-w", "stop",
                ]  # fmt: skip
                try:
                    self._run(stop_args, cwd=base, timeout=60)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(base, ignore_errors=True)

    def _run(
        self, args: list[str], *, cwd: Path | None, timeout: float = _COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run a server command, as the unprivileged account when we are root."""
        # PG* variables (PGDATA, PGPORT, PGOPTIONS...) from the caller must not leak in.
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env |= {"LC_ALL": "C", "LANG": "C"}
        extra: dict[str, Any] = {}
        if self._account is not None:
            env["HOME"] = str(cwd or "/")
            env["USER"] = env["LOGNAME"] = self._account.name
            extra = {
                "user": self._account.uid,
                "group": self._account.gid,
                "extra_groups": [],
            }
        return subprocess.run(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            cwd=cwd,
            timeout=timeout,
            check=False,
            **extra,
        )


_LIVE: set[TemporaryPostgres] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def main(argv: list[str] | None = None) -> int:
    """Start a throwaway cluster, print its DSN, and stop it on Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m cloud.pgtemp", description=main.__doc__)
    parser.add_argument(
        "--durable",
        action="store_true",
        help="keep fsync, synchronous_commit and full_page_writes on (honest benchmarks)",
    )
    options = parser.parse_args(argv)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    try:
        with TemporaryPostgres(fast=not options.durable) as server:
            # Block only after the server is up: children would inherit the signal mask.
            signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
            print(server.dsn, flush=True)
            print(f"data: {server.data_dir}  (Ctrl-C to stop)", file=sys.stderr, flush=True)
            signal.sigwait(stop_signals)
    except PgTempError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
