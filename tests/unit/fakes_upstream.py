"""A scripted in-process Upstream and a controllable clock for the workflow tests.

The fake answers like an OpenAI-compatible server: by default a 200 with a realistic body and usage
for the endpoint; a test scripts other answers by the request's text content (the last chat message,
or `input` / `prompt`), and can hook every call (to cancel the batch or move the clock mid-run).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson

from batch_api.ports import UpstreamResponse

# usage each endpoint's default answer reports; tests sum these
DEFAULT_USAGE: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "prompt_tokens_details": {"cached_tokens": 2},
        "completion_tokens_details": {"reasoning_tokens": 1},
    },
    "/v1/completions": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
    "/v1/embeddings": {"prompt_tokens": 4, "total_tokens": 4},
    "/v1/responses": {
        "input_tokens": 8,
        "output_tokens": 6,
        "total_tokens": 14,
        "input_tokens_details": {"cached_tokens": 1},
        "output_tokens_details": {"reasoning_tokens": 2},
    },
}


def content_of(body: dict[str, Any]) -> str:
    """The text a test keys its script on."""
    if isinstance(body.get("messages"), list) and body["messages"]:
        return str(body["messages"][-1].get("content"))
    for key in ("input", "prompt"):
        if key in body:
            return str(body[key])
    return ""


def default_body(endpoint: str, body: dict[str, Any], n: int) -> dict[str, Any]:
    answer: dict[str, Any] = {"id": f"resp_{n}", "model": body.get("model"), "echo": content_of(body)}
    if endpoint in DEFAULT_USAGE:
        answer["usage"] = DEFAULT_USAGE[endpoint]
    return answer


def transport_failure(code: str = "timeout", message: str = "upstream timed out") -> UpstreamResponse:
    return UpstreamResponse(status_code=None, error_code=code, error_message=message, attempts=3)


def http_error(status: int, message: str = "bad") -> UpstreamResponse:
    return UpstreamResponse(
        status_code=status,
        body={"error": {"message": message, "type": "x", "param": None, "code": None}},
        request_id=f"req_err_{status}",
    )


Scripted = UpstreamResponse | Callable[[dict[str, Any]], UpstreamResponse] | Exception


class FakeUpstream:
    """Counts calls, tracks how many are in flight, answers from `script` or with the default."""

    def __init__(
        self,
        script: dict[str, Scripted] | None = None,
        *,
        latency: float = 0.0,
        on_call: Callable[[int, dict[str, Any]], None] | None = None,
    ) -> None:
        self.script = script or {}
        self.latency = latency
        self.on_call = on_call
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.clients_created = 0
        self.clients_closed = 0
        self.routes: list[tuple[str | None, str | None]] = []  # (model, batch_id) of each client made
        self.rate_shares: list[float] = []  # the rate share each client was made with
        self.deadlines: list[float | None] = []  # the deadline each request was sent with

    def sent_contents(self) -> list[str]:
        return [content_of(body) for _, body in self.calls]

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        parsed = orjson.loads(body)
        self.calls.append((endpoint, parsed))
        n = len(self.calls)
        if self.on_call is not None:
            self.on_call(n, parsed)
        self.deadlines.append(deadline)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and self.latency > left:  # like a client whose timeout is clipped
                await asyncio.sleep(max(0.0, left))
                return transport_failure("upstream_timeout", "no complete answer in the time left")
            if self.latency:
                await asyncio.sleep(self.latency)
            else:
                await asyncio.sleep(0)
        finally:
            self.in_flight -= 1
        scripted = self.script.get(content_of(parsed))
        if isinstance(scripted, Exception):
            raise scripted
        if isinstance(scripted, UpstreamResponse):
            return scripted
        if scripted is not None:
            return scripted(parsed)
        return UpstreamResponse(
            status_code=200, body=default_body(endpoint, parsed, n), request_id=f"req_{n}"
        )

    async def aclose(self) -> None:
        self.clients_closed += 1

    def factory(
        self, *, model: str | None = None, batch_id: str | None = None, rate_share: float = 1.0
    ) -> FakeUpstream:
        """Use as `Deps.upstream_factory`: every "new client" is this recorder."""
        self.clients_created += 1
        self.routes.append((model, batch_id))
        self.rate_shares.append(rate_share)
        return self
