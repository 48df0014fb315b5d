"""validate_batch: every validation code with its line, chunk planning, outcomes and re-runs."""

from __future__ import annotations

import itertools
import logging
import tracemalloc
from typing import Any

import orjson
import pytest

from batch_api import object_keys
from batch_api.contract import models
from batch_api.contract.errors import NotFound
from batch_api.upstreams.routing import UpstreamSpec
from batch_api.workflow.lines import split_lines
from batch_api.workflow.manifest import load_manifest
from batch_api.workflow.validate import embedding_input_count, validate_batch
from tests.unit.builders import (
    PROJECT,
    RecordingMetadata,
    add_batch,
    get_batch,
    ids,
    jsonl,
    make_deps,
    request,
)

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"
EMB = "/v1/embeddings"


def _errors(deps: Any) -> list[dict[str, Any]]:
    return [e.model_dump() for e in get_batch(deps).errors]


def _fail_with(line: Any, *, endpoint: str = CHAT) -> list[dict[str, Any]]:
    """Validate a file whose third line (after a good line and a blank one) is `line`."""
    deps = make_deps()
    add_batch(deps, jsonl([request("ok", endpoint), "", line, request("ok2", endpoint)]), endpoint=endpoint)
    result = validate_batch(ids(), deps)
    assert result.state() == {**ids(), "next": "done", "status": "failed"}
    return _errors(deps)


# ---------------------------------------------------------------- a valid file


@pytest.mark.parametrize("endpoint", list(models.ENDPOINTS))
def test_valid_file_moves_the_batch_in_progress_with_a_manifest(endpoint: str) -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request(f"r{i}", endpoint) for i in range(5)]), endpoint=endpoint)

    result = validate_batch(ids(), deps)

    assert result.state() == {
        **ids(),
        "next": "process",
        "manifest_key": object_keys.manifest_key("batch_test"),
        "chunk_count": 1,
    }
    batch = get_batch(deps)
    assert batch.status == "in_progress"
    assert batch.in_progress_at == deps.now()
    assert batch.model == "gpt-test"
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 0, "failed": 0}
    assert batch.chunk_count == 1
    assert batch.errors == []
    assert [c.model_dump() for c in load_manifest(deps, "batch_test")] == [
        {"index": 0, "start": 0, "end": len(deps.blobs.get("files/file-input")), "first_line": 1, "lines": 5}
    ]
    assert deps.events.events == []


def test_rerun_after_validation_answers_from_the_stored_record_without_revalidating() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), request("b")]))
    first = validate_batch(ids(), deps)
    deps.blobs.put("files/file-input", b"now garbage\n")  # a re-validation would fail on this

    assert validate_batch(ids(), deps) == first
    assert get_batch(deps).status == "in_progress"


@pytest.mark.parametrize(
    ("status", "expected_next"),
    [("finalizing", "finalize"), ("completed", "done"), ("failed", "done"), ("cancelled", "done")],
)
def test_rerun_on_a_later_status_returns_its_next_step(status: str, expected_next: str) -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))
    validate_batch(ids(), deps)
    deps.metadata.update_batch(PROJECT, "batch_test", {"status": status}, expected_status={"in_progress"})

    result = validate_batch(ids(), deps)

    assert result.next == expected_next
    if expected_next == "done":
        assert result.status == status


def test_cancelled_while_validating_still_plans_and_goes_to_finalize() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), request("b"), request("c")]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"validating"}
    )

    result = validate_batch(ids(), deps)

    assert result.next == "finalize"
    batch = get_batch(deps)
    assert batch.status == "cancelling"
    assert (batch.request_counts.total, batch.chunk_count, batch.model) == (3, 1, "gpt-test")
    assert sum(c.lines for c in load_manifest(deps, "batch_test")) == 3
    assert validate_batch(ids(), deps) == result  # the re-run does not validate again


def test_a_cancelling_batch_already_planned_is_not_validated_again() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), request("b")]))
    planned = validate_batch(ids(), deps)
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"in_progress"}
    )
    deps.blobs.put("files/file-input", b"now garbage\n")  # a re-validation would fail on this

    result = validate_batch(ids(), deps)

    assert result.state() == {**planned.state(), "next": "finalize"}
    batch = get_batch(deps)
    assert (batch.status, batch.errors, batch.chunk_count) == ("cancelling", [], 1)


def test_an_invalid_file_cancelled_while_validating_ends_cancelled_with_its_errors() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), b"{broken"]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"validating"}
    )

    result = validate_batch(ids(), deps)

    assert result.state() == {**ids(), "next": "done", "status": "cancelled"}
    batch = get_batch(deps)
    assert (batch.status, batch.cancelled_at, batch.failed_at) == ("cancelled", deps.now(), None)
    assert _errors(deps) == [
        {
            "code": "invalid_json_line",
            "message": "This line is not parseable as valid JSON.",
            "param": None,
            "line": 2,
        }
    ]
    assert [kind for kind, _ in deps.events.events] == ["batch.cancelled"]


class _PlannedByAnotherRun(RecordingMetadata):
    """Another run of validate plans the batch while this one is reading its input file."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def get_file(self, project_id: str, file_id: str) -> Any:
        if self.armed:
            self.armed = False
            self.update_batch(
                project_id,
                "batch_test",
                {"status": "in_progress", "chunk_count": 1},
                expected_status={"validating"},
            )
        return super().get_file(project_id, file_id)


def test_a_batch_planned_by_another_run_meanwhile_is_not_failed() -> None:
    deps = make_deps()
    deps.metadata = _PlannedByAnotherRun()
    add_batch(deps, jsonl([b"{broken"]))

    result = validate_batch(ids(), deps)

    assert result.state() == {
        **ids(),
        "next": "process",
        "manifest_key": object_keys.manifest_key("batch_test"),
        "chunk_count": 1,
    }
    batch = get_batch(deps)
    assert (batch.status, batch.errors, batch.failed_at) == ("in_progress", [], None)
    assert deps.events.events == []


def test_unknown_batch_raises_not_found() -> None:
    with pytest.raises(NotFound):
        validate_batch(ids("batch_nope"), make_deps())


# ---------------------------------------------------------------- each validation code, with its line


@pytest.mark.parametrize(
    ("line", "code", "param"),
    [
        (b"{not json", "invalid_json_line", None),
        (b"\xff\xfe garbage", "invalid_json_line", None),
        (b"[1, 2]", "invalid_json_line", None),
        (
            {"method": "POST", "url": CHAT, "body": {"model": "gpt-test", "messages": []}},
            "missing_required_parameter",
            "custom_id",
        ),
        (
            {"custom_id": "x", "url": CHAT, "body": {"model": "gpt-test", "messages": []}},
            "missing_required_parameter",
            "method",
        ),
        (
            {"custom_id": "x", "method": "POST", "body": {"model": "gpt-test", "messages": []}},
            "missing_required_parameter",
            "url",
        ),
        ({"custom_id": "x", "method": "POST", "url": CHAT}, "missing_required_parameter", "body"),
        ({**request("x"), "custom_id": ""}, "invalid_request", "custom_id"),
        ({**request("x"), "custom_id": 7}, "invalid_request", "custom_id"),
        ({**request("x"), "method": "GET"}, "invalid_request", "method"),
        ({**request("x"), "url": "/v1/embeddings"}, "invalid_url", "url"),
        ({**request("x"), "body": "hello"}, "invalid_request", "body"),
        (
            {**request("x"), "body": {"model": "gpt-test", "messages": [], "stream": True}},
            "streaming_unsupported",
            "body.stream",
        ),
        ({**request("x"), "body": {"messages": []}}, "missing_required_parameter", "body.model"),
        ({**request("x"), "body": {"model": 3, "messages": []}}, "invalid_request", "body.model"),
        (request("x", model="other-model"), "mismatched_model", "body.model"),
        ({**request("x"), "body": {"model": "gpt-test"}}, "missing_required_parameter", "body.messages"),
        (request("ok"), "duplicate_custom_id", "custom_id"),
    ],
)
def test_each_bad_line_fails_the_batch_with_its_code_param_and_line(
    line: Any, code: str, param: str | None
) -> None:
    errors = _fail_with(line)

    assert [(e["code"], e["param"], e["line"]) for e in errors] == [(code, param, 3)]
    message = errors[0]["message"]
    if code == "invalid_json_line" and line != b"[1, 2]":
        assert message == "This line is not parseable as valid JSON."  # OpenAI's words
    elif code == "missing_required_parameter":
        assert message == f"Missing required parameter: '{param}'."
    elif code == "invalid_url":
        assert message == "The URL provided for this request does not match the batch endpoint."
    elif code == "streaming_unsupported":
        assert message == "Chat Completions: Streaming is not supported in the Batch API."
    else:  # where OpenAI has no wording of its own, ours names the line
        assert "line 3" in message.lower()


@pytest.mark.parametrize(
    ("endpoint", "name"),
    [
        ("/v1/chat/completions", "Chat Completions"),
        ("/v1/completions", "Completions"),
        ("/v1/embeddings", "Embeddings"),
        ("/v1/responses", "Responses"),
        ("/v1/moderations", "Moderations"),
    ],
)
def test_streaming_is_refused_in_the_endpoints_own_name(endpoint: str, name: str) -> None:
    field = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}.get(endpoint, "input")
    line = {
        "custom_id": "s",
        "method": "POST",
        "url": endpoint,
        "body": {"model": "m", field: "x", "stream": True},
    }
    deps = make_deps()
    add_batch(deps, jsonl([line]), endpoint=endpoint)
    validate_batch(ids(), deps)
    assert [e["message"] for e in _errors(deps)] == [f"{name}: Streaming is not supported in the Batch API."]


def test_streaming_on_an_endpoint_without_an_openai_name_is_refused_by_its_path() -> None:
    endpoint = "/v1/audio/speech"
    line = {"custom_id": "s", "method": "POST", "url": endpoint, "body": {"model": "m", "stream": True}}
    deps = make_deps()
    add_batch(deps, jsonl([line]), endpoint=endpoint)

    validate_batch(ids(), deps)

    assert _errors(deps) == [
        {
            "code": "streaming_unsupported",
            "message": f"{endpoint}: Streaming is not supported in the Batch API.",
            "param": "body.stream",
            "line": 1,
        }
    ]


@pytest.mark.parametrize(
    ("line", "code", "param", "message"),
    [
        (
            b"[1, 2]",
            "invalid_json_line",
            None,
            "Line 3 is JSON but not an object; each line must be one request object.",
        ),
        (
            {**request("x"), "custom_id": 7},
            "invalid_request",
            "custom_id",
            "Line 3 has custom_id 7; it must be a non-empty string.",
        ),
        (
            {**request("x"), "custom_id": ""},
            "invalid_request",
            "custom_id",
            "Line 3 has custom_id ''; it must be a non-empty string.",
        ),
        (
            {**request("x"), "method": "GET"},
            "invalid_request",
            "method",
            "Line 3 has method 'GET'; only 'POST' is supported.",
        ),
        (
            {**request("x"), "body": "hello"},
            "invalid_request",
            "body",
            "Line 3 has a 'body' that is not a JSON object.",
        ),
        (
            {**request("x"), "body": {"model": [1], "messages": []}},
            "invalid_request",
            "body.model",
            "Line 3 has body.model [1]; it must be a non-empty string.",
        ),
        (
            request("x", model="other-model"),
            "mismatched_model",
            "body.model",
            "Line 3 uses model 'other-model', but line 1 uses 'gpt-test'; a batch file must use one model.",
        ),
        (
            request("ok"),
            "duplicate_custom_id",
            "custom_id",
            "Line 3 repeats custom_id 'ok', already used on line 1; custom_id must be unique within the file.",
        ),
    ],
)
def test_our_own_messages_name_the_line_and_show_the_value(
    line: Any, code: str, param: str | None, message: str
) -> None:
    assert _fail_with(line) == [{"code": code, "message": message, "param": param, "line": 3}]


@pytest.mark.parametrize(
    ("method", "shown"),
    [
        ("G" * 78, "'" + "G" * 78 + "'"),  # 80 characters with its quotes: shown whole
        ("G" * 79, "'" + "G" * 76 + "..."),  # 81: cut to 77 and "..."
        ("G" * 500, "'" + "G" * 76 + "..."),
    ],
)
def test_a_long_value_is_shown_cut_to_80_characters(method: str, shown: str) -> None:
    assert len(shown) == 80
    assert _fail_with({**request("x"), "method": method}) == [
        {
            "code": "invalid_request",
            "message": f"Line 3 has method {shown}; only 'POST' is supported.",
            "param": "method",
            "line": 3,
        }
    ]


def test_duplicate_custom_id_names_the_first_line() -> None:
    [error] = _fail_with(request("ok"))

    assert "line 1" in error["message"]


def test_mismatched_model_names_both_models() -> None:
    [error] = _fail_with(request("x", model="other-model"))

    assert "other-model" in error["message"] and "gpt-test" in error["message"]


def test_stream_false_is_fine() -> None:
    deps = make_deps()
    line = request("a")
    line["body"]["stream"] = False
    add_batch(deps, jsonl([line]))

    assert validate_batch(ids(), deps).next == "process"


@pytest.mark.parametrize(
    ("endpoint", "field"),
    [
        ("/v1/chat/completions", "messages"),
        ("/v1/completions", "prompt"),
        ("/v1/embeddings", "input"),
        ("/v1/responses", "input"),
        ("/v1/moderations", "input"),
    ],
)
def test_each_endpoint_requires_its_body_field(endpoint: str, field: str) -> None:
    line = request("x", endpoint)
    del line["body"][field]

    errors = _fail_with(line, endpoint=endpoint)

    assert [(e["code"], e["param"], e["line"]) for e in errors] == [
        ("missing_required_parameter", f"body.{field}", 3)
    ]


def test_a_line_with_several_problems_reports_each() -> None:
    errors = _fail_with({"custom_id": "x", "method": "PUT", "url": "/v1/nope"})

    assert {(e["code"], e["param"]) for e in errors} == {
        ("missing_required_parameter", "body"),
        ("invalid_request", "method"),
        ("invalid_url", "url"),
    }
    assert {e["line"] for e in errors} == {3}


def test_failed_batch_has_failed_at_and_publishes_batch_failed() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([b"nope"]))

    validate_batch(ids(), deps)

    batch = get_batch(deps)
    assert batch.status == "failed" and batch.failed_at == deps.now()
    [(kind, detail)] = deps.events.events
    assert kind == "batch.failed"
    assert detail["project_id"] == PROJECT and detail["id"] == "batch_test" and detail["status"] == "failed"
    assert detail["errors"]["data"][0]["code"] == "invalid_json_line"
    assert not deps.blobs.exists(object_keys.manifest_key("batch_test"))


def test_errors_are_capped_but_the_whole_file_is_counted(caplog: pytest.LogCaptureFixture) -> None:
    deps = make_deps(max_batch_errors=3)
    add_batch(deps, jsonl([b"bad"] * 10 + [request("a")]))

    with caplog.at_level(logging.INFO, logger="batch_api.workflow.validate"):
        validate_batch(ids(), deps)

    assert [e["line"] for e in _errors(deps)] == [1, 2, 3]
    assert ": 10 errors, 3 kept" in caplog.text


# ---------------------------------------------------------------- limits and the input file


def test_more_requests_than_the_limit_is_batch_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MAX_REQUESTS_PER_BATCH", 3)
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), "", request("b"), request("c"), request("d"), request("e")]))

    validate_batch(ids(), deps)

    assert _errors(deps) == [
        {
            "code": "batch_too_large",
            "message": "Line 5 is request number 4; a batch may hold at most 3 requests. "
            "Split the file into smaller batches.",
            "param": None,
            "line": 5,
        }
    ]


def test_requests_at_the_limit_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MAX_REQUESTS_PER_BATCH", 3)
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), request("b"), request("c")]))

    assert validate_batch(ids(), deps).next == "process"


def test_file_over_the_size_limit_is_file_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl([request("a"), request("b")])
    monkeypatch.setattr(models, "MAX_BATCH_FILE_BYTES", len(data) - 1)
    deps = make_deps()
    add_batch(deps, data)

    validate_batch(ids(), deps)

    assert _errors(deps) == [
        {
            "code": "file_too_large",
            "message": f"The input file is {len(data):,} bytes; a batch file may be at most "
            f"{len(data) - 1:,} bytes.",
            "param": "input_file_id",
            "line": None,
        }
    ]


def test_a_file_of_exactly_the_size_limit_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    data = jsonl([request("a"), request("b")])
    monkeypatch.setattr(models, "MAX_BATCH_FILE_BYTES", len(data))
    deps = make_deps()
    add_batch(deps, data)

    assert validate_batch(ids(), deps).next == "process"


def test_too_many_embedding_inputs_summed_over_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "MAX_EMBEDDING_INPUTS", 5)
    emb = "/v1/embeddings"
    lines = [
        request("a", emb),
        {**request("b", emb), "body": {"model": "gpt-test", "input": ["x", "y", "z"]}},
    ]
    lines += [{**request("c", emb), "body": {"model": "gpt-test", "input": [[1, 2], [3]]}}, request("d", emb)]
    deps = make_deps()
    add_batch(deps, jsonl(lines), endpoint=emb)

    validate_batch(ids(), deps)

    assert [(e["code"], e["line"]) for e in _errors(deps)] == [("too_many_embedding_inputs", 3)]


@pytest.mark.parametrize(
    ("inputs", "error_line"),
    [([2, 1], None), ([3, 1, 1], 2), ([1, 1, 2, 5], 3)],
)
def test_embedding_inputs_may_reach_the_limit_and_the_line_passing_it_is_named_once(
    monkeypatch: pytest.MonkeyPatch, inputs: list[int], error_line: int | None
) -> None:
    monkeypatch.setattr(models, "MAX_EMBEDDING_INPUTS", 3)
    lines = [
        {**request(f"r{i}", EMB), "body": {"model": "gpt-test", "input": ["x"] * n}}
        for i, n in enumerate(inputs)
    ]
    deps = make_deps()
    add_batch(deps, jsonl(lines), endpoint=EMB)

    result = validate_batch(ids(), deps)

    if error_line is None:
        assert result.next == "process"
    else:
        assert _errors(deps) == [
            {
                "code": "too_many_embedding_inputs",
                "message": f"The embedding inputs add up to more than 3 by line {error_line}; "
                "split the file into smaller batches.",
                "param": None,
                "line": error_line,
            }
        ]


@pytest.mark.parametrize(
    ("value", "count"), [("x", 1), (["a", "b"], 2), ([1, 2, 3], 1), ([[1], [2]], 2), ([], 0)]
)
def test_embedding_input_count(value: Any, count: int) -> None:
    assert embedding_input_count(value) == count


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n"])
def test_a_file_without_requests_is_empty_file(data: bytes) -> None:
    deps = make_deps()
    add_batch(deps, data)

    validate_batch(ids(), deps)

    assert _errors(deps) == [
        {
            "code": "empty_file",
            "message": "The input file has no requests.",
            "param": "input_file_id",
            "line": None,
        }
    ]


@pytest.mark.parametrize("how", ["no_record", "no_body"])
def test_missing_input_file_fails_with_invalid_request_on_input_file_id(how: str) -> None:
    """Only a delete that raced batches.create can have removed the body (docs/bad-input.md)."""
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))
    record = deps.metadata.files["file-input"]
    if how == "no_record":
        del deps.metadata.files["file-input"]
    else:
        deps.blobs.delete(record.blob_key)

    result = validate_batch(ids(), deps)

    assert result.status == "failed"
    assert _errors(deps) == [
        {
            "code": "invalid_request",
            "message": "The input file file-input was deleted before the batch could read it.",
            "param": "input_file_id",
            "line": None,
        }
    ]


@pytest.mark.parametrize("how", ["deleted", "expired"])
def test_an_input_file_deleted_or_expired_after_create_is_still_read(how: str) -> None:
    """A batch keeps its input: the file answers 404, but its body stays until the batch ends."""
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))
    record = deps.metadata.files["file-input"]
    if how == "deleted":
        deps.metadata.mark_file_deleted(PROJECT, "file-input")
    else:
        deps.metadata.files["file-input"] = record.model_copy(update={"expires_at": deps.now()})

    result = validate_batch(ids(), deps)

    assert result.next == "process"
    assert get_batch(deps).request_counts.total == 1


# ---------------------------------------------------------------- chunk planning


def _check_plan_covers_the_file(deps: Any) -> list[dict[str, Any]]:
    """Every chunk's byte range holds exactly its `lines` requests starting at `first_line`, and the
    ranges tile the file."""
    data = deps.blobs.get("files/file-input")
    numbered = list(enumerate(split_lines([data]), start=1))
    plans = [c.model_dump() for c in load_manifest(deps, "batch_test")]
    assert plans[0]["start"] == 0 and plans[-1]["end"] == len(data)
    for before, after in itertools.pairwise(plans):
        assert before["end"] == after["start"]
    for plan in plans:
        inside = [(n, raw) for n, (s, e, raw) in numbered if s >= plan["start"] and e <= plan["end"]]
        assert inside[0][0] == plan["first_line"]
        assert sum(1 for _, raw in inside if raw.strip()) == plan["lines"]
    assert get_batch(deps).chunk_count == len(plans)
    return plans


def test_chunks_hold_at_most_chunk_max_lines_requests() -> None:
    deps = make_deps(chunk_max_lines=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(5)]))

    validate_batch(ids(), deps)

    plans = _check_plan_covers_the_file(deps)
    assert [(p["lines"], p["first_line"]) for p in plans] == [(2, 1), (2, 3), (1, 5)]


def test_chunks_stay_under_chunk_max_bytes_and_a_huge_line_gets_its_own() -> None:
    deps = make_deps(chunk_max_bytes=1024)
    small = [request(f"s{i}", content="x" * 300) for i in range(4)]
    huge = request("huge", content="y" * 3000)
    add_batch(deps, jsonl([*small, huge, request("tail")]))

    validate_batch(ids(), deps)

    plans = _check_plan_covers_the_file(deps)
    assert [p["lines"] for p in plans] == [2, 2, 1, 1]
    assert all(p["end"] - p["start"] <= 1024 for i, p in enumerate(plans) if i != 2)


@pytest.mark.parametrize(("slack", "lines"), [(0, [2]), (-1, [1, 1])])
def test_a_chunk_may_hold_exactly_chunk_max_bytes(slack: int, lines: list[int]) -> None:
    data = jsonl([request(f"r{i}", content="x" * 600) for i in range(2)])
    deps = make_deps(chunk_max_bytes=len(data) + slack)
    add_batch(deps, data)

    validate_batch(ids(), deps)

    assert [p["lines"] for p in _check_plan_covers_the_file(deps)] == lines


def test_planning_with_crlf_blank_lines_and_no_final_newline() -> None:
    deps = make_deps(chunk_max_lines=2)
    lines = [orjson.dumps(request(f"r{i}")) for i in range(5)]
    data = (
        b"\r\n"
        + lines[0]
        + b"\r\n\r\n"
        + lines[1]
        + b"\r\n"
        + lines[2]
        + b"\r\n  \r\n"
        + lines[3]
        + b"\r\n"
        + lines[4]
    )
    add_batch(deps, data)

    validate_batch(ids(), deps)

    plans = _check_plan_covers_the_file(deps)
    # line numbers count the blank lines: r2 is on line 5, r4 on line 8
    assert [(p["lines"], p["first_line"]) for p in plans] == [(2, 1), (2, 5), (1, 8)]
    assert get_batch(deps).request_counts.total == 5


def test_error_line_numbers_count_blank_lines_and_crlf() -> None:
    deps = make_deps()
    add_batch(
        deps, b"\r\n" + orjson.dumps(request("a")) + b"\r\n\r\n{broken\r\n" + orjson.dumps(request("b"))
    )

    validate_batch(ids(), deps)

    assert [(e["code"], e["line"]) for e in _errors(deps)] == [("invalid_json_line", 4)]


def test_validation_streams_instead_of_loading_the_file() -> None:
    """An ~8 MB file validates with a small fraction of its size in extra memory."""
    deps = make_deps()
    deps.blobs.piece = 1 << 16  # realistic read pieces; the tiny default would only make this slow
    data = jsonl([request(f"r{i}", content="z" * 800) for i in range(8000)])
    add_batch(deps, data)

    tracemalloc.start()
    try:
        result = validate_batch(ids(), deps)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert result.next == "process"
    assert peak < len(data) / 4, f"peak {peak} for a {len(data)} byte file"


# ---------------------------------------------------------------- routing by model


def test_a_model_no_upstream_serves_fails_the_batch_as_openai_words_it() -> None:
    deps = make_deps()
    asked: list[str] = []
    served = UpstreamSpec(name="served", kind="mock", models=["served-model"])
    deps.route = lambda model: asked.append(model or "") or (served if model == "served-model" else None)
    add_batch(deps, jsonl(["", request("a", model="gpt-unknown"), request("b", model="gpt-unknown")]))
    result = validate_batch(ids(), deps)
    assert result.state() == {**ids(), "next": "done", "status": "failed"}
    assert asked == ["gpt-unknown"]  # asked once, for the file's one model
    assert [(e["code"], e["param"], e["line"], e["message"]) for e in _errors(deps)] == [
        (
            "model_not_found",
            "body.model",
            2,  # the line of its first use
            "The provided model 'gpt-unknown' is not supported by the Batch API.",
        )
    ]


def test_a_served_model_plans_the_batch() -> None:
    deps = make_deps()
    deps.route = lambda model: UpstreamSpec(name="u", kind="mock") if model == "gpt-test" else None
    add_batch(deps, jsonl([request("a")]))
    assert validate_batch(ids(), deps).next == "process"
