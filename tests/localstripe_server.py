"""A throwaway localstripe (a stateful fake of the Stripe API) for the card provider's tests.

How it works. ``localstripe`` (installed with the test extras) is started in a child Python
process bound to a free loopback port that the child picks itself and reports on its
standard output, so two runs never race for a port. The parent then waits until the fake
answers an authenticated request and hands out its base address (``http://127.0.0.1:N``);
leaving the context stops the child.

The child does not use ``python -m localstripe`` as is, for three reasons: that listens on
every interface over IPv6 only (which fails on hosts without IPv6), loads whatever an
earlier run left in ``/tmp/localstripe.pickle``, and rewrites that shared file after every
write. The child here serves the same application (``localstripe.server.app``) on
127.0.0.1 and keeps its objects in memory only, so each start is empty and concurrent runs
(or other users of the machine) never see each other's data.

Use ``with running_localstripe() as base_url:`` from synchronous fixtures (tests call
``asyncio.run`` themselves) or ``async with localstripe() as base_url:`` from async code.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator

#: any key starting ``sk_`` is accepted by the fake
TEST_API_KEY = "sk_test_fynlo_localstripe"

_CHILD = r"""
import socket
import sys

from aiohttp import web
from localstripe import resources, server

# objects live in memory only (see the module docstring)
resources.Store.dump_to_disk = lambda self: None

sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.bind(("127.0.0.1", 0))
sock.listen(128)
print(sock.getsockname()[1], flush=True)
web.run_app(server.app, sock=sock, print=None, access_log=None)
"""


class LocalStripeError(RuntimeError):
    """localstripe could not be started."""


class LocalStripe:
    """One running localstripe child process."""

    def __init__(self, *, start_timeout: float = 20.0) -> None:
        self.start_timeout = start_timeout
        self.base_url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")

    def start(self) -> str:
        """Start the child and wait until it answers; return its base address."""
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        deadline = time.monotonic() + self.start_timeout
        try:
            port = self._read_port(deadline)
            self.base_url = f"http://127.0.0.1:{port}"
            self._wait_until_answering(deadline)
        except BaseException:
            self.stop()
            raise
        return self.base_url

    def _read_port(self, deadline: float) -> int:
        assert self._proc is not None and self._proc.stdout is not None
        lines: queue.Queue[str] = queue.Queue()
        stdout = self._proc.stdout
        threading.Thread(target=lambda: lines.put(stdout.readline()), daemon=True).start()
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise LocalStripeError(f"localstripe did not start in time{self._output()}") from None
        if not line.strip().isdigit():
            raise LocalStripeError(f"localstripe failed to start{self._output()}")
        return int(line)

    def _wait_until_answering(self, deadline: float) -> None:
        request = urllib.request.Request(
            f"{self.base_url}/v1/balance", headers={"Authorization": f"Bearer {TEST_API_KEY}"}
        )
        while True:
            try:
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise LocalStripeError(f"localstripe exited{self._output()}")
            if time.monotonic() > deadline:
                raise LocalStripeError(f"localstripe does not answer{self._output()}")
            time.sleep(0.05)

    def _output(self) -> str:
        self._stderr.seek(0)
        text = self._stderr.read()[-2000:]
        return f":\n{text}" if text else ""

    def stop(self) -> None:
        """Stop the child (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self._stderr.close()


@contextlib.contextmanager
def running_localstripe(*, start_timeout: float = 20.0) -> Iterator[str]:
    """Run localstripe for the block; yields its base address."""
    server = LocalStripe(start_timeout=start_timeout)
    server.start()
    try:
        yield server.base_url
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def localstripe(*, start_timeout: float = 20.0) -> AsyncIterator[str]:
    """``async with localstripe() as base_url:`` (the start and stop run off the event loop)."""
    server = LocalStripe(start_timeout=start_timeout)
    await asyncio.to_thread(server.start)
    try:
        yield server.base_url
    finally:
        await asyncio.to_thread(server.stop)
