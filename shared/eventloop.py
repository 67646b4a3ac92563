"""The event loop the services run on: uvloop where it is installed, asyncio's own otherwise.

uvloop (libuv underneath) runs the same asyncio code with a faster loop and transports; it
is a dependency on Linux and macOS. Anything written for asyncio runs unchanged on it.
``FYNLO_EVENT_LOOP=asyncio`` in the environment picks asyncio's own loop (to rule the loop out
when chasing a problem, or to compare).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop: uvloop's when it can be imported, else asyncio's default."""
    if os.environ.get("FYNLO_EVENT_LOOP", "").lower() == "asyncio":
        return asyncio.new_event_loop()
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on a loop from ``new_event_loop``."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
