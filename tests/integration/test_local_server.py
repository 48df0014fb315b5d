"""The local HTTP server (uvicorn + the ASGI adapter) on a real socket: its own answers are in the
OpenAI envelope, limits are enforced before bodies are read, connections are kept alive, and no
request's state leaks into another's."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from batch_api.config import Settings
from batch_api.local.bootstrap import LocalApp, build_local_app
from batch_api.local.server import HEAD_LIMIT_BYTES, MAX_HEADERS, TARGET_LIMIT_BYTES
from tests.support.asgi_server import asgi_app, closed_by_peer, exchange, read_answer, serving
from tests.support.server import free_port

pytestmark = pytest.mark.integration

KEYS = ("sk-project-a-0123456789", "sk-project-b-0123456789")
MAX_BODY = 512 * 1024


@pytest.fixture
def local(tmp_path: Path) -> Iterator[tuple[LocalApp, Settings]]:
    settings = Settings(
        port=free_port(),  # download links name it
        data_dir=tmp_path / "data",
        api_keys=list(KEYS),  # type: ignore[arg-type]
        max_request_bytes=MAX_BODY,  # the hammering test's uploads fit
        max_inline_download_bytes=16,
        http_concurrency=8,
    )
    app = build_local_app(settings)
    try:
        yield app, settings
    finally:
        app.close()


@pytest.fixture
def address(local: tuple[LocalApp, Settings]) -> Iterator[tuple[str, int]]:
    app, settings = local
    with serving(asgi_app(app, settings), settings.port) as address:
        yield address


def _client(address: tuple[str, int], key: str = KEYS[0], **options: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://{address[0]}:{address[1]}/v1", api_key=key, max_retries=0, **options
    )


# ---------------------------------------------------------------- the server's own answers


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    ],
    ids=["request-line", "negative-length", "text-length", "two-lengths", "chunk-size", "header-name"],
)
def test_malformed_http_is_a_400_in_the_envelope(address: tuple[str, int], raw: bytes) -> None:
    answer = exchange(address, raw)
    assert answer.status == 400
    error = answer.envelope()
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_http_request")
    assert answer.headers["connection"] == "close"


@pytest.mark.parametrize("length", [70_000, TARGET_LIMIT_BYTES + 10])
def test_a_long_request_line_is_a_414(address: tuple[str, int], length: int) -> None:
    answer = exchange(address, b"GET /" + b"a" * length + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 414
    assert answer.envelope()["code"] == "uri_too_long"


def test_a_request_line_just_under_the_limit_is_served(address: tuple[str, int]) -> None:
    path = b"/v1/files/" + b"f" * (TARGET_LIMIT_BYTES - 100)
    answer = exchange(address, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.status == 401  # reached the API: no key


@pytest.mark.parametrize(
    "headers",
    [
        b"X-Big: " + b"a" * 100_000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(200)),
        b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 1)),
        b"X-Big: " + b"a" * HEAD_LIMIT_BYTES + b"\r\n",
    ],
    ids=["100KB-header", "200-headers", "one-too-many", "head-over-limit"],
)
def test_headers_too_large_are_a_431(address: tuple[str, int], headers: bytes) -> None:
    answer = exchange(address, b"GET /health HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert answer.status == 431
    assert answer.envelope()["code"] == "request_header_fields_too_large"


def test_a_body_over_the_limit_is_refused_from_its_length_before_it_is_sent(address: tuple[str, int]) -> None:
    """The client says 10 GB is coming; the answer comes at once, and the connection closes (the
    unread body cannot be skipped)."""
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n"
        )
        answer = read_answer(sock)
        assert answer.status == 413
        error = answer.envelope()
        assert error["code"] == "request_too_large"
        assert "upload_file_chunked" in str(error["message"])
        assert closed_by_peer(sock)


def test_a_chunked_body_that_grows_past_the_limit_is_a_413(address: tuple[str, int]) -> None:
    piece = b"x" * 16384
    chunk = b"%x\r\n" % len(piece) + piece + b"\r\n"
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(MAX_BODY // len(piece) + 2):
                sock.sendall(chunk)
        answer = read_answer(sock)
    assert answer.status == 413
    assert answer.envelope()["code"] == "request_too_large"


def test_connections_are_kept_alive(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        for _ in range(3):
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = read_answer(sock)
            assert (answer.status, answer.body) == (200, b'{"status":"ok"}')
            assert "connection" not in answer.headers


def test_unknown_paths_are_404_and_wrong_methods_405_with_allow(address: tuple[str, int]) -> None:
    auth = f"Authorization: Bearer {KEYS[0]}\r\n".encode()
    missing = exchange(address, b"GET /v1/nothing HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n")
    assert missing.status == 404
    assert missing.envelope()["message"] == "Invalid URL (GET /v1/nothing)"

    wrong = exchange(address, b"PUT /v1/files HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 0\r\n\r\n")
    assert wrong.status == 405
    assert wrong.headers["allow"] == "GET, HEAD, POST"
    assert wrong.envelope()["code"] == "method_not_allowed"
    assert (
        exchange(address, b"DELETE /v1/batches/b1 HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n").headers["allow"]
        == "GET, HEAD"
    )


def test_a_crash_below_the_api_is_a_500_in_the_envelope(local: tuple[LocalApp, Settings]) -> None:
    app, settings = local

    class Broken:
        def resolve(self, event: Any, context: Any) -> Any:
            raise RuntimeError("disk on fire")

    with serving(asgi_app(app, settings, factory=Broken)) as address:
        answer = exchange(address, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer.status == 500
        error = answer.envelope()
        assert error["type"] == "server_error"
        assert "disk on fire" not in str(error["message"])
        assert exchange(address, b"GET /v1/files HTTP/1.1\r\nHost: x\r\n\r\n").status == 500  # still serving


def test_head_answers_headers_only(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(2)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert rest == b""
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is still in step
        assert read_answer(sock).body == b'{"status":"ok"}'


def test_large_downloads_go_through_a_signed_link(address: tuple[str, int]) -> None:
    client = _client(address)
    data = b"".join(b'{"n": %d}\n' % i for i in range(2000))
    uploaded = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")

    raw = client.files.with_raw_response.content(uploaded.id)
    assert raw.http_response.status_code == 200  # the SDK followed the 302
    assert raw.http_response.history and raw.http_response.history[0].status_code == 302
    assert raw.http_response.read() == data

    link = raw.http_response.history[0].headers["location"]
    path = link.split("://", 1)[1].split("/", 1)[1]
    tampered = exchange(
        address,
        b"GET /" + path.replace("signature=", "signature=0").encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    assert tampered.status == 403
    assert tampered.envelope()["code"] == "invalid_signature"


class _VanishesOnceOpen:
    """A blob's path whose file is deleted the moment the server has opened it: a delete racing the
    download, at its worst moment."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, mode: str) -> Any:
        handle = self.path.open(mode)
        self.path.unlink()
        return handle

    def stat(self) -> Any:
        return self.path.stat()


def test_a_link_whose_file_is_deleted_once_opened_serves_the_whole_body(
    local: tuple[LocalApp, Settings], address: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    app, _ = local
    client = _client(address)
    data = b"".join(b'{"n": %d}\n' % i for i in range(2000))
    uploaded = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    real_path_for = app.blobs.path_for
    monkeypatch.setattr(app.blobs, "path_for", lambda key: _VanishesOnceOpen(real_path_for(key)))

    raw = client.files.with_raw_response.content(uploaded.id)

    assert raw.http_response.history and raw.http_response.history[0].status_code == 302
    assert raw.http_response.status_code == 200 and raw.http_response.read() == data
    with pytest.raises(openai.NotFoundError):  # gone for the next download
        client.files.content(uploaded.id).read()


# ---------------------------------------------------------------- no state shared between requests


def test_two_projects_hammering_at_once_never_see_each_other(address: tuple[str, int]) -> None:
    """The attack that once stored one project's uploads in another: uploads of project A racing
    listings of project B on shared resolver state. Each request must be answered as its own."""
    failures: list[str] = []
    created: dict[str, set[str]] = {KEYS[0]: set(), KEYS[1]: set()}
    stop = time.monotonic() + 5

    def uploader(key: str, worker: int) -> None:
        client = _client(address, key)
        n = 0
        while time.monotonic() < stop:
            n += 1
            payload = (f"{key}:{worker}:{n}:".encode() * 20000)[: 256 * 1024]  # big enough to overlap others
            try:
                record = client.files.create(file=(f"f{n}.bin", io.BytesIO(payload)), purpose="user_data")
                created[key].add(record.id)
                if client.files.content(record.id).read() != payload:
                    failures.append(f"{key} read another body for {record.id}")
            except openai.APIError as exc:
                failures.append(f"{key} upload: {exc!r}")

    def lister(key: str) -> None:
        client = _client(address, key)
        while time.monotonic() < stop:
            try:
                client.batches.list(limit=1)
                client.files.list()
            except openai.APIError as exc:
                failures.append(f"{key} list: {exc!r}")

    threads = [threading.Thread(target=uploader, args=(KEYS[0], i)) for i in range(4)]
    threads += [threading.Thread(target=uploader, args=(KEYS[1], i)) for i in range(2)]
    threads += [threading.Thread(target=lister, args=(key,)) for key in KEYS for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert created[KEYS[0]] and created[KEYS[1]]
    for key, other in ((KEYS[0], KEYS[1]), (KEYS[1], KEYS[0])):
        listed = {f.id for f in _client(address, key).files.list()}
        assert listed == created[key]
        assert not listed & created[other]


def test_the_listening_socket_says_it_is_tcp_so_answers_are_not_held_for_delayed_acks() -> None:
    """asyncio sets TCP_NODELAY only on sockets whose protocol is IPPROTO_TCP; without it each answer
    (head and body written apart) waited ~40 ms for the client's delayed ACK."""
    from batch_api.local.server import listen

    sock = listen("127.0.0.1", 0)
    try:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()
