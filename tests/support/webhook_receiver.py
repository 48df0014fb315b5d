"""A webhook receiver for tests: records every POST (headers and body) and answers a scripted status.

`answers` is consumed one per request (then 200s): e.g. `[500, 503]` fails the first two attempts.
Runs `http.server` on a thread; `wait_for(n)` waits on the recorded requests, never a fixed sleep.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered


@dataclass
class WebhookReceiver:
    answers: list[int] = field(default_factory=list)
    redirect_to: str | None = None  # with a 3xx answer: the Location sent
    # hold the first `hold_first` requests unanswered until `release()` (a sender killed meanwhile)
    hold_first: int = 0
    tls: ssl.SSLContext | None = None  # serve https with this server context
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._changed = threading.Condition()
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with receiver._changed:
                    status = receiver.answers.pop(0) if receiver.answers else 200
                    held = len(receiver.received) < receiver.hold_first
                    receiver.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status)
                    )
                    receiver._changed.notify_all()
                if held:
                    receiver._released.wait(60)
                with contextlib.suppress(OSError):  # the sender is gone (killed while held)
                    self._answer(status)

            def _answer(self, status: int) -> None:
                self.send_response(status)
                if 300 <= status < 400 and receiver.redirect_to:
                    self.send_header("Location", receiver.redirect_to)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if self.tls is not None:
            self.server.socket = self.tls.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def wait_for(self, count: int, timeout: float = 30.0) -> list[Received]:
        """The first `count` requests, once they have arrived (AssertionError after `timeout`)."""
        with self._changed:
            if not self._changed.wait_for(lambda: len(self.received) >= count, timeout):
                raise AssertionError(f"expected {count} webhook request(s), got {len(self.received)}")
            return list(self.received[:count])

    def release(self) -> None:
        self._released.set()

    def delivered(self) -> list[Received]:
        with self._changed:
            return [r for r in self.received if 200 <= r.status < 300]

    def close(self) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()


def receivers(*answer_lists: Iterable[int]) -> list[WebhookReceiver]:
    return [WebhookReceiver(list(answers)) for answers in answer_lists]
