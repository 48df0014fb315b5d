"""The API handler: every route of the Files, Uploads and Batches APIs on one Powertools resolver.

Routes are typed (path, query, header, JSON and form parameters, the wire model they answer with), so
Powertools validates them and generates the OpenAPI document served at `/openapi.json` (Swagger UI at
`/docs`). Each route calls one use case and returns its wire object. Errors are raised, never answered
here: `handlers/errors.py` turns them into the OpenAI envelope. The same resolver serves API Gateway
(REST, v1 proxy events) and the local server, which builds the same events.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, cast

from aws_lambda_powertools.event_handler import APIGatewayRestResolver, Response, content_types
from aws_lambda_powertools.event_handler.openapi.models import HTTPBearer, Server
from aws_lambda_powertools.event_handler.openapi.params import File, Form, Header, Query, UploadFile
from aws_lambda_powertools.utilities.typing import LambdaContext
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from batch_api.contract.errors import NotFound
from batch_api.contract.models import (
    ENDPOINTS,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    OUTPUT_EXPIRES_MAX,
    OUTPUT_EXPIRES_MIN,
    UPLOADABLE_PURPOSES,
    FileRecord,
)
from batch_api.contract.wire import (
    BatchList,
    BatchObject,
    FileDeleted,
    FileLink,
    FileList,
    FileObject,
    Health,
    UploadObject,
    UploadPartObject,
)
from batch_api.deps import Deps
from batch_api.handlers.auth import KeysProvider, authenticate
from batch_api.handlers.console import PATHS as CONSOLE_PATHS
from batch_api.handlers.console import register_console_routes
from batch_api.handlers.errors import register_error_handlers
from batch_api.handlers.resolver import BatchApiResolver, error_responses
from batch_api.service import batches, files, uploads

PUBLIC_PATHS = frozenset({"/health", "/openapi.json", "/docs"}) | CONSOLE_PATHS  # the console asks for a key
# a large download's link lives 30 minutes (the SDK follows it at once); on AWS it is signed with a role
# assumed for an hour (adapters/aws/links.py), so each session signs half an hour of links
MAX_DOWNLOAD_URL_SECONDS = 1800
TITLE = "batch-api: an OpenAI-compatible Batch API"
DESCRIPTION = (
    "The Files, Uploads and Batches APIs of OpenAI, as the official `openai` SDK uses them. Every request "
    "of a batch runs against the model server this deployment is configured with. Every error is the "
    'OpenAI envelope `{"error": {"message", "type", "param", "code"}}`.'
)
SECURITY_SCHEMES = {
    "bearerAuth": HTTPBearer(description="An API key of this deployment; each key is a project.")
}


def _package_version() -> str:
    try:
        return version("batch-api")
    except PackageNotFoundError:  # the Lambda asset carries the package without its metadata
        return "0"


# ---------------------------------------------------------------- JSON request bodies


class _Body(BaseModel):
    """JSON request bodies: unknown fields ignored (the SDK may send newer ones), types strict. Allowed
    values are documented in the schema and checked by the use cases, which word the errors as OpenAI."""

    model_config = ConfigDict(extra="ignore", strict=True)


def _nullable(schema: dict[str, Any]) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [schema, {"type": "null"}]})


EXPIRES_AFTER_SCHEMA = {
    "type": "object",
    "properties": {
        "anchor": {"type": "string", "enum": ["created_at"]},
        "seconds": {"type": "integer", "minimum": OUTPUT_EXPIRES_MIN, "maximum": OUTPUT_EXPIRES_MAX},
    },
    "required": ["anchor", "seconds"],
}
METADATA_SCHEMA = {
    "type": "object",
    "maxProperties": MAX_METADATA_PAIRS,
    "propertyNames": {"maxLength": MAX_METADATA_KEY},
    "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
}


class CreateUploadBody(_Body):
    bytes: int = Field(description="The size of the whole file.", json_schema_extra={"minimum": 0})
    filename: str = Field(json_schema_extra={"minLength": 1})
    mime_type: str = Field(description="Must suit the purpose: application/jsonl for `batch`.")
    purpose: str = Field(json_schema_extra={"enum": list(UPLOADABLE_PURPOSES)})
    expires_after: Annotated[dict[str, Any] | None, _nullable(EXPIRES_AFTER_SCHEMA)] = None


class CompleteUploadBody(_Body):
    part_ids: list[str] = Field(description="The parts, in the order they make up the file.")
    md5: str | None = Field(default=None, description="The md5 of the whole file, checked if given.")


class CreateBatchBody(_Body):
    input_file_id: str
    endpoint: str = Field(json_schema_extra={"enum": list(ENDPOINTS)})
    completion_window: str = Field(json_schema_extra={"enum": ["24h"]})
    metadata: Annotated[dict[str, Any] | None, _nullable(METADATA_SCHEMA)] = None
    output_expires_after: Annotated[dict[str, Any] | None, _nullable(EXPIRES_AFTER_SCHEMA)] = None


# ---------------------------------------------------------------- the app


def create_app(deps: Deps, api_keys: KeysProvider | None = None) -> APIGatewayRestResolver:
    """A resolver with every route. It serves one request at a time (see `handlers/resolver.py`).

    `api_keys` gives the client keys at each request (on AWS: a cached read of the secret, so keys
    rotate without a new resolver); by default the settings' keys."""
    settings = deps.settings
    keys: KeysProvider = api_keys if api_keys is not None else lambda: settings.api_keys

    def authenticate_caller(app: APIGatewayRestResolver) -> None:
        if app.current_event.path not in PUBLIC_PATHS:
            app.append_context(project_id=authenticate(app.current_event.headers, keys()))

    app = BatchApiResolver(settings, guards=[authenticate_caller], openapi=_openapi_options())
    register_error_handlers(app)

    def project() -> str:
        return str(app.context["project_id"])

    _public_routes(app)
    _file_routes(app, deps, project)
    _upload_routes(app, deps, project)
    _batch_routes(app, deps, project)
    return app


def _openapi_options() -> dict[str, Any]:
    return {
        "title": TITLE,
        "version": _package_version(),
        "description": DESCRIPTION,
        "security_schemes": SECURITY_SCHEMES,
        "security": [{"bearerAuth": []}],
    }


def _public_routes(app: BatchApiResolver) -> None:
    @app.get("/health", include_in_schema=False)
    def health() -> Health:
        return Health()

    @app.get("/openapi.json", include_in_schema=False)
    def openapi_document():  # no return type: Powertools would validate and re-encode the body
        document = app.get_openapi_schema(servers=[Server(url=app.base_path() or "/")])
        return Response(
            status_code=200,
            content_type=content_types.APPLICATION_JSON,
            body=document.model_dump_json(by_alias=True, exclude_none=True),
        )

    app.enable_swagger(path="/docs", persist_authorization=True, title=TITLE)
    register_console_routes(app)  # the web console's static files (handlers/console.py)


def _file_routes(app: BatchApiResolver, deps: Deps, project: Any) -> None:
    """The Files routes. A route table: long only because each route declares its OpenAPI
    parameters and answers; every handler is a few lines that call the service."""
    settings = deps.settings

    @app.post(
        "/v1/files",
        summary="Upload a file",
        tags=["Files"],
        operation_id="createFile",
        responses={200: {"description": "The File object."}, **error_responses(400, 401, 413, 500)},
    )
    def create_file(
        file: Annotated[UploadFile, File(description="The file. For `batch`: a .jsonl file of requests.")],
        purpose: Annotated[str, Form(json_schema_extra={"enum": list(UPLOADABLE_PURPOSES)})],
        expires_after_anchor: Annotated[
            str | None, Form(alias="expires_after[anchor]", json_schema_extra={"enum": ["created_at"]})
        ] = None,
        expires_after_seconds: Annotated[
            int | None,
            Form(
                alias="expires_after[seconds]",
                json_schema_extra={"minimum": OUTPUT_EXPIRES_MIN, "maximum": OUTPUT_EXPIRES_MAX},
            ),
        ] = None,
    ) -> FileObject:
        expires_after: dict[str, Any] | None = None
        if expires_after_anchor is not None or expires_after_seconds is not None:
            expires_after = {"anchor": expires_after_anchor, "seconds": expires_after_seconds}
        record = files.create_file(
            deps, project(), file.filename or "file", purpose, file.content, expires_after
        )
        return record.to_wire()

    @app.get(
        "/v1/files",
        summary="List files",
        tags=["Files"],
        operation_id="listFiles",
        responses={200: {"description": "A page of File objects."}, **error_responses(400, 401, 500)},
    )
    def list_files(
        purpose: Annotated[str | None, Query()] = None,
        order: Annotated[str, Query(json_schema_extra={"enum": list(files.FILE_ORDERS)})] = "desc",
        limit: Annotated[
            int,
            Query(json_schema_extra={"minimum": 1, "maximum": files.FILE_LIST_MAX_LIMIT}),
        ] = files.FILE_LIST_MAX_LIMIT,
        after: Annotated[str | None, Query(description="A file id: the page starts after it.")] = None,
    ) -> FileList:
        records, has_more = files.list_files(
            deps, project(), purpose=purpose or None, order=order, limit=limit, after=after or None
        )
        return FileList(
            data=[record.to_wire() for record in records],
            first_id=records[0].id if records else None,
            last_id=records[-1].id if records else None,
            has_more=has_more,
        )

    @app.get(
        "/v1/files/<file_id>",
        summary="Retrieve a file",
        tags=["Files"],
        operation_id="retrieveFile",
        responses={200: {"description": "The File object."}, **error_responses(401, 404, 500)},
    )
    def retrieve_file(file_id: str) -> FileObject:
        return files.retrieve_file(deps, project(), file_id).to_wire()

    @app.delete(
        "/v1/files/<file_id>",
        summary="Delete a file",
        tags=["Files"],
        operation_id="deleteFile",
        responses={200: {"description": "The file is deleted."}, **error_responses(401, 404, 500)},
    )
    def delete_file(file_id: str) -> FileDeleted:
        return files.delete_file(deps, project(), file_id)

    @app.get(
        "/v1/files/<file_id>/content",
        summary="Download a file's content",
        tags=["Files"],
        operation_id="downloadFile",
        responses={
            200: {
                "description": "The file's bytes.",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            },
            302: {
                "description": "A large file: a signed link to its bytes, valid for at most 30 minutes.",
                "headers": {"Location": {"schema": {"type": "string"}}},
            },
            **error_responses(401, 404, 500),
        },
    )
    def file_content(file_id: str):  # no return type: Powertools would re-encode the bytes as text
        record, blob_key = files.file_content(deps, project(), file_id)
        if record.bytes > settings.max_inline_download_bytes:
            link = _signed_link(deps, record, blob_key)
            if link is not None:
                return Response(status_code=302, headers={"Location": link.url}, body="")
        return Response(
            status_code=200,
            content_type="application/octet-stream",
            body=files.read_content(deps, project(), record),
        )

    @app.get(
        "/v1/files/<file_id>/link",
        summary="Get a signed link to a file's content (not in OpenAI's API)",
        description=(
            "A link any client can GET without credentials for a while, whatever the file's size: what "
            "`/content` redirects large files to. For clients that cannot follow that redirect (a web page "
            "kept to its own origin). 404 with code `link_unavailable` where the storage signs no links."
        ),
        tags=["Files"],
        operation_id="getFileLink",
        responses={200: {"description": "The signed link."}, **error_responses(401, 404, 500)},
    )
    def file_link(file_id: str) -> FileLink:
        record, blob_key = files.file_content(deps, project(), file_id)
        link = _signed_link(deps, record, blob_key)
        if link is None:
            raise NotFound(
                f"This deployment signs no links: download {file_id} from /v1/files/{file_id}/content.",
                param="id",
                code="link_unavailable",
            )
        return link


def _signed_link(deps: Deps, record: FileRecord, blob_key: str) -> FileLink | None:
    """A signed link to the file's body, valid for MAX_DOWNLOAD_URL_SECONDS or until the file expires if
    sooner; None when the storage signs no links."""
    lifetime = MAX_DOWNLOAD_URL_SECONDS
    if record.expires_at is not None:
        lifetime = max(1, min(lifetime, record.expires_at - deps.now()))
    url = deps.blobs.download_url(blob_key, filename=record.filename, expires_in=lifetime)
    if url is None:
        return None
    return FileLink(
        id=record.id, url=url, expires_at=deps.now() + lifetime, filename=record.filename, bytes=record.bytes
    )


def _upload_routes(app: BatchApiResolver, deps: Deps, project: Any) -> None:
    """The Uploads routes. A route table: long only because each route declares its OpenAPI
    parameters and answers; every handler is a few lines that call the service."""

    @app.post(
        "/v1/uploads",
        summary="Create an upload",
        tags=["Uploads"],
        operation_id="createUpload",
        responses={200: {"description": "The pending Upload."}, **error_responses(400, 401, 413, 500)},
    )
    def create_upload(body: CreateUploadBody) -> UploadObject:
        upload = uploads.create_upload(
            deps, project(), body.filename, body.purpose, body.bytes, body.mime_type, body.expires_after
        )
        return uploads.upload_wire(deps, project(), upload)

    @app.post(
        "/v1/uploads/<upload_id>/parts",
        summary="Add a part to an upload",
        tags=["Uploads"],
        operation_id="addUploadPart",
        responses={200: {"description": "The Part."}, **error_responses(400, 401, 404, 413, 500)},
    )
    def add_upload_part(
        upload_id: str, data: Annotated[UploadFile, File(description="The part's bytes (at most 64 MB).")]
    ) -> UploadPartObject:
        return uploads.add_part(deps, project(), upload_id, data.content).to_wire()

    @app.post(
        "/v1/uploads/<upload_id>/complete",
        summary="Complete an upload",
        tags=["Uploads"],
        operation_id="completeUpload",
        responses={
            200: {"description": "The completed Upload with its File."},
            **error_responses(400, 401, 404, 413, 500),
        },
    )
    def complete_upload(upload_id: str, body: CompleteUploadBody) -> UploadObject:
        upload, file = uploads.complete_upload(deps, project(), upload_id, body.part_ids, body.md5)
        return uploads.upload_wire(deps, project(), upload, file)

    @app.post(
        "/v1/uploads/<upload_id>/cancel",
        summary="Cancel an upload",
        tags=["Uploads"],
        operation_id="cancelUpload",
        responses={200: {"description": "The cancelled Upload."}, **error_responses(400, 401, 404, 500)},
    )
    def cancel_upload(upload_id: str) -> UploadObject:
        return uploads.upload_wire(deps, project(), uploads.cancel_upload(deps, project(), upload_id))


def _batch_routes(app: BatchApiResolver, deps: Deps, project: Any) -> None:
    """The Batches routes. A route table: long only because each route declares its OpenAPI
    parameters and answers; every handler is a few lines that call the service."""

    @app.post(
        "/v1/batches",
        summary="Create a batch",
        tags=["Batches"],
        operation_id="createBatch",
        responses={
            200: {"description": "The Batch, validating."},
            **error_responses(400, 401, 409, 413, 500),
        },
    )
    def create_batch(
        body: CreateBatchBody,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="Replays of a request with this key within 24 hours return the same batch.",
            ),
        ] = None,
    ) -> BatchObject:
        batch = batches.create_batch(
            deps,
            project(),
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            metadata=body.metadata,
            output_expires_after=body.output_expires_after,
            idempotency_key=idempotency_key,
        )
        return batch.to_wire()

    @app.get(
        "/v1/batches",
        summary="List batches",
        tags=["Batches"],
        operation_id="listBatches",
        responses={
            200: {"description": "A page of Batches, newest first."},
            **error_responses(400, 401, 500),
        },
    )
    def list_batches(
        after: Annotated[str | None, Query(description="A batch id: the page starts after it.")] = None,
        limit: Annotated[
            int, Query(json_schema_extra={"minimum": 1, "maximum": batches.BATCH_LIST_MAX_LIMIT})
        ] = batches.BATCH_LIST_DEFAULT_LIMIT,
    ) -> BatchList:
        records, has_more = batches.list_batches(deps, project(), after=after or None, limit=limit)
        return BatchList(
            data=[record.to_wire() for record in records],
            first_id=records[0].id if records else None,
            last_id=records[-1].id if records else None,
            has_more=has_more,
        )

    @app.get(
        "/v1/batches/<batch_id>",
        summary="Retrieve a batch",
        tags=["Batches"],
        operation_id="retrieveBatch",
        responses={200: {"description": "The Batch."}, **error_responses(401, 404, 500)},
    )
    def retrieve_batch(batch_id: str) -> BatchObject:
        return batches.retrieve_batch(deps, project(), batch_id).to_wire()

    @app.post(
        "/v1/batches/<batch_id>/cancel",
        summary="Cancel a batch",
        tags=["Batches"],
        operation_id="cancelBatch",
        responses={
            200: {"description": "The Batch, cancelling (or already cancelled)."},
            **error_responses(401, 404, 409, 500),
        },
    )
    def cancel_batch(batch_id: str) -> BatchObject:
        return batches.cancel_batch(deps, project(), batch_id).to_wire()


def handle(
    app: APIGatewayRestResolver,
    event: dict[str, Any],
    context: LambdaContext,
    raw_body: bytes | None = None,
) -> dict[str, Any]:
    """Resolve one API Gateway (REST, v1 proxy) event into its proxy response, with the request id in
    `x-request-id` as OpenAI sends it (the SDK exposes it as `_request_id`; quote it when asking why).
    `raw_body`: the body as bytes instead of the event's (the local server; see `resolver.py`)."""
    if raw_body is not None:
        response = cast(BatchApiResolver, app).resolve(event, context, raw_body)
    else:
        response = app.resolve(event, context)
    request_id = (event.get("requestContext") or {}).get("requestId")
    if request_id:
        headers = response.get("multiValueHeaders") or {}
        headers["x-request-id"] = [str(request_id)]
        response["multiValueHeaders"] = headers
    return response
