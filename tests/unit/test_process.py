"""process_chunk: sending, journaling, counting, and stopping (cancel, deadline, time budget, crash)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import orjson
import pytest

from batch_api import object_keys
from batch_api.adapters.memory import MemoryCapacityLeases
from batch_api.contract.ids import batch_request_id
from batch_api.contract.models import Usage
from batch_api.contract.steps import ProcessOutput
from batch_api.ports import Grant, UpstreamResponse
from batch_api.upstreams.leases import LEASE_SECONDS, WAIT_SECONDS
from batch_api.workflow import process
from batch_api.workflow import process as process_module
from batch_api.workflow.lines import result_line
from batch_api.workflow.manifest import load_manifest
from batch_api.workflow.process import (
    DEADLINE_MARGIN_SECONDS,
    HARD_STOP_SECONDS,
    TIME_MARGIN_FLOOR_SECONDS,
    process_chunk,
    process_chunk_async,
    stop_reason,
)
from batch_api.workflow.validate import validate_batch
from tests.unit.builders import PROJECT, FakeClock, add_batch, get_batch, ids, jsonl, make_deps, request
from tests.unit.fakes_upstream import DEFAULT_USAGE, FakeUpstream, http_error, transport_failure

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"


def _setup(
    n: int,
    *,
    endpoint: str = CHAT,
    upstream: FakeUpstream | None = None,
    clock: FakeClock | None = None,
    **settings: Any,
) -> tuple[Any, FakeUpstream, list[dict[str, Any]]]:
    upstream = upstream or FakeUpstream()
    deps = make_deps(upstream, clock, **settings)
    add_batch(deps, jsonl([request(f"r{i}", endpoint) for i in range(n)]), endpoint=endpoint)
    assert validate_batch(ids(), deps).next == "process"
    chunks = [c.model_dump() for c in load_manifest(deps, "batch_test")]
    return deps, upstream, chunks


def _run(deps: Any, chunk: dict[str, Any], **kwargs: Any) -> ProcessOutput:
    return process_chunk({**ids(), "chunk": chunk}, deps, **kwargs)


def _journal(deps: Any, index: int = 0) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in deps.journal.read("batch_test", index)]


def _cancel(deps: Any) -> None:
    deps.metadata.update_batch(
        PROJECT,
        "batch_test",
        {"status": "cancelling", "cancelling_at": deps.now()},
        expected_status={"in_progress"},
    )


@pytest.mark.parametrize(
    "endpoint",
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/moderations"],
)
def test_a_chunk_runs_every_request_and_journals_its_line(endpoint: str) -> None:
    deps, upstream, [chunk] = _setup(4, endpoint=endpoint)

    result = _run(deps, chunk)

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": None, "wait_seconds": 0}
    assert upstream.sent_contents() == ["r0", "r1", "r2", "r3"]
    assert all(called == endpoint for called, _ in upstream.calls)
    assert upstream.calls[0][1] == request("r0", endpoint)["body"]  # the body goes upstream unchanged
    lines = _journal(deps)
    assert sorted(line["custom_id"] for line in lines) == ["r0", "r1", "r2", "r3"]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in lines)
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert (progress.completed, progress.failed, progress.done) == (4, 0, True)
    assert get_batch(deps).status == "in_progress"  # the step never moves the status
    assert (upstream.clients_created, upstream.clients_closed) == (1, 1)


def test_usage_is_summed_over_successes_only() -> None:
    upstream = FakeUpstream({"r1": http_error(400)})
    deps, _, [chunk] = _setup(3, upstream=upstream)

    _run(deps, chunk)

    [progress] = deps.metadata.list_chunk_progress("batch_test")
    one = DEFAULT_USAGE[CHAT]
    assert progress.usage == Usage(
        input_tokens=2 * one["prompt_tokens"],
        cached_tokens=2 * one["prompt_tokens_details"]["cached_tokens"],
        output_tokens=2 * one["completion_tokens"],
        reasoning_tokens=2 * one["completion_tokens_details"]["reasoning_tokens"],
        total_tokens=2 * one["total_tokens"],
    )


def test_upstream_failures_become_error_lines_and_never_raise() -> None:
    upstream = FakeUpstream(
        {
            "r0": http_error(400, "bad request"),
            "r1": http_error(500, "boom"),
            "r2": transport_failure("timeout", "no answer after 3 attempts"),
            "r3": RuntimeError("client bug"),
        }
    )
    deps, _, [chunk] = _setup(5, upstream=upstream)

    result = _run(deps, chunk)

    assert result.done is True
    by_id = {line["custom_id"]: line for line in _journal(deps)}
    assert by_id["r0"]["response"]["status_code"] == 400 and by_id["r0"]["error"] is None
    assert by_id["r0"]["response"]["body"]["error"]["message"] == "bad request"
    assert by_id["r1"]["response"]["status_code"] == 500
    assert by_id["r2"]["response"] is None
    assert by_id["r2"]["error"] == {"code": "timeout", "message": "no answer after 3 attempts"}
    assert by_id["r3"]["response"] is None and by_id["r3"]["error"]["code"] == "internal_error"
    assert "client bug" in by_id["r3"]["error"]["message"]  # the line says what went wrong
    assert by_id["r4"]["response"]["status_code"] == 200
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert (progress.completed, progress.failed, progress.done) == (1, 4, True)


def test_in_flight_requests_are_bounded_by_requests_per_chunk() -> None:
    deps, upstream, [chunk] = _setup(20, upstream=FakeUpstream(latency=0.01), requests_per_chunk=4)

    _run(deps, chunk)

    assert upstream.max_in_flight == 4
    assert len(upstream.calls) == 20


def test_lines_that_complete_together_share_one_journal_append() -> None:
    deps, _, [chunk] = _setup(16, upstream=FakeUpstream(latency=0.01), requests_per_chunk=8)

    _run(deps, chunk)

    assert len(_journal(deps)) == 16
    assert deps.journal.appends <= 4  # two waves of eight, give or take a straggler


def test_a_journal_flush_interval_batches_results_into_fewer_appends() -> None:
    # one request at a time, 10 ms each: every result would be its own append without an interval
    deps, _, [chunk] = _setup(
        20, upstream=FakeUpstream(latency=0.01), requests_per_chunk=1, journal_flush_interval_seconds=0.1
    )
    immediate, _, [same_chunk] = _setup(20, upstream=FakeUpstream(latency=0.01), requests_per_chunk=1)

    _run(deps, chunk)
    _run(immediate, same_chunk)

    assert len(_journal(deps)) == len(_journal(immediate)) == 20
    assert immediate.journal.appends == 20
    assert deps.journal.appends <= 5  # ~0.2 s of work in 0.1 s windows, plus the final flush


def test_progress_is_written_while_the_chunk_runs() -> None:
    deps, _, [chunk] = _setup(
        12, upstream=FakeUpstream(latency=0.01), requests_per_chunk=1, progress_interval_seconds=0.02
    )

    _run(deps, chunk)

    counts = [p.completed for p in deps.metadata.progress_writes]
    assert counts[-1] == 12
    assert any(0 < c < 12 for c in counts), counts
    assert counts == sorted(counts)  # whole-journal counts only grow


def test_several_chunks_each_keep_their_own_journal_and_progress() -> None:
    deps, upstream, chunks = _setup(5, chunk_max_lines=2)

    for chunk in chunks:
        assert _run(deps, chunk).done is True

    assert [len(_journal(deps, c["index"])) for c in chunks] == [2, 2, 1]
    assert [p.completed for p in deps.metadata.list_chunk_progress("batch_test")] == [2, 2, 1]
    assert len(upstream.calls) == 5


def test_rerun_after_a_crash_sends_only_the_requests_not_in_the_journal() -> None:
    deps, upstream, [chunk] = _setup(6)
    for custom_id in ("r0", "r2", "r3"):  # finished before the crash
        ok = UpstreamResponse(status_code=200, body={"usage": {"prompt_tokens": 1, "completion_tokens": 1}})
        deps.journal.append("batch_test", 0, [result_line("batch_test", custom_id, ok)])

    result = _run(deps, chunk)

    assert result.done is True
    assert upstream.sent_contents() == ["r1", "r4", "r5"]
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert (progress.completed, progress.done) == (6, True)  # counts over the whole journal
    assert progress.usage.input_tokens == 3 * 1 + 3 * DEFAULT_USAGE[CHAT]["prompt_tokens"]


def test_rerunning_a_finished_chunk_sends_nothing_and_counts_the_same() -> None:
    deps, upstream, [chunk] = _setup(3)
    _run(deps, chunk)
    before = deps.metadata.list_chunk_progress("batch_test")

    assert _run(deps, chunk).done is True
    assert len(upstream.calls) == 3
    assert deps.metadata.list_chunk_progress("batch_test") == before
    assert len(_journal(deps)) == 3


def test_a_killed_run_loses_nothing_that_finished() -> None:
    """Cancel the step's task mid-run (the closest thing to kill -9 in-process), then run it again."""
    upstream = FakeUpstream(latency=0.005)
    deps, _, [chunk] = _setup(30, upstream=upstream, requests_per_chunk=3)

    async def kill_midway() -> None:
        task = asyncio.create_task(process_chunk_async({**ids(), "chunk": chunk}, deps))
        while len(list(deps.journal.read("batch_test", 0))) < 10:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(kill_midway())
    journaled = len(_journal(deps))
    sent_before = len(upstream.calls)
    assert 10 <= journaled < 30

    assert _run(deps, chunk).done is True

    lines = _journal(deps)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"r{i}" for i in range(30))
    # only what had not been journaled was sent again (at most the few that were in flight twice)
    assert len(upstream.calls) - sent_before == 30 - journaled
    assert len(upstream.calls) <= 30 + 3


def test_cancel_mid_run_stops_starting_requests() -> None:
    holder: dict[str, Any] = {}

    def cancel_at_third(n: int, _body: dict[str, Any]) -> None:
        if n == 3:
            _cancel(holder["deps"])

    upstream = FakeUpstream(latency=0.01, on_call=cancel_at_third)
    deps, _, [chunk] = _setup(40, upstream=upstream, requests_per_chunk=1, progress_interval_seconds=0.005)
    holder["deps"] = deps

    result = _run(deps, chunk)

    assert result.model_dump() == {
        **ids(),
        "index": 0,
        "done": True,
        "stopped": "cancelled",
        "wait_seconds": 0,
    }
    assert 3 <= len(upstream.calls) < 40
    assert len(_journal(deps)) == len(upstream.calls)  # in-flight requests finished and were journaled
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert progress.completed == len(upstream.calls) and progress.done is False


def test_deadline_mid_run_stops_with_expired() -> None:
    clock = FakeClock()

    def expire_at_fourth(n: int, _body: dict[str, Any]) -> None:
        if n == 4:
            clock.advance(86400)

    upstream = FakeUpstream(on_call=expire_at_fourth)
    deps, _, [chunk] = _setup(10, upstream=upstream, clock=clock, requests_per_chunk=1)

    result = _run(deps, chunk)

    assert result.stopped == "expired" and result.done is True
    assert len(upstream.calls) == 4
    assert len(_journal(deps)) == 4


@pytest.mark.parametrize(
    ("status", "stopped"), [("cancelling", "cancelled"), ("cancelled", "cancelled"), ("expired", "expired")]
)
def test_nothing_starts_when_the_batch_is_already_stopped(status: str, stopped: str) -> None:
    deps, upstream, [chunk] = _setup(3)
    deps.metadata.update_batch(PROJECT, "batch_test", {"status": status}, expected_status={"in_progress"})

    result = _run(deps, chunk)

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": stopped, "wait_seconds": 0}
    assert upstream.calls == []


def test_nothing_starts_after_the_deadline() -> None:
    clock = FakeClock()
    deps, upstream, [chunk] = _setup(3, clock=clock)
    clock.advance(86400)

    assert _run(deps, chunk).stopped == "expired"
    assert upstream.calls == []


def test_low_lambda_time_returns_not_done_and_the_next_call_continues() -> None:
    remaining = {"seconds": 900.0}

    def spend(n: int, _body: dict[str, Any]) -> None:
        if n == 5:
            remaining["seconds"] = 20.0  # below the 30 s floor of the margin

    upstream = FakeUpstream(on_call=spend)
    deps, _, [chunk] = _setup(12, upstream=upstream, requests_per_chunk=1)

    first = _run(deps, chunk, time_left=lambda: remaining["seconds"])

    assert first.model_dump() == {**ids(), "index": 0, "done": False, "stopped": None, "wait_seconds": 0}
    assert len(upstream.calls) == 5 and len(_journal(deps)) == 5
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert (progress.completed, progress.done) == (5, False)

    remaining["seconds"] = 900.0
    second = _run(deps, chunk, time_left=lambda: remaining["seconds"])

    assert second.done is True
    assert upstream.sent_contents() == [f"r{i}" for i in range(12)]  # nothing sent twice


def test_an_invocation_always_starts_at_least_one_request() -> None:
    """Even with less time than the margin, progress is made: no endless loop of empty invocations."""
    deps, upstream, [chunk] = _setup(3, requests_per_chunk=1)

    result = _run(deps, chunk, time_left=lambda: 10.0)

    assert result.done is False
    assert len(upstream.calls) == 1 and len(_journal(deps)) == 1


def test_nearly_out_of_time_abandons_in_flight_requests_before_lambda_kills_us() -> None:
    remaining = {"seconds": 900.0}
    slow = FakeUpstream(latency=5.0, on_call=lambda n, _b: remaining.update(seconds=2.0))
    deps, _, [chunk] = _setup(2, upstream=slow, requests_per_chunk=2, progress_interval_seconds=0.01)

    result = _run(deps, chunk, time_left=lambda: remaining["seconds"])

    assert result.done is False
    assert _journal(deps) == []  # abandoned requests leave no line; the next run sends them again


def test_no_time_left_at_all_starts_nothing() -> None:
    """The local runner's shutdown: time_left answers 0, and not even a first request starts."""
    deps, upstream, [chunk] = _setup(3)

    result = _run(deps, chunk, time_left=lambda: 0.0)

    assert result.model_dump() == {**ids(), "index": 0, "done": False, "stopped": None, "wait_seconds": 0}
    assert upstream.calls == [] and _journal(deps) == []


def test_a_vanished_input_body_stops_the_chunk_instead_of_failing_it() -> None:
    """Defence in depth (the body is kept while the batch runs): retrying cannot bring it back, so the
    chunk stops and the journal of the chunks that ran is kept for finalize."""
    deps, upstream, chunks = _setup(4, chunk_max_lines=2)
    assert _run(deps, chunks[0]).done is True
    deps.blobs.delete(object_keys.file_key("file-input"))

    result = _run(deps, chunks[1])

    assert result.model_dump() == {
        **ids(),
        "index": 1,
        "done": True,
        "stopped": "input_missing",
        "wait_seconds": 0,
    }
    assert upstream.sent_contents() == ["r0", "r1"]
    assert len(_journal(deps, 0)) == 2


# ---------------------------------------------------------------- stopped before anything starts


def _journal_ok(deps: Any, custom_id: str, body: dict[str, Any] | None = None) -> None:
    """A success line for `custom_id`, as an earlier run would have journaled it."""
    ok = UpstreamResponse(
        status_code=200, body=body or {"usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    )
    deps.journal.append("batch_test", 0, [result_line("batch_test", custom_id, ok)])


@pytest.mark.parametrize(
    ("status", "stopped", "progress_written"),
    [
        ("cancelling", "cancelled", True),  # still live: finalize reads this chunk's progress
        ("finalizing", None, True),  # moved on under us: nothing to run, no stop reason
        ("cancelled", "cancelled", False),  # terminal: its counts are final, left untouched
        ("expired", "expired", False),
        ("completed", None, False),
        ("failed", None, False),
    ],
)
def test_a_batch_that_is_not_running_starts_nothing(
    status: str, stopped: str | None, progress_written: bool
) -> None:
    deps, upstream, [chunk] = _setup(3)
    _journal_ok(deps, "r0")
    deps.metadata.update_batch(PROJECT, "batch_test", {"status": status}, expected_status={"in_progress"})

    result = _run(deps, chunk)

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": stopped, "wait_seconds": 0}
    assert upstream.calls == [] and upstream.clients_created == 0
    progress = deps.metadata.list_chunk_progress("batch_test")
    if progress_written:
        assert [(p.index, p.completed, p.failed, p.done) for p in progress] == [(0, 1, 0, False)]
    else:
        assert progress == [] and deps.metadata.progress_writes == []


def test_at_the_deadline_itself_nothing_starts_and_no_client_is_opened() -> None:
    clock = FakeClock()
    deps, upstream, [chunk] = _setup(3, clock=clock)
    clock.now = get_batch(deps).expires_at  # the deadline is inclusive

    result = _run(deps, chunk)

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": "expired", "wait_seconds": 0}
    assert upstream.calls == [] and upstream.clients_created == 0
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert (progress.completed, progress.done) == (0, False)


def test_stop_reason_counts_the_deadline_second_as_expired() -> None:
    deps, _, _ = _setup(1)
    batch = get_batch(deps)

    assert stop_reason(batch, batch.expires_at - 1) is None
    assert stop_reason(batch, batch.expires_at) == "expired"


def test_a_finished_chunk_reports_no_stop_reason_even_when_the_batch_is_cancelled() -> None:
    """Nothing was left unrun, so there is nothing the cancel stopped."""
    deps, upstream, [chunk] = _setup(2)
    _run(deps, chunk)
    _cancel(deps)

    result = _run(deps, chunk)

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": None, "wait_seconds": 0}
    assert len(upstream.calls) == 2


def test_a_vanished_input_file_record_stops_the_chunk_and_keeps_its_progress() -> None:
    deps, upstream, [chunk] = _setup(3)
    _journal_ok(deps, "r0")
    del deps.metadata.files["file-input"]  # the record itself gone (defence in depth)

    result = _run(deps, chunk)

    assert result.model_dump() == {
        **ids(),
        "index": 0,
        "done": True,
        "stopped": "input_missing",
        "wait_seconds": 0,
    }
    assert upstream.calls == []
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert (progress.index, progress.completed, progress.failed, progress.done) == (0, 1, 0, False)


# ---------------------------------------------------------------- what a run sends and counts


def test_blank_lines_inside_a_chunk_are_skipped_not_the_end_of_it() -> None:
    upstream = FakeUpstream()
    deps = make_deps(upstream)
    add_batch(deps, jsonl([request("r0"), "", request("r1"), "   ", request("r2")]))
    assert validate_batch(ids(), deps).next == "process"
    [chunk] = [c.model_dump() for c in load_manifest(deps, "batch_test")]

    result = _run(deps, chunk)

    assert result.done is True and result.stopped is None
    assert upstream.sent_contents() == ["r0", "r1", "r2"]


@pytest.mark.parametrize(("status", "success"), [(199, False), (200, True), (299, True), (300, False)])
def test_only_2xx_answers_count_as_completed(status: int, success: bool) -> None:
    answer = UpstreamResponse(
        status_code=status, body={"usage": {"prompt_tokens": 3, "completion_tokens": 2}}
    )
    deps, _, [chunk] = _setup(1, upstream=FakeUpstream({"r0": answer}))

    _run(deps, chunk)

    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert (progress.completed, progress.failed) == ((1, 0) if success else (0, 1))
    assert progress.usage.input_tokens == (3 if success else 0)


def test_each_journal_line_carries_the_request_id_of_its_batch_and_custom_id() -> None:
    deps, _, [chunk] = _setup(3)

    _run(deps, chunk)

    assert {line["custom_id"]: line["id"] for line in _journal(deps)} == {
        f"r{i}": batch_request_id("batch_test", f"r{i}") for i in range(3)
    }


def test_usage_is_read_in_the_endpoints_own_names_for_new_and_journaled_lines() -> None:
    """/v1/responses reports input/output tokens (not prompt/completion), both when a request runs now and
    when its line is re-read from the journal of an earlier run."""
    responses = "/v1/responses"
    deps, upstream, [chunk] = _setup(3, endpoint=responses)
    earlier = {"usage": {"input_tokens": 100, "output_tokens": 50, "total_tokens": 150}}
    _journal_ok(deps, "r0", earlier)

    _run(deps, chunk)

    assert upstream.sent_contents() == ["r1", "r2"]
    one = DEFAULT_USAGE[responses]
    [progress] = deps.metadata.list_chunk_progress("batch_test")
    assert progress.usage == Usage(
        input_tokens=100 + 2 * one["input_tokens"],
        cached_tokens=2 * one["input_tokens_details"]["cached_tokens"],
        output_tokens=50 + 2 * one["output_tokens"],
        reasoning_tokens=2 * one["output_tokens_details"]["reasoning_tokens"],
        total_tokens=150 + 2 * one["total_tokens"],
    )


# ---------------------------------------------------------------- journal and progress while running


def test_with_a_flush_interval_results_reach_the_journal_while_the_chunk_runs() -> None:
    journaled_at_call: list[int] = []
    holder: dict[str, Any] = {}
    upstream = FakeUpstream(
        latency=0.01, on_call=lambda n, _b: journaled_at_call.append(len(_journal(holder["deps"])))
    )
    deps, _, [chunk] = _setup(
        12, upstream=upstream, requests_per_chunk=1, journal_flush_interval_seconds=0.02
    )
    holder["deps"] = deps

    _run(deps, chunk)

    assert len(_journal(deps)) == 12
    assert any(0 < n < 12 for n in journaled_at_call), journaled_at_call  # not only the final flush
    assert deps.journal.appends > 1


def test_progress_of_the_batch_can_be_read_while_the_chunk_runs() -> None:
    seen: list[int] = []
    holder: dict[str, Any] = {}

    def look(_n: int, _body: dict[str, Any]) -> None:
        seen.extend(p.completed for p in holder["deps"].metadata.list_chunk_progress("batch_test"))

    upstream = FakeUpstream(latency=0.01, on_call=look)
    deps, _, [chunk] = _setup(12, upstream=upstream, requests_per_chunk=1, progress_interval_seconds=0.02)
    holder["deps"] = deps

    _run(deps, chunk)

    assert any(0 < c < 12 for c in seen), seen


def test_a_healthy_run_with_checkpoints_logs_no_warning_or_error(caplog: pytest.LogCaptureFixture) -> None:
    deps, _, [chunk] = _setup(
        12, upstream=FakeUpstream(latency=0.01), requests_per_chunk=2, progress_interval_seconds=0.005
    )

    with caplog.at_level(logging.WARNING):
        assert _run(deps, chunk).done is True

    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_journal_that_cannot_be_written_fails_the_step_and_counts_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deps, upstream, [chunk] = _setup(
        6, upstream=FakeUpstream(latency=0.005), requests_per_chunk=2, progress_interval_seconds=0.002
    )

    def broken(_batch_id: str, _index: int, _lines: list[bytes]) -> None:
        raise OSError("journal unavailable")

    monkeypatch.setattr(deps.journal, "append", broken)

    with pytest.raises(OSError, match="journal unavailable"):
        _run(deps, chunk)

    assert 0 < len(upstream.calls) < 6  # stopped starting requests once the journal failed
    assert all(p.completed == p.failed == 0 for p in deps.metadata.list_chunk_progress("batch_test"))
    assert upstream.clients_closed == upstream.clients_created == 1


# ---------------------------------------------------------------- stopping mid-run


@pytest.mark.parametrize(("status", "stopped"), [("failed", "cancelled"), ("expired", "expired")])
def test_a_batch_moved_on_mid_run_stops_starting_requests(status: str, stopped: str) -> None:
    holder: dict[str, Any] = {}

    def move_at_third(n: int, _body: dict[str, Any]) -> None:
        if n == 3:
            holder["deps"].metadata.update_batch(
                PROJECT, "batch_test", {"status": status}, expected_status={"in_progress"}
            )

    upstream = FakeUpstream(latency=0.01, on_call=move_at_third)
    deps, _, [chunk] = _setup(40, upstream=upstream, requests_per_chunk=1, progress_interval_seconds=0.002)
    holder["deps"] = deps

    result = _run(deps, chunk)

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": stopped, "wait_seconds": 0}
    assert 3 <= len(upstream.calls) < 40
    assert len(_journal(deps)) == len(upstream.calls)


def test_the_first_reason_to_stop_is_the_one_reported() -> None:
    """The deadline passes while a request is in flight; a cancel that comes after does not turn the
    expiry into a cancellation."""
    clock = FakeClock()
    holder: dict[str, Any] = {}

    def expire_then_cancel(n: int, _body: dict[str, Any]) -> None:
        if n == 1:
            clock.advance(86400)
            asyncio.get_running_loop().call_later(0.02, _cancel, holder["deps"])

    upstream = FakeUpstream(latency=0.05, on_call=expire_then_cancel)
    deps, _, [chunk] = _setup(
        2, upstream=upstream, clock=clock, requests_per_chunk=1, progress_interval_seconds=0.005
    )
    holder["deps"] = deps

    result = _run(deps, chunk)

    assert get_batch(deps).status == "cancelling"  # the cancel did happen during the run
    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": "expired", "wait_seconds": 0}
    assert len(upstream.calls) == 1 and len(_journal(deps)) == 1


LAST_SAFE = HARD_STOP_SECONDS + DEADLINE_MARGIN_SECONDS  # a request's deadline comes this long before the end


@pytest.mark.parametrize("seconds", [10.0, LAST_SAFE + 0.5])
def test_any_time_left_before_the_deadline_starts_the_first_request(seconds: float) -> None:
    deps, upstream, [chunk] = _setup(3, requests_per_chunk=1)

    result = _run(deps, chunk, time_left=lambda: seconds)

    assert result.done is False
    assert len(upstream.calls) == 1 and len(_journal(deps)) == 1
    [deadline] = upstream.deadlines
    assert deadline is not None and 0 < deadline - time.monotonic() <= seconds - LAST_SAFE


@pytest.mark.parametrize("seconds", [LAST_SAFE, 0.5])
def test_with_no_time_before_the_deadline_nothing_is_sent_and_nothing_journaled(seconds: float) -> None:
    """It could not be answered and journaled before the hard stop: it is left to the next invocation
    rather than sent now and again then."""
    deps, upstream, [chunk] = _setup(3, requests_per_chunk=1)

    result = _run(deps, chunk, time_left=lambda: seconds)

    assert result.done is False
    assert upstream.calls == [] and _journal(deps) == []


def test_a_worker_driven_to_its_time_limit_sends_no_request_twice() -> None:
    """The first invocation's only request is still out when its time runs short: it ends at its
    deadline as a journaled upstream_timeout, instead of being abandoned at the hard stop and sent
    again by the next invocation (billed twice by the upstream)."""
    upstream = FakeUpstream(latency=2.0)
    deps, _, [chunk] = _setup(4, upstream=upstream, requests_per_chunk=2, progress_interval_seconds=0.01)
    end = time.monotonic() + LAST_SAFE + 0.2  # 0.2 s until the deadline, 1.2 s until the hard stop

    first = _run(deps, chunk, time_left=lambda: end - time.monotonic())
    upstream.latency = 0
    second = _run(deps, chunk, time_left=lambda: 900.0)

    assert (first.done, second.done) == (False, True)
    sent = Counter(upstream.sent_contents())
    assert sorted(sent) == ["r0", "r1", "r2", "r3"] and set(sent.values()) == {1}
    lines = {line["custom_id"]: line for line in _journal(deps)}
    assert lines["r0"]["error"]["code"] == "upstream_timeout"  # it ran out of time, once
    assert all(lines[f"r{i}"]["error"] is None for i in (1, 2, 3))


SLOWEST = 20.0  # seconds the first request takes: twice that is above the margin's floor


@pytest.mark.parametrize(
    ("left", "all_sent"),
    [
        (2 * SLOWEST - 1, False),  # less than twice the slowest request: stop after it
        (2 * SLOWEST, True),  # exactly the margin is still enough
        (3 * SLOWEST - 1, True),
    ],
)
def test_the_time_margin_is_twice_the_slowest_request_seen(
    monkeypatch: pytest.MonkeyPatch, left: float, all_sent: bool
) -> None:
    assert TIME_MARGIN_FLOOR_SECONDS < 2 * SLOWEST - 1  # the slowest request, not the floor, sets the margin
    monotonic = {"now": 1000.0}
    monkeypatch.setattr(process_module, "time", SimpleNamespace(monotonic=lambda: monotonic["now"]))

    def first_is_slow(n: int, _body: dict[str, Any]) -> None:
        if n == 1:
            monotonic["now"] += SLOWEST

    upstream = FakeUpstream(on_call=first_is_slow)
    deps, _, [chunk] = _setup(3, upstream=upstream, requests_per_chunk=1)

    result = _run(deps, chunk, time_left=lambda: left)

    assert len(upstream.calls) == (3 if all_sent else 1)
    assert result.done is all_sent


class _OverrunsItsDeadline(FakeUpstream):
    """A client that answers after its deadline (the hard stop is there for such a one)."""

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        return await super().send(endpoint, body, None)


def test_with_exactly_the_hard_stop_time_left_in_flight_requests_are_still_awaited() -> None:
    upstream = _OverrunsItsDeadline(latency=0.03)
    deps, _, [chunk] = _setup(1, upstream=upstream, requests_per_chunk=1, progress_interval_seconds=0.002)
    # enough to send it; once it is out, exactly the hard stop
    result = _run(deps, chunk, time_left=lambda: HARD_STOP_SECONDS if upstream.calls else LAST_SAFE + 1)

    assert result.done is True
    assert len(_journal(deps)) == 1


class _SlowToUnwind(FakeUpstream):
    """A client whose cancelled request takes a few loop turns to unwind, as a real HTTP client closing its
    connection does; records how many requests were still open when the client was closed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.open = 0
        self.open_at_close: list[int] = []

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        self.open += 1
        try:
            return await super().send(endpoint, body, deadline)
        except asyncio.CancelledError:
            for _ in range(5):
                await asyncio.sleep(0)
            raise
        finally:
            self.open -= 1

    async def aclose(self) -> None:
        self.open_at_close.append(self.open)
        await super().aclose()


def test_a_killed_run_closes_the_client_only_after_its_requests_have_unwound() -> None:
    upstream = _SlowToUnwind(latency=0.005)
    deps, _, [chunk] = _setup(30, upstream=upstream, requests_per_chunk=3)

    async def kill_midway() -> set[asyncio.Task[Any]]:
        task = asyncio.create_task(process_chunk_async({**ids(), "chunk": chunk}, deps))
        while len(list(deps.journal.read("batch_test", 0))) < 4:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    left_running = asyncio.run(kill_midway())

    assert upstream.open_at_close == [0]
    assert left_running == set()


def test_the_async_step_leaves_no_task_running_when_it_returns() -> None:
    """A caller with its own event loop gets the loop back clean: the progress ticker is gone too."""
    deps, _, [chunk] = _setup(3, progress_interval_seconds=0.01)

    async def call() -> tuple[Any, set[asyncio.Task[Any]]]:
        result = await process_chunk_async({**ids(), "chunk": chunk}, deps)
        return result, asyncio.all_tasks() - {asyncio.current_task()}  # type: ignore[operator]

    result, left_running = asyncio.run(call())

    assert result.done is True
    assert left_running == set()


def test_the_client_is_made_for_the_batch_and_its_model() -> None:
    """Routing and fair share need both: the upstream serving the model, the batch taking its turns."""
    deps, upstream, [chunk] = _setup(2)
    _run(deps, chunk)
    assert upstream.routes == [("gpt-test", "batch_test")]


# ---------------------------------------------------------------- capacity shared with other workers


class RecordingLeases(MemoryCapacityLeases):
    def __init__(self, grant_at_most: int) -> None:
        super().__init__()
        self.grant_at_most = grant_at_most
        self.calls: list[tuple[Any, ...]] = []

    def acquire(self, upstream: str, holder: str, batch_id: str, want: int, limit: int) -> Grant:
        self.calls.append(("acquire", upstream, holder, batch_id, want, limit))
        return super().acquire(upstream, holder, batch_id, min(want, self.grant_at_most), limit)

    def renew(self, upstream: str, holder: str) -> None:
        self.calls.append(("renew", upstream, holder))
        super().renew(upstream, holder)

    def release(self, upstream: str, holder: str) -> None:
        self.calls.append(("release", upstream, holder))
        super().release(upstream, holder)


def test_without_capacity_the_worker_sends_nothing_and_asks_to_wait() -> None:
    deps, upstream, [chunk] = _setup(4, requests_per_chunk=8, upstream_max_in_flight=50)
    deps.leases = RecordingLeases(grant_at_most=0)
    result = _run(deps, chunk)
    assert (result.done, result.stopped, result.wait_seconds) == (False, None, WAIT_SECONDS)
    assert upstream.calls == []
    [(_, name, holder, batch_id, want, limit)] = deps.leases.calls
    assert (name, batch_id, want, limit) == ("default", "batch_test", 8, 50)
    assert holder.startswith("batch_test/0/")
    assert [p.index for p in deps.metadata.list_chunk_progress("batch_test")] == [0]  # counts stay live


def test_a_finished_chunk_never_asks_to_wait() -> None:
    deps, _upstream, [chunk] = _setup(2)
    assert _run(deps, chunk).done
    deps.leases = RecordingLeases(grant_at_most=0)  # a retry of a finished chunk, the upstream full
    result = _run(deps, chunk)
    assert (result.done, result.wait_seconds) == (True, 0)


def test_a_lease_bounds_the_requests_in_flight_and_is_given_back() -> None:
    deps, upstream, [chunk] = _setup(12, upstream=FakeUpstream(latency=0.01), requests_per_chunk=8)
    deps.leases = RecordingLeases(grant_at_most=3)
    result = _run(deps, chunk)
    assert result.done and result.wait_seconds == 0
    assert upstream.max_in_flight == 3
    # 3 of the upstream's 128 slots: 3/128 of its requests and tokens per minute
    assert upstream.rate_shares == [3 / deps.settings.upstream_max_in_flight]
    acquire, release = deps.leases.calls[0], deps.leases.calls[-1]
    assert release == ("release", "default", acquire[2])
    assert deps.leases.held("default") == 0


def test_the_lease_is_taken_on_the_upstream_the_batchs_model_is_routed_to() -> None:
    deps, upstream, [chunk] = _setup(4, upstream=FakeUpstream(latency=0.01), requests_per_chunk=8)
    deps.leases = RecordingLeases(grant_at_most=2)
    routes = {"gpt-test": SimpleNamespace(name="fleet-a", max_in_flight=16)}
    deps.route = routes.get  # the batch's model is gpt-test; any other model has no upstream

    result = _run(deps, chunk)

    assert result.done and upstream.max_in_flight == 2
    acquire = deps.leases.calls[0]
    assert (acquire[:2], acquire[5]) == (("acquire", "fleet-a"), 16)  # its name and its limit
    assert upstream.rate_shares == [2 / 16]  # its slots' part of that upstream's limit


def test_without_leases_a_chunk_may_use_all_of_its_upstreams_rates() -> None:
    deps, upstream, [chunk] = _setup(2)
    assert _run(deps, chunk).done
    assert upstream.rate_shares == [1.0]


def test_each_invocation_holds_its_own_lease() -> None:
    deps, _upstream, [chunk] = _setup(2)
    deps.leases = RecordingLeases(grant_at_most=4)
    _run(deps, chunk, time_left=lambda: 0.0)  # no time: nothing is sent, the lease still comes back
    _run(deps, chunk)
    holders = [call[2] for call in deps.leases.calls if call[0] == "acquire"]
    assert len(set(holders)) == 2
    assert deps.leases.held("default") == 0


def test_a_lease_is_renewed_once_a_quarter_of_its_time_has_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    deps, _upstream, _chunks = _setup(1)
    deps.leases = RecordingLeases(grant_at_most=4)
    now = [1000.0]
    monkeypatch.setattr(process.time, "monotonic", lambda: now[0])
    lease = process._Lease(deps, get_batch(deps), 0)
    assert lease.acquire() == 4
    lease.keep()
    now[0] += LEASE_SECONDS / 4 - 1
    lease.keep()
    assert [c[0] for c in deps.leases.calls] == ["acquire"]
    now[0] += 1
    lease.keep()
    assert deps.leases.calls[1:] == [("renew", "default", lease.holder)]
    lease.keep()  # just renewed
    assert [c[0] for c in deps.leases.calls] == ["acquire", "renew"]


def test_without_leases_a_chunk_keeps_its_own_requests_in_flight() -> None:
    deps, _upstream, _chunks = _setup(1, requests_per_chunk=9)
    lease = process._Lease(deps, get_batch(deps), 0)
    assert lease.acquire() == 9
    lease.keep()
    lease.release()  # nothing to give back


# ---------------------------------------------------------------- slots shared by a batch's chunks


def _run_shared(deps: Any, chunk: dict[str, Any], slots: int, **kwargs: Any) -> tuple[Any, int, int]:
    """Run the chunk on its batch's `slots` shared slots; returns its output, how many times it said it
    had dispatched everything, and how many slots were free afterwards."""
    from batch_api.workflow.process import SharedSlots

    async def call() -> tuple[Any, int, int]:
        semaphore = asyncio.Semaphore(slots)
        dispatched: list[bool] = []
        shared = SharedSlots(semaphore, lambda: dispatched.append(True))
        result = await process_chunk_async({**ids(), "chunk": chunk}, deps, shared=shared, **kwargs)
        free = 0
        while not semaphore.locked():
            await semaphore.acquire()
            free += 1
        return result, len(dispatched), free

    return asyncio.run(call())


def test_on_shared_slots_a_chunk_bounds_its_requests_by_them_and_gives_every_one_back() -> None:
    upstream = FakeUpstream(latency=0.005)
    deps, _, [chunk] = _setup(10, upstream=upstream, requests_per_chunk=8)

    result, dispatched, free = _run_shared(deps, chunk, slots=3)

    assert result.done is True and len(_journal(deps)) == 10
    assert upstream.max_in_flight == 3  # the batch's slots, not the chunk's own 8
    assert (dispatched, free) == (1, 3)


def test_on_shared_slots_requests_abandoned_at_a_hard_stop_give_their_slots_back() -> None:
    remaining = {"seconds": 900.0}
    slow = FakeUpstream(latency=5.0, on_call=lambda n, _b: remaining.update(seconds=2.0))
    deps, _, [chunk] = _setup(6, upstream=slow, progress_interval_seconds=0.01)

    result, dispatched, free = _run_shared(deps, chunk, slots=4, time_left=lambda: remaining["seconds"])

    assert result.done is False and _journal(deps) == []
    assert (dispatched, free) == (1, 4)  # the cancelled requests' slots came back


def test_on_shared_slots_a_chunk_with_nothing_to_send_still_says_it_dispatched() -> None:
    deps, upstream, [chunk] = _setup(2)
    _run(deps, chunk)  # everything is journaled already

    result, dispatched, free = _run_shared(deps, chunk, slots=2)

    assert result.done is True and len(upstream.calls) == 2
    assert (dispatched, free) == (1, 2)
