"""An Upstream that takes a slot of its upstream's `CapacityGate` for each request it forwards.

For clients without retries of their own (the built-in mock); the HTTP client takes a slot per
attempt itself, so that each retry waits for capacity too.
"""

from __future__ import annotations

from batch_api.ports import Upstream, UpstreamResponse
from batch_api.upstreams.capacity import CapacityGate, answer_tokens, estimate_tokens


class GatedUpstream:
    def __init__(self, inner: Upstream, gate: CapacityGate, batch_id: str) -> None:
        self.inner = inner
        self.gate = gate
        self.batch_id = batch_id

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        tokens = estimate_tokens(body) if self.gate.counts_tokens else 0
        await self.gate.pace(tokens)
        admitted = await self.gate.acquire(self.batch_id)
        status: int | None = None
        headers = None
        try:
            response = await self.inner.send(endpoint, body, deadline)
            status, headers = response.status_code, response.headers
        finally:
            self.gate.release(admitted, status, headers)
        if tokens:
            self.gate.used_tokens(tokens, answer_tokens(response.body))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()
