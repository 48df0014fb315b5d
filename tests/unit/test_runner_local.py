"""The local state machine (`workflow/runner_local.py`) on the memory adapters: the order of the steps,
retries, the catch that ends a batch failed, resume, and stopping."""

from __future__ import annotations

import threading
from dataclasses import replace
from typing import Any

import pytest

from batch_api.contract.models import ChunkProgress
from batch_api.workflow import runner_local
from batch_api.workflow.runner_local import LocalWorkflow
from tests.unit.fakes_upstream import FakeUpstream
from tests.unit.workflow_support import PROJECT, add_batch, file_lines, get_batch, jsonl, make_deps, request

pytestmark = pytest.mark.unit


def bound(deps: Any, **options: Any) -> LocalWorkflow:
    workflow = LocalWorkflow(step_backoff_seconds=0, **options)
    workflow.bind(deps)
    deps.workflow = workflow
    return workflow


def drive(workflow: LocalWorkflow, batch_id: str = "batch_test") -> None:
    workflow.start(PROJECT, batch_id)
    assert workflow.wait_idle(30)


def test_a_batch_is_validated_processed_chunk_by_chunk_and_finalized() -> None:
    deps = make_deps(FakeUpstream(), chunk_max_lines=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(5)]))
    workflow = bound(deps)

    drive(workflow)

    batch = get_batch(deps)
    assert batch.status == "completed"
    assert batch.chunk_count == 3
    assert batch.request_counts.model_dump() == {"total": 5, "completed": 5, "failed": 0}
    assert sorted(line["custom_id"] for line in file_lines(deps, batch.output_file_id)) == [
        f"r{i}" for i in range(5)
    ]
    assert [kind for kind, _ in deps.events.events] == ["batch.completed"]


def test_an_invalid_file_ends_at_validation_without_processing() -> None:
    upstream = FakeUpstream()
    deps = make_deps(upstream)
    add_batch(deps, jsonl([request("a"), b"{not json"]))

    drive(bound(deps))

    assert get_batch(deps).status == "failed"
    assert upstream.calls == []


def test_a_batch_cancelled_while_validating_goes_straight_to_finalize() -> None:
    upstream = FakeUpstream()
    deps = make_deps(upstream)
    add_batch(deps, jsonl([request("a"), request("b")]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "cancelling"}, expected_status={"validating"}
    )

    drive(bound(deps))

    batch = get_batch(deps)
    assert batch.status == "cancelled"
    assert upstream.calls == []
    assert [line["error"]["code"] for line in file_lines(deps, batch.error_file_id)] == [
        "batch_cancelled"
    ] * 2


def test_a_step_that_fails_now_and_then_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))
    from batch_api.workflow import finalize

    real = finalize.finalize_batch
    attempts: list[int] = []

    def flaky(event: Any, step_deps: Any) -> Any:
        attempts.append(1)
        if len(attempts) < 3:
            raise RuntimeError("throttled")
        return real(event, step_deps)

    monkeypatch.setattr(finalize, "finalize_batch", flaky)
    drive(bound(deps, step_attempts=3))

    assert len(attempts) == 3
    assert get_batch(deps).status == "completed"


def test_a_step_that_keeps_failing_ends_the_batch_failed_naming_the_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))
    from batch_api.workflow import finalize

    attempts: list[int] = []

    def broken(event: Any, step_deps: Any) -> Any:
        attempts.append(1)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(finalize, "finalize_batch", broken)
    drive(bound(deps, step_attempts=2))

    assert len(attempts) == 2
    batch = get_batch(deps)
    assert batch.status == "failed"
    [entry] = batch.errors
    assert entry.code == "internal_error"
    assert entry.message == "finalize failed after 2 attempts: RuntimeError('disk on fire')"
    assert [kind for kind, _ in deps.events.events] == ["batch.failed"]


def test_a_chunk_that_keeps_failing_fails_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    deps = make_deps(FakeUpstream(), chunk_max_lines=1)
    add_batch(deps, jsonl([request("a"), request("b")]))
    from batch_api.workflow import process

    def broken(event: Any, step_deps: Any, **_: Any) -> Any:
        raise RuntimeError("no journal")

    monkeypatch.setattr(process, "process_chunk", broken)
    drive(bound(deps, step_attempts=1))

    batch = get_batch(deps)
    assert batch.status == "failed"
    assert batch.errors[0].message.startswith("process failed after 1 attempts")


def test_starting_a_batch_that_is_being_driven_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))
    workflow = bound(deps)
    release = threading.Event()
    drives: list[str] = []
    real_drive = workflow._drive

    def slow_drive(project_id: str, batch_id: str) -> None:
        drives.append(batch_id)
        release.wait(10)
        real_drive(project_id, batch_id)

    monkeypatch.setattr(workflow, "_drive", slow_drive)
    workflow.start(PROJECT, "batch_test")
    workflow.start(PROJECT, "batch_test")
    release.set()
    assert workflow.wait_idle(30)

    assert drives == ["batch_test"]
    assert get_batch(deps).status == "completed"
    workflow.start(PROJECT, "batch_test")  # ended: a new drive only finds it done
    assert workflow.wait_idle(30) and drives == ["batch_test", "batch_test"]


def test_nothing_starts_once_stopping() -> None:
    upstream = FakeUpstream()
    deps = make_deps(upstream)
    add_batch(deps, jsonl([request("a")]))
    workflow = bound(deps)

    workflow.stop(timeout=1)
    workflow.start(PROJECT, "batch_test")

    assert workflow.wait_idle(1)
    assert get_batch(deps).status == "validating"  # left for resume on the next start
    assert upstream.calls == []


def test_resume_drives_every_unfinished_batch_and_drops_ended_ones_journals() -> None:
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]), batch_id="batch_one", file_id="file-one")
    add_batch(deps, jsonl([request("b")]), batch_id="batch_two", file_id="file-two")
    add_batch(deps, jsonl([request("c")]), batch_id="batch_ended", file_id="file-three")
    deps.metadata.update_batch(
        PROJECT, "batch_ended", {"status": "completed"}, expected_status={"validating"}
    )
    deps.journal.append("batch_ended", 0, [b'{"custom_id": "c"}'])
    deps.metadata.put_chunk_progress("batch_ended", ChunkProgress(index=0, completed=1))
    workflow = bound(deps)

    assert workflow.resume() == 2
    assert workflow.wait_idle(30)

    assert get_batch(deps, "batch_one").status == "completed"
    assert get_batch(deps, "batch_two").status == "completed"
    assert list(deps.journal.read("batch_ended", 0)) == []
    assert deps.metadata.list_chunk_progress("batch_ended") == []


def test_resume_announces_an_end_a_crash_left_unannounced() -> None:
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))
    deps.metadata.update_batch(
        PROJECT, "batch_test", {"status": "failed", "event_pending": True}, expected_status={"validating"}
    )
    workflow = bound(deps)

    assert workflow.resume() == 0

    assert [kind for kind, _ in deps.events.events] == ["batch.failed"]
    assert get_batch(deps).event_pending is False


def test_stop_makes_running_chunks_see_no_time_left_and_leaves_the_batch_for_resume() -> None:
    started = threading.Event()
    upstream = FakeUpstream(latency=0.05, on_call=lambda n, body: started.set())
    deps = make_deps(upstream, requests_per_chunk=1, progress_interval_seconds=0.02)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(200)]))
    workflow = bound(deps)
    workflow.start(PROJECT, "batch_test")
    assert started.wait(10)

    workflow.stop(timeout=10)

    assert workflow.wait_idle(1)
    batch = get_batch(deps)
    assert batch.status == "in_progress"  # not failed: the next start resumes it
    assert 0 < len(upstream.calls) < 200
    assert workflow._time_left() == 0.0

    upstream.latency = 0  # the rest at once
    again = LocalWorkflow(step_backoff_seconds=0)
    again.bind(replace(deps, workflow=again))
    assert again.resume() == 1 and again.wait_idle(60)
    assert get_batch(deps).status == "completed"


def test_the_defaults_retry_four_times_with_growing_backoff() -> None:
    assert runner_local.STEP_ATTEMPTS == 4
    assert runner_local.STEP_BACKOFF_SECONDS == 1.0
    workflow = LocalWorkflow()
    assert (workflow._step_attempts, workflow._step_backoff) == (4, 1.0)
    assert workflow._time_left() == float("inf")
