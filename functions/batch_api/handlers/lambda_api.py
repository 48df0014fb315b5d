"""The API Lambda: the same resolver as the local server (`handlers/api.py`), on the AWS adapters.

Everything is built once per container, at import, and nothing changes afterwards: the settings (the
aws backend, whose resource names are required, so a missing variable fails the cold start with its
name), the adapters (no AWS call until the first request) and the resolver.

Client API keys: the stack names a Secrets Manager secret in BATCH_API_API_KEYS_SECRET_NAME (keys
separated by commas or newlines, or JSON {"api_keys": [...]}). The resolver asks for them at every
request through a 5-minute cache, so adding or revoking a key needs no deployment. An API on the
internet must never be open: without a secret (or keys given directly in BATCH_API_API_KEYS) the
function does not start, and an unreadable or empty secret fails the request instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from aws_lambda_powertools.logging import correlation_paths
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import SecretStr

from batch_api.bootstrap_aws import build_aws_deps
from batch_api.config import Settings
from batch_api.handlers.api import create_app, handle
from batch_api.handlers.auth import KeysProvider
from batch_api.handlers.observability import logger, metrics, route_library_logs, tracer


def client_keys(settings: Settings) -> KeysProvider:
    """Where the function reads its client keys from; refuses to run without any."""
    secret_name = settings.api_keys_secret_name
    if secret_name:
        from batch_api.adapters.aws.secrets import client_api_keys

        def from_secret() -> Sequence[SecretStr]:
            return client_api_keys(settings, secret_name)

        return from_secret
    if settings.api_keys:
        keys = tuple(settings.api_keys)
        return lambda: keys
    raise ValueError(
        "the API function needs client API keys: set BATCH_API_API_KEYS_SECRET_NAME (or BATCH_API_API_KEYS)"
    )


settings = Settings(backend="aws")
deps = build_aws_deps(settings)
app = create_app(deps, api_keys=client_keys(settings))
route_library_logs()


@logger.inject_lambda_context(correlation_id_path=correlation_paths.API_GATEWAY_REST)
@metrics.log_metrics(capture_cold_start_metric=True)
@tracer.capture_lambda_handler(capture_response=False)  # responses carry file contents
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    logger.info("api request", extra={"method": event.get("httpMethod"), "path": event.get("path")})
    return handle(app, event, context)
