"""The lean HTTP/1.1 client (`upstreams.http1`): how answers are framed and read, fed byte by byte
to a connection, and how the pool reuses, limits, replaces and gives up connections against real
sockets (a scripted server on 127.0.0.1, TLS included)."""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ssl
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from batch_api.upstreams import http1
from batch_api.upstreams.http1 import (
    AnswerTimeout,
    ConnectError,
    ConnectionPool,
    ConnectTimeout,
    Disconnected,
    ProtocolError,
    Response,
)

pytestmark = pytest.mark.unit


# --- the parser, fed by hand --------------------------------------------------------------------


class RecordingTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.aborted = False
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def abort(self) -> None:
        self.aborted = True

    def close(self) -> None:
        self.closed = True


def feed(raw: bytes, step: int | None = None, *, eof: bool = False) -> tuple[Any, http1._Connection]:
    """Send a request on a connection over a recording transport and feed it `raw` in pieces of `step`
    bytes (None: at once), then the end of the connection if `eof`: the answer (or the exception,
    or None while there is none yet) and the connection."""

    async def run() -> tuple[Any, http1._Connection]:
        connection = http1._Connection()
        connection.connection_made(RecordingTransport())  # type: ignore[arg-type]
        waiter: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        connection.send(b"POST / HTTP/1.1\r\n\r\n", waiter)
        pieces = [raw] if step is None else [raw[i : i + step] for i in range(0, len(raw), step)]
        for piece in filter(None, pieces):  # a transport never hands over nothing
            connection.data_received(piece)
        if eof:
            connection.connection_lost(None)
        if not waiter.done():
            return None, connection
        exc = waiter.exception()
        return (exc if exc is not None else waiter.result()), connection

    return asyncio.run(run())


STEPS = [None, 1, 7]


@pytest.mark.parametrize("step", STEPS)
def test_a_content_length_answer(step: int | None) -> None:
    raw = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Request-ID: req_1\r\nContent-Length: 11\r\n\r\n{"a": true}'
    answer, connection = feed(raw, step)

    assert isinstance(answer, Response)
    assert (answer.status, answer.body) == (200, b'{"a": true}')
    assert answer.headers["x-request-id"] == answer.headers.get("X-Request-Id") == "req_1"
    assert (
        "content-type" in answer.headers and "CONTENT-TYPE" in answer.headers and "etag" not in answer.headers
    )
    assert connection.reusable


def test_an_answer_is_not_complete_before_its_last_byte() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabcde"
    assert feed(raw[:-1])[0] is None
    assert feed(raw[:-5])[0] is None
    assert feed(raw[: raw.index(b"\r\n\r\n") + 3])[0] is None


@pytest.mark.parametrize("step", STEPS)
def test_a_chunked_answer_with_extensions_and_trailers(step: int | None) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"4;name=value\r\nWiki\r\n6\r\npedia \r\nE\r\nin \r\n\r\nchunks.\r\n0\r\nExpires: never\r\n\r\n"
    )
    answer, connection = feed(raw, step)

    assert answer.body == b"Wikipedia in \r\n\r\nchunks."
    assert connection.reusable


def test_a_chunked_answer_is_not_complete_before_its_last_chunk_and_trailers() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert feed(raw[:-2])[0] is None
    assert feed(raw[:-5])[0] is None
    assert feed(raw)[0].body == b"abc"


@pytest.mark.parametrize("step", STEPS)
def test_an_answer_without_a_length_runs_to_the_close_and_ends_the_connection(step: int | None) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{}"
    assert feed(raw, step)[0] is None
    answer, connection = feed(raw, step, eof=True)
    assert answer.body == b"{}"
    assert not connection.reusable


@pytest.mark.parametrize(
    ("head", "reusable"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Upgrade, Close\r\nContent-Length: 2", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 2", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2", False),
    ],
)
def test_keep_alive_follows_the_version_and_the_connection_header(head: bytes, reusable: bool) -> None:
    body = b"2\r\n{}\r\n0\r\n\r\n" if b"chunked" in head else b"{}"
    answer, connection = feed(head + b"\r\n\r\n" + body, eof=False)
    if answer is None:  # the gzip transfer coding: read to the close
        answer, connection = feed(head + b"\r\n\r\n" + body, eof=True)
    assert isinstance(answer, Response)
    assert connection.reusable is reusable


def test_interim_answers_are_skipped() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok"
    answer, _ = feed(raw, 3)
    assert (answer.status, answer.body) == (201, b"ok")
    assert "link" not in answer.headers


@pytest.mark.parametrize("status", [204, 304])
def test_no_content_answers_have_no_body(status: int) -> None:
    answer, connection = feed(f"HTTP/1.1 {status} Nothing\r\n\r\n".encode())
    assert (answer.status, answer.body, connection.reusable) == (status, b"", True)


def test_repeated_headers_are_joined_and_folded_lines_continue_the_last() -> None:
    raw = b"HTTP/1.1 200 OK\r\nVary: a\r\nVARY: b\r\nX-Long: one\r\n two\r\nContent-Length: 0\r\n\r\n"
    answer, _ = feed(raw)
    assert answer.headers["vary"] == "a, b"
    assert answer.headers["x-long"] == "one two"


@pytest.mark.parametrize(
    ("coding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", lambda data: zlib.compress(data)[2:-4]),  # raw deflate, as some servers send it
        ("identity", lambda data: data),
    ],
)
def test_compressed_answers_are_decoded(coding: str, encode: Callable[[bytes], bytes]) -> None:
    payload = b'{"data": "' + b"x" * 5000 + b'"}'
    body = encode(payload)
    raw = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        coding.encode(),
        len(body),
        body,
    )
    assert feed(raw)[0].body == payload


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"ICY 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2x0 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok", "bad header line"),
        (b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n", "bad header line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok", "bad Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n", "does not end with CRLF"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "switched protocols"),
        (b"HTTP/1.1 200 OK\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\nok", "did not ask for"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 2\r\n\r\nok",
            "could not be decompressed",
        ),
    ],
)
def test_what_is_not_http_fails_the_request_and_the_connection(raw: bytes, says: str) -> None:
    answer, connection = feed(raw)
    assert isinstance(answer, ProtocolError)
    assert says in str(answer)
    assert not connection.reusable and connection.transport.aborted  # type: ignore[union-attr]


def test_a_head_or_chunk_line_without_end_is_refused_once_over_its_limit() -> None:
    head = b"HTTP/1.1 200 OK\r\nX-Padding: " + b"a" * http1.MAX_HEAD_BYTES
    assert feed(head[: http1.MAX_HEAD_BYTES])[0] is None  # at the limit: still waiting
    answer, _ = feed(head)
    assert isinstance(answer, ProtocolError) and "head is over" in str(answer)
    line = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * (http1.MAX_CHUNK_LINE_BYTES + 1)
    answer, _ = feed(line)
    assert isinstance(answer, ProtocolError) and "too long" in str(answer)


def test_bytes_past_the_answer_make_the_connection_unusable() -> None:
    answer, connection = feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n")
    assert answer.body == b"ok"
    assert not connection.reusable


def test_bytes_nobody_asked_for_abort_an_idle_connection() -> None:
    _answer, connection = feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert connection.reusable
    connection.data_received(b"surprise")
    assert not connection.reusable and connection.transport.aborted  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "without answering"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "in the middle of the answer"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", "in the middle of the answer"),
    ],
)
def test_a_connection_ending_before_the_whole_answer_is_disconnected(raw: bytes, says: str) -> None:
    answer, connection = feed(raw, eof=True)
    assert isinstance(answer, Disconnected) and says in str(answer)
    assert connection.got_bytes is bool(raw)


# --- the pool, against a scripted server --------------------------------------------------------

Respond = Callable[[int, int, bytes, bytes], Awaitable[bytes | None]]


class ScriptedServer:
    """A raw HTTP/1.1 server on 127.0.0.1: `respond(connection_no, request_no, head, body)` gives
    the bytes to write (None: close the connection without answering)."""

    def __init__(self, respond: Respond, ssl_context: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.ssl_context = ssl_context
        self.requests: list[tuple[int, bytes, bytes]] = []  # (connection_no, head, body)
        self.connections = 0
        self.open = 0
        self.most_open = 0
        self.closed_by_client = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    def drop_all(self) -> None:
        """End every connection from the server's side, as a server whose keep-alive ran out does."""
        for writer in self._writers:
            writer.close()

    async def __aenter__(self) -> ScriptedServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = int(self.server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self.server is not None
        self.server.close()
        self.drop_all()
        for task in self._handlers:  # a handler still waiting to answer ends now, before the loop does
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        self._writers.add(writer)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    if writer in self._writers:
                        self.closed_by_client += 1
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length)
                self.requests.append((number, head, body))
                answer = await self.respond(number, len(self.requests), head, body)
                if answer is None:
                    return
                writer.write(answer)
                await writer.drain()
        except asyncio.CancelledError:
            return
        finally:
            self._handlers.discard(task)
            self.open -= 1
            self._writers.discard(writer)
            writer.close()


def ok(body: bytes = b"{}", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def answer_ok(_connection: int, request: int, _head: bytes, body: bytes) -> bytes:
    return ok(b'{"echo": %d}' % request)


def run(coro: Awaitable[Any]) -> Any:
    """Run a scenario; one that waits forever fails instead of hanging the suite."""
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_requests_carry_the_headers_path_and_body_and_reuse_one_connection() -> None:
    async def scenario() -> tuple[ScriptedServer, list[Response]]:
        async with ScriptedServer(answer_ok) as server:
            pool = ConnectionPool(
                f"http://127.0.0.1:{server.port}/openai/v1/",
                {"Authorization": "Bearer sk-1", "Content-Type": "application/json"},
            )
            answers = [await pool.post("/chat/completions", b'{"n": %d}' % i, 5) for i in range(3)]
            await pool.close()
        return server, answers

    server, answers = run(scenario())
    assert [a.body for a in answers] == [b'{"echo": 1}', b'{"echo": 2}', b'{"echo": 3}']
    assert [number for number, _head, _body in server.requests] == [1, 1, 1]
    _number, head, body = server.requests[0]
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /openai/v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}".encode() in lines
    assert b"Authorization: Bearer sk-1" in lines and b"Content-Length: 8" in lines
    assert b"Accept-Encoding: gzip, deflate" in lines
    assert body == b'{"n": 0}'


def test_the_pool_never_opens_more_than_its_connections_and_everyone_gets_an_answer() -> None:
    async def slow(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return ok(b"%d" % request)

    async def scenario() -> tuple[ScriptedServer, list[Response], ConnectionPool]:
        async with ScriptedServer(slow) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, max_connections=3)
            answers = await asyncio.gather(*(pool.post("/x", b"", 10) for _ in range(30)))
            await pool.close()
        return server, answers, pool

    server, answers, pool = run(scenario())
    assert sorted(int(a.body) for a in answers) == list(range(1, 31))
    assert server.connections == 3 and server.most_open == 3
    assert pool._open == 0 and not pool._waiters


def test_an_answer_that_ends_the_connection_frees_its_slot_for_a_waiting_request() -> None:
    async def closing(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes:
        await asyncio.sleep(0.01)
        return ok(b"%d" % request, b"Connection: close\r\n")

    async def scenario() -> tuple[ScriptedServer, list[Response]]:
        async with ScriptedServer(closing) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, max_connections=2)
            answers = await asyncio.gather(*(pool.post("/x", b"", 10) for _ in range(6)))
            await pool.close()
        return server, answers

    server, answers = run(scenario())
    assert len(answers) == 6 and server.connections == 6 and server.most_open <= 2


def test_a_request_on_a_kept_connection_closed_before_any_answer_is_sent_once_more_on_a_new_one() -> None:
    async def drop_second(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes | None:
        return None if request == 2 else ok(b"%d" % request)

    async def scenario() -> tuple[ScriptedServer, Response]:
        async with ScriptedServer(drop_second) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {})
            await pool.post("/x", b"", 5)
            answer = await pool.post("/x", b"", 5)
            await pool.close()
        return server, answer

    server, answer = run(scenario())
    assert answer.body == b"3"
    assert [number for number, _head, _body in server.requests] == [1, 1, 2]


def test_a_new_connection_closed_before_any_answer_is_not_sent_again() -> None:
    async def drop(_connection: int, _request: int, _head: bytes, _body: bytes) -> bytes | None:
        return None

    async def scenario() -> tuple[ScriptedServer, BaseException]:
        async with ScriptedServer(drop) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {})
            with pytest.raises(Disconnected) as failure:
                await pool.post("/x", b"", 5)
            await pool.close()
        return server, failure.value

    server, error = run(scenario())
    assert len(server.requests) == 1
    assert "without answering" in str(error)


def test_the_request_sent_once_more_goes_on_a_new_connection_not_another_kept_one() -> None:
    async def keep_alive_ran_out(connection: int, _request: int, head: bytes, _body: bytes) -> bytes | None:
        first_use = head.startswith(b"POST /first")
        return ok() if connection > 2 or first_use else None

    async def scenario() -> tuple[ScriptedServer, Response]:
        async with ScriptedServer(keep_alive_ran_out) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {})
            await asyncio.gather(pool.post("/first", b"", 5), pool.post("/first", b"", 5))
            assert len(pool._idle) == 2
            answer = await pool.post("/again", b"", 5)
            await pool.close()
        return server, answer

    server, answer = run(scenario())
    assert answer.status == 200
    assert [number for number, _head, _body in server.requests][2:] == [2, 3]  # the latest kept, then new


def test_a_kept_connection_is_replaced_once_only() -> None:
    async def drop_after_first(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes | None:
        return ok() if request == 1 else None

    async def scenario() -> ScriptedServer:
        async with ScriptedServer(drop_after_first) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {})
            await pool.post("/x", b"", 5)
            with pytest.raises(Disconnected):
                await pool.post("/x", b"", 5)
            await pool.close()
        return server

    assert len(run(scenario()).requests) == 3


def test_a_connection_that_breaks_in_the_middle_of_an_answer_is_not_sent_again() -> None:
    async def half(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes | None:
        return ok() if request == 1 else b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"

    async def scenario() -> ScriptedServer:
        async with ScriptedServer(half) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {})
            await pool.post("/x", b"", 5)
            task = asyncio.ensure_future(pool.post("/x", b"", 5))
            while len(server.requests) < 2:
                await asyncio.sleep(0.001)
            server.drop_all()  # the connection ends in the middle of the answer
            with pytest.raises(Disconnected) as failure:
                await task
            assert "in the middle" in str(failure.value)
            await pool.close()
        return server

    assert len(run(scenario()).requests) == 2


def test_an_idle_connection_older_than_the_idle_timeout_is_not_reused() -> None:
    async def scenario(idle_timeout: float) -> int:
        async with ScriptedServer(answer_ok) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, idle_timeout=idle_timeout)
            for _ in range(3):
                await pool.post("/x", b"", 5)
            await pool.close()
            while server.open:
                await asyncio.sleep(0.001)
            return server.connections

    assert run(scenario(60.0)) == 1
    assert run(scenario(0.0)) == 3


def test_a_connection_the_server_closed_while_idle_is_not_used() -> None:
    async def then_close(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes:
        return ok(b"%d" % request)

    async def scenario() -> tuple[ScriptedServer, Response]:
        async with ScriptedServer(then_close) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {})
            await pool.post("/x", b"", 5)
            [kept] = pool._idle
            assert kept.transport is not None
            server.drop_all()  # its keep-alive ran out: the client sees the connection go
            while not kept.closed:
                await asyncio.sleep(0.001)
            answer = await pool.post("/x", b"", 5)
            await pool.close()
        return server, answer

    server, answer = run(scenario())
    assert answer.body == b"2" and server.connections == 2 and len(server.requests) == 2


def test_no_answer_in_time_is_a_timeout_that_ends_the_connection_and_frees_its_slot() -> None:
    async def hang_first(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes:
        if request == 1:
            await asyncio.sleep(30)
        return ok()

    async def scenario() -> tuple[ScriptedServer, ConnectionPool, float]:
        async with ScriptedServer(hang_first) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, max_connections=1)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(AnswerTimeout, match=r"no complete answer within 0\.2 s"):
                await pool.post("/x", b"", 0.2)
            took = loop.time() - began
            assert (await pool.post("/x", b"", 5)).status == 200  # the one slot is free again
            await pool.close()
        return server, pool, took

    server, pool, took = run(scenario())
    assert 0.2 <= took < 2
    assert server.connections == 2 and pool._open == 0


def test_a_cancelled_request_ends_its_connection_and_frees_its_slot() -> None:
    async def hang(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes:
        if request == 1:
            await asyncio.sleep(30)
        return ok()

    async def scenario() -> tuple[ConnectionPool, ScriptedServer]:
        async with ScriptedServer(hang) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, max_connections=1)
            task = asyncio.ensure_future(pool.post("/x", b"", 60))
            while not server.requests:
                await asyncio.sleep(0.001)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool._open == 0
            assert (await pool.post("/x", b"", 5)).status == 200
            await pool.close()
        return pool, server

    pool, server = run(scenario())
    assert server.connections == 2 and pool._open == 0


def test_a_request_cancelled_while_waiting_for_a_connection_leaves_no_trace() -> None:
    release = asyncio.Event

    async def scenario() -> tuple[ConnectionPool, ScriptedServer, list[Response]]:
        go = release()

        async def gated(_connection: int, request: int, _head: bytes, _body: bytes) -> bytes:
            if request == 1:
                await go.wait()
            return ok(b"%d" % request)

        async with ScriptedServer(gated) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, max_connections=1)
            first = asyncio.ensure_future(pool.post("/x", b"", 10))
            while not server.requests:
                await asyncio.sleep(0.001)
            waiting = asyncio.ensure_future(pool.post("/x", b"", 10))
            behind = asyncio.ensure_future(pool.post("/x", b"", 10))
            while len(pool._waiters) < 2:
                await asyncio.sleep(0.001)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            go.set()
            answers = [await first, await behind]
            await pool.close()
        return pool, server, answers

    pool, server, answers = run(scenario())
    assert [a.body for a in answers] == [b"1", b"2"]
    assert server.connections == 1 and not pool._waiters and pool._open == 0


def test_waiting_for_a_connection_counts_against_the_request_s_time() -> None:
    async def scenario() -> tuple[ConnectionPool, float, Response]:
        go = asyncio.Event()

        async def gated(_c: int, request: int, _h: bytes, _b: bytes) -> bytes:
            if request == 1:
                await go.wait()
            return ok(b"%d" % request)

        async with ScriptedServer(gated) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, max_connections=1)
            first = asyncio.ensure_future(pool.post("/x", b"", 30))
            while not server.requests:
                await asyncio.sleep(0.001)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(AnswerTimeout, match="came free"):
                await pool.post("/x", b"", 0.2)
            took = loop.time() - began
            assert not pool._waiters
            go.set()
            answer = await first
            assert (await pool.post("/x", b"", 5)).body == b"2"  # the connection went back to the pool
            await pool.close()
        return pool, took, answer

    pool, took, answer = run(scenario())
    assert 0.2 <= took < 2 and answer.body == b"1" and pool._open == 0


def test_connection_refused_is_a_connect_error_that_gives_back_its_slot() -> None:
    async def scenario() -> ConnectionPool:
        server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        pool = ConnectionPool(f"http://127.0.0.1:{port}", {}, max_connections=1)
        for _ in range(2):  # a slot not given back would make the second wait forever
            with pytest.raises(ConnectError, match="could not connect"):
                await asyncio.wait_for(pool.post("/x", b"", 5), 5)
        return pool

    assert run(scenario())._open == 0


def test_a_connect_that_hangs_is_a_connect_timeout_or_the_request_s_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def never(*_args: Any, **_kwargs: Any) -> Any:
        await asyncio.sleep(60)

    async def scenario(connect_timeout: float, timeout: float) -> tuple[BaseException, ConnectionPool]:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "create_connection", never)
        pool = ConnectionPool("http://127.0.0.1:9", {}, connect_timeout=connect_timeout, max_connections=1)
        with pytest.raises(http1.HttpError) as failure:
            await pool.post("/x", b"", timeout)
        return failure.value, pool

    error, pool = run(scenario(0.1, 30))
    assert isinstance(error, ConnectTimeout) and "within 0.1 s" in str(error) and pool._open == 0
    error, pool = run(scenario(30, 0.1))
    assert isinstance(error, AnswerTimeout) and not isinstance(error, ConnectTimeout) and pool._open == 0


def test_connects_made_together_share_one_name_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    lookups: list[str] = []

    async def scenario() -> tuple[ScriptedServer, list[Response]]:
        loop = asyncio.get_running_loop()
        real = loop.getaddrinfo

        async def counting(host: str, *args: Any, **kwargs: Any) -> Any:
            lookups.append(host)
            await asyncio.sleep(0.01)
            return await real("127.0.0.1", *args, **kwargs)

        monkeypatch.setattr(loop, "getaddrinfo", counting)

        async def slow(_c: int, _r: int, _h: bytes, _b: bytes) -> bytes:
            await asyncio.sleep(0.02)
            return ok()

        async with ScriptedServer(slow) as server:
            pool = ConnectionPool(
                f"http://upstream.internal:{server.port}", {}, max_connections=8, idle_timeout=0
            )
            answers = await asyncio.gather(*(pool.post("/x", b"", 5) for _ in range(8)))
            answers.append(await pool.post("/x", b"", 5))  # a new connection, later: the same lookup
            await pool.close()
        return server, answers

    server, answers = run(scenario())
    assert len(answers) == 9 and server.connections == 9
    assert lookups == ["upstream.internal"]
    head = server.requests[0][1]
    assert f"Host: upstream.internal:{server.port}".encode() in head.split(b"\r\n")


def test_a_name_that_does_not_resolve_is_a_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> BaseException:
        loop = asyncio.get_running_loop()

        async def unknown(host: str, *args: Any, **kwargs: Any) -> Any:
            raise OSError(-2, "Name or service not known")

        monkeypatch.setattr(loop, "getaddrinfo", unknown)
        pool = ConnectionPool("http://nowhere.invalid", {}, max_connections=1)
        with pytest.raises(ConnectError) as failure:
            await pool.post("/x", b"", 5)
        with pytest.raises(ConnectError):  # and its slot was given back
            await asyncio.wait_for(pool.post("/x", b"", 5), 5)
        return failure.value

    assert "could not resolve nowhere.invalid" in str(run(scenario()))


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def test_https_verifies_the_server_by_its_name(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)

    async def scenario() -> tuple[Response, BaseException, ScriptedServer]:
        async with ScriptedServer(answer_ok, server_context) as server:
            trusting = ssl.create_default_context(cafile=str(cert))
            pool = ConnectionPool(f"https://localhost:{server.port}", {}, ssl_context=trusting)
            answer = await pool.post("/x", b"{}", 5)
            await pool.post("/x", b"{}", 5)
            await pool.close()
            stranger = ConnectionPool(f"https://localhost:{server.port}", {})  # the system's trust store
            with pytest.raises(ConnectError) as failure:
                await stranger.post("/x", b"{}", 5)
        return answer, failure.value, server

    answer, error, server = run(scenario())
    assert answer.body == b'{"echo": 1}'
    assert "CERTIFICATE_VERIFY_FAILED" in str(error)
    assert [number for number, _h, _b in server.requests] == [1, 1]  # kept alive over TLS too


def test_large_bodies_both_ways() -> None:
    big = bytes(range(256)) * 8192  # 2 MiB

    async def echo(_c: int, _r: int, _head: bytes, body: bytes) -> bytes:
        return ok(body)

    async def scenario() -> Response:
        async with ScriptedServer(echo) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {})
            answer = await pool.post("/x", big, 10)
            await pool.close()
        return answer

    assert run(scenario()).body == big


def test_a_closed_pool_refuses_requests_and_fails_those_waiting() -> None:
    async def scenario() -> None:
        go = asyncio.Event()

        async def gated(_c: int, _r: int, _h: bytes, _b: bytes) -> bytes:
            await go.wait()
            return ok()

        async with ScriptedServer(gated) as server:
            pool = ConnectionPool(f"http://127.0.0.1:{server.port}", {}, max_connections=1)
            first = asyncio.ensure_future(pool.post("/x", b"", 10))
            while not server.requests:
                await asyncio.sleep(0.001)
            waiting = asyncio.ensure_future(pool.post("/x", b"", 10))
            while not pool._waiters:
                await asyncio.sleep(0.001)
            await pool.close()
            with pytest.raises(ConnectError, match="closed"):
                await waiting
            go.set()
            assert (await first).status == 200  # the request under way still gets its answer
            assert pool._open == 0  # and its connection is closed, not kept
            with pytest.raises(ConnectError, match="closed"):
                await pool.post("/x", b"", 10)

    run(scenario())


@pytest.mark.parametrize(
    ("base_url", "headers"),
    [
        ("ftp://host/v1", {}),
        ("http:///v1", {}),
        ("http://host/v1", {"Authorization": "Bearer a\r\nX-Injected: 1"}),
    ],
)
def test_bad_base_urls_and_header_values_are_refused_up_front(base_url: str, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        ConnectionPool(base_url, headers)
