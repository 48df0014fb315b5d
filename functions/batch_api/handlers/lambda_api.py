"""The API Lambda: the same resolver as the local server (`handlers/api.py`), on the AWS adapters.

Everything is built once per container, at import: settings from the environment the stack sets,
the adapters (no AWS call until the first request) and the resolver.

Client API keys: the stack names a Secrets Manager secret in BATCH_API_API_KEYS_SECRET_NAME (keys
separated by commas or newlines, or JSON {"api_keys": [...]}). It is read on the first request and
then through a 5-minute cache; the resolver is rebuilt when the keys change, so adding or revoking a
key needs no deployment. Without keys every caller would be one unauthenticated project, which an
API on the internet must never be; an unreadable secret fails the request instead.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aws_lambda_powertools.event_handler import APIGatewayRestResolver
from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext

from batch_api.bootstrap_aws import build_aws_deps
from batch_api.config import Settings
from batch_api.handlers.api import create_app, handle
from batch_api.handlers.observability import logger, metrics, route_library_logs, tracer

settings = Settings()
api_keys_secret_name = settings.api_keys_secret_name
deps = build_aws_deps(settings)
app = create_app(deps)
_app_keys: tuple[str, ...] | None = None  # the secret's keys `app` was built with
route_library_logs()


def current_app() -> APIGatewayRestResolver:
    """The resolver, rebuilt with the secret's client keys whenever they changed."""
    global app, deps, _app_keys
    if api_keys_secret_name is None:
        return app
    from batch_api.adapters.aws.secrets import client_api_keys

    keys = client_api_keys(settings, api_keys_secret_name)
    values = tuple(key.get_secret_value() for key in keys)
    if values != _app_keys:
        deps = replace(deps, settings=deps.settings.model_copy(update={"api_keys": keys}))
        app = create_app(deps)
        _app_keys = values
    return app


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@metrics.log_metrics(capture_cold_start_metric=True)
@tracer.capture_lambda_handler(capture_response=False)  # responses carry file contents
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    logger.info("api request", extra={"method": event.get("httpMethod"), "path": event.get("path")})
    return handle(current_app(), event, context)
