"""Powertools Logger, Tracer and Metrics shared by every Lambda entry point (service "batch-api",
metrics namespace "BatchApi"; POWERTOOLS_* variables set by the stack may refine them)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.metrics.provider.cloudwatch_emf.cloudwatch import AmazonCloudWatchEMFProvider

if TYPE_CHECKING:
    from batch_api.upstreams.metered import UpstreamMetric

SERVICE = "batch-api"
UPSTREAM_DIMENSION = "Upstream"  # upstreams.metered's
METRICS_NAMESPACE = "BatchApi"

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)

# The API and most steps publish only the cold-start metric; an invocation without metrics is normal.
warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)


class LambdaMetrics:
    """`upstreams.metered.MetricsSink` on Powertools: invocation metrics go to the shared `metrics`
    (flushed by the handler decorator); per-upstream ones are written at once, one EMF document per
    call with its own `Upstream` dimension (one Metrics object holds one dimension set)."""

    def __init__(self, shared: Metrics) -> None:
        self.shared = shared

    def add_metric(self, name: str, unit: MetricUnit | str, value: float) -> None:
        self.shared.add_metric(name=name, unit=unit, value=value)

    def add_upstream_metrics(self, upstream: str, reported: Sequence[UpstreamMetric]) -> None:
        provider = AmazonCloudWatchEMFProvider(
            namespace=METRICS_NAMESPACE,
            service=SERVICE,
            default_dimensions={"service": SERVICE, UPSTREAM_DIMENSION: upstream},
        )
        for name, unit, values in reported:
            for value in values:  # 100 values of one metric are written as they fill a document
                provider.add_metric(name=name, unit=unit, value=value)  # type: ignore[arg-type]
        if provider.metric_set:
            provider.flush_metrics()


def in_lambda() -> bool:
    """Whether this process is a Lambda function (the runtime names it)."""
    return bool(os.environ.get("AWS_LAMBDA_FUNCTION_NAME"))


def route_library_logs() -> None:
    """In Lambda, send the package's stdlib loggers (workflow steps, adapters) through the Powertools
    logger: JSON lines with the correlation id, at the Powertools log level. Outside Lambda (tests, the
    local server) logging is left as the host configured it."""
    if in_lambda():
        copy_config_to_registered_loggers(source_logger=logger, include={"batch_api"})
