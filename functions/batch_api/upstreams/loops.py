"""Event loops kept across chunk invocations, so the upstream connections of one are reused by the next.

A chunk runs on an event loop (`run`). By default each run gets a fresh loop (`asyncio.run`), and its
upstream client opens new connections and closes them at the end: for a 1,000-line chunk at 32 in
flight, 32 connects (32 TLS handshakes against a hosted API) for 31 waves of requests. A thread that
runs chunk after chunk (the local runner's chunk loop, a warm Lambda container) keeps its loop instead
(`keep_loop`): HTTP clients then share one connection pool per upstream on that loop (`shared_session`),
whose pooled keep-alive connections the next chunk picks up. `close_loop` closes those sessions and
the loop when the thread is done with it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Session(Protocol):
    """What a kept loop holds per upstream: a connection pool that knows whether it is closed."""

    @property
    def closed(self) -> bool: ...

    async def close(self) -> None: ...


S = TypeVar("S", bound=Session)

_local = threading.local()
# sessions shared on a kept loop: loop -> key -> session (only kept loops have an entry)
_sessions: dict[asyncio.AbstractEventLoop, dict[Hashable, Any]] = {}
_sessions_lock = threading.Lock()


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on this thread's kept loop, or on a fresh one when the thread keeps none."""
    runner: asyncio.Runner | None = getattr(_local, "runner", None)
    if runner is None:
        return asyncio.run(coro)
    return runner.run(coro)


def keep_loop() -> asyncio.Runner:
    """Keep this thread's event loop across `run` calls (idempotent); `close_loop` ends it."""
    runner: asyncio.Runner | None = getattr(_local, "runner", None)
    if runner is None:
        runner = _local.runner = asyncio.Runner()
        loop = runner.get_loop()
        with _sessions_lock:
            _sessions[loop] = {}
    return runner


def close_loop(runner: asyncio.Runner) -> None:
    """Close the sessions shared on `runner`'s loop, then the loop. Call it from the thread that kept
    it, or from any thread once that one has ended (the loop is not running then)."""
    loop = runner.get_loop()
    with _sessions_lock:
        sessions = _sessions.pop(loop, {})
    try:
        if sessions:
            runner.run(_close_all(list(sessions.values())))
    finally:
        runner.close()
        if getattr(_local, "runner", None) is runner:
            del _local.runner


async def _close_all(sessions: list[Session]) -> None:
    for session in sessions:
        await session.close()


def shared_session(key: Hashable, make: Callable[[], S]) -> S | None:
    """The session for `key` on the running loop if it is a kept one (made by `make` the first time,
    or again once closed); None on a fresh loop, whose clients open and close their own."""
    loop = asyncio.get_running_loop()
    with _sessions_lock:
        sessions = _sessions.get(loop)
        if sessions is None:
            return None
        session = sessions.get(key)
        if session is None or session.closed:
            session = sessions[key] = make()
        return session
