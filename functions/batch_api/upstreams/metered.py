"""An Upstream decorator that reports every request as CloudWatch metrics (EMF, via Powertools).

Metric names are the contract with the dashboard (infra monitoring, namespace BatchApi):
RequestsSucceeded / RequestsFailed (Count: a 2xx answer vs anything else, after the client's
retries) and UpstreamLatency (Milliseconds, per request, retries included). Counts are summed per
client and emitted when it closes (one value per chunk invocation instead of one per request);
latencies are emitted per request (Powertools flushes every 100 values). The workflow code is
unchanged: the Lambda entry point wraps the factory.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

from aws_lambda_powertools.metrics import MetricUnit

from batch_api.ports import Upstream, UpstreamFactory, UpstreamResponse
from batch_api.upstreams.capacity import CapacityGate

REQUESTS_SUCCEEDED = "RequestsSucceeded"
REQUESTS_FAILED = "RequestsFailed"
UPSTREAM_LATENCY = "UpstreamLatency"
UPSTREAM_THROTTLED = "UpstreamThrottled"  # attempts answered 429/503 while this client was open
UPSTREAM_LIMIT = "UpstreamLimit"  # the gate's effective limit when the client closed


class MetricsSink(Protocol):
    """What we need of `aws_lambda_powertools.Metrics`."""

    def add_metric(self, name: str, unit: MetricUnit | str, value: float) -> None: ...


class MeteredUpstream:
    """ports.Upstream that times and counts each request it forwards to `inner`."""

    def __init__(self, inner: Upstream, metrics: MetricsSink) -> None:
        self.inner = inner
        self.metrics = metrics
        self.succeeded = 0
        self.failed = 0
        self.gate: CapacityGate | None = getattr(inner, "gate", None)  # the upstream's, when it has one
        self._throttled_before = self.gate.throttled if self.gate is not None else 0

    async def send(self, endpoint: str, body: bytes) -> UpstreamResponse:
        began = time.perf_counter()
        try:
            response = await self.inner.send(endpoint, body)
        except asyncio.CancelledError:
            raise  # abandoned, not answered: it runs again on the next invocation
        except Exception:
            self.failed += 1  # the caller records it as a failed request
            raise
        self.metrics.add_metric(
            name=UPSTREAM_LATENCY, unit=MetricUnit.Milliseconds, value=(time.perf_counter() - began) * 1000
        )
        if response.status_code is not None and 200 <= response.status_code < 300:
            self.succeeded += 1
        else:
            self.failed += 1
        return response

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            if self.succeeded:
                self.metrics.add_metric(name=REQUESTS_SUCCEEDED, unit=MetricUnit.Count, value=self.succeeded)
            if self.failed:
                self.metrics.add_metric(name=REQUESTS_FAILED, unit=MetricUnit.Count, value=self.failed)
            self.succeeded = self.failed = 0
            if self.gate is not None:
                throttled = self.gate.throttled - self._throttled_before
                self._throttled_before = self.gate.throttled
                self.metrics.add_metric(name=UPSTREAM_THROTTLED, unit=MetricUnit.Count, value=throttled)
                self.metrics.add_metric(name=UPSTREAM_LIMIT, unit=MetricUnit.Count, value=self.gate.limit)


def metered(factory: UpstreamFactory, metrics: MetricsSink) -> UpstreamFactory:
    """A factory whose clients report their requests to `metrics`."""

    def make(*, model: str | None = None, batch_id: str | None = None) -> Upstream:
        return MeteredUpstream(factory(model=model, batch_id=batch_id), metrics)

    return make
