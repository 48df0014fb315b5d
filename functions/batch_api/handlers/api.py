"""The API handler: every route of the Files, Uploads and Batches APIs on one Powertools resolver.

Each route parses its input, calls one use case and shapes the answer. Errors are raised, never
answered here: `handlers/errors.py` turns them into the OpenAI envelope. The same resolver serves
API Gateway (REST, v1 proxy events) and the local server, which builds the same events.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import orjson
from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response
from aws_lambda_powertools.event_handler.middlewares import NextMiddleware
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict

from batch_api.config import Settings
from batch_api.contract.errors import InvalidRequest, PayloadTooLarge
from batch_api.contract.models import list_page
from batch_api.deps import Deps
from batch_api.handlers.auth import authenticate
from batch_api.handlers.errors import register_error_handlers
from batch_api.handlers.multipart import MultipartForm, Part, parse_multipart
from batch_api.service import batches, files, uploads

PUBLIC_PATHS = frozenset({"/health"})
MAX_DOWNLOAD_URL_SECONDS = 3600
_MIB = 1024 * 1024
_MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around a part


# ---------------------------------------------------------------- request bodies


class _Body(BaseModel):
    """JSON request bodies: unknown fields ignored (the SDK may send newer ones), types strict."""

    model_config = ConfigDict(extra="ignore", strict=True)


class CreateUploadBody(_Body):
    bytes: int
    filename: str
    mime_type: str
    purpose: str
    expires_after: dict[str, Any] | None = None


class CompleteUploadBody(_Body):
    part_ids: list[str]
    md5: str | None = None


class CreateBatchBody(_Body):
    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, Any] | None = None
    output_expires_after: dict[str, Any] | None = None


# ---------------------------------------------------------------- parsing helpers


def suggested_part_size(settings: Settings) -> int:
    """A part size that fits one request to this deployment (whole MiB when it can be)."""
    size = min(uploads.MAX_PART_BYTES, settings.max_request_bytes - _MULTIPART_OVERHEAD)
    if size >= _MIB:
        return size // _MIB * _MIB
    return max(size, 1)


def _too_large(settings: Settings, size: int | None, param: str = "file") -> PayloadTooLarge:
    """413 for a body over `max_request_bytes`; `param` is the form field that carried the bulk."""
    got = f"of {size} bytes " if size is not None else ""
    part_size = suggested_part_size(settings)
    if param == "data":  # an upload part: the remedy is smaller parts
        remedy = f"Send smaller Parts, e.g. upload_file_chunked(..., part_size={part_size})."
    else:
        remedy = (
            "Upload larger files with the Uploads API in parts, e.g. "
            f"client.uploads.upload_file_chunked(file=..., mime_type=..., purpose=..., part_size={part_size})."
        )
    return PayloadTooLarge(
        f"The request body {got}exceeds this endpoint's limit of {settings.max_request_bytes} bytes. {remedy}",
        param=param,
    )


def request_bytes(
    app: APIGatewayRestResolver,
    limit: int | None = None,
    settings: Settings | None = None,
    param: str = "file",
) -> bytes:
    """The raw request body; base64 or not. Bodies over `limit` are refused before decoding (413 naming
    `param`)."""
    event = app.current_event
    body = event.body or ""
    if event.is_base64_encoded:
        if limit is not None and settings is not None and len(body) > (limit + 2) // 3 * 4:
            raise _too_large(settings, len(body) * 3 // 4, param)
        try:
            data = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise InvalidRequest("The request body is not valid base64.") from exc
    else:
        data = body.encode("utf-8", "surrogateescape")
    if limit is not None and settings is not None and len(data) > limit:
        raise _too_large(settings, len(data), param)
    return data


def json_body(app: APIGatewayRestResolver, model: type[_Body]) -> Any:
    raw = request_bytes(app)
    try:
        value = orjson.loads(raw) if raw.strip() else {}
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            "We could not parse the JSON body of your request. The API expects a JSON payload, "
            "but what was sent was not valid JSON."
        ) from exc
    if not isinstance(value, dict):
        raise InvalidRequest("The JSON body of the request must be an object.", code="invalid_type")
    return model.model_validate(value)


def multipart_body(app: APIGatewayRestResolver, settings: Settings, param: str = "file") -> MultipartForm:
    """The parsed form; `param` names the field a 413 points at (`file`, or `data` for upload parts)."""
    data = request_bytes(app, settings.max_request_bytes, settings, param)
    return parse_multipart(data, app.current_event.headers.get("content-type"))


def query_int(app: APIGatewayRestResolver, name: str, default: int) -> int:
    raw = app.current_event.query_string_parameters.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise InvalidRequest(
            f"Invalid value for '{name}': {raw!r} is not an integer.", param=name, code="invalid_type"
        ) from exc


def query_str(app: APIGatewayRestResolver, name: str) -> str | None:
    value = app.current_event.query_string_parameters.get(name)
    return value or None


def _form_expires_after(form: MultipartForm) -> dict[str, Any] | None:
    """The SDK sends `expires_after` as the form fields `expires_after[anchor]` / `expires_after[seconds]`."""
    anchor = form.field("expires_after[anchor]")
    seconds = form.field("expires_after[seconds]")
    if anchor is None and seconds is None:
        return None
    policy: dict[str, Any] = {"anchor": anchor}
    if seconds is not None:
        try:
            policy["seconds"] = int(seconds)
        except ValueError as exc:
            raise InvalidRequest(
                f"Invalid value for 'expires_after.seconds': {seconds!r} is not an integer.",
                param="expires_after.seconds",
                code="invalid_type",
            ) from exc
    return policy


def _required_part(form: MultipartForm, name: str) -> Part:
    part = form.get(name)
    if part is None:
        raise InvalidRequest(
            f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
        )
    return part


# ---------------------------------------------------------------- the app


def create_app(deps: Deps) -> APIGatewayRestResolver:
    app = APIGatewayRestResolver()
    register_error_handlers(app)
    settings = deps.settings

    def authenticate_caller(app: APIGatewayRestResolver, next_middleware: NextMiddleware) -> Response[Any]:
        if app.current_event.path not in PUBLIC_PATHS:
            app.append_context(project_id=authenticate(app.current_event.headers, settings))
        return next_middleware(app)

    app.use(middlewares=[authenticate_caller])

    def project() -> str:
        return str(app.context["project_id"])

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok"}

    # ------------------------------------------------------------ files

    @app.post("/v1/files")
    def create_file() -> dict[str, Any]:
        form = multipart_body(app, settings)
        purpose = form.field("purpose")
        if purpose is None:
            raise InvalidRequest(
                "Missing required parameter: 'purpose'.", param="purpose", code="missing_required_parameter"
            )
        file_part = _required_part(form, "file")
        record = files.create_file(
            deps,
            project(),
            file_part.filename or "file",
            purpose,
            bytes(file_part.data),
            _form_expires_after(form),
        )
        return record.to_wire()

    @app.get("/v1/files")
    def list_files() -> dict[str, Any]:
        records, has_more = files.list_files(
            deps,
            project(),
            purpose=query_str(app, "purpose"),
            order=query_str(app, "order") or "desc",
            limit=query_int(app, "limit", files.FILE_LIST_MAX_LIMIT),
            after=query_str(app, "after"),
        )
        return list_page([record.to_wire() for record in records], has_more)

    @app.get("/v1/files/<file_id>")
    def retrieve_file(file_id: str) -> dict[str, Any]:
        return files.retrieve_file(deps, project(), file_id).to_wire()

    @app.delete("/v1/files/<file_id>")
    def delete_file(file_id: str) -> dict[str, Any]:
        return files.delete_file(deps, project(), file_id)

    @app.get("/v1/files/<file_id>/content")
    def file_content(file_id: str) -> Response[Any]:
        record, blob_key = files.file_content(deps, project(), file_id)
        if record.bytes > settings.max_inline_download_bytes:
            lifetime = MAX_DOWNLOAD_URL_SECONDS
            if record.expires_at is not None:
                lifetime = max(1, min(lifetime, record.expires_at - deps.now()))
            url = deps.blobs.download_url(blob_key, filename=record.filename, expires_in=lifetime)
            if url is not None:
                return Response(status_code=302, headers={"Location": url}, body="")
        return Response(
            status_code=200,
            content_type="application/octet-stream",
            body=deps.blobs.get(blob_key),
        )

    # ------------------------------------------------------------ uploads

    @app.post("/v1/uploads")
    def create_upload() -> dict[str, Any]:
        body = json_body(app, CreateUploadBody)
        upload = uploads.create_upload(
            deps, project(), body.filename, body.purpose, body.bytes, body.mime_type, body.expires_after
        )
        return uploads.upload_wire(deps, project(), upload)

    @app.post("/v1/uploads/<upload_id>/parts")
    def add_upload_part(upload_id: str) -> dict[str, Any]:
        form = multipart_body(app, settings, "data")
        return uploads.add_part(
            deps, project(), upload_id, bytes(_required_part(form, "data").data)
        ).to_wire()

    @app.post("/v1/uploads/<upload_id>/complete")
    def complete_upload(upload_id: str) -> dict[str, Any]:
        body = json_body(app, CompleteUploadBody)
        upload, file = uploads.complete_upload(deps, project(), upload_id, body.part_ids, body.md5)
        return uploads.upload_wire(deps, project(), upload, file)

    @app.post("/v1/uploads/<upload_id>/cancel")
    def cancel_upload(upload_id: str) -> dict[str, Any]:
        return uploads.upload_wire(deps, project(), uploads.cancel_upload(deps, project(), upload_id))

    # ------------------------------------------------------------ batches

    @app.post("/v1/batches")
    def create_batch() -> dict[str, Any]:
        body = json_body(app, CreateBatchBody)
        batch = batches.create_batch(
            deps,
            project(),
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after=body.output_expires_after,
            idempotency_key=app.current_event.headers.get("idempotency-key"),
        )
        return batch.to_wire()

    @app.get("/v1/batches")
    def list_batches() -> dict[str, Any]:
        records, has_more = batches.list_batches(
            deps,
            project(),
            after=query_str(app, "after"),
            limit=query_int(app, "limit", batches.BATCH_LIST_DEFAULT_LIMIT),
        )
        return list_page([record.to_wire() for record in records], has_more)

    @app.get("/v1/batches/<batch_id>")
    def retrieve_batch(batch_id: str) -> dict[str, Any]:
        return batches.retrieve_batch(deps, project(), batch_id).to_wire()

    @app.post("/v1/batches/<batch_id>/cancel")
    def cancel_batch(batch_id: str) -> dict[str, Any]:
        return batches.cancel_batch(deps, project(), batch_id).to_wire()

    return app


def handle(app: APIGatewayRestResolver, event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Resolve one API Gateway (REST, v1 proxy) event into its proxy response, with the request id in
    `x-request-id` as OpenAI sends it (the SDK exposes it as `_request_id`; quote it when asking why)."""
    response = app.resolve(event, context)
    request_id = (event.get("requestContext") or {}).get("requestId")
    if request_id:
        headers = response.get("multiValueHeaders") or {}
        headers["x-request-id"] = [str(request_id)]
        response["multiValueHeaders"] = headers
    return response
