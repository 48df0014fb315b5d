"""finalize_batch and fail_batch: files, counts, terminal statuses, idempotency."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from batch_api import object_keys
from batch_api.contract.errors import ConditionFailed
from batch_api.contract.ids import batch_request_id, output_file_id
from batch_api.contract.models import ChunkProgress
from batch_api.ports import UpstreamResponse
from batch_api.service.batches import cancel_batch
from batch_api.service.files import delete_file
from batch_api.workflow import finalize
from batch_api.workflow import tally as tally_module
from batch_api.workflow.finalize import (
    NEVER_RAN_MESSAGES,
    WRITE_PIECE_BYTES,
    FinalizeError,
    fail_batch,
    finalize_batch,
)
from batch_api.workflow.lines import result_line
from batch_api.workflow.manifest import load_manifest
from batch_api.workflow.process import process_chunk
from batch_api.workflow.validate import validate_batch
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
from tests.unit.fakes_upstream import DEFAULT_USAGE, FakeUpstream, http_error, transport_failure

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
FINALIZE_LOGGER = finalize.__name__


def _messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """The messages finalize logged at `level`."""
    return [r.getMessage() for r in caplog.records if r.name == FINALIZE_LOGGER and r.levelno == level]


def _run_batch(
    n: int, upstream: FakeUpstream | None = None, clock: FakeClock | None = None, **settings: Any
) -> Any:
    """Validate and process every chunk; return deps (the batch is left for finalize)."""
    deps = make_deps(upstream or FakeUpstream(), clock, **settings)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(n)]), output_expires_after_seconds=7200)
    assert validate_batch(ids(), deps).next == "process"
    for chunk in load_manifest(deps, "batch_test"):
        process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)
    return deps


def test_finalize_writes_output_and_error_files_and_completes(caplog: pytest.LogCaptureFixture) -> None:
    deps = _run_batch(5, FakeUpstream({"r1": http_error(400), "r3": transport_failure()}), chunk_max_lines=2)
    deps.clock.advance(60)

    with caplog.at_level(logging.INFO, logger=FINALIZE_LOGGER):
        result = finalize_batch(ids(), deps)

    assert result.model_dump() == {**ids(), "status": "completed"}
    batch = get_batch(deps)
    assert batch.status == "completed" and batch.completed_at == deps.now()
    assert batch.finalizing_at == deps.now()
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 3, "failed": 2}
    assert batch.usage.input_tokens == 3 * DEFAULT_USAGE[CHAT]["prompt_tokens"]
    assert batch.usage.total_tokens == 3 * DEFAULT_USAGE[CHAT]["total_tokens"]
    assert batch.output_file_id == output_file_id("batch_test", "output")
    assert batch.error_file_id == output_file_id("batch_test", "error")
    assert sorted(line["custom_id"] for line in file_lines(deps, batch.output_file_id)) == ["r0", "r2", "r4"]
    errors = {line["custom_id"]: line for line in file_lines(deps, batch.error_file_id)}
    assert errors["r1"]["response"]["status_code"] == 400 and errors["r1"]["error"] is None
    assert errors["r3"]["response"] is None and errors["r3"]["error"]["code"] == "timeout"
    for file_id, kind in ((batch.output_file_id, "output"), (batch.error_file_id, "error")):
        record = deps.metadata.get_file(PROJECT, file_id)
        assert record is not None
        assert record.purpose == "batch_output"
        assert record.filename == f"batch_test_{kind}.jsonl"
        assert (record.created_at, record.expires_at) == (deps.now(), deps.now() + 7200)
        assert deps.blobs.expiry[object_keys.file_key(file_id)] == deps.now() + 7200
    [(kind, detail)] = deps.events.events
    assert kind == "batch.completed"
    assert detail["project_id"] == PROJECT and detail["status"] == "completed"
    assert detail["output_file_id"] == batch.output_file_id
    assert list(deps.journal.read("batch_test", 0)) == []  # journals freed once the status is stored
    assert deps.metadata.list_chunk_progress("batch_test") == []  # and the progress records with them
    assert _messages(caplog, logging.INFO) == ["batch batch_test completed: 3 completed, 2 failed"]


def test_finalize_twice_writes_nothing_new() -> None:
    deps = _run_batch(3, FakeUpstream({"r0": http_error(500)}))
    first = finalize_batch(ids(), deps)
    writes, events, stored = list(deps.blobs.writes), list(deps.events.events), get_batch(deps)

    assert finalize_batch(ids(), deps) == first
    assert deps.blobs.writes == writes
    assert deps.events.events == events
    assert get_batch(deps) == stored


def test_rerun_after_a_crash_before_the_terminal_update_reuses_the_files() -> None:
    deps = _run_batch(3, FakeUpstream({"r0": http_error(500)}))
    real_update = deps.metadata.update_batch
    calls = {"n": 0}

    def crash_on_terminal_update(
        project_id: str, batch_id: str, changes: Any, *, expected_status: Any
    ) -> Any:
        if changes.get("status") == "completed" and calls["n"] == 0:
            calls["n"] += 1
            raise RuntimeError("process killed")
        return real_update(project_id, batch_id, changes, expected_status=expected_status)

    deps.metadata.update_batch = crash_on_terminal_update
    with pytest.raises(RuntimeError):
        finalize_batch(ids(), deps)
    assert get_batch(deps).status == "finalizing"

    assert finalize_batch(ids(), deps).status == "completed"

    assert sorted(deps.blobs.writes) == sorted(
        object_keys.file_key(output_file_id("batch_test", kind)) for kind in ("output", "error")
    )  # each file written once
    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert len(file_lines(deps, batch.output_file_id)) == 2


def test_rerun_on_a_terminal_batch_frees_a_journal_left_behind() -> None:
    deps = _run_batch(2)
    leftover = list(deps.journal.read("batch_test", 0))
    finalize_batch(ids(), deps)
    deps.journal.append("batch_test", 0, leftover)  # as if the process died before deleting it

    assert finalize_batch(ids(), deps).status == "completed"
    assert list(deps.journal.read("batch_test", 0)) == []


def test_rerun_on_a_terminal_batch_frees_chunk_progress_left_behind() -> None:
    deps = _run_batch(4, chunk_max_lines=2)
    left = deps.metadata.list_chunk_progress("batch_test")
    assert len(left) == 2
    finalize_batch(ids(), deps)
    for progress in left:  # as if the process died before deleting them
        deps.metadata.put_chunk_progress("batch_test", progress)

    assert finalize_batch(ids(), deps).status == "completed"
    assert deps.metadata.list_chunk_progress("batch_test") == []
    assert get_batch(deps).request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}


def test_a_batch_whose_every_line_failed_is_completed_without_an_output_file() -> None:
    deps = _run_batch(3, FakeUpstream({f"r{i}": http_error(400) for i in range(3)}))

    assert finalize_batch(ids(), deps).status == "completed"

    batch = get_batch(deps)
    assert batch.output_file_id is None
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 0, "failed": 3}
    assert len(file_lines(deps, batch.error_file_id)) == 3
    assert not deps.blobs.exists(object_keys.file_key(output_file_id("batch_test", "output")))


def test_a_batch_without_failures_has_no_error_file() -> None:
    deps = _run_batch(2)

    finalize_batch(ids(), deps)

    batch = get_batch(deps)
    assert batch.error_file_id is None
    assert deps.metadata.get_file(PROJECT, output_file_id("batch_test", "error")) is None


def test_cancel_mid_run_ends_cancelled_with_batch_cancelled_lines_and_counts_adding_up() -> None:
    holder: dict[str, Any] = {}

    def cancel_at_fourth(n: int, _body: dict[str, Any]) -> None:
        if n == 4:
            holder["deps"].metadata.update_batch(
                PROJECT,
                "batch_test",
                {"status": "cancelling", "cancelling_at": holder["deps"].now()},
                expected_status={"in_progress"},
            )

    upstream = FakeUpstream({"r1": http_error(429)}, latency=0.01, on_call=cancel_at_fourth)
    deps = make_deps(upstream, requests_per_chunk=1, progress_interval_seconds=0.005, chunk_max_lines=10)
    holder["deps"] = deps
    add_batch(deps, jsonl([request(f"r{i}") for i in range(30)]))
    validate_batch(ids(), deps)
    results = [
        process_chunk({**ids(), "chunk": c.model_dump()}, deps) for c in load_manifest(deps, "batch_test")
    ]
    assert results[0].stopped == "cancelled"
    assert all(r.stopped == "cancelled" and r.done for r in results[1:])

    assert finalize_batch(ids(), deps).model_dump() == {**ids(), "status": "cancelled"}

    batch = get_batch(deps)
    ran = len(upstream.calls)
    assert 4 <= ran < 30
    assert batch.status == "cancelled" and batch.cancelled_at == deps.now()
    counts = batch.request_counts
    assert (counts.total, counts.completed, counts.failed) == (30, ran - 1, 30 - ran + 1)
    errors = file_lines(deps, batch.error_file_id)
    never_ran = [line for line in errors if line["error"] and line["error"]["code"] == "batch_cancelled"]
    assert len(never_ran) == 30 - ran
    assert {line["custom_id"] for line in never_ran} == {f"r{i}" for i in range(ran, 30)}
    assert all(line["response"] is None for line in never_ran)
    outputs = file_lines(deps, batch.output_file_id)
    assert len(outputs) == ran - 1
    assert {line["custom_id"] for line in outputs + errors} == {f"r{i}" for i in range(30)}
    assert deps.events.events[-1][0] == "batch.cancelled"


def test_deadline_ends_expired_with_batch_expired_lines() -> None:
    clock = FakeClock()
    upstream = FakeUpstream(on_call=lambda n, _b: clock.advance(86400) if n == 3 else None)
    deps = _run_batch(8, upstream, clock, requests_per_chunk=1)

    assert finalize_batch(ids(), deps).status == "expired"

    batch = get_batch(deps)
    assert batch.expired_at == deps.now()
    assert batch.request_counts.model_dump() == {"total": 8, "completed": 3, "failed": 5}
    expired = file_lines(deps, batch.error_file_id)
    assert sorted(line["custom_id"] for line in expired) == [f"r{i}" for i in range(3, 8)]
    assert {line["error"]["code"] for line in expired} == {"batch_expired"}
    assert len(file_lines(deps, batch.output_file_id)) == 3  # completed results are kept
    assert deps.events.events[-1][0] == "batch.expired"


def test_cancelled_while_validating_finalizes_as_cancelled_with_every_line_never_ran() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), request("b")]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"validating"}
    )
    assert validate_batch(ids(), deps).next == "finalize"

    assert finalize_batch(ids(), deps).status == "cancelled"

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 0, "failed": 2}
    assert batch.output_file_id is None
    assert {line["error"]["code"] for line in file_lines(deps, batch.error_file_id)} == {"batch_cancelled"}


def test_missing_results_without_cancel_or_deadline_are_a_bug() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), request("b")]))
    validate_batch(ids(), deps)  # no chunk was processed

    with pytest.raises(
        FinalizeError, match="batch batch_test: 2 requests never ran, but the batch is neither"
    ):
        finalize_batch(ids(), deps)
    assert get_batch(deps).status == "finalizing"  # not terminal: a retry or fail_batch decides


def test_finalize_of_a_validating_batch_is_refused() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))

    with pytest.raises(FinalizeError, match="batch batch_test cannot be finalized from status 'validating'"):
        finalize_batch(ids(), deps)


def test_journal_duplicates_count_once() -> None:
    deps = _run_batch(2)
    [line] = [x for x in deps.journal.read("batch_test", 0)][:1]
    deps.journal.append("batch_test", 0, [line])  # a retried append landed twice

    finalize_batch(ids(), deps)

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
    assert len(file_lines(deps, batch.output_file_id)) == 2


@pytest.mark.parametrize("status", ["validating", "in_progress", "finalizing"])
def test_fail_batch_fails_any_active_batch(status: str) -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))
    deps.metadata.batches["batch_test"] = get_batch(deps).model_copy(update={"status": status})
    deps.metadata.put_chunk_progress("batch_test", ChunkProgress(index=0, completed=1))

    result = fail_batch({**ids(), "error": {"code": "internal_error", "message": "step kept failing"}}, deps)

    assert result.model_dump() == {**ids(), "status": "failed"}
    assert deps.metadata.list_chunk_progress("batch_test") == []
    batch = get_batch(deps)
    assert batch.status == "failed" and batch.failed_at == deps.now()
    assert [(e.code, e.message) for e in batch.errors] == [("internal_error", "step kept failing")]
    [(kind, detail)] = deps.events.events
    assert kind == "batch.failed" and detail["project_id"] == PROJECT


def test_fail_batch_of_a_cancelling_batch_ends_it_cancelled_with_the_error() -> None:
    """The batch answered `cancelling`, so it ends `cancelled`; what went wrong is kept in `errors`."""
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))
    deps.metadata.batches["batch_test"] = get_batch(deps).model_copy(update={"status": "cancelling"})

    result = fail_batch({**ids(), "error": {"code": "internal_error", "message": "step kept failing"}}, deps)

    assert result.model_dump() == {**ids(), "status": "cancelled"}
    batch = get_batch(deps)
    assert (batch.status, batch.cancelled_at, batch.failed_at) == ("cancelled", deps.now(), None)
    assert [(e.code, e.message) for e in batch.errors] == [("internal_error", "step kept failing")]
    assert [kind for kind, _ in deps.events.events] == ["batch.cancelled"]


def test_fail_batch_without_details_says_internal_error() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))

    fail_batch(ids(), deps)

    [entry] = get_batch(deps).errors
    assert entry.model_dump() == {
        "code": "internal_error",
        "message": "The batch failed because of an internal error.",
        "param": None,
        "line": None,
    }


def test_fail_batch_leaves_a_terminal_batch_alone() -> None:
    deps = _run_batch(1)
    finalize_batch(ids(), deps)
    events = list(deps.events.events)

    assert fail_batch({**ids(), "error": {"code": "x", "message": "y"}}, deps).status == "completed"
    assert get_batch(deps).status == "completed"
    assert deps.events.events == events


def test_finalize_losing_to_a_concurrent_finalize_returns_its_status() -> None:
    deps = _run_batch(1)
    real_update = deps.metadata.update_batch

    def someone_else_finished_first(
        project_id: str, batch_id: str, changes: Any, *, expected_status: Any
    ) -> Any:
        if changes.get("status") == "completed":  # the winner commits (and crashes before it announces)
            real_update(project_id, batch_id, changes, expected_status={"finalizing"})
            raise ConditionFailed(batch_id)
        return real_update(project_id, batch_id, changes, expected_status=expected_status)

    deps.metadata.update_batch = someone_else_finished_first

    assert finalize_batch(ids(), deps).status == "completed"
    # The loser finds the winner's commit still marked `event_pending` and announces it, once.
    assert [kind for kind, _ in deps.events.events] == ["batch.completed"]
    assert get_batch(deps).event_pending is False


def test_an_input_body_gone_mid_batch_keeps_what_finished(caplog: pytest.LogCaptureFixture) -> None:
    """Defence in depth (the body is kept while the batch runs): finalize writes the results that exist
    and counts the requests it cannot read as failed, with an entry in `errors` saying why."""
    deps = make_deps(FakeUpstream(), chunk_max_lines=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(4)]))
    validate_batch(ids(), deps)
    chunks = load_manifest(deps, "batch_test")
    process_chunk({**ids(), "chunk": chunks[0].model_dump()}, deps)
    deps.blobs.delete(object_keys.file_key("file-input"))
    assert process_chunk({**ids(), "chunk": chunks[1].model_dump()}, deps).stopped == "input_missing"

    with caplog.at_level(logging.WARNING, logger=FINALIZE_LOGGER):
        assert finalize_batch(ids(), deps).status == "completed"

    batch = get_batch(deps)
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    assert [line["custom_id"] for line in file_lines(deps, batch.output_file_id)] == ["r0", "r1"]
    assert [e.model_dump() for e in batch.errors] == [
        {
            "code": "input_file_missing",
            "message": "The body of input file file-input was gone before 2 requests could run; they are "
            "counted as failed and have no lines in the error file.",
            "param": "input_file_id",
            "line": None,
        }
    ]
    assert batch.error_file_id is None  # no line can be written for requests whose input is unreadable
    assert _messages(caplog, logging.WARNING) == [
        "batch batch_test: the input file's body is gone; 2 requests that never ran are counted failed "
        "without error lines"
    ]


def test_a_cancel_that_lands_while_finalize_writes_the_files_ends_the_batch_cancelled() -> None:
    """Finalize decides `completed` from a `finalizing` batch, writes the files, and the user's cancel
    lands before the commit: the cancel answered `cancelling`, so the batch ends `cancelled` (with every
    result), and no `batch.completed` is ever announced."""
    deps = _run_batch(3)
    real_update = deps.metadata.update_batch
    answers: list[Any] = []

    def cancel_lands_first(project_id: str, batch_id: str, changes: Any, *, expected_status: Any) -> Any:
        if changes.get("status") == "completed" and not answers:
            answers.append(cancel_batch(deps, PROJECT, batch_id))
        return real_update(project_id, batch_id, changes, expected_status=expected_status)

    deps.metadata.update_batch = cancel_lands_first

    assert finalize_batch(ids(), deps).status == "cancelled"

    assert answers[0].status == "cancelling"
    batch = get_batch(deps)
    assert (batch.status, batch.cancelled_at, batch.completed_at) == ("cancelled", deps.now(), None)
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
    assert len(file_lines(deps, batch.output_file_id)) == 3
    assert [kind for kind, _ in deps.events.events] == ["batch.cancelled"]
    assert batch.event_pending is False


def test_a_crash_between_the_terminal_commit_and_the_event_announces_it_on_the_retry() -> None:
    deps = _run_batch(1)
    real_publish = deps.events.publish

    def crash(kind: str, detail: Any) -> None:
        raise RuntimeError("killed before the event went out")

    deps.events.publish = crash  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        finalize_batch(ids(), deps)
    assert (get_batch(deps).status, get_batch(deps).event_pending) == ("completed", True)
    assert deps.events.events == []

    deps.events.publish = real_publish  # type: ignore[method-assign]
    assert finalize_batch(ids(), deps).status == "completed"  # the step's retry

    assert [kind for kind, _ in deps.events.events] == ["batch.completed"]
    assert get_batch(deps).event_pending is False


# ---------------------------------------------------------------- races and re-runs


def test_a_cancel_that_lands_before_the_move_to_finalizing_ends_the_batch_cancelled() -> None:
    """Finalize reads the batch `in_progress`; the user's cancel lands before finalize moves it to
    `finalizing`, so that move fails and finalize goes on from the batch as it now is."""
    deps = _run_batch(2)
    real_update = deps.metadata.update_batch
    answers: list[Any] = []

    def cancel_lands_first(project_id: str, batch_id: str, changes: Any, *, expected_status: Any) -> Any:
        if changes.get("status") == "finalizing" and not answers:
            answers.append(cancel_batch(deps, PROJECT, batch_id))
        return real_update(project_id, batch_id, changes, expected_status=expected_status)

    deps.metadata.update_batch = cancel_lands_first

    assert finalize_batch(ids(), deps).model_dump() == {**ids(), "status": "cancelled"}

    assert answers[0].status == "cancelling"
    batch = get_batch(deps)
    assert (batch.cancelled_at, batch.finalizing_at) == (deps.now(), None)
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
    assert [kind for kind, _ in deps.events.events] == ["batch.cancelled"]


def test_a_rerun_that_finds_the_files_registered_sets_their_expiry_again() -> None:
    """A crash after the files were registered and before the terminal commit: the re-run reuses them
    and tags their bodies with the recorded expiry again (the first tagging may not have held)."""
    deps = _run_batch(3, FakeUpstream({"r0": http_error(500)}), output_expires_after_seconds=7200)
    real_update = deps.metadata.update_batch
    crashed: list[bool] = []

    def crash_on_terminal_update(
        project_id: str, batch_id: str, changes: Any, *, expected_status: Any
    ) -> Any:
        if changes.get("status") == "completed" and not crashed:
            crashed.append(True)
            raise RuntimeError("process killed")
        return real_update(project_id, batch_id, changes, expected_status=expected_status)

    deps.metadata.update_batch = crash_on_terminal_update
    with pytest.raises(RuntimeError):
        finalize_batch(ids(), deps)
    first_run = deps.now()
    deps.blobs.expiry.clear()  # the tags are gone
    deps.clock.advance(300)

    assert finalize_batch(ids(), deps).status == "completed"

    batch = get_batch(deps)
    for file_id in (batch.output_file_id, batch.error_file_id):
        assert file_id is not None
        record = deps.metadata.get_file(PROJECT, file_id)
        assert record is not None and record.expires_at == first_run + 7200
        assert deps.blobs.expiry.get(record.blob_key) == record.expires_at


def test_a_rerun_does_not_tag_an_output_file_deleted_meanwhile() -> None:
    deps = _run_batch(3, FakeUpstream({"r0": http_error(500)}))
    real_update = deps.metadata.update_batch
    crashed: list[bool] = []

    def crash_on_terminal_update(
        project_id: str, batch_id: str, changes: Any, *, expected_status: Any
    ) -> Any:
        if changes.get("status") == "completed" and not crashed:
            crashed.append(True)
            raise RuntimeError("process killed")
        return real_update(project_id, batch_id, changes, expected_status=expected_status)

    deps.metadata.update_batch = crash_on_terminal_update
    with pytest.raises(RuntimeError):
        finalize_batch(ids(), deps)
    error_file = output_file_id("batch_test", "error")
    delete_file(deps, PROJECT, error_file)  # the user found it in the file list and deleted it
    deps.blobs.expiry.clear()

    assert finalize_batch(ids(), deps).status == "completed"

    assert object_keys.file_key(error_file) not in deps.blobs.expiry
    assert object_keys.file_key(output_file_id("batch_test", "output")) in deps.blobs.expiry


def test_a_concurrent_run_registering_a_file_first_is_not_an_error() -> None:
    deps = _run_batch(2, FakeUpstream({"r0": http_error(500)}))
    real_create = deps.metadata.create_file

    def the_other_run_registers_it_first(record: Any) -> None:
        real_create(record)  # the concurrent run, with the same record
        real_create(record)  # ours

    deps.metadata.create_file = the_other_run_registers_it_first  # type: ignore[method-assign]

    assert finalize_batch(ids(), deps).status == "completed"

    batch = get_batch(deps)
    assert [line["custom_id"] for line in file_lines(deps, batch.output_file_id)] == ["r1"]
    assert [line["custom_id"] for line in file_lines(deps, batch.error_file_id)] == ["r0"]


def test_fail_batch_of_an_unknown_batch_reports_no_status() -> None:
    deps = make_deps()

    assert fail_batch(ids("batch_nope"), deps).model_dump() == {**ids("batch_nope"), "status": None}


# ---------------------------------------------------------------- what the files and counts hold


def test_the_usage_of_a_responses_batch_is_summed_in_that_endpoint_s_names() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request(f"r{i}", RESPONSES) for i in range(2)]), endpoint=RESPONSES)
    validate_batch(ids(), deps)
    for chunk in load_manifest(deps, "batch_test"):
        process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)

    finalize_batch(ids(), deps)

    usage = DEFAULT_USAGE[RESPONSES]
    assert get_batch(deps).usage.model_dump() == {
        "input_tokens": 2 * usage["input_tokens"],
        "cached_tokens": 2 * usage["input_tokens_details"]["cached_tokens"],
        "output_tokens": 2 * usage["output_tokens"],
        "reasoning_tokens": 2 * usage["output_tokens_details"]["reasoning_tokens"],
        "total_tokens": 2 * usage["total_tokens"],
    }


def test_a_duplicate_in_the_middle_of_a_journal_counts_once_and_the_rest_is_kept() -> None:
    deps = _run_batch(3)
    lines = list(deps.journal.read("batch_test", 0))
    deps.journal.delete_batch("batch_test")
    deps.journal.append("batch_test", 0, lines[:1])
    deps.journal.append("batch_test", 0, lines[:1])  # a retried append landed twice
    deps.journal.append("batch_test", 0, lines[1:])  # and the chunk went on

    finalize_batch(ids(), deps)

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 3, "failed": 0}
    assert sorted(line["custom_id"] for line in file_lines(deps, batch.output_file_id)) == ["r0", "r1", "r2"]


def test_each_journal_is_parsed_once_and_a_line_appended_after_the_count_is_not_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The tally notes each line's kind; the output and error passes sort the lines by it. A line a
    straggling worker appends after the count is neither counted nor written: the files and the
    counts always agree."""
    upstream = FakeUpstream({"r1": http_error(400)})
    deps = _run_batch(3, upstream)
    straggler = result_line("batch_test", "r9", UpstreamResponse(status_code=200, body={"ok": True}))
    reads = [0]
    real_read = deps.journal.read

    def read(batch_id: str, index: int) -> Iterator[bytes]:
        reads[0] += 1
        yield from real_read(batch_id, index)
        if reads[0] > 1:  # after the tally's read
            yield straggler

    monkeypatch.setattr(deps.journal, "read", read)
    parsed: list[bytes] = []
    real_parse = tally_module.parse_line
    monkeypatch.setattr(tally_module, "parse_line", lambda line: parsed.append(line) or real_parse(line))

    finalize_batch(ids(), deps)

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert sorted(line["custom_id"] for line in file_lines(deps, batch.output_file_id)) == ["r0", "r2"]
    assert [line["custom_id"] for line in file_lines(deps, batch.error_file_id)] == ["r1"]
    assert len(parsed) == 3  # one parse per journal line, all in the tally


def test_never_ran_lines_have_the_openai_error_line_shape_and_skip_blank_input_lines() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a"), b"", request("b"), b"   ", request("c")]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"validating"}
    )
    assert validate_batch(ids(), deps).next == "finalize"

    assert finalize_batch(ids(), deps).status == "cancelled"

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 0, "failed": 3}
    assert file_lines(deps, batch.error_file_id) == [
        {
            "id": batch_request_id("batch_test", custom_id),
            "custom_id": custom_id,
            "response": None,
            "error": {"code": "batch_cancelled", "message": NEVER_RAN_MESSAGES["batch_cancelled"]},
        }
        for custom_id in ("a", "b", "c")
    ]


def test_a_cancel_after_the_first_chunk_gives_lines_for_the_rest_reading_only_their_input() -> None:
    deps = make_deps(chunk_max_lines=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(6)]))
    validate_batch(ids(), deps)
    chunks = load_manifest(deps, "batch_test")
    assert len(chunks) == 3
    process_chunk({**ids(), "chunk": chunks[0].model_dump()}, deps)
    cancel_batch(deps, PROJECT, "batch_test")
    real_iter_range = deps.blobs.iter_range
    ranges_read: list[tuple[int, int | None]] = []

    def recording_iter_range(
        key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Any:
        ranges_read.append((start, end))
        return real_iter_range(key, start, end, chunk_size)

    deps.blobs.iter_range = recording_iter_range  # type: ignore[method-assign]

    assert finalize_batch(ids(), deps).status == "cancelled"

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 2, "failed": 4}
    assert [line["custom_id"] for line in file_lines(deps, batch.output_file_id)] == ["r0", "r1"]
    never_ran = file_lines(deps, batch.error_file_id)
    assert [line["custom_id"] for line in never_ran] == ["r2", "r3", "r4", "r5"]
    assert {line["error"]["code"] for line in never_ran} == {"batch_cancelled"}
    assert ranges_read == [(chunk.start, chunk.end) for chunk in chunks[1:]]  # not the finished chunk's


def test_a_cancelled_batch_whose_input_is_gone_counts_the_rest_failed_without_lines(
    caplog: pytest.LogCaptureFixture,
) -> None:
    deps = make_deps(chunk_max_lines=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(4)]))
    validate_batch(ids(), deps)
    process_chunk({**ids(), "chunk": load_manifest(deps, "batch_test")[0].model_dump()}, deps)
    cancel_batch(deps, PROJECT, "batch_test")
    deps.blobs.delete(object_keys.file_key("file-input"))

    with caplog.at_level(logging.WARNING, logger=FINALIZE_LOGGER):
        assert finalize_batch(ids(), deps).status == "cancelled"

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 2}
    assert [line["custom_id"] for line in file_lines(deps, batch.output_file_id)] == ["r0", "r1"]
    assert batch.error_file_id is None
    assert _messages(caplog, logging.WARNING) == [
        "batch batch_test: the input file is gone, so never-ran requests are counted as failed without lines"
    ]


def test_a_batch_cancelled_before_it_was_planned_ends_cancelled_with_nothing_to_account_for() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"validating"}
    )

    assert finalize_batch(ids(), deps).status == "cancelled"

    batch = get_batch(deps)
    assert batch.request_counts.model_dump() == {"total": 0, "completed": 0, "failed": 0}
    assert (batch.output_file_id, batch.error_file_id) == (None, None)


def test_a_finalizing_batch_without_a_plan_is_not_ended() -> None:
    deps = make_deps()
    add_batch(deps, jsonl([request("a")]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "finalizing"}, expected_status={"validating"}
    )

    with pytest.raises(KeyError):
        finalize_batch(ids(), deps)
    assert get_batch(deps).status == "finalizing"


# ---------------------------------------------------------------- writing the files in pieces


def test_an_output_larger_than_one_write_piece_is_written_whole_in_few_large_pieces() -> None:
    big = "x" * (WRITE_PIECE_BYTES // 2)
    upstream = FakeUpstream(
        {
            f"r{i}": UpstreamResponse(status_code=200, body={"echo": big}, request_id=f"req_{i}")
            for i in range(3)
        }
    )
    deps = _run_batch(3, upstream)
    real_write = deps.blobs.write_stream
    pieces: dict[str, list[int]] = {}

    def recording_write(key: str, chunks: Any) -> int:
        chunks = list(chunks)
        pieces[key] = [len(chunk) for chunk in chunks]
        return real_write(key, chunks)

    deps.blobs.write_stream = recording_write  # type: ignore[method-assign]

    finalize_batch(ids(), deps)

    batch = get_batch(deps)
    lines = file_lines(deps, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2"]
    assert all(line["response"]["body"]["echo"] == big for line in lines)
    sizes = pieces[object_keys.file_key(output_file_id("batch_test", "output"))]
    assert 1 < len(sizes) < len(lines)
    assert all(size >= WRITE_PIECE_BYTES for size in sizes[:-1])


def _line(index: int, size: int) -> bytes:
    return bytes([ord("a") + index]) * (size - 1) + b"\n"


@pytest.mark.parametrize(
    ("sizes", "groups"),
    [
        ([], []),
        ([2], [[2]]),  # a short last piece still goes out
        ([2, 2, 3, 2], [[2, 2], [3, 2]]),  # a piece that reaches the size ends; the next starts empty
        ([3, 3, 1], [[3, 3], [1]]),  # the first piece starts empty too
        ([5, 1], [[5], [1]]),  # a line longer than the size is a piece of its own
    ],
)
def test_lines_are_grouped_into_pieces_of_at_least_the_size(
    sizes: list[int], groups: list[list[int]]
) -> None:
    lines = [_line(i, size) for i, size in enumerate(sizes)]
    expected, taken = [], iter(lines)
    for group in groups:
        expected.append(b"".join(next(taken) for _ in group))

    assert list(finalize._coalesce(iter(lines), 4)) == expected
