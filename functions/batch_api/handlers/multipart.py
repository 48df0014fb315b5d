"""A small multipart/form-data parser (RFC 7578) over the bytes of a request body.

The body is already whole in memory (API Gateway delivers it so); the parser only finds boundaries
with `bytes.find` and hands out `memoryview` slices, so no part is copied until its user needs bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from batch_api.contract.errors import InvalidRequest

_CRLF = b"\r\n"
_HEADER_END = b"\r\n\r\n"
# Browsers and httpx escape these in quoted names (HTML5 form encoding); nothing else is %-encoded.
_FORM_ESCAPES = {"%22": '"', "%0D": "\r", "%0A": "\n", "%0d": "\r", "%0a": "\n"}


@dataclass(frozen=True)
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: memoryview

    def text(self) -> str:
        try:
            return str(self.data, "utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"Form field '{self.name}' is not valid UTF-8.", param=self.name) from exc


@dataclass(frozen=True)
class MultipartForm:
    parts: list[Part]

    def get(self, name: str) -> Part | None:
        """The first part with this field name."""
        return next((part for part in self.parts if part.name == name), None)

    def field(self, name: str) -> str | None:
        part = self.get(name)
        return part.text() if part is not None else None


def _malformed(detail: str) -> InvalidRequest:
    return InvalidRequest(f"Malformed multipart/form-data body: {detail}.", code="invalid_multipart")


def _split_params(header_value: str) -> tuple[str, dict[str, str]]:
    """`form-data; name="a;b"; filename=x` -> ("form-data", {"name": "a;b", "filename": "x"})."""
    params: dict[str, str] = {}
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in header_value:
        if escaped:
            current.append(char)
            escaped = False
        elif quoted and char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            current.append(char)
            quoted = not quoted
        elif char == ";" and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    value = parts[0].strip().lower()
    for item in parts[1:]:
        key, sep, raw = item.partition("=")
        if not sep:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = _unquote(raw[1:-1])
        params[key.strip().lower()] = raw
    return value, params


def _unquote(text: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
        elif char == "%" and text[i : i + 3] in _FORM_ESCAPES:
            out.append(_FORM_ESCAPES[text[i : i + 3]])
            i += 3
        else:
            out.append(char)
            i += 1
    return "".join(out)


def boundary_of(content_type: str | None) -> bytes:
    """The boundary of a `multipart/form-data` Content-Type, quoted or not."""
    if not content_type:
        raise InvalidRequest("Expected a multipart/form-data body, but the Content-Type header is missing.")
    kind, params = _split_params(content_type)
    if kind != "multipart/form-data":
        raise InvalidRequest(f"Expected a multipart/form-data body, but the Content-Type is '{kind}'.")
    boundary = params.get("boundary", "")
    if not 1 <= len(boundary) <= 200:
        raise _malformed("the Content-Type has no valid boundary")
    try:
        return boundary.encode("ascii")
    except UnicodeEncodeError as exc:
        raise _malformed("the boundary is not ASCII") from exc


def _parse_headers(raw: memoryview) -> tuple[str, str | None, str | None]:
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed("part headers are not UTF-8") from exc
    name: str | None = None
    filename: str | None = None
    content_type: str | None = None
    for line in text.split("\r\n"):
        key, sep, value = line.partition(":")
        if not sep:
            raise _malformed(f"bad part header line {line!r}")
        key = key.strip().lower()
        if key == "content-disposition":
            disposition, params = _split_params(value)
            if disposition != "form-data" or "name" not in params:
                raise _malformed("a part lacks a form-data Content-Disposition with a name")
            name = params["name"]
            filename = params.get("filename")
        elif key == "content-type":
            content_type = value.strip()
    if name is None:
        raise _malformed("a part has no Content-Disposition header")
    return name, filename, content_type


def parse_multipart(body: bytes, content_type: str | None) -> MultipartForm:
    """Split `body` into its parts. Anything malformed raises `InvalidRequest` (400)."""
    boundary = boundary_of(content_type)
    delimiter = b"--" + boundary
    next_delimiter = _CRLF + delimiter
    view = memoryview(body)

    # The first delimiter opens the body, or follows a preamble and a CRLF.
    if body.startswith(delimiter):
        position = len(delimiter)
    else:
        found = body.find(next_delimiter)
        if found < 0:
            raise _malformed("the boundary never occurs")
        position = found + len(next_delimiter)

    parts: list[Part] = []
    while True:
        if body.startswith(b"--", position):
            return MultipartForm(parts)  # the close delimiter; an epilogue may follow
        line_end = body.find(_CRLF, position)
        if line_end < 0 or body[position:line_end].strip(b" \t"):
            raise _malformed("a delimiter is not followed by a line break")
        headers_start = line_end + len(_CRLF)
        headers_end = body.find(_HEADER_END, headers_start)
        if headers_end < 0:
            raise _malformed("a part's headers never end")
        name, filename, part_type = _parse_headers(view[headers_start:headers_end])
        data_start = headers_end + len(_HEADER_END)
        data_end = body.find(next_delimiter, data_start)
        if data_end < 0:
            raise _malformed("the body ends without a closing boundary")
        parts.append(
            Part(name=name, filename=filename, content_type=part_type, data=view[data_start:data_end])
        )
        position = data_end + len(next_delimiter)
