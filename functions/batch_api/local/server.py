"""The local HTTP front door: uvicorn (HTTP/1.1, keep-alive) in front of a thin ASGI adapter that turns
each request into the API Gateway (REST, payload v1) proxy event the API Lambda gets on AWS, and
resolves it with the very same handler (`handlers/api.py`).

No per-request state is shared between requests: Powertools' resolver keeps the current event and
`app.context` on itself, so every worker thread owns its own resolver (`ResolverPool`), and a request
is resolved on one worker thread from start to end.

The server's own answers (malformed HTTP, oversized request lines, headers and bodies, a crash of the
adapter) are in the OpenAI error envelope, like the API's. Limits are checked before the body is read:
a body over `max_request_bytes` is refused from its Content-Length (or, for a chunked body, as soon as
its running total crosses the limit) and the connection is closed instead of reading the rest.

Besides the API it serves `/_blobs/...`, the local stand-in for S3 presigned GETs: large downloads
answer 302 to a signed, expiring link, streamed from the data directory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import h11
import orjson
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from batch_api.config import Settings
from batch_api.contract.errors import ApiError
from batch_api.handlers.api import handle
from batch_api.handlers.resolver import too_large

logger = logging.getLogger(__name__)

# The request line and headers together (h11 buffers them as one event). A larger head is a 431, or a
# 414 when the request line alone is too long.
HEAD_LIMIT_BYTES = 64 * 1024
# The request target (path and query). Nothing this API takes comes near it.
TARGET_LIMIT_BYTES = 16 * 1024
MAX_HEADERS = 100
DOWNLOAD_PIECE_BYTES = 1 << 20
_CRLF = b"\r\n"


def envelope(message: str, error_type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


@dataclass(frozen=True)
class HttpError:
    """An answer the server gives itself, before or instead of the API handler."""

    status: int
    message: str
    code: str | None
    error_type: str = "invalid_request_error"

    def body(self) -> bytes:
        return envelope(self.message, self.error_type, self.code)


def from_api_error(error: ApiError) -> HttpError:
    return HttpError(error.status_code, error.message, error.code, error.error_type)


URI_TOO_LONG = HttpError(
    414,
    f"The request line is too long: the path and query may have at most {TARGET_LIMIT_BYTES} bytes.",
    "uri_too_long",
)
HEADERS_TOO_LARGE = HttpError(
    431,
    f"The request headers are too large: at most {MAX_HEADERS} headers of at most {HEAD_LIMIT_BYTES} bytes "
    "in all.",
    "request_header_fields_too_large",
)
SERVER_ERROR = HttpError(
    500,
    "The server had an error while processing your request. Sorry about that!",
    None,
    "server_error",
)


# ---------------------------------------------------------------- API Gateway events


@dataclass
class LambdaContext:
    """The few Lambda context attributes Powertools reads."""

    aws_request_id: str
    function_name: str = "batch-api-local"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 0
    invoked_function_arn: str = "arn:aws:lambda:local:000000000000:function:batch-api-local"

    def get_remaining_time_in_millis(self) -> int:
        return 900_000


def to_apigw_event(
    method: str, raw_path: str, headers: list[tuple[str, str]], body: bytes, source_ip: str
) -> dict[str, Any]:
    """Build the REST API proxy event API Gateway would send for this request."""
    parts = urlsplit(raw_path)
    path = unquote(parts.path) or "/"
    multi_query = dict(parse_qs(parts.query, keep_blank_values=True))
    multi_headers: dict[str, list[str]] = {}
    for name, value in headers:
        multi_headers.setdefault(name, []).append(value)
    request_id = str(uuid.uuid4())
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": {k: v[-1] for k, v in multi_headers.items()} or None,
        "multiValueHeaders": multi_headers or None,
        "queryStringParameters": {k: v[-1] for k, v in multi_query.items()} or None,
        "multiValueQueryStringParameters": multi_query or None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "stageVariables": None,
        "requestContext": {
            "resourcePath": "/{proxy+}",
            "httpMethod": method,
            "path": path,
            "stage": "local",
            "requestId": request_id,
            "requestTimeEpoch": int(time.time() * 1000),
            "identity": {"sourceIp": source_ip},
        },
        "body": base64.b64encode(body).decode("ascii") if body else None,
        "isBase64Encoded": bool(body),
    }


def from_apigw_response(response: dict[str, Any]) -> tuple[int, list[tuple[str, str]], bytes]:
    """Turn the Lambda proxy response back into status, headers and body bytes."""
    headers: list[tuple[str, str]] = []
    multi = response.get("multiValueHeaders") or {}
    for name, values in multi.items():
        headers.extend((name, str(v)) for v in values)
    for name, value in (response.get("headers") or {}).items():
        if name not in multi:
            headers.append((name, str(value)))
    raw = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(raw)
    else:
        body = raw.encode("utf-8") if isinstance(raw, str) else bytes(raw)
    return int(response.get("statusCode", 200)), headers, body


# ---------------------------------------------------------------- resolvers, one per thread


class ResolverPool:
    """Runs API requests on `workers` threads, each with its own resolver built by `factory`."""

    def __init__(self, factory: Callable[[], Any], workers: int) -> None:
        self._factory = factory
        self._local = threading.local()
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="http")

    def resolver(self) -> Any:
        """This thread's resolver (built on its first request)."""
        app = getattr(self._local, "app", None)
        if app is None:
            app = self._local.app = self._factory()
        return app

    def resolve(
        self, method: str, target: str, headers: list[tuple[str, str]], body: bytes, client: str
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """Resolve one request on this (worker) thread."""
        # the body goes over as bytes beside the event, not base64 inside it: a 64 MiB part would
        # otherwise be held three more times (its base64, the decoded copy, the part's copy)
        event = to_apigw_event(method, target, headers, b"", client)
        context = LambdaContext(aws_request_id=event["requestContext"]["requestId"])
        # the dataclass has every attribute Powertools reads from a Lambda context
        return from_apigw_response(handle(self.resolver(), event, cast(Any, context), body))

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------- the ASGI application


Send = Callable[[dict[str, Any]], Any]
Receive = Callable[[], Any]


class _Disconnected(Exception):
    """The client went away before its request was read."""


class ApiAsgiApp:
    """ASGI: limits, body, one API Gateway event per request, and the signed `/_blobs/` downloads."""

    def __init__(
        self,
        resolvers: ResolverPool,
        *,
        blobs: Any,
        signing_key: bytes,
        settings: Settings,
    ) -> None:
        self.resolvers = resolvers
        self.blobs = blobs
        self.signing_key = signing_key
        self.settings = settings
        self.max_request_bytes = settings.max_request_bytes
        self.concurrency = settings.http_concurrency
        self._slots: asyncio.Semaphore | None = None

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if self._slots is None:  # created on the server's loop
            self._slots = asyncio.Semaphore(self.concurrency)
        started = time.perf_counter()
        responded: list[int] = []

        async def tracked_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                responded.append(message["status"])
            await send(message)

        try:
            async with self._slots:  # bounds the bodies held in memory and the requests being resolved
                await self._serve(scope, receive, tracked_send)
        except _Disconnected:
            return
        except Exception:
            logger.exception("the HTTP adapter failed on %s %s", scope["method"], scope["path"])
            if responded:
                raise  # uvicorn closes the connection
            await _answer(tracked_send, SERVER_ERROR, close=True)
        if responded:
            logger.info(
                "%s %s -> %d (%.1f ms)",
                scope["method"],
                scope["path"],
                responded[0],
                (time.perf_counter() - started) * 1000,
            )

    async def _serve(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode()
        query: bytes = scope.get("query_string", b"")
        if len(raw_path) + len(query) + 1 > TARGET_LIMIT_BYTES:
            await _answer(send, URI_TOO_LONG, close=True)
            return
        raw_headers: list[tuple[bytes, bytes]] = scope["headers"]
        # h11 caps a head that arrives in pieces; one that arrives whole is measured here
        head_bytes = sum(len(name) + len(value) + 4 for name, value in raw_headers)
        if len(raw_headers) > MAX_HEADERS or head_bytes > HEAD_LIMIT_BYTES:
            await _answer(send, HEADERS_TOO_LARGE, close=True)
            return
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw_headers]
        target = raw_path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        method: str = scope["method"]

        if method in ("GET", "HEAD") and raw_path.startswith(b"/_blobs/"):
            await self._serve_blob(target, send)
            return

        declared = _content_length(headers)
        if declared is not None and declared > self.max_request_bytes:
            await _answer(send, from_api_error(too_large(self.settings, declared, None)), close=True)
            return
        body = await self._read_body(receive)
        if body is None:  # a chunked body that grew past the limit
            await _answer(send, from_api_error(too_large(self.settings, None, None)), close=True)
            return
        client = scope.get("client") or ("", 0)
        loop = asyncio.get_running_loop()
        status, response_headers, payload = await loop.run_in_executor(
            self.resolvers.executor, self.resolvers.resolve, method, target, headers, body, client[0]
        )
        del body
        await _respond(send, status, response_headers, payload)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None once it grows past the limit (a chunked body has no Content-Length).
        The pieces are appended to one growing buffer (not listed and joined: the body is held once),
        and not preallocated from the Content-Length (a client's claim, not yet bytes it sent)."""
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _Disconnected()
            piece = message.get("body", b"")
            if piece:
                if len(body) + len(piece) > self.max_request_bytes:
                    return None
                body += piece
            if not message.get("more_body", False):
                return body  # type: ignore[return-value]  # bytes-like, and never resized from here on

    async def _serve_blob(self, target: str, send: Send) -> None:
        from batch_api.adapters.local.filesystem import verify_download

        parts = urlsplit(target)
        key = unquote(parts.path[len("/_blobs/") :])
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        filename = query.get("filename", "")
        if not verify_download(
            self.signing_key,
            key,
            query.get("expires", "0"),
            filename,
            query.get("signature", ""),
            int(time.time()),
        ):
            await _answer(
                send,
                HttpError(403, "This download link is invalid or has expired.", "invalid_signature"),
            )
            return
        try:
            path = self.blobs.path_for(key)
            handle_ = path.open("rb")
        except (FileNotFoundError, ValueError):
            await _answer(send, HttpError(404, "No such file.", None))
            return
        loop = asyncio.get_running_loop()
        with handle_:
            # the size of what was opened: a delete now unlinks the path, not the open file, which is
            # served whole (a stat of the path would find it gone)
            size = os.fstat(handle_.fileno()).st_size
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"application/octet-stream"),
                        (b"content-length", str(size).encode()),
                        (
                            b"content-disposition",
                            f"attachment; filename*=UTF-8''{quote(filename)}".encode("latin-1"),
                        ),
                    ],
                }
            )
            sent = 0
            while sent < size:
                piece = await loop.run_in_executor(None, handle_.read, min(DOWNLOAD_PIECE_BYTES, size - sent))
                if not piece:  # shorter than it was a moment ago: end the response, the client sees it short
                    raise RuntimeError(f"{key} shrank while it was sent")
                sent += len(piece)
                await send({"type": "http.response.body", "body": piece, "more_body": sent < size})
            if size == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    """The declared body size (h11 has already refused a malformed or conflicting one)."""
    for name, value in headers:
        if name == "content-length":
            return int(value)
    return None


def _encode_header(name: str, value: str) -> tuple[bytes, bytes]:
    try:
        return name.lower().encode("latin-1"), value.encode("latin-1")
    except UnicodeEncodeError:
        return name.lower().encode("latin-1", "replace"), quote(value, safe=" /:;,=@?&%+-._~*'()").encode()


async def _respond(send: Send, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
    out: list[tuple[bytes, bytes]] = []
    has_type = False
    for name, value in headers:
        lower = name.lower()
        if lower in ("content-length", "connection", "transfer-encoding"):
            continue
        has_type = has_type or lower == "content-type"
        out.append(_encode_header(name, value))
    if not has_type:
        out.append((b"content-type", b"application/json"))
    out.append((b"content-length", str(len(payload)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": out})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


async def _answer(send: Send, error: HttpError, *, close: bool = False) -> None:
    """The server's own answer. `close` when the rest of the request is left unread: the connection
    cannot carry another request."""
    headers = [("content-type", "application/json")]
    if close:
        headers.append(("connection", "close"))
    body = error.body()
    out = [_encode_header(n, v) for n, v in headers] + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": out})
    await send({"type": "http.response.body", "body": body, "more_body": False})


# ---------------------------------------------------------------- uvicorn


class _RecordingConnection(h11.Connection):
    """h11's connection, keeping the protocol error it raised so the answer can say what it was."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self):  # type: ignore[no-untyped-def]
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


class EnvelopeH11Protocol(H11Protocol):
    """uvicorn's h11 protocol whose own answers to bad HTTP are 400, 414 or 431 in the error envelope
    (uvicorn's are a plain-text 400)."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self.conn = _RecordingConnection(h11.SERVER, config.h11_max_incomplete_event_size or HEAD_LIMIT_BYTES)

    def send_400_response(self, msg: str) -> None:
        error = _protocol_error(cast(_RecordingConnection, self.conn))
        body = error.body()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        with contextlib.suppress(h11.LocalProtocolError):  # the response had started: just close
            response = h11.Response(
                status_code=error.status, headers=headers, reason=HTTPStatus(error.status).phrase.encode()
            )
            self.transport.write(self.conn.send(response))
            self.transport.write(self.conn.send(h11.Data(data=body)))
            self.transport.write(self.conn.send(h11.EndOfMessage()))
        self.transport.close()


def _protocol_error(conn: _RecordingConnection) -> HttpError:
    error = conn.last_error
    if error is not None and error.error_status_hint == 431:
        buffered, _closed = conn.trailing_data
        line_end = buffered.find(_CRLF)
        if line_end < 0 or line_end > TARGET_LIMIT_BYTES:
            return URI_TOO_LONG
        return HEADERS_TOO_LARGE
    text = str(error) if error is not None else ""
    detail = f": {text[:200]}" if text else ""
    return HttpError(400, f"The HTTP request is malformed{detail}.", "invalid_http_request")


class LocalServer(uvicorn.Server):
    """uvicorn's server whose signals belong to the caller (`request_exit`): uvicorn would re-raise a
    captured SIGTERM after its shutdown and end the process before the workflow is stopped."""

    def __init__(self, config: uvicorn.Config, *, on_started: Callable[[str, int], None] | None = None):
        super().__init__(config)
        self._on_started = on_started
        self.bound: tuple[str, int] | None = None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if sockets:
            host, port = sockets[0].getsockname()[:2]
            self.bound = (host, port)
            if self._on_started is not None:
                self._on_started(host, port)

    def request_exit(self, force: bool = False) -> None:
        """Stop taking connections and finish the requests in flight (`force`: don't wait for them)."""
        self.should_exit = True
        if force:
            self.force_exit = True


def build_server(
    app: ApiAsgiApp,
    *,
    graceful_seconds: int = 5,
    on_started: Callable[[str, int], None] | None = None,
) -> LocalServer:
    config = uvicorn.Config(
        cast(Any, app),
        http=EnvelopeH11Protocol,
        ws="none",
        lifespan="off",
        loop="asyncio",
        log_config=None,
        access_log=False,
        server_header=False,
        h11_max_incomplete_event_size=HEAD_LIMIT_BYTES,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=graceful_seconds,
    )
    return LocalServer(config, on_started=on_started)


def listen(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so a port in use is our error to report (uvicorn would exit).

    The protocol is named (IPPROTO_TCP), not left 0: asyncio sets TCP_NODELAY only on sockets that say
    they are TCP, and without it an answer written in two pieces (head, body) waits for the client's
    delayed ACK, about 40 ms per request."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
