"""The local server (uvicorn + the ASGI adapter) in a thread of the test process, and a raw HTTP/1.1
exchange for the requests no well-behaved client would send."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import orjson

from batch_api.config import Settings
from batch_api.local.bootstrap import LocalApp
from batch_api.local.server import ApiAsgiApp, ResolverPool, build_server, listen


def asgi_app(local: LocalApp, settings: Settings, factory: Any = None) -> ApiAsgiApp:
    """The ASGI app `batch-api serve` runs, over a local app built in this process."""
    return ApiAsgiApp(
        ResolverPool(factory or local.api_factory, settings.http_concurrency),
        blobs=local.blobs,
        signing_key=local.signing_key,
        settings=settings,
    )


@contextmanager
def serving(app: ApiAsgiApp, port: int = 0) -> Iterator[tuple[str, int]]:
    """Serve `app` on loopback (`port`, or a free one) until the block ends; yields (host, port)."""
    sock = listen("127.0.0.1", port)
    server = build_server(app, graceful_seconds=2)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.01)
    try:
        yield sock.getsockname()[:2]
    finally:
        server.request_exit()
        thread.join(10)
        sock.close()
        app.resolvers.close()


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def envelope(self) -> dict[str, object]:
        """The OpenAI error envelope, checked: all four keys, nothing else."""
        assert self.headers.get("content-type") == "application/json", self.headers
        error = orjson.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        return dict(error)


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 response (Content-Length framed) from `sock`."""
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError(f"closed before the head ended: {data!r}")
        data += piece
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        piece = sock.recv(65536)
        if not piece:
            raise ConnectionError("closed inside the body")
        rest += piece
    return Answer(status, headers, rest[:length])


def exchange(address: tuple[str, int], raw: bytes, timeout: float = 5.0) -> Answer:
    """Send `raw` on a new connection and read one answer."""
    with socket.create_connection(address, timeout=timeout) as sock:
        # the server may answer and close before reading everything we send
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        return read_answer(sock)


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the server closes the connection (EOF) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while True:
            if not sock.recv(65536):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
