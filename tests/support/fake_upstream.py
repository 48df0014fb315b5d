"""A scriptable OpenAI-compatible server for tests, run on a background thread.

It answers like the mock upstream (`batch_api.upstreams.mock`), but each request may carry
directives in its body's `"user"` field, so one batch input file can mix behaviours line by line.
`"user"` was chosen over `"metadata"` because chat, completions, embeddings and responses all take
it as a plain string; the fake reads it on every endpoint (moderations included).

Directives: `;`-separated, e.g. `"id=line-7;status=429;times=2"`.

    id=KEY          names the request: attempts are counted per KEY and listed by
                    `received_custom_keys()` (without an id, attempts are counted per body)
    status=CODE     answer with this HTTP status (an OpenAI error envelope for >= 400)
    times=K         apply the fault directives below only to the first K attempts of this
                    request, then answer normally (default: every attempt)
    retry_after=S   send `Retry-After: S` on faulty answers (default "0" with status=429)
    retry_after_ms=MS  send `retry-after-ms: MS` on faulty answers
    should_retry=true|false  send `x-should-retry` on faulty answers
    delay=SECONDS   answer after SECONDS (ends early when the server stops)
    hang            never answer until the server stops (then 503)
    invalid_json    answer with a body that is not JSON (status 200 unless status= says otherwise)
    disconnect      close the connection without answering

Usage:

    with FakeUpstreamServer() as upstream:
        client = OpenAIHttpUpstream(upstream.base_url, "sk-test")
        ...
        assert upstream.count(lambda r: r.key == "line-7") == 3
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from batch_api.upstreams.mock import MOCK_ENDPOINTS, MockRequestError, mock_answer, mock_request_id

FAULTS = ("status", "delay", "hang", "invalid_json", "disconnect")


@dataclass(frozen=True)
class ReceivedRequest:
    """One request as the fake saw it. `attempt` is 1-based per key (id directive, else body)."""

    method: str
    path: str
    body: Any  # parsed JSON, or None when it did not parse
    raw_body: bytes
    headers: dict[str, str]
    key: str | None
    attempt: int
    peer_port: int | None


@dataclass
class Directives:
    key: str | None = None
    status: int | None = None
    times: int | None = None
    retry_after: str | None = None
    retry_after_ms: str | None = None
    should_retry: str | None = None
    delay: float = 0.0
    hang: bool = False
    invalid_json: bool = False
    disconnect: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def parse_directives(text: str) -> Directives:
    """Parse a `user` string; unknown words are kept in `extra` (a real user value passes through)."""
    directives = Directives()
    for token in filter(None, (part.strip() for part in text.split(";"))):
        name, has_value, value = token.partition("=")
        name = name.strip()
        value = value.strip()
        if name == "id" and has_value:
            directives.key = value
        elif name == "status" and has_value:
            directives.status = int(value)
        elif name == "times" and has_value:
            directives.times = int(value)
        elif name == "retry_after" and has_value:
            directives.retry_after = value
        elif name == "retry_after_ms" and has_value:
            directives.retry_after_ms = value
        elif name == "should_retry" and has_value:
            directives.should_retry = value
        elif name == "delay" and has_value:
            directives.delay = float(value)
        elif name in ("hang", "invalid_json", "disconnect") and not has_value:
            setattr(directives, name, True)
        else:
            directives.extra[name] = value
    if directives.status == 429 and directives.retry_after is None and directives.retry_after_ms is None:
        directives.retry_after = "0"
    return directives


def free_port() -> int:
    """A port nothing listens on right now (for connection-refused tests and servers)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class FakeUpstreamServer:
    """Context manager: an aiohttp server on 127.0.0.1:<free port> in a daemon thread.

    `default_directive` applies to requests whose body has no `user` string;
    `latency_seconds` delays every answer.
    """

    def __init__(self, *, latency_seconds: float = 0.0, default_directive: str = "") -> None:
        self.latency_seconds = latency_seconds
        self.default_directive = default_directive
        self.port: int | None = None
        self._lock = threading.Lock()
        self._received: list[ReceivedRequest] = []
        self.model_listings: list[str | None] = []  # the Authorization header of each GET /v1/models
        self._attempts: Counter[str] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self._runner: web.AppRunner | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """Like "http://127.0.0.1:PORT/v1", as a user would configure an OpenAI-compatible server."""
        if self.port is None:
            raise RuntimeError("the fake upstream is not running")
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeUpstreamServer:
        self._thread = threading.Thread(target=self._serve, name="fake-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout=10):
            raise RuntimeError("the fake upstream did not start within 10 s")
        if self._startup_error is not None:
            raise RuntimeError("the fake upstream failed to start") from self._startup_error
        return self

    def stop(self) -> None:
        """Wake hanging and delayed handlers, close the server, join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._loop = self._thread = None

    def __enter__(self) -> FakeUpstreamServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _serve(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._startup())
        except BaseException as exc:  # reported to start()
            self._startup_error = exc
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    async def _startup(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _shutdown(self) -> None:
        assert self._stopping is not None and self._runner is not None
        self._stopping.set()
        await asyncio.sleep(0)  # let woken handlers answer before connections close
        await self._runner.cleanup()

    # --- what the tests read -----------------------------------------------------------------

    @property
    def requests(self) -> list[ReceivedRequest]:
        """A snapshot of every request received, in arrival order."""
        with self._lock:
            return list(self._received)

    def count(self, predicate: Callable[[ReceivedRequest], bool] = lambda _request: True) -> int:
        with self._lock:
            return sum(1 for request in self._received if predicate(request))

    def received_custom_keys(self) -> list[str]:
        """The `id=` keys of every request received, repeats included, in arrival order."""
        with self._lock:
            return [request.key for request in self._received if request.key is not None]

    def attempts(self, key: str) -> int:
        with self._lock:
            return self._attempts[key]

    # --- the server ----------------------------------------------------------------------------

    async def _models(self, request: web.Request) -> web.Response:
        with self._lock:
            self.model_listings.append(request.headers.get("Authorization"))
        return web.json_response({"object": "list", "data": [{"id": "mock-chat", "object": "model"}]})

    def _record(self, request: web.Request, raw: bytes) -> tuple[Directives, ReceivedRequest]:
        try:
            body: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        user = body.get("user") if isinstance(body, dict) else None
        directives = parse_directives(user if isinstance(user, str) else self.default_directive)
        count_key = (
            directives.key if directives.key is not None else f"body:{hashlib.sha256(raw).hexdigest()}"
        )
        peer = request.transport.get_extra_info("peername") if request.transport else None
        with self._lock:
            self._attempts[count_key] += 1
            received = ReceivedRequest(
                method=request.method,
                path=request.path,
                body=body,
                raw_body=raw,
                headers={key.lower(): value for key, value in request.headers.items()},
                key=directives.key,
                attempt=self._attempts[count_key],
                peer_port=peer[1] if peer else None,
            )
            self._received.append(received)
        return directives, received

    async def _wait(self, seconds: float | None) -> bool:
        """Sleep `seconds` (None: forever); True when the server is stopping instead."""
        assert self._stopping is not None
        try:
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        directives, received = self._record(request, raw)
        faulty = directives.times is None or received.attempt <= directives.times
        if self.latency_seconds > 0 and await self._wait(self.latency_seconds):
            return _error(503, "the fake upstream is stopping")
        waits = faulty and (directives.hang or directives.delay > 0)
        if waits and await self._wait(None if directives.hang else directives.delay):
            return _error(503, "the fake upstream is stopping")
        if faulty and directives.disconnect:
            assert request.transport is not None
            request.transport.close()
            return web.Response(status=500)  # never reaches the client
        headers: dict[str, str] = {
            "x-request-id": f"req_fake{received.attempt}_{mock_request_id(request.path, raw)[8:]}"
        }
        if faulty and directives.retry_after is not None:
            headers["Retry-After"] = directives.retry_after
        if faulty and directives.retry_after_ms is not None:
            headers["retry-after-ms"] = directives.retry_after_ms
        if faulty and directives.should_retry is not None:
            headers["x-should-retry"] = directives.should_retry
        if faulty and directives.invalid_json:
            status = directives.status or 200
            return web.Response(
                status=status, body=b"<html>not json</html>", content_type="text/html", headers=headers
            )
        if faulty and directives.status is not None and directives.status >= 400:
            message = f"fake upstream answered {directives.status} as the request's directives asked"
            return _error(directives.status, message, headers)
        if request.path not in MOCK_ENDPOINTS:
            return _error(404, f"Invalid URL (POST {request.path})", headers)
        status, payload = mock_answer(request.path, raw)
        if faulty and directives.status is not None and status == 200:
            status = directives.status
        return web.Response(
            status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
        )


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    envelope = MockRequestError(message, status=status).envelope()
    return web.Response(
        status=status, body=orjson.dumps(envelope), content_type="application/json", headers=headers
    )
