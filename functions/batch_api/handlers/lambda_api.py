"""The API Lambda: the same resolver as the local server (`handlers/api.py`), on the AWS adapters.

Everything is built once per container, at import: settings from the environment the stack sets,
the adapters (no AWS call until the first request) and the resolver.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from batch_api.bootstrap_aws import build_aws_deps
from batch_api.config import Settings
from batch_api.handlers.api import create_app, handle
from batch_api.handlers.observability import logger, metrics, route_library_logs, tracer

settings = Settings()
deps = build_aws_deps(settings)
app = create_app(deps)
route_library_logs()


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@metrics.log_metrics(capture_cold_start_metric=True)
@tracer.capture_lambda_handler(capture_response=False)  # responses carry file contents
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    logger.info("api request", extra={"method": event.get("httpMethod"), "path": event.get("path")})
    return handle(app, event, context)
