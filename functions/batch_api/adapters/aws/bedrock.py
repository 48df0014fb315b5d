"""Amazon Bedrock's runtime (`ports.BedrockRuntime`) on boto3: the only code that calls bedrock-runtime.

botocore makes one attempt per call (`total_max_attempts` 1): the Bedrock upstream retries with the
same rules and deadlines as the HTTP one, and two retry loops stacked would multiply its budget. Its
exceptions become `BedrockCallError`s: a Bedrock error with the HTTP status its code stands for
(from the service model: ThrottlingException 429, ValidationException 400, ...), or, when no answer
came, one of the upstream client's transport codes. Credentials come from boto3's default chain: the
function's role on AWS, the environment, `AWS_PROFILE` or SSO locally.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import boto3
import orjson
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from batch_api.config import Settings
from batch_api.ports import BedrockAnswer, BedrockCallError

SERVICE = "bedrock-runtime"
OPERATIONS = ("Converse", "InvokeModel")


def runtime_config(max_connections: int, read_timeout: float, connect_timeout: float) -> Config:
    """One attempt per call, a connection per request in flight, the upstream's timeouts."""
    return Config(
        retries={"mode": "standard", "total_max_attempts": 1},
        max_pool_connections=max_connections,
        read_timeout=read_timeout,
        connect_timeout=connect_timeout,
    )


# Errors the service model gives a 4xx that Bedrock documents as "resubmit your request later": a rate
# or token quota of the account, answered as the 429 it is, so the request is retried with backoff.
RETRY_LATER = {"ServiceQuotaExceededException": 429}


def error_statuses(client: Any) -> dict[str, int]:
    """Error code -> HTTP status, as the service model declares them for the calls made here."""
    statuses: dict[str, int] = {}
    for operation in OPERATIONS:
        for shape in client.meta.service_model.operation_model(operation).error_shapes:
            status = shape.metadata.get("error", {}).get("httpStatusCode")
            if isinstance(status, int):
                statuses[shape.name] = status
    return statuses


class BotoBedrockRuntime:
    """`ports.BedrockRuntime` on a bedrock-runtime client (thread-safe, as boto3 clients are)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self._statuses = error_statuses(client)

    def converse(self, request: Mapping[str, Any]) -> BedrockAnswer:
        response = self._call("converse", dict(request))
        return _answer(response)

    def invoke_model(self, model_id: str, body: bytes) -> BedrockAnswer:
        response = self._call(
            "invoke_model",
            {
                "modelId": model_id,
                "body": body,
                "contentType": "application/json",
                "accept": "application/json",
            },
        )
        raw = response["body"].read()
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BedrockCallError(
                "upstream_invalid_response", f"{model_id} answered with no JSON: {exc}", None
            ) from exc
        if not isinstance(parsed, dict):
            raise BedrockCallError(
                "upstream_invalid_response", f"{model_id} answered with no JSON object", None
            )
        response["body"] = parsed
        return _answer(response, body_key="body")

    def _call(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            response: dict[str, Any] = getattr(self.client, operation)(**params)
            return response
        except ClientError as exc:
            error = exc.response.get("Error", {})
            code = str(error.get("Code") or "BedrockError")
            metadata = exc.response.get("ResponseMetadata", {})
            status = (
                RETRY_LATER.get(code) or self._statuses.get(code) or metadata.get("HTTPStatusCode") or 500
            )
            raise BedrockCallError(
                code, str(error.get("Message") or code), int(status), request_id=metadata.get("RequestId")
            ) from exc
        except ParamValidationError as exc:  # the translated request breaks the API's own rules
            raise BedrockCallError("ValidationException", str(exc), 400) from exc
        except (ReadTimeoutError, ConnectTimeoutError) as exc:
            raise BedrockCallError("upstream_timeout", str(exc), None, retryable=True) from exc
        except (EndpointConnectionError, ConnectionClosedError) as exc:
            raise BedrockCallError("upstream_connection_error", str(exc), None, retryable=True) from exc
        except (NoCredentialsError, PartialCredentialsError) as exc:
            raise BedrockCallError(
                "upstream_credentials_error", f"{exc} (the AWS credential chain found none)", None
            ) from exc
        except BotoCoreError as exc:
            raise BedrockCallError("upstream_connection_error", str(exc), None, retryable=True) from exc


def _answer(response: dict[str, Any], body_key: str | None = None) -> BedrockAnswer:
    metadata = response.pop("ResponseMetadata", {}) or {}
    body = response[body_key] if body_key is not None else response
    return BedrockAnswer(
        body=body,
        request_id=metadata.get("RequestId"),
        headers={k.lower(): str(v) for k, v in (metadata.get("HTTPHeaders") or {}).items()},
    )


class BedrockClients:
    """`ports.BedrockRuntimeFactory`: one bedrock-runtime client per region, made on first use.

    Never pointed at `settings.aws_endpoint_url` (that is S3's and DynamoDB's stand-in in tests)."""

    def __init__(self, settings: Settings, session: boto3.session.Session | None = None) -> None:
        self.settings = settings
        self._session = session or boto3.session.Session()
        self._clients: dict[tuple[str, int], BotoBedrockRuntime] = {}
        self._lock = threading.Lock()  # a boto3 session must not build two clients at once

    def region(self, region: str | None) -> str:
        chosen = region or self.settings.aws_region or self._session.region_name
        if not chosen:
            raise ValueError(
                "no AWS region for Amazon Bedrock: give the upstream a region, or set AWS_REGION "
                "(or BATCH_API_AWS_REGION)"
            )
        return str(chosen)

    def __call__(self, region: str, max_connections: int) -> BotoBedrockRuntime:
        with self._lock:
            runtime = self._clients.get((region, max_connections))
            if runtime is None:
                settings = self.settings
                client = self._session.client(
                    SERVICE,  # type: ignore[call-overload]
                    region_name=region,
                    config=runtime_config(
                        max_connections,
                        settings.upstream_timeout_seconds,
                        settings.upstream_connect_timeout_seconds,
                    ),
                )
                runtime = self._clients[(region, max_connections)] = BotoBedrockRuntime(client)
            return runtime
