"""The mock upstream over HTTP: an OpenAI-compatible server answering from `mock.mock_response`.

Lets users try the `--upstream-url` path without a model, and gives the bench a server to measure
clients against:

    python -m batch_api.upstreams.mock_server --port 8001 --latency 0.05
    BATCH_API_UPSTREAM_URL=http://127.0.0.1:8001/v1 batch-api serve
"""

from __future__ import annotations

import argparse
import asyncio

import orjson
from aiohttp import web

from batch_api.upstreams.mock import MOCK_CREATED_AT, MOCK_ENDPOINTS, mock_answer, mock_request_id

MOCK_MODELS = ("mock-chat", "mock-embedding", "omni-moderation-latest")


def _json(status: int, payload: object, request_id: str | None = None) -> web.Response:
    headers = {"x-request-id": request_id} if request_id else None
    return web.Response(
        status=status, body=orjson.dumps(payload), content_type="application/json", headers=headers
    )


def create_app(latency_seconds: float = 0.0) -> web.Application:
    """POST /v1/{chat/completions,completions,embeddings,responses,moderations}, GET /v1/models.

    Any model name is accepted and echoed; every answer arrives after `latency_seconds`.
    """

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        if latency_seconds > 0:
            await asyncio.sleep(latency_seconds)
        status, payload = mock_answer(request.path, body)
        return _json(status, payload, mock_request_id(request.path, body))

    async def list_models(_request: web.Request) -> web.Response:
        models = [
            {"id": name, "object": "model", "created": MOCK_CREATED_AT, "owned_by": "batch-api-mock"}
            for name in MOCK_MODELS
        ]
        return _json(200, {"object": "list", "data": models})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_get("/v1/models", list_models)
    for endpoint in MOCK_ENDPOINTS:
        app.router.add_post(endpoint, answer)
    return app


def run(host: str = "127.0.0.1", port: int = 8001, latency: float = 0.0) -> None:
    """Serve until interrupted."""
    web.run_app(create_app(latency), host=host, port=port, access_log=None, print=None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A deterministic OpenAI-compatible mock model server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    args = parser.parse_args(argv)
    print(f"mock upstream on http://{args.host}:{args.port}/v1 (latency {args.latency:g} s)", flush=True)
    run(args.host, args.port, args.latency)


if __name__ == "__main__":
    main()
