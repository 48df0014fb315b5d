"""moto's HTTP server with one request at a time, so each request is atomic as it is in AWS.

moto applies an UpdateItem attribute by attribute on the stored item itself, so a GetItem served
on another thread can read a half-applied update (a batch already `completed` with its old counts).
DynamoDB never shows that. Serving one request at a time gives the item-level atomicity the code
relies on; moto is bound by the GIL anyway, so little is lost.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any

from moto.moto_server.threaded_moto_server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
from werkzeug.serving import make_server

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def one_at_a_time(app: WsgiApp) -> WsgiApp:
    """Run each request, its response body included, under one lock."""
    lock = threading.Lock()

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        with lock:
            result = app(environ, start_response)
            try:
                return [b"".join(result)]
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()

    return serve


class AtomicMotoServer(ThreadedMotoServer):
    """`ThreadedMotoServer` serving one request at a time (see the module docstring)."""

    def _server_entry(self) -> None:
        app = one_at_a_time(DomainDispatcherApplication(create_backend_app))
        self._server = make_server(
            self._ip_address, self._port, app, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()
