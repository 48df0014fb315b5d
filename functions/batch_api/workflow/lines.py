"""Output/error lines and input-line splitting shared by the workflow steps.

An output or error line is `{id, custom_id, response: {status_code, request_id, body} | null,
error: {code, message} | null}` (docs/architecture.md#the-openai-contract); 2xx responses go to the output file, the rest to
the error file.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import orjson

from batch_api.contract.ids import batch_request_id
from batch_api.contract.models import Usage
from batch_api.ports import UpstreamResponse

TRANSPORT_ERROR_CODE = "request_failed"

# token counts in `Usage`'s field order (input, cached, output, reasoning, total): plain ints, as the
# per-request path sums them (a pydantic model per finished request costs more than the rest of it)
Tokens = tuple[int, int, int, int, int]
NO_TOKENS: Tokens = (0, 0, 0, 0, 0)


def _dump_line(obj: Mapping[str, Any]) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)


def result_line(batch_id: str, custom_id: str, response: UpstreamResponse) -> bytes:
    """The line for one request that ran: its HTTP answer, or the transport failure when none came."""
    if response.status_code is not None:
        return _dump_line(
            {
                "id": batch_request_id(batch_id, custom_id),
                "custom_id": custom_id,
                "response": {
                    "status_code": response.status_code,
                    "request_id": response.request_id,
                    "body": response.body,
                },
                "error": None,
            }
        )
    return _dump_line(
        {
            "id": batch_request_id(batch_id, custom_id),
            "custom_id": custom_id,
            "response": None,
            "error": {
                "code": response.error_code or TRANSPORT_ERROR_CODE,
                "message": response.error_message or "The request to the model endpoint failed.",
            },
        }
    )


def never_ran_line(batch_id: str, custom_id: str, code: str, message: str) -> bytes:
    """The error line of a request that was never sent (`batch_cancelled`, `batch_expired`)."""
    return _dump_line(
        {
            "id": batch_request_id(batch_id, custom_id),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": code, "message": message},
        }
    )


def parse_line(line: bytes) -> dict[str, Any]:
    """A journal/output line back as a dict."""
    obj: dict[str, Any] = orjson.loads(line)
    return obj


def is_success(line_obj: Mapping[str, Any]) -> bool:
    """True when the request got a 2xx answer: such lines belong in the output file."""
    response = line_obj.get("response")
    if not isinstance(response, dict):  # parsed JSON: objects are dicts (a Mapping check costs more)
        return False
    status = response.get("status_code")
    return isinstance(status, int) and 200 <= status < 300


def _int(value: Any) -> int:
    # bool is an int subclass; a model server that sends true for a count is not giving us tokens
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _details(usage: Mapping[str, Any], key: str, field: str) -> int:
    details = usage.get(key)
    return _int(details.get(field)) if isinstance(details, dict) else 0


def tokens_of(endpoint: str, body: Any) -> Tokens:
    """Token usage of one successful response body, in the Batch object's input/output names.

    Chat and completions report prompt/completion tokens, embeddings only prompt tokens, responses
    already input/output. Anything missing or malformed counts as zero: usage is informative, a
    server that omits it must not break the batch.
    """
    # parsed JSON: objects are dicts (a Mapping check costs more, once per finished request)
    if not isinstance(body, dict):
        return NO_TOKENS
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return NO_TOKENS
    if endpoint == "/v1/responses":
        input_tokens = _int(usage.get("input_tokens"))
        output_tokens = _int(usage.get("output_tokens"))
        cached = _details(usage, "input_tokens_details", "cached_tokens")
        reasoning = _details(usage, "output_tokens_details", "reasoning_tokens")
    else:
        input_tokens = _int(usage.get("prompt_tokens"))
        output_tokens = 0 if endpoint == "/v1/embeddings" else _int(usage.get("completion_tokens"))
        cached = _details(usage, "prompt_tokens_details", "cached_tokens")
        reasoning = _details(usage, "completion_tokens_details", "reasoning_tokens")
    total = _int(usage.get("total_tokens"))
    return (input_tokens, cached, output_tokens, reasoning, total or input_tokens + output_tokens)


def usage_of(endpoint: str, body: Any) -> Usage:
    """`tokens_of` as a `Usage`."""
    return as_usage(tokens_of(endpoint, body))


def as_usage(tokens: Tokens) -> Usage:
    input_tokens, cached, output_tokens, reasoning, total = tokens
    return Usage(
        input_tokens=input_tokens,
        cached_tokens=cached,
        output_tokens=output_tokens,
        reasoning_tokens=reasoning,
        total_tokens=total,
    )


def split_lines(pieces: Iterable[bytes], base_offset: int = 0) -> Iterator[tuple[int, int, bytes]]:
    """Split a byte stream into lines: yields (start, end, content) with [start, end) the line's byte
    range including its line break, and content without "\\n" / "\\r\\n".

    Lines split across pieces are joined; a final line without a newline is yielded too. Only the
    current partial line is held, so memory stays at one piece plus one line.
    """
    partial: list[bytes] = []  # non-empty pieces of a line not yet ended, joined once its newline arrives
    offset = base_offset  # file offset of the start of `partial`
    for piece in pieces:
        if not piece:
            continue
        pos = 0
        while True:
            newline = piece.find(b"\n", pos)
            if newline < 0:
                if pos < len(piece):
                    partial.append(piece[pos:])
                break
            segment = piece[pos:newline]
            if partial:
                partial.append(segment)
                content = b"".join(partial)
                partial.clear()
            else:
                content = segment
            end = offset + len(content) + 1
            yield offset, end, content[:-1] if content.endswith(b"\r") else content
            offset = end
            pos = newline + 1
    if partial:
        content = b"".join(partial)
        yield offset, offset + len(content), content[:-1] if content.endswith(b"\r") else content
