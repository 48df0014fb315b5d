"""A lean HTTP/1.1 client for JSON APIs: pooled keep-alive connections on asyncio protocols.

The upstream client sends one small JSON POST per batch line and reads one JSON answer, hundreds at
a time on one event loop. An aiohttp session spent 1.8 times the CPU per request on that (0.251 CPU s
per 1,000 requests for a bare aiohttp loop, 0.140 for the upstream client on this pool with its
retries and parsing: `bench/results/upstream_client.md`): its request and response objects, stream
readers, payload writers and per-request context managers are built for cases this path never has.
Here a request is one `transport.write` of bytes built from a prefix made once per pool, and an
answer is parsed in `data_received` straight into a `Response`.

What it speaks: HTTP/1.1 (and 1.0 answers) over TCP or TLS (the system's trust store, SNI, ALPN
"http/1.1"); bodies framed by Content-Length, chunked transfer coding (extensions and trailers
skipped) or the end of the connection; 1xx interim answers skipped; gzip and deflate content codings
(the only ones it asks for); keep-alive unless either side says `Connection: close`; idle connections
closed after `idle_timeout`. A request sent on a reused connection that the server had closed (its
keep-alive ran out, a Lambda container was frozen) is sent once more on a new connection, as
browsers do, when not a byte of an answer came back.

What it does not do, on purpose: HTTP/2, proxies and cookies (the aiohttp session it replaced read
neither), redirects (a 3xx is an answer like any other), `Expect: 100-continue`.

Failures are `HttpError`s: `ConnectError` (refused, unreachable, DNS, TLS), `ConnectTimeout`,
`AnswerTimeout` (no complete answer in the time given), `Disconnected` (the connection ended before
the whole answer) and `ProtocolError` (bytes that are not an HTTP/1.x answer).
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl
import zlib
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

# Limits on what a server may send before the body: generous for real servers, small enough that a
# broken or hostile one cannot make the worker buffer without end.
MAX_HEAD_BYTES = 64 * 1024
MAX_CHUNK_LINE_BYTES = 4 * 1024
DNS_TTL_SECONDS = 300.0
IDLE_TIMEOUT_SECONDS = 15.0
ACCEPT_ENCODING = "gzip, deflate"

_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}")
_DIGITS = re.compile(rb"[0-9]{1,18}")


class HttpError(Exception):
    """The request got no complete answer; the message says why."""


class ConnectError(HttpError):
    """No connection could be made (refused, unreachable, name not resolved, TLS failed)."""


class ConnectTimeout(HttpError, TimeoutError):
    """No connection within the connect timeout."""


class AnswerTimeout(HttpError, TimeoutError):
    """No complete answer within the time the request was given."""


class Disconnected(HttpError):
    """The connection ended before the whole answer arrived."""


class ProtocolError(HttpError):
    """The server sent bytes that are not an HTTP/1.x answer this client can read."""


class Headers(dict[str, str]):
    """An answer's headers: names lowercased, read case-insensitively; repeated ones joined by ", "."""

    def __getitem__(self, name: str) -> str:
        return dict.__getitem__(self, name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return dict.get(self, name.lower(), default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and dict.__contains__(self, name.lower())


@dataclass(slots=True, frozen=True)
class Response:
    status: int
    headers: Headers
    body: bytes


# parser states
_IDLE, _HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE = range(8)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: sends a request, parses its answer, hands it to the waiter."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = True
        self.idle_since = 0.0
        self.used = 0  # requests sent on it
        self.got_bytes = False  # a byte of the current answer has arrived
        self._waiter: asyncio.Future[Response] | None = None
        self._buffer = bytearray()
        self._state = _IDLE
        self._status = 0
        self._headers = Headers()
        self._remaining = 0
        self._body = bytearray()
        self._keep_alive = True

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._waiter is None:  # bytes nobody asked for: this connection cannot be trusted
            self.reusable = False
            self.abort()
            return
        self.got_bytes = True
        self._buffer += data
        try:
            self._parse()
        except HttpError as exc:
            self._fail(exc)

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost ends an answer that runs to the close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.reusable = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._state == _UNTIL_CLOSE and exc is None:
            self._finish(bytes(self._body))
            return
        detail = f": {exc}" if exc is not None else ""
        if self.got_bytes:
            self._fail(Disconnected(f"the connection ended in the middle of the answer{detail}"))
        else:
            self._fail(Disconnected(f"the server closed the connection without answering{detail}"))

    # --- use -----------------------------------------------------------------------------------

    def send(self, request: bytes, waiter: asyncio.Future[Response]) -> None:
        assert self.transport is not None
        self._waiter = waiter
        self._state = _HEAD
        self.got_bytes = False
        self.used += 1
        self.transport.write(request)

    def timed_out(self, timeout: float) -> None:
        self._fail(AnswerTimeout(f"no complete answer within {timeout:g} s"))

    def abort(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()

    # --- parsing -------------------------------------------------------------------------------

    def _parse(self) -> None:
        buffer = self._buffer
        while True:
            state = self._state
            if state == _HEAD:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise ProtocolError(f"the answer's head is over {MAX_HEAD_BYTES} bytes")
                    return
                head = bytes(buffer[:end])
                del buffer[: end + 4]
                self._start(head)
            elif state == _LENGTH:
                remaining = self._remaining
                if len(buffer) < remaining:
                    return
                body = bytes(buffer[:remaining])
                del buffer[:remaining]
                self._finish(body)
            elif state == _CHUNK_SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE_BYTES:
                        raise ProtocolError("a chunk size line is too long")
                    return
                size = bytes(buffer[:end]).partition(b";")[0].strip()
                del buffer[: end + 2]
                if not _HEX.fullmatch(size):
                    raise ProtocolError(f"bad chunk size {size[:20]!r}")
                self._remaining = int(size, 16)
                self._state = _CHUNK_DATA if self._remaining else _TRAILERS
            elif state == _CHUNK_DATA:
                take = min(len(buffer), self._remaining)
                self._body += buffer[:take]
                del buffer[:take]
                self._remaining -= take
                if self._remaining:
                    return
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buffer) < 2:
                    return
                if buffer[:2] != b"\r\n":
                    raise ProtocolError("a chunk does not end with CRLF")
                del buffer[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD_BYTES:
                        raise ProtocolError(f"the answer's trailers are over {MAX_HEAD_BYTES} bytes")
                    return
                del buffer[: end + 2]
                if end == 0:
                    self._finish(bytes(self._body))
            elif state == _UNTIL_CLOSE:
                self._body += buffer
                buffer.clear()
                return
            else:  # _IDLE: more bytes than the answer had
                if buffer:
                    self.reusable = False
                return

    def _start(self, head: bytes) -> None:
        """Read a status line and headers; choose how the body is framed."""
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if (
            not status_line.startswith(b"HTTP/1.")
            or len(status_line) < 12
            or not status_line[9:12].isdigit()
            or status_line[12:13] not in (b"", b" ")
        ):
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:40]!r}")
        status = int(status_line[9:12])
        headers = Headers()
        last = ""
        for line in lines[1:]:
            if line[:1] in (b" ", b"\t") and last:  # obsolete line folding
                dict.__setitem__(headers, last, f"{headers[last]} {line.strip().decode('latin-1')}")
                continue
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise ProtocolError(f"bad header line {line[:40]!r}")
            last = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            if dict.__contains__(headers, last):
                text = f"{dict.__getitem__(headers, last)}, {text}"
            dict.__setitem__(headers, last, text)
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("the server switched protocols, which was not asked for")
            return  # an interim answer (103 Early Hints, ...): the real one follows
        self._status = status
        self._headers = headers
        self._body = bytearray()
        tokens = {token.strip() for token in headers.get("connection", "").lower().split(",")}
        self._keep_alive = "close" not in tokens if status_line[7:8] != b"0" else "keep-alive" in tokens
        coding = headers.get("transfer-encoding")
        length = headers.get("content-length")
        if coding is not None:
            if coding.lower().rsplit(",", 1)[-1].strip() == "chunked":
                self._state = _CHUNK_SIZE
                if length is not None:  # both: the coding wins, but the connection is suspect (RFC 9112 6.3)
                    self._keep_alive = False
            else:
                self._state = _UNTIL_CLOSE
                self._keep_alive = False
        elif length is not None:
            values = {value.strip().encode("latin-1") for value in length.split(",")}
            if len(values) != 1 or not _DIGITS.fullmatch(next(iter(values))):
                raise ProtocolError(f"bad Content-Length {length[:40]!r}")
            self._remaining = int(next(iter(values)))
            self._state = _LENGTH
        elif status in (204, 304):
            self._finish(b"")
        else:
            self._state = _UNTIL_CLOSE
            self._keep_alive = False

    def _finish(self, body: bytes) -> None:
        self._state = _IDLE
        if not self._keep_alive:
            self.reusable = False
        coding = self._headers.get("content-encoding")
        if coding is not None and body:
            body = _decode(body, coding.strip().lower())
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(Response(self._status, self._headers, body))

    def _fail(self, error: HttpError) -> None:
        waiter, self._waiter = self._waiter, None
        self.abort()
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a lookup's failure as seen: every caller may have given up before it ended."""
    if not task.cancelled():
        task.exception()


def _decode(body: bytes, coding: str) -> bytes:
    try:
        if coding in ("gzip", "x-gzip"):
            return zlib.decompress(body, 16 + zlib.MAX_WBITS)
        if coding == "deflate":  # zlib-wrapped as the RFC says, or raw as some servers send it
            try:
                return zlib.decompress(body)
            except zlib.error:
                return zlib.decompress(body, -zlib.MAX_WBITS)
    except zlib.error as exc:
        raise ProtocolError(f"the {coding} answer could not be decompressed: {exc}") from None
    if coding == "identity":
        return body
    raise ProtocolError(f"the answer is in a content coding this client did not ask for: {coding!r}")


class ConnectionPool:
    """Keep-alive connections to the one server of `base_url`, at most `max_connections` open.

    Create and use it on one event loop. `post(path, body, timeout)` sends `headers` (made into bytes
    once), a Content-Length and the body, and returns the answer or raises an `HttpError`.
    """

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        max_connections: int = 64,
        connect_timeout: float = 10.0,
        idle_timeout: float = IDLE_TIMEOUT_SECONDS,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("the base URL must be an http(s) URL with a host")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = quote(parts.path.rstrip("/"), safe="/%:@!$&'()*+,;=-._~")
        self.max_connections = max(1, max_connections)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self._ssl = ssl_context or ssl.create_default_context()
            self._ssl.set_alpn_protocols(["http/1.1"])
        host_header = parts.netloc.rpartition("@")[2]
        lines = [f"Host: {host_header}", f"Accept-Encoding: {ACCEPT_ENCODING}"]
        lines += [f"{name}: {value}" for name, value in headers.items() if name.lower() != "host"]
        for line in lines:
            if "\r" in line or "\n" in line:
                raise ValueError("a header holds a line break")
        self._head_tail = ("\r\n".join(lines) + "\r\nContent-Length: ").encode("latin-1")
        self._idle: deque[_Connection] = deque()
        self._open = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._addresses: list[tuple[Any, ...]] = []
        self._addresses_until = 0.0
        self._resolving: asyncio.Task[list[tuple[Any, ...]]] | None = None
        self.closed = False

    def request_bytes(self, path: str, body: bytes) -> bytes:
        return b"POST %s HTTP/1.1\r\n%s%d\r\n\r\n%s" % (
            (self.prefix + path).encode("ascii"),
            self._head_tail,
            len(body),
            body,
        )

    async def post(self, path: str, body: bytes, timeout: float) -> Response:
        """POST `body` to the base URL's path + `path` (which starts with "/"); the whole exchange,
        connecting included, ends within `timeout` seconds or raises `AnswerTimeout`."""
        if self.closed:
            raise ConnectError("the connection pool is closed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request = self.request_bytes(path, body)
        connection, reused = await self._acquire(loop, deadline)
        try:
            return await self._exchange(loop, connection, request, deadline, timeout)
        except Disconnected:
            if not reused or connection.got_bytes:
                raise
        # the server had closed the kept connection before reading a request: once more on a new one
        connection, _ = await self._acquire(loop, deadline, fresh=True)
        return await self._exchange(loop, connection, request, deadline, timeout)

    async def _exchange(
        self,
        loop: asyncio.AbstractEventLoop,
        connection: _Connection,
        request: bytes,
        deadline: float,
        timeout: float,
    ) -> Response:
        waiter: asyncio.Future[Response] = loop.create_future()
        timer = loop.call_at(deadline, connection.timed_out, timeout)
        try:
            connection.send(request, waiter)
            response = await waiter
        except BaseException:  # a failure, a timeout or the caller's cancellation: the connection is spent
            connection.abort()
            self._release(connection)
            raise
        finally:
            timer.cancel()
        self._release(connection)
        return response

    async def _acquire(
        self, loop: asyncio.AbstractEventLoop, deadline: float, fresh: bool = False
    ) -> tuple[_Connection, bool]:
        """An idle connection (reused: True) or a new one (`fresh`: always a new one), waiting for a
        connection of the pool's to come free when all `max_connections` are in use."""
        if self._idle:
            connection = self._idle.pop()
            if not fresh and connection.reusable and loop.time() - connection.idle_since < self.idle_timeout:
                return connection, True
            connection.close()  # stale, or not wanted: a new connection takes its place
            return await self._open_in_slot(loop, deadline), False
        if self._open < self.max_connections:
            self._open += 1
            return await self._open_in_slot(loop, deadline), False
        waiter: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                handed = await waiter
        except BaseException as exc:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                late = waiter.result()  # handed over as we gave up: pass it on
                if late is None:
                    self._give_back_slot()
                else:
                    self._release(late)
            elif waiter in self._waiters:
                self._waiters.remove(waiter)
            if isinstance(exc, TimeoutError):
                raise AnswerTimeout(
                    "no connection of the pool came free in the time the request had"
                ) from None
            raise
        if handed is None:  # a slot came free: connect in it
            return await self._open_in_slot(loop, deadline), False
        if not fresh:
            return handed, True
        handed.close()
        return await self._open_in_slot(loop, deadline), False

    async def _open_in_slot(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        try:
            return await self._connect(loop, deadline)
        except BaseException:
            self._give_back_slot()
            raise

    def _release(self, connection: _Connection) -> None:
        """Return a connection after its exchange: to a waiter or the idle list, or close it."""
        if not connection.reusable or connection.closed or self.closed:
            self._drop(connection)
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        loop_time = asyncio.get_running_loop().time()
        connection.idle_since = loop_time
        idle = self._idle
        while idle and loop_time - idle[0].idle_since >= self.idle_timeout:  # the oldest, unused for long
            self._drop(idle.popleft())
        idle.append(connection)

    def _drop(self, connection: _Connection) -> None:
        connection.close()
        self._give_back_slot()

    def _give_back_slot(self) -> None:
        """A connection slot is free: a waiter opens a connection in it, or the pool counts one less."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self._open -= 1

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        left = deadline - loop.time()
        limit = min(self.connect_timeout, left)
        try:
            async with asyncio.timeout(limit if limit > 0 else 0):
                addresses = await self._resolve(loop)
                error: OSError | None = None
                for family, _type, _proto, _name, address in addresses:
                    try:
                        _transport, connection = await loop.create_connection(
                            _Connection,
                            address[0],
                            address[1],
                            family=family,
                            ssl=self._ssl,
                            server_hostname=self.host if self._ssl is not None else None,
                        )
                        return connection
                    except OSError as exc:  # refused, unreachable, TLS failed: the next address
                        error = exc
                self._addresses_until = 0.0  # resolve again next time
                raise ConnectError(f"could not connect: {error}")
        except TimeoutError:
            if left <= self.connect_timeout:
                raise AnswerTimeout(f"no connection in the {left:g} s the request had") from None
            raise ConnectTimeout(f"could not connect within {self.connect_timeout:g} s") from None

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[tuple[Any, ...]]:
        """The host's addresses, looked up once per DNS_TTL_SECONDS: connects made together share one
        lookup (a caller giving up does not end it for the others)."""
        if self._addresses and loop.time() < self._addresses_until:
            return self._addresses
        if self._resolving is None or self._resolving.done():
            self._resolving = loop.create_task(self._lookup(loop))
            self._resolving.add_done_callback(_retrieve)
        return await asyncio.shield(self._resolving)

    async def _lookup(self, loop: asyncio.AbstractEventLoop) -> list[tuple[Any, ...]]:
        try:
            found = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectError(f"could not resolve {self.host}: {exc}") from None
        self._addresses, self._addresses_until = found, loop.time() + DNS_TTL_SECONDS
        return found

    async def close(self) -> None:
        """Close every idle connection; those in use close when their exchange ends."""
        self.closed = True
        while self._idle:
            self._drop(self._idle.popleft())
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectError("the connection pool is closed"))
        self._waiters.clear()
