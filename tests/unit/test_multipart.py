"""The multipart/form-data parser, against hand-written bodies and what httpx (the SDK's client) sends."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from batch_api.contract.errors import InvalidRequest
from batch_api.handlers.multipart import boundary_of, parse_multipart

pytestmark = pytest.mark.unit


def _body(boundary: str, *parts: bytes, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += b"--" + boundary.encode() + b"\r\n" + part + b"\r\n"
    return out + b"--" + boundary.encode() + b"--\r\n" + epilogue


def test_fields_and_files_as_httpx_encodes_them() -> None:
    payload = b'{"a": 1}\r\n--not-a-boundary\r\n\x00\xff'
    request = httpx.Request(
        "POST",
        "http://x/v1/files",
        data={"purpose": "batch", "expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"},
        files={"file": ('in "quoted".jsonl', payload, "application/jsonl")},
    )
    form = parse_multipart(request.read(), request.headers["content-type"])

    assert form.field("purpose") == "batch"
    assert form.field("expires_after[anchor]") == "created_at"
    assert form.field("expires_after[seconds]") == "3600"
    file = form.get("file")
    assert file is not None
    assert bytes(file.data) == payload
    assert file.filename == 'in "quoted".jsonl'
    assert file.content_type == "application/jsonl"
    assert form.get("absent") is None


@pytest.mark.parametrize(
    "content_type", ['multipart/form-data; boundary="b-1"', "Multipart/Form-Data;boundary=b-1"]
)
def test_quoted_and_unquoted_boundaries(content_type: str) -> None:
    body = _body("b-1", b'Content-Disposition: form-data; name="purpose"\r\n\r\nbatch')
    assert boundary_of(content_type) == b"b-1"
    assert parse_multipart(body, content_type).field("purpose") == "batch"


def test_preamble_epilogue_and_empty_values() -> None:
    body = _body(
        "xyz",
        b'Content-Disposition: form-data; name="empty"\r\n\r\n',
        b'Content-Disposition: form-data; name="data"; filename="p.bin"\r\nContent-Type: application/octet-stream\r\n\r\n\r\n\r\n',
        preamble=b"ignored preamble\r\n",
        epilogue=b"ignored epilogue",
    )
    form = parse_multipart(body, "multipart/form-data; boundary=xyz")
    assert form.field("empty") == ""
    assert bytes(form.get("data").data) == b"\r\n\r\n"  # type: ignore[union-attr]


def test_parts_are_views_not_copies() -> None:
    body = _body("b", b'Content-Disposition: form-data; name="data"; filename="x"\r\n\r\n' + b"z" * 1000)
    part = parse_multipart(body, "multipart/form-data; boundary=b").get("data")
    assert isinstance(part.data, memoryview)  # type: ignore[union-attr]
    assert part.data.obj is body  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"whatever", None),
        (b"whatever", "application/json"),
        (b"whatever", "multipart/form-data"),
        (b"no boundary here", "multipart/form-data; boundary=b"),
        (
            b'--b\r\nContent-Disposition: form-data; name="a"\r\n\r\nvalue with no end',
            "multipart/form-data; boundary=b",
        ),
        (b'--b\r\nContent-Disposition: form-data; name="a"', "multipart/form-data; boundary=b"),
        (b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b"),
        (b"--b\r\nnot a header\r\n\r\nx\r\n--b--", "multipart/form-data; boundary=b"),
        (b"--bjunk\r\n", "multipart/form-data; boundary=b"),
    ],
)
def test_malformed_bodies_are_400(body: bytes, content_type: str | None) -> None:
    with pytest.raises(InvalidRequest):
        parse_multipart(body, content_type)


def test_non_utf8_field_is_400_when_read_as_text() -> None:
    body = _body("b", b'Content-Disposition: form-data; name="purpose"\r\n\r\n\xff')
    form = parse_multipart(body, "multipart/form-data; boundary=b")
    with pytest.raises(InvalidRequest):
        form.field("purpose")
