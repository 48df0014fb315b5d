"""Every row of docs/bad-input.md is a test: each id in its tables has a case here that provokes the
mistake and returns what the code answered; the row's status, type, code, param and message must
match. A row without a case or a case without a row fails, so the page and the code stay one."""

from __future__ import annotations

import asyncio
import io
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from batch_api import object_keys
from batch_api.config import Settings
from batch_api.contract import models
from batch_api.contract.models import BatchRecord, FileRecord, UploadRecord
from batch_api.handlers import api
from batch_api.local.bootstrap import LocalApp, build_local_app
from batch_api.ports import UpstreamResponse
from batch_api.service import files
from batch_api.upstreams.openai_http import OpenAIHttpUpstream
from batch_api.workflow.finalize import finalize_batch
from batch_api.workflow.lines import parse_line, result_line
from batch_api.workflow.manifest import load_manifest
from batch_api.workflow.process import process_chunk
from batch_api.workflow.validate import validate_batch
from tests.support.asgi_server import asgi_app, exchange, serving
from tests.support.fake_upstream import FakeUpstreamServer
from tests.support.server import free_port
from tests.unit.api_events import proxy_event
from tests.unit.builders import (
    PROJECT,
    FakeClock,
    add_batch,
    file_lines,
    get_batch,
    ids,
    jsonl,
    make_deps,
    request,
)
from tests.unit.builders import make_deps as make_step_deps
from tests.unit.conftest import LambdaContext
from tests.unit.fakes_upstream import FakeUpstream

pytestmark = pytest.mark.integration

CATALOGUE = Path(__file__).resolve().parents[2] / "docs" / "bad-input.md"
KEY = "sk-catalogue-0123456789"
CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- the page


@dataclass(frozen=True)
class Row:
    id: str
    cells: list[str]


def _cell(text: str) -> str | None:
    text = text.strip()
    if text == "null":
        return None
    if len(text) >= 2 and text[0] == text[-1] == "`":
        return text[1:-1]
    return text


def catalogue_rows() -> dict[str, Row]:
    rows: dict[str, Row] = {}
    for line in CATALOGUE.read_text().splitlines():
        match = re.match(r"^\| ([A-Z]+\d+) \|(.*)\|$", line)
        if match:
            rows[match.group(1)] = Row(match.group(1), [c.strip() for c in match.group(2).split(" | ")])
    return rows


def matches(documented: str | None, actual: str | None) -> bool:
    """The page's message, with `...` standing for any text, against what the code said."""
    if documented is None or actual is None:
        return documented == actual
    pattern = ".*".join(re.escape(piece) for piece in documented.split("..."))
    return re.fullmatch(pattern, actual, re.DOTALL) is not None


@dataclass
class Observed:
    """What the code answered: an HTTP error (section 1), a validation entry (2) or a result line (3)."""

    status: int | None = None
    type: str | None = None
    code: str | None = None
    param: str | None = None
    message: str | None = None


# ---------------------------------------------------------------- section 1: the API, in-process


class Api:
    def __init__(self) -> None:
        self.clock = FakeClock()
        self.deps = make_deps(clock=self.clock, api_keys=[KEY])
        self.app = api.create_app(self.deps)
        self.project = api.authenticate({"authorization": f"Bearer {KEY}"}, self.deps.settings.api_keys)
        self.answered: list[tuple[str, str, int]] = []  # (method, path, status) of every call

    def call(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        query: dict[str, list[str]] | None = None,
        auth: bool = True,
        raw_body: str | None = None,
    ) -> Observed:
        all_headers = [("authorization", f"Bearer {KEY}")] if auth else []
        all_headers += headers or []
        event = proxy_event(method, path, headers=all_headers, query=query, body=body)
        if raw_body is not None:
            event["body"], event["isBase64Encoded"] = raw_body, True
        result = api.handle(self.app, event, LambdaContext())  # type: ignore[arg-type]
        self.answered.append((method, path, result["statusCode"]))
        body = orjson.loads(result["body"])
        if result["statusCode"] < 400:
            return Observed(result["statusCode"])
        error = body["error"]
        return Observed(result["statusCode"], error["type"], error["code"], error["param"], error["message"])

    def json(self, method: str, path: str, body: Any, **kwargs: Any) -> Observed:
        headers = [("content-type", "application/json"), *kwargs.pop("headers", [])]
        return self.call(method, path, body=orjson.dumps(body), headers=headers, **kwargs)

    def form(self, path: str, fields: list[tuple[str, str | None, bytes]], **kwargs: Any) -> Observed:
        """A multipart body; a field is (name, filename or None, bytes)."""
        parts = []
        for name, filename, data in fields:
            disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
            parts.append(f"--b\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
        body = b"".join(parts) + b"--b--\r\n"
        headers = kwargs.pop("headers", [("content-type", "multipart/form-data; boundary=b")])
        return self.call("POST", path, body=body, headers=headers, **kwargs)

    def file(self, name: str = "in.jsonl", purpose: str = "batch", data: bytes = b'{"a": 1}\n') -> FileRecord:
        return files.create_file(self.deps, self.project, name, purpose, data)

    def upload(self, **fields: Any) -> UploadRecord:
        record = UploadRecord(
            id=fields.pop("id", "upload_catalogue"),
            project_id=self.project,
            bytes=fields.pop("bytes", 9),
            created_at=self.deps.now(),
            expires_at=self.deps.now() + 3600,
            filename="in.jsonl",
            purpose=fields.pop("purpose", "batch"),
            mime_type="application/jsonl",
            **fields,
        )
        self.deps.metadata.create_upload(record)
        return record

    def part(self, upload_id: str, data: bytes) -> str:
        from batch_api.service import uploads

        return uploads.add_part(self.deps, self.project, upload_id, data).id

    def batch(self, status: str = "validating") -> BatchRecord:
        source = self.file()
        record = BatchRecord(
            id="batch_catalogue",
            project_id=self.project,
            endpoint=CHAT,
            input_file_id=source.id,
            status=status,  # type: ignore[arg-type]
            created_at=self.deps.now(),
            expires_at=self.deps.now() + 86400,
        )
        self.deps.metadata.create_batch(record)
        return record


def create_batch_body(**changes: Any) -> dict[str, Any]:
    return {"input_file_id": "file-x", "endpoint": CHAT, "completion_window": "24h", **changes}


def upload_body(**changes: Any) -> dict[str, Any]:
    return {
        "bytes": 9,
        "filename": "in.jsonl",
        "mime_type": "application/jsonl",
        "purpose": "batch",
        **changes,
    }


def multipart_file(purpose: str = "user_data", name: str = "a.txt", data: bytes = b"x") -> list[Any]:
    return [("purpose", None, purpose.encode()), ("file", name, data)]


def _b5(a: Api) -> Observed:
    return a.json("POST", "/v1/batches", create_batch_body(metadata={"k" * 65: "v"}))


def _u13(a: Api) -> Observed:
    upload = a.upload(status="completed")
    return a.form(f"/v1/uploads/{upload.id}/parts", [("data", "blob", b"x")])


def _u14(a: Api) -> Observed:
    upload = a.upload()
    a.clock.advance(3600)
    return a.json("POST", f"/v1/uploads/{upload.id}/complete", {"part_ids": []})


def _u15(a: Api) -> Observed:
    from batch_api.service import uploads

    upload = a.upload()
    real, uploads.MAX_PART_BYTES = uploads.MAX_PART_BYTES, 4
    try:
        return a.form(f"/v1/uploads/{upload.id}/parts", [("data", "blob", b"12345")])
    finally:
        uploads.MAX_PART_BYTES = real


def _u16(a: Api) -> Observed:
    upload = a.upload()
    part = a.part(upload.id, b'{"a": 1}\n')
    return a.json("POST", f"/v1/uploads/{upload.id}/complete", {"part_ids": [part, part]})


def _u17(a: Api) -> Observed:
    upload = a.upload()
    part = a.part(upload.id, b'{"a": 1}\n')
    return a.json("POST", f"/v1/uploads/{upload.id}/complete", {"part_ids": [part, "part_x"]})


def _u18(a: Api) -> Observed:
    upload = a.upload(bytes=12)
    part = a.part(upload.id, b'{"a": 1}\n')
    return a.json("POST", f"/v1/uploads/{upload.id}/complete", {"part_ids": [part]})


def _u19(a: Api) -> Observed:
    upload = a.upload()
    part = a.part(upload.id, b'{"a": 1}\n')
    return a.json("POST", f"/v1/uploads/{upload.id}/complete", {"part_ids": [part], "md5": "0" * 32})


def _u20(a: Api) -> Observed:
    upload = a.upload(bytes=10)
    part = a.part(upload.id, b"not json\n\n")
    return a.json("POST", f"/v1/uploads/{upload.id}/complete", {"part_ids": [part]})


def _u21(a: Api) -> Observed:
    from batch_api.contract import ids as id_rules

    upload = a.upload(bytes=18)
    first, second = a.part(upload.id, b'{"a": 1}\n'), a.part(upload.id, b'{"b": 2}\n')
    # another complete, naming the parts in the other order, registered the file a moment ago
    file_id = id_rules.upload_file_id(upload.id)
    other_key = object_keys.stitched_file_key(file_id, [second, first])
    a.deps.blobs.put(other_key, b'{"b": 2}\n{"a": 1}\n')
    a.deps.metadata.create_file(
        FileRecord(
            id=file_id,
            project_id=a.project,
            bytes=18,
            created_at=a.deps.now(),
            filename="in.jsonl",
            purpose="batch",
            blob_key=other_key,
        )
    )
    return a.json("POST", f"/v1/uploads/{upload.id}/complete", {"part_ids": [first, second]})


def _u22(a: Api) -> Observed:
    upload = a.upload(status="completed")
    return a.call("POST", f"/v1/uploads/{upload.id}/cancel")


def _b10(a: Api) -> Observed:
    source = a.file()
    files.delete_file(a.deps, a.project, source.id)
    return a.json("POST", "/v1/batches", create_batch_body(input_file_id=source.id))


def _b11(a: Api) -> Observed:
    source = a.file(name="a.txt", purpose="user_data")
    return a.json("POST", "/v1/batches", create_batch_body(input_file_id=source.id))


def _b12(a: Api) -> Observed:
    source = a.file()
    return a.json(
        "POST",
        "/v1/batches",
        create_batch_body(input_file_id=source.id),
        headers=[("idempotency-key", "k" * 256)],
    )


def _b15(a: Api) -> Observed:
    batch = a.batch(status="completed")
    return a.call("POST", f"/v1/batches/{batch.id}/cancel")


def _b16(a: Api) -> Observed:
    source = a.file()
    key = [("idempotency-key", "create-once")]
    first = a.json("POST", "/v1/batches", create_batch_body(input_file_id=source.id), headers=key)
    assert first.status == 200
    return a.json(
        "POST", "/v1/batches", create_batch_body(input_file_id=source.id, metadata={"k": "v"}), headers=key
    )


def _h19(a: Api) -> Observed:
    a.deps.settings.max_request_bytes = 2048
    return a.form("/v1/files", multipart_file(data=b"x" * 4096))


API_CASES: dict[str, Callable[[Api], Observed]] = {
    "H5": lambda a: a.call("GET", "/v1/files", auth=False),
    "H6": lambda a: a.call(
        "GET", "/v1/files", auth=False, headers=[("authorization", "Bearer sk-wrong-12345")]
    ),
    "H7": lambda a: a.call("GET", "/v1/nothing"),
    "H8": lambda a: a.call("PUT", "/v1/files"),
    "H9": lambda a: a.call(
        "POST", "/v1/batches", body=b"{nope", headers=[("content-type", "application/json")]
    ),
    "H10": lambda a: a.call(
        "POST", "/v1/batches", body=b"[]", headers=[("content-type", "application/json")]
    ),
    "H11": lambda a: a.json("POST", "/v1/uploads", {"filename": "in.jsonl"}),
    "H12": lambda a: a.json("POST", "/v1/uploads/upload_x/complete", {"part_ids": ["part_a", 7]}),
    "H13": lambda a: a.call("POST", "/v1/batches", raw_body="not base64!"),
    "H14": lambda a: a.form("/v1/files", multipart_file(), headers=[]),
    "H15": lambda a: a.form("/v1/files", multipart_file(), headers=[("content-type", "application/json")]),
    "H16": lambda a: a.form("/v1/files", multipart_file(), headers=[("content-type", "multipart/form-data")]),
    "H17": lambda a: a.call(
        "POST",
        "/v1/files",
        body=b"no delimiter here",
        headers=[("content-type", "multipart/form-data; boundary=b")],
    ),
    "H18": lambda a: a.form("/v1/files", [("purpose", None, b"\xff\xfe"), ("file", "a.txt", b"x")]),
    "H19": _h19,
    "H20": lambda a: a.call("GET", "/v1/files", query={"limit": ["x"]}),
    "F1": lambda a: a.form("/v1/files", [("file", "a.txt", b"x")]),
    "F2": lambda a: a.form("/v1/files", [("purpose", None, b"user_data")]),
    "F3": lambda a: a.form("/v1/files", multipart_file(purpose="batch_output")),
    "F4": lambda a: a.form(
        "/v1/files", multipart_file(purpose="batch", name="requests.csv", data=b'{"a": 1}\n')
    ),
    "F5": lambda a: a.form(
        "/v1/files", multipart_file(purpose="batch", name="in.jsonl", data=b"\ncustom_id,url\n")
    ),
    "F6": lambda a: a.form(
        "/v1/files",
        [*multipart_file(), ("expires_after[anchor]", None, b"x"), ("expires_after[seconds]", None, b"3600")],
    ),
    "F7": lambda a: a.form(
        "/v1/files",
        [
            *multipart_file(),
            ("expires_after[anchor]", None, b"created_at"),
            ("expires_after[seconds]", None, b"1.5"),
        ],
    ),
    "F8": lambda a: a.form("/v1/files", [*multipart_file(), ("expires_after[anchor]", None, b"created_at")]),
    "F9": lambda a: a.form(
        "/v1/files",
        [
            *multipart_file(),
            ("expires_after[anchor]", None, b"created_at"),
            ("expires_after[seconds]", None, b"10"),
        ],
    ),
    "F10": lambda a: a.call("GET", "/v1/files", query={"order": ["up"]}),
    "F11": lambda a: a.call("GET", "/v1/files", query={"limit": ["0"]}),
    "F12": lambda a: a.call("GET", "/v1/files/file-missing/content"),
    "U1": lambda a: a.json("POST", "/v1/uploads", upload_body(purpose="nope")),
    "U2": lambda a: a.json("POST", "/v1/uploads", upload_body(expires_after="x")),
    "U3": lambda a: a.json(
        "POST", "/v1/uploads", upload_body(expires_after={"anchor": "created_at", "seconds": 3600.0})
    ),
    "U4": lambda a: a.json("POST", "/v1/uploads", upload_body(filename="")),
    "U5": lambda a: a.json("POST", "/v1/uploads", upload_body(mime_type="")),
    "U6": lambda a: a.json("POST", "/v1/uploads", upload_body(bytes=-1)),
    "U7": lambda a: a.json("POST", "/v1/uploads", upload_body(bytes=8 * 1024**3 + 1)),
    "U8": lambda a: a.json("POST", "/v1/uploads", upload_body(mime_type="jsonl")),
    "U9": lambda a: a.json("POST", "/v1/uploads", upload_body(mime_type="image/png")),
    "U10": lambda a: a.json("POST", "/v1/uploads", upload_body(filename="requests.json")),
    "U11": lambda a: a.call("POST", "/v1/uploads/upload_missing/cancel"),
    "U12": lambda a: a.form(f"/v1/uploads/{a.upload().id}/parts", [("other", None, b"x")]),
    "U13": _u13,
    "U14": _u14,
    "U15": _u15,
    "U16": _u16,
    "U17": _u17,
    "U18": _u18,
    "U19": _u19,
    "U20": _u20,
    "U21": _u21,
    "U22": _u22,
    "B1": lambda a: a.json("POST", "/v1/batches", create_batch_body(endpoint="/v1/images")),
    "B2": lambda a: a.json("POST", "/v1/batches", create_batch_body(completion_window="48h")),
    "B3": lambda a: a.json("POST", "/v1/batches", create_batch_body(metadata=[1])),
    "B4": lambda a: a.json(
        "POST", "/v1/batches", create_batch_body(metadata={f"k{i}": "v" for i in range(17)})
    ),
    "B5": _b5,
    "B6": lambda a: a.json("POST", "/v1/batches", create_batch_body(metadata={"k": [1]})),
    "B7": lambda a: a.json("POST", "/v1/batches", create_batch_body(metadata={"k": "v" * 513})),
    "B8": lambda a: a.json(
        "POST", "/v1/batches", create_batch_body(output_expires_after={"anchor": "x", "seconds": 3600})
    ),
    "B9": lambda a: a.json(
        "POST", "/v1/batches", create_batch_body(output_expires_after={"anchor": "created_at", "seconds": 60})
    ),
    "B10": _b10,
    "B11": _b11,
    "B12": _b12,
    "B13": lambda a: a.call("GET", "/v1/batches", query={"limit": ["101"]}),
    "B14": lambda a: a.call("GET", "/v1/batches/batch_nope"),
    "B15": _b15,
    "B16": _b16,
}


# ---------------------------------------------------------------- section 1: the local server


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[tuple[str, int], LocalApp]]:
    settings = Settings(
        port=free_port(),
        data_dir=tmp_path_factory.mktemp("catalogue") / "data",
        max_request_bytes=64 * 1024,
        max_inline_download_bytes=8,
    )
    app = build_local_app(settings)
    try:
        with serving(asgi_app(app, settings), settings.port) as address:
            yield address, app
    finally:
        app.close()


def _raw(address: tuple[str, int], data: bytes) -> Observed:
    answer = exchange(address, data)
    error = answer.envelope()
    return Observed(answer.status, error["type"], error["code"], error["param"], error["message"])  # type: ignore[arg-type]


def _signed_link(address: tuple[str, int], local: LocalApp) -> str:
    client = openai.OpenAI(base_url=f"http://{address[0]}:{address[1]}/v1", api_key="x", max_retries=0)
    uploaded = client.files.create(file=("big.jsonl", io.BytesIO(b'{"n": 1}\n' * 10)), purpose="batch")
    response = client.files.with_raw_response.content(uploaded.id).http_response
    link = response.history[0].headers["location"]
    return "/" + link.split("://", 1)[1].split("/", 1)[1]


def _l2(address: tuple[str, int], local: LocalApp) -> Observed:
    path = _signed_link(address, local)
    key = path.split("?")[0][len("/_blobs/") :]
    local.blobs.delete(key)
    return _raw(address, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


SERVER_CASES: dict[str, Callable[[tuple[str, int], LocalApp], Observed]] = {
    "H1": lambda addr, _: _raw(addr, b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"),
    "H2": lambda addr, _: _raw(addr, b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"),
    "H3": lambda addr, _: _raw(addr, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-H: v\r\n" * 101 + b"\r\n"),
    "H4": lambda addr, _: _raw(
        addr, b"POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"
    ),
    "L1": lambda addr, local: _raw(
        addr,
        f"GET {_signed_link(addr, local).replace('signature=', 'signature=0')} HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
    ),
    "L2": _l2,
}


# ---------------------------------------------------------------- section 2: validation


def _validation(lines: list[Any] | bytes, endpoint: str = CHAT, **limits: int) -> Observed:
    deps = make_step_deps()
    add_batch(deps, lines if isinstance(lines, bytes) else jsonl(lines), endpoint=endpoint)
    saved = (models.MAX_REQUESTS_PER_BATCH, models.MAX_BATCH_FILE_BYTES, models.MAX_EMBEDDING_INPUTS)
    models.MAX_REQUESTS_PER_BATCH = limits.get("requests", saved[0])
    models.MAX_BATCH_FILE_BYTES = limits.get("bytes", saved[1])
    models.MAX_EMBEDDING_INPUTS = limits.get("inputs", saved[2])
    try:
        validate_batch(ids(), deps)
    finally:
        models.MAX_REQUESTS_PER_BATCH, models.MAX_BATCH_FILE_BYTES, models.MAX_EMBEDDING_INPUTS = saved
    errors = get_batch(deps).errors
    assert get_batch(deps).status == "failed"
    last = errors[-1]  # the line under test comes last
    return Observed(code=last.code, param=last.param, message=last.message)


def _v17() -> Observed:
    deps = make_step_deps()
    add_batch(deps, jsonl([request("a")]))
    deps.blobs.delete(object_keys.file_key("file-input"))  # the delete raced batches.create
    validate_batch(ids(), deps)
    entry = get_batch(deps).errors[0]
    return Observed(code=entry.code, param=entry.param, message=entry.message)


def _embedding(i: int, inputs: Any) -> dict[str, Any]:
    return {
        "custom_id": f"e{i}",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": inputs},
    }


OK = request("a")
VALIDATION_CASES: dict[str, Callable[[], Observed]] = {
    "V1": lambda: _validation([OK, request("b"), b"{not json"]),
    "V2": lambda: _validation([OK, request("b"), b"[1, 2]"]),
    "V3": lambda: _validation(
        [OK, request("b"), {k: v for k, v in request("c").items() if k != "custom_id"}]
    ),
    "V4": lambda: _validation([OK, request("b"), {**request("c"), "body": {"messages": []}}]),
    "V5": lambda: _validation([OK, request("b"), {**request("c"), "body": {"model": "gpt-test"}}]),
    "V6": lambda: _validation([OK, request("b"), {**request("c"), "custom_id": 5}]),
    "V7": lambda: _validation([OK, request("b"), {**request("c"), "method": "GET"}]),
    "V8": lambda: _validation([OK, request("b"), {**request("c"), "body": "hello"}]),
    "V9": lambda: _validation([OK, request("b"), {**request("c"), "body": {"model": "", "messages": []}}]),
    "V10": lambda: _validation([OK, request("b"), {**request("c"), "url": "/v1/embeddings"}]),
    "V11": lambda: _validation(
        [OK, request("b"), {**request("c"), "body": {"model": "gpt-test", "messages": [], "stream": True}}]
    ),
    "V12": lambda: _validation([OK, request("b"), request("a")]),
    "V13": lambda: _validation([OK, request("b"), request("c", model="other")]),
    "V14": lambda: _validation([OK, request("b"), request("c"), request("d")], requests=3),
    "V15": lambda: _validation(
        [_embedding(1, ["x", "y"]), _embedding(2, ["z", "w"])], "/v1/embeddings", inputs=3
    ),
    "V16": lambda: _validation([OK, request("b")], bytes=10),
    "V17": _v17,
    "V18": lambda: _validation(b"\n  \n"),
}


# ---------------------------------------------------------------- section 3: result lines


def _upstream_line(
    directive: str | None = None,
    *,
    base_url: str | None = None,
    timeout: float = 60,
    within: float | None = None,
) -> Observed:
    async def send(url: str) -> UpstreamResponse:
        client = OpenAIHttpUpstream(url, "sk-upstream", max_retries=0, timeout=timeout)
        try:
            body = {"model": "m", "messages": [], "user": directive or ""}
            deadline = None if within is None else time.monotonic() + within
            return await client.send(CHAT, orjson.dumps(body), deadline)
        finally:
            await client.aclose()

    if base_url is not None:
        response = asyncio.run(send(base_url))
    else:
        with FakeUpstreamServer() as server:
            response = asyncio.run(send(server.base_url))
    line = parse_line(result_line("batch_x", "c1", response))
    error = line["error"] or {}
    if line["response"] is not None:  # R1, R2: the answer is kept as it came
        assert line["response"]["status_code"] >= 400 and isinstance(line["response"]["body"], dict)
        assert set(line["response"]["body"]["error"]) >= {"message", "type"}
    return Observed(code=error.get("code"), message=error.get("message"))


def _r2() -> Observed:
    observed = _upstream_line("status=502;invalid_json")
    return observed


def _unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _never_ran(code: str) -> Observed:
    deps = make_step_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a"), request("b")]))
    validate_batch(ids(), deps)
    if code == "batch_cancelled":
        deps.metadata.update_batch(
            PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"in_progress"}
        )
    else:
        deps.clock.advance(86400)
        for chunk in load_manifest(deps, "batch_test"):
            process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)
    finalize_batch(ids(), deps)
    [line, *_] = file_lines(deps, get_batch(deps).error_file_id)
    return Observed(code=line["error"]["code"], message=line["error"]["message"])


def _client_raised() -> Observed:
    deps = make_step_deps(FakeUpstream({"a": RuntimeError("the client broke")}))
    add_batch(deps, jsonl([request("a")]))
    validate_batch(ids(), deps)
    for chunk in load_manifest(deps, "batch_test"):
        process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)
    [line] = [parse_line(raw) for raw in deps.journal.read("batch_test", 0)]
    return Observed(code=line["error"]["code"], message=line["error"]["message"])


def _no_error_code() -> Observed:
    line = parse_line(result_line("batch_x", "c1", UpstreamResponse(status_code=None)))
    return Observed(code=line["error"]["code"], message=line["error"]["message"])


RESULT_CASES: dict[str, Callable[[], Observed]] = {
    "R1": lambda: _upstream_line("status=400"),
    "R2": _r2,
    "R3": lambda: _upstream_line("invalid_json"),
    "R4": lambda: _upstream_line("hang", timeout=0.2),
    "R5": lambda: _upstream_line(base_url=f"http://127.0.0.1:{_unused_port()}/v1"),
    "R6": _client_raised,
    "R7": _no_error_code,
    "R8": lambda: _never_ran("batch_cancelled"),
    "R9": lambda: _never_ran("batch_expired"),
    "R10": lambda: _upstream_line("hang", within=0.2),
}


# ---------------------------------------------------------------- the tests


ROWS = catalogue_rows()
ALL_CASES = {**API_CASES, **SERVER_CASES, **VALIDATION_CASES, **RESULT_CASES}


def test_every_row_has_a_case_and_every_case_a_row() -> None:
    assert sorted(ROWS) == sorted(ALL_CASES), set(ROWS) ^ set(ALL_CASES)
    assert len(ROWS) > 80


def _check_http_row(row: Row, observed: Observed) -> None:
    _request, _mistake, status, error_type, code, param, message = row.cells
    assert observed.status == int(status), (row.id, observed)
    assert observed.type == _cell(error_type), (row.id, observed)
    assert observed.code == _cell(code), (row.id, observed)
    assert matches(_cell(param), observed.param), (row.id, observed)
    assert matches(_cell(message), observed.message), (row.id, observed.message)


def undocumented(app: Any, answered: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The answers whose status the OpenAPI document does not list for their operation (a path no
    route matches, or a method its path does not have, is the resolver's 404 / 405: not listed)."""
    paths = app.get_openapi_schema().paths or {}
    missing = []
    for method, path, status in answered:
        for template, item in paths.items():
            if re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", template), path):
                operation = getattr(item, method.lower(), None)
                if operation is not None and str(status) not in {str(k) for k in operation.responses or {}}:
                    missing.append((method, path, status))
    return missing


@pytest.mark.parametrize("row_id", sorted(API_CASES))
def test_api_rows(row_id: str) -> None:
    caller = Api()
    _check_http_row(ROWS[row_id], API_CASES[row_id](caller))
    assert undocumented(caller.app, caller.answered) == []  # every answer is one the document lists


@pytest.mark.parametrize("row_id", sorted(SERVER_CASES))
def test_local_server_rows(row_id: str, local_server: tuple[tuple[str, int], LocalApp]) -> None:
    address, local = local_server
    _check_http_row(ROWS[row_id], SERVER_CASES[row_id](address, local))


@pytest.mark.parametrize("row_id", sorted(VALIDATION_CASES))
def test_validation_rows(row_id: str) -> None:
    code, param, _fires, message = ROWS[row_id].cells
    observed = VALIDATION_CASES[row_id]()
    assert (observed.code, observed.param) == (_cell(code), _cell(param)), row_id
    assert matches(_cell(message), observed.message), (row_id, observed.message)


@pytest.mark.parametrize("row_id", sorted(RESULT_CASES))
def test_result_line_rows(row_id: str) -> None:
    _case, _response, code, message = ROWS[row_id].cells
    observed = RESULT_CASES[row_id]()
    assert observed.code == _cell(code), (row_id, observed)
    assert matches(_cell(message), observed.message), (row_id, observed.message)


def test_the_matcher_has_teeth() -> None:
    assert matches("No such File object: file-...", "No such File object: file-abc")
    assert not matches("No such File object: file-...", "No such Upload object: upload_abc")
    assert not matches(
        "Cannot cancel a batch with status 'completed'.", "Cannot cancel a batch with status completed."
    )
    assert matches(None, None) and not matches(None, "x")
