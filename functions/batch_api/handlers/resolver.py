"""Powertools' REST resolver, fitted to this API.

- Guards run before request validation: Powertools validates (and so parses) the request before any
  middleware, so authentication and the body-size limit would otherwise come after parsing a hostile
  body. `BatchApiResolver` runs them first.
- Bodies are parsed here: JSON with orjson (our messages for bad JSON), multipart/form-data with our
  parser (`handlers/multipart.py`), chosen by what the route declares, not by what the client says.
- The OpenAPI document describes errors as they are answered: the OpenAI envelope for 400, 401, 404,
  405, 409 and 413 (never Powertools' 422, which this API does not send), and bearer authentication.
- A known path called with a method it does not serve is a 405 with `Allow`, not a 404.

- The request being resolved lives on the resolver instance. Powertools keeps `current_event` and
  `lambda_context` on its `BaseRouter` *class*, shared by every resolver in the process: harmless in
  Lambda (one event at a time), but in the threaded local server one request would read another's
  event (another project's key, body, headers).

A resolver still keeps one request at a time on itself (`current_event`, `context`): the local server
builds one per worker thread, and Lambda runs one event at a time per container.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from typing import Any

import orjson
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from aws_lambda_powertools.event_handler.middlewares.openapi_validation import (
    OpenAPIRequestValidationMiddleware,
)
from aws_lambda_powertools.event_handler.openapi.models import OpenAPI
from aws_lambda_powertools.event_handler.openapi.params import File, Form, UploadFile

from batch_api.config import Settings
from batch_api.contract import limits
from batch_api.contract.errors import InvalidRequest, PayloadTooLarge
from batch_api.contract.wire import ErrorEnvelope
from batch_api.handlers.multipart import parse_multipart
from batch_api.service import uploads

Guard = Callable[[APIGatewayRestResolver], None]

_ERROR_CONTENT = {"application/json": {"model": ErrorEnvelope}}


def error_responses(*statuses: int) -> dict[int, Any]:
    """OpenAPI `responses` entries for the error statuses a route can answer, in the OpenAI envelope."""
    descriptions = {
        400: "Invalid request: the parameter and the problem are in the error.",
        401: "Missing or unknown API key.",
        404: "No such object in the caller's project (or no such route).",
        405: "The path exists but not with this method (see `Allow`).",
        409: "The object's state does not allow this; retrying will not help (`x-should-retry: false`).",
        413: "The request body is over the limit; the message names a part size that fits.",
        500: "A server error.",
    }
    return {status: {"description": descriptions[status], "content": _ERROR_CONTENT} for status in statuses}


class _GuardedValidation(OpenAPIRequestValidationMiddleware):
    """Powertools' request validation, after the guards, over bodies parsed our way."""

    def __init__(self, settings: Settings, guards: list[Guard]) -> None:
        super().__init__()
        self._settings = settings
        self._guards = guards

    def handler(self, app: APIGatewayRestResolver, next_middleware: NextMiddleware) -> Response[Any]:  # type: ignore[override]
        for guard in self._guards:
            guard(app)
        return super().handler(app, next_middleware)  # type: ignore[arg-type]

    def _get_body(self, app: Any) -> dict[str, Any]:
        route = app.context["_route"]
        params = route.dependant.body_params
        file_fields = {f.alias for f in params if isinstance(f.field_info, File)}
        if any(isinstance(f.field_info, Form) for f in params):
            # the field carrying the bulk names the 413: `data` for upload parts, else `file`
            bulk = next(iter(sorted(file_fields)), "file")
            data = body_bytes(app, self._settings, bulk)
            form = parse_multipart(data, app.current_event.headers.get("content-type"))
            values: dict[str, Any] = {}
            for part in form.parts:
                if part.name in values:
                    continue  # the first part of a name wins
                if part.name in file_fields:
                    # a view into the body, not a copy (a part can be 64 MiB)
                    values[part.name] = UploadFile(
                        content=part.data,  # type: ignore[arg-type]  # bytes-like is all it is used as
                        filename=part.filename,
                        content_type=part.content_type,
                    )
                else:
                    values[part.name] = part.text()
            return values
        raw = body_bytes(app, self._settings, None)
        try:
            value = orjson.loads(raw) if raw.strip() else {}
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(
                "We could not parse the JSON body of your request. The API expects a JSON payload, "
                "but what was sent was not valid JSON."
            ) from exc
        if not isinstance(value, dict):
            raise InvalidRequest("The JSON body of the request must be an object.", code="invalid_type")
        return value


def suggested_part_size(settings: Settings) -> int:
    """A part size that fits one request to this deployment (whole MiB when it can be)."""
    return limits.part_size_for(settings.max_request_bytes, uploads.MAX_PART_BYTES)


def too_large(settings: Settings, size: int | None, param: str | None) -> PayloadTooLarge:
    """413 for a body over `max_request_bytes`; `param` is the form field that carried the bulk."""
    message = limits.too_large_message(settings.max_request_bytes, suggested_part_size(settings), size)
    return PayloadTooLarge(message, param=param)


def body_bytes(app: Any, settings: Settings, param: str | None) -> bytes:
    """The raw request body: handed over as bytes by the local server (`raw_body`), else from the
    event, base64 or not. A body over `max_request_bytes` is refused before it is decoded (413 naming
    `param`, the form field that carried the bulk)."""
    limit = settings.max_request_bytes
    raw: bytes | None = getattr(app, "raw_body", None)
    if raw is not None:
        if len(raw) > limit:
            raise too_large(settings, len(raw), param)
        return raw
    event = app.current_event
    body = event.body or ""
    if event.is_base64_encoded:
        if len(body) > limits.base64_length(limit):
            raise too_large(settings, len(body) // 4 * 3 - body[-2:].count("="), param)
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest("The request body is not valid base64.") from exc
    else:
        data = body.encode("utf-8", "surrogateescape")
    if len(data) > limit:
        raise too_large(settings, len(data), param)
    return data


class BatchApiResolver(APIGatewayRestResolver):
    """The API's resolver: validation on, guards first, our body parsing, an honest OpenAPI document."""

    def __init__(self, settings: Settings, *, guards: list[Guard], openapi: dict[str, Any]) -> None:
        """`openapi`: the document's title, version, description, security schemes and security."""
        super().__init__(enable_validation=True)
        self._openapi_options = openapi
        # Powertools puts request validation first in every route's middleware stack
        self._request_validation_middleware = _GuardedValidation(settings, guards)
        self._openapi: dict[str, Any] | None = None
        self.raw_body: bytes | None = None

    @property  # type: ignore[override]
    def current_event(self) -> Any:
        return self.__dict__["_current_event"]

    @current_event.setter
    def current_event(self, value: Any) -> None:
        self.__dict__["_current_event"] = value

    @property  # type: ignore[override]
    def lambda_context(self) -> Any:
        return self.__dict__.get("_lambda_context")

    @lambda_context.setter
    def lambda_context(self, value: Any) -> None:
        self.__dict__["_lambda_context"] = value

    def resolve(self, event: Any, context: Any, raw_body: bytes | None = None) -> dict[str, Any]:
        """Resolve one event, kept on this instance (see the module docstring). HEAD is answered as GET
        without the body, as HTTP asks of every GET route. `raw_body`: the request's body as bytes, in
        place of the event's (the local server: no base64 round trip of a 64 MiB part)."""
        head = event.get("httpMethod") == "HEAD"
        if head:
            event = {**event, "httpMethod": "GET"}
        self.current_event = self._to_proxy_event(event)
        self.lambda_context = context
        self.raw_body = raw_body
        try:
            response = super().resolve(event, context)
        finally:
            self.__dict__.pop("_current_event", None)
            self.__dict__.pop("_lambda_context", None)
            self.raw_body = None
        if head:
            return {**response, "body": "", "isBase64Encoded": False}
        return response

    def allowed_methods(self, path: str) -> list[str]:
        """The methods the routes matching `path` serve (empty: no route has this path)."""
        methods = {
            route.method for route in self._static_routes + self._dynamic_routes if route.rule.match(path)
        }
        if "GET" in methods:
            methods.add("HEAD")
        return sorted(methods)

    def base_path(self) -> str:
        """The stage prefix of the path this request came in on ("" locally and on a custom domain)."""
        return self._get_base_path()

    def get_openapi_schema(self, **kwargs: Any) -> OpenAPI:
        """Powertools' document, with the options given at construction, without the 422 answers it adds
        for validated routes (this API answers a 400 in the OpenAI envelope instead). Generated once per
        resolver; only `servers` (the stage prefix of the request) varies."""
        if self._openapi is None:
            generated = super().get_openapi_schema(**self._openapi_options)
            document = generated.model_dump(by_alias=True, exclude_none=True)
            for operations in document.get("paths", {}).values():
                for operation in operations.values():
                    if isinstance(operation, dict):
                        responses = operation.get("responses", {})
                        for key in ("422", 422):
                            responses.pop(key, None)
            schemas = document.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError", "ResponseValidationError"):
                schemas.pop(name, None)
            self._openapi = document
        servers = kwargs.get("servers")
        document = dict(self._openapi)
        if servers:
            document["servers"] = [server.model_dump(by_alias=True, exclude_none=True) for server in servers]
        return OpenAPI.model_validate(document)
