"""API Gateway REST (v1 proxy) events, shaped like the ones the local server builds, and a bridge
that lets the real `openai` SDK talk to the resolver in-process (request -> event -> response)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx2 as httpx

EVENTS_DIR = Path(__file__).resolve().parents[2] / "events" / "api"

# Ids the sample events refer to; `seeded_deps` in test_api_handler.py creates these objects.
INPUT_FILE_ID = "file-0123456789abcdef01234567"
BATCH_ID = "batch_0123456789abcdef01234567"
UPLOAD_ID = "upload_0123456789abcdef01234567"
PART_IDS = ("part_0123456789abcdef0123456a", "part_0123456789abcdef0123456b")

_DROPPED_HEADERS = ("x-stainless-",)  # SDK telemetry that changes with every SDK release and machine


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS_DIR / name).read_text())
    return event


def proxy_event(
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]] | None = None,
    query: dict[str, list[str]] | None = None,
    body: bytes = b"",
    request_id: str = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
) -> dict[str, Any]:
    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    for key, value in headers or []:
        single[key] = value
        multi.setdefault(key, []).append(value)
    return {
        "resource": "/{proxy+}",
        "path": path,
        "httpMethod": method,
        "headers": single,
        "multiValueHeaders": multi,
        "queryStringParameters": {k: v[-1] for k, v in query.items()} if query else None,
        "multiValueQueryStringParameters": query or None,
        "pathParameters": {"proxy": path.lstrip("/")},
        "requestContext": {
            "requestId": request_id,
            "stage": "prod",
            "httpMethod": method,
            "path": f"/prod{path}",
            "identity": {"sourceIp": "127.0.0.1"},
        },
        "body": base64.b64encode(body).decode() if body else None,
        "isBase64Encoded": True,
    }


def event_from_request(request: httpx.Request) -> dict[str, Any]:
    headers = [
        (key.decode().lower(), value.decode())
        for key, value in request.headers.raw
        if not key.decode().lower().startswith(_DROPPED_HEADERS)
    ]
    return proxy_event(
        request.method,
        request.url.path,
        headers=headers,
        query=parse_qs(
            request.url.query.decode() if isinstance(request.url.query, bytes) else request.url.query
        ),
        body=request.read(),
    )


def response_from_proxy(result: dict[str, Any], request: httpx.Request) -> httpx.Response:
    body = result.get("body") or ""
    content = base64.b64decode(body) if result.get("isBase64Encoded") else body.encode()
    headers = [(k, v) for k, values in (result.get("multiValueHeaders") or {}).items() for v in values]
    return httpx.Response(result["statusCode"], headers=headers, content=content, request=request)


def sdk_transport(
    resolve: Callable[[dict[str, Any]], dict[str, Any]], seen: list[dict[str, Any]]
) -> httpx.MockTransport:
    """A transport that sends every SDK request through `resolve(event)`; `seen` collects the events."""

    def handler(request: httpx.Request) -> httpx.Response:
        event = event_from_request(request)
        seen.append(event)
        return response_from_proxy(resolve(event), request)

    return httpx.MockTransport(handler)
