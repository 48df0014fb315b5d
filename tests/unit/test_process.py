"""process_chunk: sending, journaling, counting, and stopping (cancel, deadline, time budget, crash)."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from batch_api import object_keys
from batch_api.contract.models import Usage
from batch_api.ports import UpstreamResponse
from batch_api.workflow.lines import result_line
from batch_api.workflow.manifest import load_manifest
from batch_api.workflow.process import process_chunk, process_chunk_async
from batch_api.workflow.validate import validate_batch
from tests.unit.fakes_upstream import DEFAULT_USAGE, FakeClock, FakeUpstream, http_error, transport_failure
from tests.unit.workflow_support import PROJECT, add_batch, get_batch, ids, jsonl, make_deps, request

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


def _run(deps: Any, chunk: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
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

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": None}
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

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": "cancelled"}
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

    assert result.model_dump() == {**ids(), "index": 0, "done": True, "stopped": stopped}
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

    assert first.model_dump() == {**ids(), "index": 0, "done": False, "stopped": None}
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

    assert result.model_dump() == {**ids(), "index": 0, "done": False, "stopped": None}
    assert upstream.calls == [] and _journal(deps) == []


def test_a_vanished_input_body_stops_the_chunk_instead_of_failing_it() -> None:
    """Defence in depth (the body is kept while the batch runs): retrying cannot bring it back, so the
    chunk stops and the journal of the chunks that ran is kept for finalize."""
    deps, upstream, chunks = _setup(4, chunk_max_lines=2)
    assert _run(deps, chunks[0]).done is True
    deps.blobs.delete(object_keys.file_key("file-input"))

    result = _run(deps, chunks[1])

    assert result.model_dump() == {**ids(), "index": 1, "done": True, "stopped": "input_missing"}
    assert upstream.sent_contents() == ["r0", "r1"]
    assert len(_journal(deps, 0)) == 2
