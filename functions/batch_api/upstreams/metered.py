"""Decorators that report upstream requests and capacity as CloudWatch metrics (EMF, via Powertools).

Metric names are the contract with the dashboard (infra monitoring, namespace BatchApi):
RequestsSucceeded / RequestsFailed (Count: a 2xx answer vs anything else, after the client's
retries) and UpstreamLatency (Milliseconds, per request, retries included). Counts are summed per
client and emitted when it closes (one value per chunk invocation instead of one per request);
latencies are emitted per request (Powertools flushes every 100 values).

Per upstream (dimension `Upstream`, its name), written together in one EMF document: UpstreamLatency
(each request's), UpstreamThrottled (attempts answered 429/503) and UpstreamLimit (the worker's
adaptive limit) when a client closes; CapacityHeld (slots leased across
every worker), CapacityWaitingBatches (batches waiting for a slot: the queue) and CapacityWaits
(workers sent away to wait) at each lease grant. The workflow code is unchanged: the Lambda entry
point wraps the factory and the lease store.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

from aws_lambda_powertools.metrics import MetricUnit

from batch_api.ports import CapacityLeases, Grant, Upstream, UpstreamFactory, UpstreamResponse
from batch_api.upstreams.capacity import CapacityGate

REQUESTS_SUCCEEDED = "RequestsSucceeded"
REQUESTS_FAILED = "RequestsFailed"
UPSTREAM_LATENCY = "UpstreamLatency"
UPSTREAM_THROTTLED = "UpstreamThrottled"  # attempts answered 429/503 while this client was open
UPSTREAM_LIMIT = "UpstreamLimit"  # the gate's effective limit when the client closed
CAPACITY_HELD = "CapacityHeld"  # slots held by live leases on the upstream, after a grant
CAPACITY_WAITING_BATCHES = "CapacityWaitingBatches"  # batches waiting for slots, after a grant
CAPACITY_WAITS = "CapacityWaits"  # 1 for each worker that got no slot and was told to wait
UPSTREAM_DIMENSION = "Upstream"

# one metric of an upstream: its name, unit and values
UpstreamMetric = tuple[str, MetricUnit | str, Sequence[float]]


class MetricsSink(Protocol):
    """What we need of Powertools metrics (`handlers.observability.LambdaMetrics`)."""

    def add_metric(self, name: str, unit: MetricUnit | str, value: float) -> None:
        """A metric of the invocation (dimension: the service)."""

    def add_upstream_metrics(self, upstream: str, metrics: Sequence[UpstreamMetric]) -> None:
        """Metrics of one upstream, written at once (dimensions: the service and `Upstream`)."""


class MeteredUpstream:
    """ports.Upstream that times and counts each request it forwards to `inner`."""

    def __init__(self, inner: Upstream, metrics: MetricsSink) -> None:
        self.inner = inner
        self.metrics = metrics
        self.succeeded = 0
        self.failed = 0
        self.gate: CapacityGate | None = getattr(inner, "gate", None)  # the upstream's, when it has one
        self._throttled_before = self.gate.throttled if self.gate is not None else 0
        self.latencies: list[float] = []  # milliseconds, since the last close

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        began = time.perf_counter()
        try:
            response = await self.inner.send(endpoint, body, deadline)
        except asyncio.CancelledError:
            raise  # abandoned, not answered: it runs again on the next invocation
        except Exception:
            self.failed += 1  # the caller records it as a failed request
            raise
        latency = round((time.perf_counter() - began) * 1000, 1)  # 0.1 ms: a few bytes of log, not 18
        self.metrics.add_metric(name=UPSTREAM_LATENCY, unit=MetricUnit.Milliseconds, value=latency)
        if self.gate is not None:
            self.latencies.append(latency)
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
                latencies, self.latencies = self.latencies, []
                self.metrics.add_upstream_metrics(
                    self.gate.name,
                    [
                        (UPSTREAM_LATENCY, MetricUnit.Milliseconds, latencies),
                        (UPSTREAM_THROTTLED, MetricUnit.Count, [throttled]),
                        (UPSTREAM_LIMIT, MetricUnit.Count, [self.gate.limit]),
                    ],
                )


def metered(factory: UpstreamFactory, metrics: MetricsSink) -> UpstreamFactory:
    """A factory whose clients report their requests to `metrics`."""

    def make(*, model: str | None = None, batch_id: str | None = None, rate_share: float = 1.0) -> Upstream:
        return MeteredUpstream(factory(model=model, batch_id=batch_id, rate_share=rate_share), metrics)

    return make


class MeteredLeases:
    """ports.CapacityLeases that reports each grant (held slots, the queue of waiting batches)."""

    def __init__(self, inner: CapacityLeases, metrics: MetricsSink) -> None:
        self.inner = inner
        self.metrics = metrics

    def acquire(self, upstream: str, holder: str, batch_id: str, want: int, limit: int) -> Grant:
        granted = self.inner.acquire(upstream, holder, batch_id, want, limit)
        reported: list[UpstreamMetric] = [
            (CAPACITY_HELD, MetricUnit.Count, [granted.held]),
            (CAPACITY_WAITING_BATCHES, MetricUnit.Count, [granted.waiting]),
        ]
        if granted.slots == 0:
            reported.append((CAPACITY_WAITS, MetricUnit.Count, [1]))
        self.metrics.add_upstream_metrics(upstream, reported)
        return granted

    def renew(self, upstream: str, holder: str) -> None:
        self.inner.renew(upstream, holder)

    def release(self, upstream: str, holder: str) -> None:
        self.inner.release(upstream, holder)
