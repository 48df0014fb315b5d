"""Bad input: a batch that fails validation with the OpenAI codes and 1-based lines, and the
synchronous 400s at create. Nothing here may answer 500."""

from __future__ import annotations

import io
import json
from typing import Any

import openai
import pytest

from tests.e2e.conftest import jsonl, request_line, upload, wait_for

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def test_a_file_of_bad_lines_fails_with_every_problem_named(client: openai.OpenAI) -> None:
    good = request_line(CHAT, 0)
    lines: list[Any] = [
        good,  # 1 ok
        b"{this is not json",  # 2
        {k: v for k, v in request_line(CHAT, 3).items() if k != "custom_id"},  # 3
        {**request_line(CHAT, 4), "method": "GET"},  # 4
        {**request_line(CHAT, 5), "url": "/v1/embeddings"},  # 5
        {**request_line(CHAT, 6), "body": {**good["body"], "stream": True}},  # 6
        {**request_line(CHAT, 7), "custom_id": "req-0"},  # 7 duplicate of line 1
        {**request_line(CHAT, 8), "body": {"messages": good["body"]["messages"]}},  # 8 no model
        {**request_line(CHAT, 9), "body": {**good["body"], "model": "other-model"}},  # 9 second model
    ]
    input_file = upload(client, lines)
    batch = client.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    batch = wait_for(client, batch.id)

    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.in_progress_at is None and batch.output_file_id is None
    assert batch.errors is not None and batch.errors.data
    by_line = {error.line: error for error in batch.errors.data}
    assert by_line[2].code == "invalid_json_line"
    assert by_line[3].code == "missing_required_parameter" and by_line[3].param == "custom_id"
    assert by_line[4].param == "method"
    assert by_line[5].code == "invalid_url" and by_line[5].param == "url"
    assert by_line[6].code == "streaming_unsupported" and by_line[6].param == "body.stream"
    assert by_line[7].code == "duplicate_custom_id"
    assert by_line[8].param == "body.model"
    assert by_line[9].param == "body.model"
    assert 1 not in by_line
    # OpenAI's wording where OpenAI has one; the line is in `line` either way
    assert by_line[2].message == "This line is not parseable as valid JSON."
    assert by_line[3].message == "Missing required parameter: 'custom_id'."
    assert by_line[5].message == "The URL provided for this request does not match the batch endpoint."
    assert by_line[6].message == "Chat Completions: Streaming is not supported in the Batch API."
    assert by_line[8].message == "Missing required parameter: 'body.model'."
    for line in (4, 7, 9):  # our own detail names the line
        assert f"Line {line}" in (by_line[line].message or "")


def _bad_request(call: Any) -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    error = caught.value
    assert error.status_code == 400
    body = error.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error"
    return error


def test_create_rejects_bad_parameters_synchronously(client: openai.OpenAI) -> None:
    input_file = upload(client, [request_line(CHAT, 0)])

    error = _bad_request(
        lambda: client.batches.create(
            input_file_id=input_file.id, endpoint="/v1/images", completion_window="24h"
        )
    )  # type: ignore[arg-type]
    assert error.body["param"] == "endpoint"  # type: ignore[index]
    error = _bad_request(
        lambda: client.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="48h")
    )  # type: ignore[arg-type]
    assert error.body["param"] == "completion_window"  # type: ignore[index]
    error = _bad_request(
        lambda: client.batches.create(
            input_file_id=input_file.id, endpoint=CHAT, completion_window="24h", metadata={"k": "v" * 513}
        )
    )
    assert error.body["param"] == "metadata.k"  # type: ignore[index]
    _bad_request(
        lambda: client.batches.create(
            input_file_id=input_file.id,
            endpoint=CHAT,
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    )
    error = _bad_request(
        lambda: client.batches.create(
            input_file_id=input_file.id, endpoint=CHAT, completion_window="24h", metadata={"n": 3}
        )
    )  # type: ignore[dict-item]
    assert error.body["code"] == "invalid_type" and error.body["param"] == "metadata.n"  # type: ignore[index]
    error = _bad_request(
        lambda: client.batches.create(
            input_file_id=input_file.id,
            endpoint=CHAT,
            completion_window="24h",
            output_expires_after={"anchor": "created_at", "seconds": 60},
        )
    )
    assert "output_expires_after" in (error.body["param"] or "")  # type: ignore[index]
    error = _bad_request(
        lambda: client.batches.create(
            input_file_id="file-doesnotexist", endpoint=CHAT, completion_window="24h"
        )
    )
    assert error.body["param"] == "input_file_id"  # type: ignore[index]

    other = client.files.create(file=("notes.txt", io.BytesIO(b"hello")), purpose="user_data")
    error = _bad_request(
        lambda: client.batches.create(input_file_id=other.id, endpoint=CHAT, completion_window="24h")
    )
    assert "batch" in error.body["message"]  # type: ignore[index]

    assert client.batches.list().data == []  # no batch was written by any rejected create


def test_bad_json_body_is_a_400_not_a_500(server: Any) -> None:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        server.base_url + "/batches",
        data=b"{not json",
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Bearer x"},
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 400
    body = json.loads(caught.value.read())
    assert set(body["error"]) == {"message", "type", "param", "code"}


def test_empty_lines_and_crlf_are_accepted(client: openai.OpenAI) -> None:
    raw = (
        jsonl([request_line(CHAT, 0)]).replace(b"\n", b"\r\n")
        + b"\r\n"
        + jsonl([request_line(CHAT, 1)]).rstrip(b"\n")
    )
    input_file = client.files.create(file=("crlf.jsonl", io.BytesIO(raw)), purpose="batch")
    batch = client.batches.create(input_file_id=input_file.id, endpoint=CHAT, completion_window="24h")
    batch = wait_for(client, batch.id)
    assert batch.status == "completed", batch.errors
    assert batch.request_counts is not None and batch.request_counts.total == 2
