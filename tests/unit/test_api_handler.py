"""The API handler: sample events from events/api/ through `create_app(...).resolve`, and the real
`openai` SDK driving the same resolver in-process."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import openai
import orjson
import pytest
from openai.types import Batch, FileDeleted, FileObject, Upload
from openai.types.uploads import UploadPart

from batch_api import object_keys
from batch_api.contract import limits
from batch_api.contract.models import BatchRecord, FileRecord, UploadPartRecord, UploadRecord
from batch_api.deps import Deps
from batch_api.handlers import api, resolver
from batch_api.handlers.api import MAX_DOWNLOAD_URL_SECONDS
from batch_api.handlers.auth import project_id_for_key
from batch_api.service import files
from tests.unit.api_events import (
    BATCH_ID,
    INPUT_FILE_ID,
    PART_IDS,
    UPLOAD_ID,
    load_event,
    proxy_event,
    sdk_transport,
)
from tests.unit.builders import T0, FakeClock, make_deps
from tests.unit.conftest import LambdaContext

pytestmark = pytest.mark.unit

INPUT_LINES = b'{"custom_id": "r1"}\n{"custom_id": "r2"}\n'
PARTS = (b'{"a": ', b'"bc"}\n')  # 12 bytes of JSONL, as the sample events say


def seed(deps: Deps, project_id: str = "local") -> None:
    """The objects the sample events name."""
    deps.blobs.put(object_keys.file_key(INPUT_FILE_ID), INPUT_LINES)
    deps.metadata.create_file(
        FileRecord(
            id=INPUT_FILE_ID,
            project_id=project_id,
            bytes=len(INPUT_LINES),
            created_at=T0 - 10,
            expires_at=T0 + 86400,
            filename="in.jsonl",
            purpose="batch",
            blob_key=object_keys.file_key(INPUT_FILE_ID),
        )
    )
    deps.metadata.create_batch(
        BatchRecord(
            id=BATCH_ID,
            project_id=project_id,
            endpoint="/v1/chat/completions",
            input_file_id=INPUT_FILE_ID,
            created_at=T0 - 5,
            expires_at=T0 + 86400,
        )
    )
    deps.metadata.create_upload(
        UploadRecord(
            id=UPLOAD_ID,
            project_id=project_id,
            bytes=sum(map(len, PARTS)),
            created_at=T0,
            expires_at=T0 + 3600,
            filename="big.jsonl",
            purpose="batch",
            mime_type="application/jsonl",
        )
    )
    for part_id, data in zip(PART_IDS, PARTS, strict=True):
        key = object_keys.upload_part_key(UPLOAD_ID, part_id)
        deps.blobs.put(key, data)
        deps.metadata.add_upload_part(
            UploadPartRecord(id=part_id, upload_id=UPLOAD_ID, created_at=T0, bytes=len(data), blob_key=key)
        )


@pytest.fixture
def seeded_deps(deps: Deps) -> Deps:
    seed(deps)
    return deps


class Client:
    """Resolves events against one app and decodes the proxy responses."""

    def __init__(self, deps: Deps, context: LambdaContext) -> None:
        self.deps = deps
        self.app = api.create_app(deps)
        self.context = context

    def __call__(self, event: dict[str, Any]) -> dict[str, Any]:
        return api.handle(self.app, event, self.context)  # type: ignore[arg-type]

    def json(self, event: dict[str, Any], status: int = 200) -> Any:
        result = self(event)
        assert result["statusCode"] == status, result
        assert result["multiValueHeaders"]["Content-Type"] == ["application/json"]
        return orjson.loads(result["body"])

    def error(self, event: dict[str, Any], status: int) -> dict[str, Any]:
        body = self.json(event, status)
        assert set(body) == {"error"}
        assert set(body["error"]) == {"message", "type", "param", "code"}
        error: dict[str, Any] = body["error"]
        return error


@pytest.fixture
def client(seeded_deps: Deps, lambda_context: LambdaContext) -> Client:
    return Client(seeded_deps, lambda_context)


def _with_body(event: dict[str, Any], body: Any, *, base64_encoded: bool = True) -> dict[str, Any]:
    event = copy.deepcopy(event)
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    event["body"] = base64.b64encode(raw).decode() if base64_encoded else raw.decode()
    event["isBase64Encoded"] = base64_encoded
    return event


def _without_header(event: dict[str, Any], name: str) -> dict[str, Any]:
    event = copy.deepcopy(event)
    del event["headers"][name]
    del event["multiValueHeaders"][name]
    return event


def _with_query(event: dict[str, Any], **query: str) -> dict[str, Any]:
    event = copy.deepcopy(event)
    event["queryStringParameters"] = query
    event["multiValueQueryStringParameters"] = {k: [v] for k, v in query.items()}
    return event


def _with_path(event: dict[str, Any], path: str) -> dict[str, Any]:
    event = copy.deepcopy(event)
    event["path"] = path
    event["pathParameters"] = {"proxy": path.lstrip("/")}
    return event


# ---------------------------------------------------------------- health, routing, auth, errors


def test_health_needs_no_key(clock: FakeClock, lambda_context: LambdaContext) -> None:
    client = Client(make_deps(clock=clock, api_keys="sk-a"), lambda_context)
    assert client.json(load_event("health.json")) == {"status": "ok"}


def test_unknown_route_is_a_404_envelope(client: Client) -> None:
    error = client.error(_with_path(load_event("files_list.json"), "/v1/nothing"), 404)
    assert error["message"] == "Invalid URL (GET /v1/nothing)"


def test_keys_scope_projects(clock: FakeClock, lambda_context: LambdaContext) -> None:
    client = Client(make_deps(clock=clock, api_keys="sk-a,sk-b"), lambda_context)
    seed(client.deps, project_id=project_id_for_key("sk-a"))

    def as_key(event: dict[str, Any], key: str | None) -> dict[str, Any]:
        event = copy.deepcopy(event)
        for name in ("headers", "multiValueHeaders"):
            event[name].pop("authorization")
            if key is not None:
                event[name]["Authorization"] = f"Bearer {key}" if name == "headers" else [f"Bearer {key}"]
        return event

    event = load_event("files_retrieve.json")
    assert client.json(as_key(event, "sk-a"))["id"] == INPUT_FILE_ID
    assert client.error(as_key(event, "sk-b"), 404)["message"] == f"No such File object: {INPUT_FILE_ID}"
    assert client.error(as_key(event, "sk-wrong"), 401)["code"] == "invalid_api_key"
    assert client.error(as_key(event, None), 401)["type"] == "invalid_request_error"
    assert client.error(event, 401)  # the sample's sk-test is not one of the keys


def test_unexpected_errors_are_500_without_internals(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(files, "retrieve_file", broken)
    error = client.error(load_event("files_retrieve.json"), 500)
    assert error["type"] == "server_error"
    assert "secret" not in error["message"]


# ---------------------------------------------------------------- files


def test_create_file_from_the_sdks_multipart(client: Client, clock: FakeClock) -> None:
    body = client.json(load_event("files_create.json"))
    file = FileObject.model_validate(body)
    assert (file.purpose, file.filename, file.status) == ("batch", "requests.jsonl", "processed")
    assert file.expires_at == T0 + 86400  # expires_after[seconds] from the form
    assert client.deps.blobs.get(object_keys.file_key(file.id)).startswith(b'{"custom_id": "r1"')
    assert file.bytes == client.deps.blobs.size(object_keys.file_key(file.id))


def test_create_file_too_large_points_at_uploads(clock: FakeClock, lambda_context: LambdaContext) -> None:
    client = Client(make_deps(clock=clock, max_request_bytes=2 * 1024 * 1024), lambda_context)
    event = _with_body(load_event("files_create.json"), b"x" * (2 * 1024 * 1024 + 1))
    error = client.error(event, 413)
    assert "upload_file_chunked" in error["message"]
    assert "part_size=1048576" in error["message"]
    assert resolver.suggested_part_size(client.deps.settings) == 1024 * 1024


def _with_largest_head(event: dict[str, Any]) -> dict[str, Any]:
    """`event` as API Gateway would send it with the request line and headers at its 10,240-byte limit:
    the padding in the user agent (which the event carries three times) and made of quotes (each
    JSON-escaped to two bytes), with every requestContext field API Gateway fills."""
    event = copy.deepcopy(event)
    headers = {k: v for k, v in event["headers"].items() if k != "user-agent"}
    line = f"{event['httpMethod']} {event['path']} HTTP/1.1\r\n"
    used = len(line) + sum(len(f"{k}: {v}\r\n") for k, v in headers.items()) + len("user-agent: \r\n")
    agent = '"' * (limits.GATEWAY_MAX_REQUEST_HEAD_BYTES - used)
    event["headers"] = {**headers, "user-agent": agent}
    event["multiValueHeaders"] = {k: [v] for k, v in event["headers"].items()}
    event["requestContext"] = {
        **event["requestContext"],
        "resourceId": "a1b2c3",
        "resourcePath": "/{proxy+}",
        "extendedRequestId": "c6af9ac6-7b61-11e6-9a41-93e8deadbeefAA=",
        "requestTime": "27/Nov/2026:19:10:55 +0000",
        "requestTimeEpoch": 1795806655000,
        "accountId": "123456789012",
        "protocol": "HTTP/1.1",
        "domainPrefix": "abcdefghij",
        "domainName": "abcdefghij.execute-api.eu-west-1.amazonaws.com",
        "apiId": "abcdefghij",
        "identity": {
            "cognitoIdentityPoolId": None,
            "accountId": None,
            "cognitoIdentityId": None,
            "caller": None,
            "sourceIp": "203.0.113.254",
            "principalOrgId": None,
            "accessKey": None,
            "cognitoAuthenticationType": None,
            "cognitoAuthenticationProvider": None,
            "userArn": None,
            "userAgent": agent,
            "user": None,
        },
    }
    return event


def test_the_part_size_the_413_names_fits_the_lambda_invoke_on_aws(
    clock: FakeClock, lambda_context: LambdaContext
) -> None:
    """With the limit the stack sets: a Part of the suggested size, sent by the SDK with the largest head
    API Gateway lets through, makes an event under Lambda's invoke limit, and the handler takes it."""
    client = Client(
        make_deps(clock=clock, max_request_bytes=limits.proxy_max_request_bytes()), lambda_context
    )
    seed(client.deps)
    part_size = resolver.suggested_part_size(client.deps.settings)
    assert part_size == 4 * 1024 * 1024
    sizes: list[int] = []

    def resolve(event: dict[str, Any]) -> dict[str, Any]:
        event = _with_largest_head(event)
        sizes.append(len(json.dumps(event)))
        return client(event)

    sdk = openai.OpenAI(
        api_key="sk-anything",
        base_url="http://testserver/v1",
        max_retries=0,
        http_client=openai.DefaultHttpxClient(transport=sdk_transport(resolve, [])),
    )
    part = sdk.uploads.parts.create(upload_id=UPLOAD_ID, data=b"\xff" * part_size)
    assert part.upload_id == UPLOAD_ID
    assert client.deps.blobs.size(object_keys.upload_part_key(UPLOAD_ID, part.id)) == part_size
    assert len(sizes) == 1 and sizes[0] <= limits.LAMBDA_SYNC_PAYLOAD_BYTES


def test_a_body_at_the_aws_limit_fits_the_invoke_and_one_byte_more_is_a_final_413(
    clock: FakeClock, lambda_context: LambdaContext
) -> None:
    limit = limits.proxy_max_request_bytes()
    client = Client(make_deps(clock=clock, max_request_bytes=limit), lambda_context)
    at_limit = _with_largest_head(_with_body(load_event("files_create.json"), b"\xff" * limit))
    assert len(json.dumps(at_limit)) <= limits.LAMBDA_SYNC_PAYLOAD_BYTES
    # and not wasteful: even with the largest head under 48 KiB of the invoke is left unused
    assert limits.LAMBDA_SYNC_PAYLOAD_BYTES - len(json.dumps(at_limit)) < 48 * 1024

    result = client(_with_body(load_event("files_create.json"), b"\xff" * (limit + 1)))
    assert result["statusCode"] == 413
    assert result["multiValueHeaders"]["x-should-retry"] == ["false"]  # the same body fails again
    error = orjson.loads(result["body"])["error"]
    assert error["message"] == limits.too_large_message(limit, 4 * 1024 * 1024, limit + 1)
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "file",
        "request_too_large",
    )


def test_a_body_handed_over_as_bytes_reaches_storage_without_a_copy(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local server passes the body beside the event (no base64); the part's bytes reach the
    store as a view into that very buffer: a 64 MiB part is held once (bench/results/memory_200mb.md)."""
    event = load_event("uploads_add_part.json")
    raw = bytearray(base64.b64decode(event["body"]))
    stored: list[Any] = []
    original = client.deps.blobs.put

    def recording_put(key: str, data: Any) -> None:
        stored.append(data)
        original(key, data)

    monkeypatch.setattr(client.deps.blobs, "put", recording_put)
    result = api.handle(client.app, {**event, "body": None, "isBase64Encoded": False}, client.context, raw)  # type: ignore[arg-type]

    assert result["statusCode"] == 200, result
    (data,) = stored
    assert isinstance(data, memoryview) and data.obj is raw
    assert bytes(data) == b"hello world\n"
    assert client.app.raw_body is None  # not kept for the next request on this thread  # type: ignore[attr-defined]


def test_a_body_handed_over_as_bytes_is_held_to_the_limit(
    clock: FakeClock, lambda_context: LambdaContext
) -> None:
    client = Client(make_deps(clock=clock, max_request_bytes=2 * 1024 * 1024), lambda_context)
    event = {**load_event("files_create.json"), "body": None, "isBase64Encoded": False}
    result = api.handle(client.app, event, lambda_context, b"x" * (2 * 1024 * 1024 + 1))  # type: ignore[arg-type]
    assert result["statusCode"] == 413
    assert orjson.loads(result["body"])["error"]["param"] == "file"


def test_too_large_upload_part_names_data(clock: FakeClock, lambda_context: LambdaContext) -> None:
    client = Client(make_deps(clock=clock, max_request_bytes=2 * 1024 * 1024), lambda_context)
    seed(client.deps)
    event = _with_body(load_event("uploads_add_part.json"), b"x" * (2 * 1024 * 1024 + 1))
    error = client.error(event, 413)
    assert error["param"] == "data"
    assert "part_size=1048576" in error["message"]


def test_create_file_needs_purpose_and_file(client: Client) -> None:
    event = load_event("files_create.json")
    boundary = event["headers"]["content-type"].split("boundary=")[1]
    no_purpose = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n\r\n{{}}\r\n'
        f"--{boundary}--\r\n"
    ).encode()
    assert client.error(_with_body(event, no_purpose), 400)["param"] == "purpose"
    no_file = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n--{boundary}--\r\n'
    )
    assert client.error(_with_body(event, no_file.encode()), 400)["param"] == "file"
    assert client.error(_with_body(event, b"not multipart at all"), 400)["type"] == "invalid_request_error"


def test_list_files(client: Client, clock: FakeClock) -> None:
    for i in range(2):
        clock.advance(1)
        files.create_file(client.deps, "local", f"{i}.jsonl", "batch", b"{}\n")
    files.create_file(client.deps, "local", "other.txt", "user_data", b"x")

    page = client.json(load_event("files_list.json"))  # purpose=batch, limit=2, order=asc
    assert page["object"] == "list"
    assert [FileObject.model_validate(f).purpose for f in page["data"]] == ["batch", "batch"]
    assert page["first_id"] == INPUT_FILE_ID
    assert page["last_id"] == page["data"][-1]["id"]
    assert page["has_more"] is True
    rest = client.json(_with_query(load_event("files_list.json"), purpose="batch", after=page["last_id"]))
    assert len(rest["data"]) == 1
    assert rest["has_more"] is False


@pytest.mark.parametrize(
    ("query", "param"),
    [({"limit": "abc"}, "limit"), ({"limit": "0"}, "limit"), ({"order": "sideways"}, "order")],
)
def test_list_files_bad_query(client: Client, query: dict[str, str], param: str) -> None:
    assert client.error(_with_query(load_event("files_list.json"), **query), 400)["param"] == param


def test_retrieve_and_delete_file(client: Client) -> None:
    assert FileObject.model_validate(client.json(load_event("files_retrieve.json"))).id == INPUT_FILE_ID
    deleted = FileDeleted.model_validate(client.json(load_event("files_delete.json")))
    assert (deleted.id, deleted.deleted) == (INPUT_FILE_ID, True)
    assert (
        client.error(load_event("files_retrieve.json"), 404)["message"]
        == f"No such File object: {INPUT_FILE_ID}"
    )
    assert client.error(load_event("files_content.json"), 404)


def test_small_file_content_is_inline(client: Client) -> None:
    result = client(load_event("files_content.json"))
    assert result["statusCode"] == 200
    assert result["isBase64Encoded"] is True
    assert base64.b64decode(result["body"]) == INPUT_LINES
    assert result["multiValueHeaders"]["Content-Type"] == ["application/octet-stream"]


def test_large_file_content_redirects_to_a_short_lived_url(
    client: Client, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    client.deps.settings.max_inline_download_bytes = 4
    calls: list[tuple[str, str, int]] = []

    def download_url(key: str, *, filename: str, expires_in: int) -> str:
        calls.append((key, filename, expires_in))
        return "https://bucket.example/signed"

    monkeypatch.setattr(client.deps.blobs, "download_url", download_url)
    result = client(load_event("files_content.json"))
    assert result["statusCode"] == 302
    assert result["multiValueHeaders"]["Location"] == ["https://bucket.example/signed"]
    assert calls == [(object_keys.file_key(INPUT_FILE_ID), "in.jsonl", MAX_DOWNLOAD_URL_SECONDS)]
    assert MAX_DOWNLOAD_URL_SECONDS == 1800  # half of the signer role's one-hour session

    clock.advance(86400 - 60)  # the file expires in a minute: the link may not outlive it
    client(load_event("files_content.json"))
    assert calls[-1][2] == 60


def test_large_file_without_download_url_is_inline(client: Client) -> None:
    client.deps.settings.max_inline_download_bytes = 4
    assert base64.b64decode(client(load_event("files_content.json"))["body"]) == INPUT_LINES


def _link_event() -> dict[str, Any]:
    return orjson.loads(orjson.dumps(load_event("files_content.json")).replace(b"/content", b"/link"))


def test_a_file_link_is_signed_for_any_size_and_never_outlives_the_file(
    client: Client, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, str, int]] = []

    def download_url(key: str, *, filename: str, expires_in: int) -> str:
        calls.append((key, filename, expires_in))
        return f"https://bucket.example/signed?for={expires_in}"

    monkeypatch.setattr(client.deps.blobs, "download_url", download_url)
    link = client.json(_link_event())  # a small file: /content would answer it inline
    assert link == {
        "id": INPUT_FILE_ID,
        "object": "file.link",
        "url": f"https://bucket.example/signed?for={MAX_DOWNLOAD_URL_SECONDS}",
        "expires_at": T0 + MAX_DOWNLOAD_URL_SECONDS,
        "filename": "in.jsonl",
        "bytes": len(INPUT_LINES),
    }
    assert calls == [(object_keys.file_key(INPUT_FILE_ID), "in.jsonl", MAX_DOWNLOAD_URL_SECONDS)]

    clock.advance(86400 - 60)  # the file expires in a minute, and so does its link
    link = client.json(_link_event())
    assert (calls[-1][2], link["expires_at"]) == (60, T0 + 86400)


def test_a_file_link_where_storage_signs_none_says_where_to_download(client: Client) -> None:
    error = client.error(_link_event(), 404)  # the in-memory storage signs no links
    assert error["code"] == "link_unavailable"
    assert f"/v1/files/{INPUT_FILE_ID}/content" in error["message"]


def test_a_file_link_is_only_for_the_files_own_project(
    clock: FakeClock, lambda_context: LambdaContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(make_deps(clock=clock, api_keys="sk-a,sk-b"), lambda_context)
    seed(client.deps, project_id=project_id_for_key("sk-a"))
    monkeypatch.setattr(client.deps.blobs, "download_url", lambda key, **_: f"https://b.example/{key}")
    event = _link_event()
    for name in ("headers", "multiValueHeaders"):
        event[name].pop("authorization")
    as_a, as_b = copy.deepcopy(event), copy.deepcopy(event)
    as_a["headers"]["Authorization"], as_a["multiValueHeaders"]["Authorization"] = (
        "Bearer sk-a",
        ["Bearer sk-a"],
    )
    as_b["headers"]["Authorization"], as_b["multiValueHeaders"]["Authorization"] = (
        "Bearer sk-b",
        ["Bearer sk-b"],
    )

    assert client.json(as_a)["url"].endswith(object_keys.file_key(INPUT_FILE_ID))
    assert client.error(as_b, 404)["message"] == f"No such File object: {INPUT_FILE_ID}"
    assert client.error(event, 401)["type"] == "invalid_request_error"  # and never without a key


# ---------------------------------------------------------------- uploads


def test_upload_flow(client: Client) -> None:
    created = Upload.model_validate(client.json(load_event("uploads_create.json")))
    assert (created.status, created.bytes, created.expires_at) == ("pending", 12, T0 + 3600)

    part = UploadPart.model_validate(client.json(load_event("uploads_add_part.json")))
    assert part.upload_id == UPLOAD_ID
    assert client.deps.blobs.get(object_keys.upload_part_key(UPLOAD_ID, part.id)) == b"hello world\n"

    done = Upload.model_validate(client.json(load_event("uploads_complete.json")))
    assert done.status == "completed"
    assert done.file is not None
    stored = client.deps.metadata.get_file("local", done.file.id)
    assert stored is not None and client.deps.blobs.get(stored.blob_key) == b"".join(PARTS)

    assert client.error(load_event("uploads_complete.json"), 400)["message"].endswith("already completed.")
    assert client.error(load_event("uploads_cancel.json"), 400)


def test_cancel_upload(client: Client) -> None:
    assert Upload.model_validate(client.json(load_event("uploads_cancel.json"))).status == "cancelled"
    assert client.deps.blobs.list_keys(object_keys.upload_prefix(UPLOAD_ID)) == []


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (
            {"filename": "f", "mime_type": "text/plain", "purpose": "batch"},
            "bytes",
            "missing_required_parameter",
        ),
        (
            {"bytes": "12", "filename": "f", "mime_type": "text/plain", "purpose": "batch"},
            "bytes",
            "invalid_type",
        ),
        (
            {"bytes": True, "filename": "f", "mime_type": "text/plain", "purpose": "batch"},
            "bytes",
            "invalid_type",
        ),
        (
            {"bytes": 1, "filename": "f", "mime_type": "text/plain", "purpose": "nope"},
            "purpose",
            "invalid_value",
        ),
    ],
)
def test_create_upload_bad_bodies(client: Client, body: dict[str, Any], param: str, code: str) -> None:
    error = client.error(_with_body(load_event("uploads_create.json"), body), 400)
    assert (error["param"], error["code"]) == (param, code)


def test_complete_upload_bad_part_ids(client: Client) -> None:
    event = _with_body(load_event("uploads_complete.json"), {"part_ids": [PART_IDS[0], 7]})
    assert client.error(event, 400)["param"] == "part_ids[1]"


# ---------------------------------------------------------------- batches


def test_create_batch_and_replay_with_idempotency_key(client: Client, clock: FakeClock) -> None:
    created = Batch.model_validate(client.json(load_event("batches_create.json")))
    assert (created.status, created.metadata, created.created_at) == ("validating", {"team": "search"}, T0)
    assert created.expires_at == T0 + 86400
    assert client.deps.workflow.started == [("local", created.id)]  # type: ignore[attr-defined]

    clock.advance(10)
    assert client.json(load_event("batches_create.json"))["id"] == created.id

    without_key = _without_header(load_event("batches_create.json"), "idempotency-key")
    assert client.json(without_key)["id"] != created.id


def test_create_batch_accepts_a_plain_text_body_and_ignores_unknown_fields(client: Client) -> None:
    body = {
        "input_file_id": INPUT_FILE_ID,
        "endpoint": "/v1/embeddings",
        "completion_window": "24h",
        "future_field": 1,
    }
    batch = Batch.model_validate(
        client.json(_with_body(load_event("batches_create.json"), body, base64_encoded=False))
    )
    assert batch.endpoint == "/v1/embeddings"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        (b"{not json", None, None),
        (b"[1, 2]", None, "invalid_type"),
        (
            {"endpoint": "/v1/chat/completions", "completion_window": "24h"},
            "input_file_id",
            "missing_required_parameter",
        ),
        (
            {"input_file_id": INPUT_FILE_ID, "endpoint": "/v1/chat/completions", "completion_window": 24},
            "completion_window",
            "invalid_type",
        ),
        (
            {
                "input_file_id": INPUT_FILE_ID,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": "x",
            },
            "metadata",
            "invalid_type",
        ),
        (
            {
                "input_file_id": INPUT_FILE_ID,
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"n": 1},
            },
            "metadata.n",
            "invalid_type",
        ),
        (
            {"input_file_id": INPUT_FILE_ID, "endpoint": "/v1/images/edits", "completion_window": "24h"},
            "endpoint",
            "invalid_value",
        ),
        (
            {"input_file_id": "file-nope", "endpoint": "/v1/chat/completions", "completion_window": "24h"},
            "input_file_id",
            "invalid_request",
        ),
    ],
)
def test_create_batch_bad_bodies_are_400_never_422(
    client: Client, body: Any, param: str | None, code: str | None
) -> None:
    event = load_event("batches_create.json")
    event = _without_header(event, "idempotency-key")
    error = client.error(_with_body(event, body), 400)
    assert (error["param"], error["code"]) == (param, code)


def test_list_and_retrieve_batches(client: Client, clock: FakeClock) -> None:
    for _ in range(2):
        clock.advance(1)
        body = {
            "input_file_id": INPUT_FILE_ID,
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        }
        event = _without_header(load_event("batches_create.json"), "idempotency-key")  # two batches
        client.json(_with_body(event, body))

    page = client.json(load_event("batches_list.json"))  # limit=2
    assert [Batch.model_validate(b).object for b in page["data"]] == ["batch", "batch"]
    assert page["has_more"] is True
    rest = client.json(_with_query(load_event("batches_list.json"), after=page["last_id"]))
    assert [b["id"] for b in rest["data"]] == [BATCH_ID]
    assert client.error(_with_query(load_event("batches_list.json"), limit="101"), 400)["param"] == "limit"

    assert Batch.model_validate(client.json(load_event("batches_retrieve.json"))).id == BATCH_ID
    assert client.error(_with_path(load_event("batches_retrieve.json"), "/v1/batches/batch_nope"), 404)


def test_cancel_batch_then_conflict_when_finished(client: Client) -> None:
    assert Batch.model_validate(client.json(load_event("batches_cancel.json"))).status == "cancelling"
    assert client.json(load_event("batches_cancel.json"))["status"] == "cancelling"

    client.deps.metadata.update_batch(
        "local", BATCH_ID, {"status": "completed"}, expected_status=["cancelling"]
    )
    result = client(load_event("batches_cancel.json"))
    assert result["statusCode"] == 409
    assert result["multiValueHeaders"]["x-should-retry"] == ["false"]
    error = orjson.loads(result["body"])["error"]
    assert error["message"] == "Cannot cancel a batch with status 'completed'."


# ---------------------------------------------------------------- the openai SDK end to end


def test_openai_sdk_round_trip(client: Client, tmp_path: Any) -> None:
    seen: list[dict[str, Any]] = []
    sdk = openai.OpenAI(
        api_key="sk-anything",
        base_url="http://testserver/v1",
        max_retries=2,
        http_client=openai.DefaultHttpxClient(transport=sdk_transport(client, seen)),
    )

    uploaded = sdk.files.create(file=("in.jsonl", INPUT_LINES), purpose="batch")
    assert sdk.files.retrieve(uploaded.id).bytes == len(INPUT_LINES)
    assert sdk.files.content(uploaded.id).read() == INPUT_LINES
    assert uploaded.id in [f.id for f in sdk.files.list(purpose="batch")]

    big = tmp_path / "big.jsonl"
    big.write_bytes(b'{"n": 12345}\n' * 1000)
    upload = sdk.uploads.upload_file_chunked(
        file=big, mime_type="application/jsonl", purpose="batch", part_size=4096
    )
    assert upload.status == "completed"
    assert upload.file is not None
    assert sdk.files.content(upload.file.id).read() == big.read_bytes()

    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert sdk.batches.retrieve(batch.id).status == "validating"
    assert batch.id in [b.id for b in sdk.batches.list()]
    assert sdk.batches.cancel(batch.id).status == "cancelling"

    client.deps.metadata.update_batch(
        "local", batch.id, {"status": "cancelled"}, expected_status=["cancelling"]
    )
    client.deps.metadata.update_batch("local", BATCH_ID, {"status": "failed"}, expected_status=["validating"])
    calls = len(seen)
    with pytest.raises(openai.ConflictError):
        sdk.batches.cancel(BATCH_ID)
    assert len(seen) == calls + 1  # x-should-retry: false stops the SDK's retries

    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve("file-missing")
    with pytest.raises(openai.BadRequestError):
        sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/chat/completions",
            completion_window="48h",  # type: ignore[arg-type]
        )
    assert sdk.files.delete(uploaded.id).deleted is True


def test_a_resolver_keeps_its_own_request_while_another_resolves(
    seeded_deps: Deps, lambda_context: LambdaContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Powertools keeps the current event on a class attribute shared by every resolver; ours keeps it
    on the instance, so a request resolved on another thread's resolver in the middle of this one
    (here: nested, to make the interleaving exact) cannot change what this one reads."""
    mine, other = api.create_app(seeded_deps), api.create_app(seeded_deps)
    real_list_files = seeded_deps.metadata.list_files
    seen: dict[str, Any] = {}

    def list_files_while_another_request_runs(*args: Any, **kwargs: Any) -> Any:
        seen["other"] = api.handle(other, load_event("batches_list.json"), lambda_context)["statusCode"]
        seen["mine"] = (mine.current_event.path, mine.current_event.http_method)
        return real_list_files(*args, **kwargs)

    monkeypatch.setattr(seeded_deps.metadata, "list_files", list_files_while_another_request_runs)
    result = api.handle(mine, load_event("files_list.json"), lambda_context)  # type: ignore[arg-type]

    assert seen == {"other": 200, "mine": ("/v1/files", "GET")}
    assert result["statusCode"] == 200
    assert [f["id"] for f in orjson.loads(result["body"])["data"]] == [INPUT_FILE_ID]


def test_the_openapi_document_and_swagger_ui_are_public_and_valid(lambda_context: LambdaContext) -> None:
    from openapi_spec_validator import validate

    deps = make_deps(clock=FakeClock(), api_keys=["sk-only-this-key"])
    app = api.create_app(deps)

    document = api.handle(app, proxy_event("GET", "/openapi.json"), lambda_context)  # no key
    assert document["statusCode"] == 200
    spec = orjson.loads(document["body"])
    validate(spec)  # a valid OpenAPI 3.1 document
    assert spec["openapi"].startswith("3.1")
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "422" not in orjson.dumps(spec).decode()  # this API answers 400, in the OpenAI envelope
    for operations in spec["paths"].values():
        for operation in operations.values():
            for status, answer in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorEnvelope"
                    }

    ui = api.handle(app, proxy_event("GET", "/docs"), lambda_context)
    assert ui["statusCode"] == 200
    assert ui["multiValueHeaders"]["Content-Type"] == ["text/html"]
    assert "SwaggerUIBundle" in ui["body"]

    refused = api.handle(app, proxy_event("GET", "/v1/files"), lambda_context)
    assert refused["statusCode"] == 401


@pytest.mark.parametrize(
    ("sdk_model", "wire_name"),
    [
        (Batch, "BatchObject"),
        (FileObject, "FileObject"),
        (Upload, "UploadObject"),
        (UploadPart, "UploadPartObject"),
        (FileDeleted, "FileDeleted"),
    ],
)
def test_the_documented_objects_have_exactly_the_sdks_fields(sdk_model: Any, wire_name: str) -> None:
    """The OpenAPI schemas are generated from these models: they must name what the SDK reads."""
    from batch_api.contract import wire

    assert set(getattr(wire, wire_name).model_fields) == set(sdk_model.model_fields)
