"""The local HTTP front door: each request becomes the API Gateway (REST, payload v1) proxy event the
API Lambda gets on AWS, and goes through the very same resolver.

Besides the API it serves `/_blobs/...`, the local stand-in for S3 presigned GETs: large downloads
answer 302 to a signed, expiring link, streamed from the data directory.
"""

from __future__ import annotations

import base64
import logging
import shutil
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import orjson

from batch_api.handlers.api import handle

logger = logging.getLogger(__name__)


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
    multi_query = {k: v for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
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


def envelope(message: str, error_type: str, code: str | None = None, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


class LocalHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self,
        address: tuple[str, int],
        *,
        app: Any,
        blobs: Any,
        signing_key: bytes,
        max_request_bytes: int,
        part_size: int,
    ):
        self.part_size = part_size  # suggested in 413 answers
        self.app = app
        self.blobs = blobs
        self.signing_key = signing_key
        self.max_request_bytes = max_request_bytes
        super().__init__(address, _Handler)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: LocalHTTPServer
    server_version = "batch-api"

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def do_GET(self) -> None:
        if self.path.startswith("/_blobs/"):
            self._serve_blob()
        else:
            self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    # ---------------------------------------------------------------- API

    def _dispatch(self) -> None:
        started = time.perf_counter()
        body = self._read_body()
        if body is None:
            return
        event = to_apigw_event(
            self.command, self.path, list(self.headers.items()), body, self.client_address[0]
        )
        del body
        context = LambdaContext(aws_request_id=event["requestContext"]["requestId"])
        # the dataclass has every attribute Powertools reads from a Lambda context
        response = handle(self.server.app, event, cast(Any, context))
        del event
        status, headers, payload = from_apigw_response(response)
        self._send(status, headers, payload)
        logger.info(
            "%s %s -> %d (%.1f ms)",
            self.command,
            self.path.split("?")[0],
            status,
            (time.perf_counter() - started) * 1000,
        )

    def _read_body(self) -> bytes | None:
        try:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                return self._read_chunked()
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(length)
        except ValueError:
            self.close_connection = True
            self._send(400, [], envelope("The request body's framing is invalid.", "invalid_request_error"))
            return None
        if length > self.server.max_request_bytes:
            self._too_large(length)
            return None
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes | None:
        """Raises ValueError on a malformed chunk size."""
        parts: list[bytes] = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size < 0:
                raise ValueError(size)
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > self.server.max_request_bytes:
                self._too_large(total)
                return None
            parts.append(self.rfile.read(size))
            self.rfile.readline(8)

    def _too_large(self, size: int) -> None:
        limit = self.server.max_request_bytes
        message = (
            f"The request body of {size} bytes exceeds this server's limit of {limit} bytes. "
            "Upload larger files with the Uploads API in parts, e.g. "
            f"client.uploads.upload_file_chunked(file=..., mime_type=..., purpose=..., "
            f"part_size={self.server.part_size})."
        )
        self.close_connection = True  # the unread body makes the connection unusable
        self._send(
            413,
            [("Content-Type", "application/json")],
            envelope(message, "invalid_request_error", "request_too_large"),
        )

    def _send(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
        self.send_response(
            status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
        )
        names = set()
        for name, value in headers:
            if name.lower() in ("content-length", "connection", "transfer-encoding"):
                continue
            names.add(name.lower())
            self.send_header(name, value)
        if "content-type" not in names:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    # ---------------------------------------------------------------- signed downloads

    def _serve_blob(self) -> None:
        from batch_api.adapters.local.filesystem import verify_download

        parts = urlsplit(self.path)
        key = unquote(parts.path[len("/_blobs/") :])
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        try:
            expires = int(query.get("expires", "0"))
        except ValueError:
            expires = 0
        filename = query.get("filename", "")
        if not verify_download(
            self.server.signing_key, key, expires, filename, query.get("signature", ""), int(time.time())
        ):
            self._send(
                403,
                [],
                envelope(
                    "This download link is invalid or has expired.",
                    "invalid_request_error",
                    "invalid_signature",
                ),
            )
            return
        try:
            path = self.server.blobs.path_for(key)
            handle = path.open("rb")
        except (FileNotFoundError, ValueError):
            self._send(404, [], envelope("No such file.", "invalid_request_error"))
            return
        with handle:
            size = path.stat().st_size
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.send_header("Content-Disposition", f"attachment; filename*=UTF-8''{quote(filename)}")
            self.end_headers()
            shutil.copyfileobj(handle, self.wfile, 1 << 20)
