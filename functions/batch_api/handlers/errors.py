"""The one place where exceptions become HTTP answers in the OpenAI error envelope.

Every non-2xx answer is `{"error": {"message", "type", "param", "code"}}` with all four keys. Bad input
is always a 400 that names the parameter, never Powertools' 422 and never a 500.
"""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.event_handler.openapi.exceptions import RequestValidationError
from pydantic import ValidationError

from batch_api.contract.errors import (
    ApiError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    ServerError,
    json_kind,
)
from batch_api.handlers.resolver import BatchApiResolver

logger = Logger(service="batch-api")

SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"


def error_response(error: ApiError) -> Response[Any]:
    headers = {"x-should-retry": "false"} if error.retryable is False else None
    return Response(
        status_code=error.status_code,
        content_type=content_types.APPLICATION_JSON,
        body=error.envelope(),
        headers=headers,
    )


_SOURCES = ("body", "query", "path", "header")  # Powertools' request validation prefixes the source


def _param_from_loc(loc: tuple[int | str, ...] | list[int | str]) -> str | None:
    """("body", "metadata", "k") -> "metadata.k"; form names like "expires_after[seconds]" read as
    "expires_after.seconds", as the JSON APIs name the same parameter."""
    param = ""
    for index, item in enumerate(loc):
        if isinstance(item, int):
            param += f"[{item}]"
        elif index == 0 and item in _SOURCES:
            continue
        else:
            name = str(item).replace("[", ".").replace("]", "")
            param += f".{name}" if param else name
    return param or None


# pydantic's error types -> the JSON type OpenAI's messages name ("expected an integer")
_EXPECTED = {
    "int": "an integer",
    "string": "a string",
    "bool": "a boolean",
    "dict": "an object",
    "model": "an object",
    "list": "an array",
    "float": "a number",
}


def invalid_request_from(errors: list[Any]) -> InvalidRequest:
    """The first pydantic error as an OpenAI 400 naming the parameter, in OpenAI's words:
    "Missing required parameter: 'x'.", "Invalid type for 'x': expected an integer, but got a string
    instead." (a value of the wrong JSON type), "Invalid value for 'limit': 'x' is not an integer." (a
    query or form string that does not parse)."""
    if not errors:
        return InvalidRequest("Invalid request.")
    first = errors[0]
    param = _param_from_loc(tuple(first.get("loc", ())))
    kind: str = first.get("type", "")
    if kind == "missing":
        return InvalidRequest(
            f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    base, _, suffix = kind.rpartition("_")
    expected = _EXPECTED.get(base)
    if expected is not None and suffix == "parsing":
        return InvalidRequest(
            f"Invalid value for '{param}': {first.get('input')!r} is not {expected}.",
            param=param,
            code="invalid_type",
        )
    if expected is not None and suffix == "type":
        return InvalidRequest(
            f"Invalid type for '{param}': expected {expected}, but got {json_kind(first.get('input'))} instead.",
            param=param,
            code="invalid_type",
        )
    return InvalidRequest(
        f"Invalid value for '{param}': {first.get('msg', 'invalid')}.", param=param, code="invalid_value"
    )


def register_error_handlers(app: APIGatewayRestResolver) -> None:
    @app.exception_handler(ApiError)
    def _api_error(error: ApiError) -> Response[Any]:
        if error.status_code >= 500:
            logger.exception("server error answered to the client")
        return error_response(error)

    @app.not_found
    def _unknown_route(_: NotFoundError) -> Response[Any]:
        event = app.current_event
        allowed = app.allowed_methods(event.path) if isinstance(app, BatchApiResolver) else []
        if allowed:
            response = error_response(
                MethodNotAllowed(
                    f"{event.http_method} is not supported on {event.path}; use {', '.join(allowed)}."
                )
            )
            response.headers["Allow"] = ", ".join(allowed)
            return response
        return error_response(NotFound(f"Invalid URL ({event.http_method} {event.path})"))

    @app.exception_handler(ValidationError)
    def _pydantic_error(error: ValidationError) -> Response[Any]:
        return error_response(invalid_request_from(list(error.errors())))

    @app.exception_handler(RequestValidationError)
    def _request_validation_error(error: RequestValidationError) -> Response[Any]:
        return error_response(invalid_request_from(list(error.errors())))

    @app.exception_handler(Exception)
    def _unexpected(error: Exception) -> Response[Any]:
        logger.exception("unhandled error")
        return error_response(ServerError(SERVER_ERROR_MESSAGE))
