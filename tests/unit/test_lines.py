"""Output/error line shapes, usage extraction and the streaming line splitter."""

from __future__ import annotations

import orjson
import pytest

from batch_api.contract.ids import batch_request_id
from batch_api.contract.models import Usage
from batch_api.ports import UpstreamResponse
from batch_api.workflow.lines import is_success, never_ran_line, result_line, split_lines, usage_of

pytestmark = pytest.mark.unit


def test_result_line_of_an_http_answer_has_the_response_and_no_error() -> None:
    line = result_line("batch_1", "a", UpstreamResponse(status_code=200, body={"x": 1}, request_id="req_9"))

    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == {
        "id": batch_request_id("batch_1", "a"),
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "req_9", "body": {"x": 1}},
        "error": None,
    }


def test_result_line_of_a_transport_failure_has_an_error_and_no_response() -> None:
    line = orjson.loads(
        result_line(
            "batch_1", "a", UpstreamResponse(status_code=None, error_code="timeout", error_message="slow")
        )
    )

    assert line == {
        "id": batch_request_id("batch_1", "a"),
        "custom_id": "a",
        "response": None,
        "error": {"code": "timeout", "message": "slow"},
    }


def test_result_line_without_an_error_code_still_says_what_failed() -> None:
    line = orjson.loads(result_line("b", "a", UpstreamResponse(status_code=None)))

    assert line["error"] == {"code": "request_failed", "message": "The request to the model endpoint failed."}


def test_result_line_ids_are_stable_per_batch_and_custom_id() -> None:
    ok = UpstreamResponse(status_code=200, body={})
    first = orjson.loads(result_line("batch_1", "a", ok))["id"]

    assert first == orjson.loads(result_line("batch_1", "a", ok))["id"]
    assert first != orjson.loads(result_line("batch_2", "a", ok))["id"]
    assert first.startswith("batch_req_")


def test_never_ran_line_shape() -> None:
    line = orjson.loads(never_ran_line("batch_1", "z", "batch_cancelled", "cancelled first"))

    assert line == {
        "id": batch_request_id("batch_1", "z"),
        "custom_id": "z",
        "response": None,
        "error": {"code": "batch_cancelled", "message": "cancelled first"},
    }


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ({"status_code": 200}, True),
        ({"status_code": 201}, True),
        ({"status_code": 299}, True),
        ({"status_code": 300}, False),
        ({"status_code": 400}, False),
        ({"status_code": 500}, False),
        (None, False),
    ],
)
def test_is_success_means_a_2xx_answer(response: dict[str, int] | None, expected: bool) -> None:
    assert is_success({"response": response, "error": None}) is expected


def test_usage_of_chat_reads_prompt_and_completion_tokens_with_details() -> None:
    body = {
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "total_tokens": 15,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 2},
        }
    }

    assert usage_of("/v1/chat/completions", body) == Usage(
        input_tokens=10, cached_tokens=3, output_tokens=5, reasoning_tokens=2, total_tokens=15
    )


def test_usage_of_completions_without_total_adds_input_and_output() -> None:
    body = {"usage": {"prompt_tokens": 7, "completion_tokens": 3}}

    assert usage_of("/v1/completions", body) == Usage(input_tokens=7, output_tokens=3, total_tokens=10)


def test_usage_of_embeddings_counts_prompt_tokens_as_input_only() -> None:
    body = {"usage": {"prompt_tokens": 4, "total_tokens": 4}}

    assert usage_of("/v1/embeddings", body) == Usage(input_tokens=4, output_tokens=0, total_tokens=4)


def test_usage_of_embeddings_ignores_completion_tokens() -> None:
    body = {"usage": {"prompt_tokens": 4, "completion_tokens": 9}}

    assert usage_of("/v1/embeddings", body) == Usage(input_tokens=4, output_tokens=0, total_tokens=4)


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/embeddings", "/v1/responses"])
def test_usage_of_keeps_the_servers_total_when_it_differs_from_the_sum(endpoint: str) -> None:
    """Some servers count tokens outside prompt and completion (tool schemas, images) in the total."""
    counts = {"prompt_tokens": 10, "completion_tokens": 5, "input_tokens": 10, "output_tokens": 5}

    assert usage_of(endpoint, {"usage": {**counts, "total_tokens": 42}}).total_tokens == 42


def test_usage_of_responses_reads_input_and_output_names() -> None:
    body = {
        "usage": {
            "input_tokens": 8,
            "output_tokens": 6,
            "total_tokens": 14,
            "input_tokens_details": {"cached_tokens": 1},
            "output_tokens_details": {"reasoning_tokens": 2},
        }
    }

    assert usage_of("/v1/responses", body) == Usage(
        input_tokens=8, cached_tokens=1, output_tokens=6, reasoning_tokens=2, total_tokens=14
    )


@pytest.mark.parametrize(
    "body",
    [None, "text", [], {}, {"usage": None}, {"usage": {"prompt_tokens": "many", "completion_tokens": True}}],
)
def test_usage_of_missing_or_malformed_usage_is_zero(body: object) -> None:
    assert usage_of("/v1/chat/completions", body) == Usage()


def _reference_split(data: bytes) -> list[tuple[int, int, bytes]]:
    out, offset = [], 0
    for line in data.splitlines(keepends=True):
        content = line.rstrip(b"\n")
        content = content[:-1] if content.endswith(b"\r") else content
        out.append((offset, offset + len(line), content))
        offset += len(line)
    return out


@pytest.mark.parametrize("piece", [1, 2, 3, 5, 8, 64, 4096])
@pytest.mark.parametrize(
    "data",
    [
        b'{"a":1}\r\n\n  \n{"b":"\xc3\xa9"}\n{"c":3}\r\n{"last":true}',
        b'{"a":1}\r\n{"b":2}\n',  # ends with its newline: no empty line after it
        b'{"a":1}\n{"last":true}\r',  # a final line without "\n" still loses its "\r"
    ],
)
def test_split_lines_is_the_same_whatever_the_read_pieces(data: bytes, piece: int) -> None:
    pieces = [data[i : i + piece] for i in range(0, len(data), piece)]

    assert list(split_lines(pieces)) == _reference_split(data)


def test_split_lines_offsets_start_at_the_base_offset_and_cover_the_range() -> None:
    data = b"one\ntwo\r\nthree\n"

    got = list(split_lines([data], base_offset=100))

    assert got == [(100, 104, b"one"), (104, 109, b"two"), (109, 115, b"three")]


def test_split_lines_goes_on_past_an_empty_read_piece() -> None:
    assert list(split_lines([b"one\ntw", b"", b"o\n", b"", b"three"])) == [
        (0, 4, b"one"),
        (4, 8, b"two"),
        (8, 13, b"three"),
    ]


def test_split_lines_of_nothing_yields_nothing() -> None:
    assert list(split_lines([b"", b""])) == []
