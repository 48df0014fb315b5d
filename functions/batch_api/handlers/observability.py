"""Powertools Logger, Tracer and Metrics shared by every Lambda entry point (service "batch-api",
metrics namespace "BatchApi"; POWERTOOLS_* variables set by the stack may refine them)."""

from __future__ import annotations

import os
import warnings

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.logging.utils import copy_config_to_registered_loggers

SERVICE = "batch-api"
METRICS_NAMESPACE = "BatchApi"

logger = Logger(service=SERVICE)
tracer = Tracer(service=SERVICE)
metrics = Metrics(namespace=METRICS_NAMESPACE, service=SERVICE)

# The API and most steps publish only the cold-start metric; an invocation without metrics is normal.
warnings.filterwarnings("ignore", message="No application metrics to publish", category=UserWarning)


def route_library_logs() -> None:
    """In Lambda, send the package's stdlib loggers (workflow steps, adapters) through the Powertools
    logger: JSON lines with the correlation id, at the Powertools log level. Outside Lambda (tests, the
    local server) logging is left as the host configured it."""
    if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
        copy_config_to_registered_loggers(source_logger=logger, include={"batch_api"})
