"""The local state machine (`workflow/runner_local.py`) on the memory adapters: the order of the steps,
retries, the catch that ends a batch failed, resume, and stopping."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import orjson
import pytest

from batch_api.adapters.memory import MemoryJournal
from batch_api.contract.models import ChunkProgress
from batch_api.workflow import runner_local
from batch_api.workflow.runner_local import LocalWorkflow
from tests.unit.builders import PROJECT, add_batch, file_lines, get_batch, jsonl, make_deps, request
from tests.unit.fakes_upstream import FakeUpstream

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

    async def broken(event: Any, step_deps: Any, **_: Any) -> Any:
        raise RuntimeError("no journal")

    monkeypatch.setattr(process, "process_chunk_async", broken)
    drive(bound(deps, step_attempts=1))

    batch = get_batch(deps)
    assert batch.status == "failed"
    assert batch.errors[0].message == "process failed after 1 attempts: RuntimeError('no journal')"


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


# ---------------------------------------------------------------- threads, pool, stop and wait


class HeldChunks:
    """Makes every chunk wait for `release` (at most `hold_seconds`, so a broken stop cannot hang the
    suite) before it runs for real; `let_go` is set once a chunk comes out of the hold."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_seconds: float = 5.0) -> None:
        from batch_api.workflow import process

        self.entered = threading.Event()
        self.release = threading.Event()
        self.let_go = threading.Event()
        real = process.process_chunk_async

        async def held(event: Any, step_deps: Any, **options: Any) -> Any:
            self.entered.set()
            await asyncio.to_thread(self.release.wait, hold_seconds)
            self.let_go.set()
            return await real(event, step_deps, **options)

        monkeypatch.setattr(process, "process_chunk_async", held)


def test_deps_before_bind_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"bind\(deps\) was not called"):
        _ = LocalWorkflow().deps


def test_stopping_a_workflow_that_was_never_bound_is_harmless() -> None:
    workflow = LocalWorkflow()

    workflow.stop(timeout=0)
    workflow.start(PROJECT, "batch_test")  # stopping: nothing starts, so deps are never needed

    assert workflow.wait_idle(1)


def test_a_batch_runs_on_a_daemon_thread_named_for_it_and_its_chunks_on_the_chunk_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batch_api.workflow import process, validate

    batch_id = "batch_01234567" + "89abcdef"
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]), batch_id=batch_id)
    seen: dict[str, threading.Thread] = {}
    real_validate, real_process = validate.validate_batch, process.process_chunk_async

    def validate_recording(event: Any, step_deps: Any) -> Any:
        seen["validate"] = threading.current_thread()
        return real_validate(event, step_deps)

    async def process_recording(event: Any, step_deps: Any, **options: Any) -> Any:
        seen["process"] = threading.current_thread()
        return await real_process(event, step_deps, **options)

    monkeypatch.setattr(validate, "validate_batch", validate_recording)
    monkeypatch.setattr(process, "process_chunk_async", process_recording)

    drive(bound(deps), batch_id)

    assert get_batch(deps, batch_id).status == "completed"
    assert seen["validate"].name == "batch-89abcdef"  # the id's last 8 characters
    assert seen["validate"].daemon  # a stuck batch never keeps the process from exiting
    assert seen["process"].name == "chunks"  # the one loop every batch's chunks run on
    assert seen["process"].daemon


def test_the_sweeper_runs_on_a_daemon_thread_named_sweeper() -> None:
    deps = make_deps(FakeUpstream())
    workflow = bound(deps)
    swept = threading.Event()
    threads: list[threading.Thread] = []

    def sweep() -> None:
        threads.append(threading.current_thread())
        swept.set()

    workflow.start_sweeper(sweep)
    try:
        assert swept.wait(10)
    finally:
        workflow.stop(timeout=1)

    assert threads[0].name == "sweeper"
    assert threads[0].daemon


@pytest.mark.parametrize(("concurrency", "per_chunk"), [(2, 2), (1, 3)])
def test_a_batch_never_has_more_in_flight_than_its_chunks_together(concurrency: int, per_chunk: int) -> None:
    upstream = FakeUpstream(latency=0.01)
    deps = make_deps(upstream, chunk_max_lines=3, chunk_concurrency=concurrency, requests_per_chunk=per_chunk)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(12)]))

    drive(bound(deps))

    assert get_batch(deps).status == "completed" and len(upstream.calls) == 12
    assert upstream.max_in_flight == concurrency * per_chunk  # reached, and never passed


@pytest.mark.parametrize("concurrency", [1, 2])
def test_no_more_chunks_send_at_once_than_chunk_concurrency(
    monkeypatch: pytest.MonkeyPatch, concurrency: int
) -> None:
    """A chunk sends from when it starts until it has sent its last request (then the next may start
    while its last answers are out)."""
    from batch_api.workflow import process

    upstream = FakeUpstream(latency=0.005)
    deps = make_deps(upstream, chunk_max_lines=2, chunk_concurrency=concurrency, requests_per_chunk=1)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(12)]))
    real = process.process_chunk_async
    sending: set[int] = set()
    peak: list[int] = []

    async def counted(event: Any, step_deps: Any, *, shared: Any, **options: Any) -> Any:
        index = event.chunk.index
        sending.add(index)
        peak.append(len(sending))

        def dispatched() -> None:
            sending.discard(index)
            shared.dispatched()

        await asyncio.sleep(0)  # a turn of the loop: others start now if their turns let them
        try:
            return await real(
                event, step_deps, shared=process.SharedSlots(shared.slots, dispatched), **options
            )
        finally:
            sending.discard(index)

    monkeypatch.setattr(process, "process_chunk_async", counted)
    drive(bound(deps))

    assert get_batch(deps).status == "completed" and len(peak) == 6
    assert max(peak) == concurrency


def test_chunks_cancelled_by_a_failure_have_ended_before_the_batch_is_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batch_api.workflow import process

    deps = make_deps(FakeUpstream(latency=5.0), chunk_max_lines=1, chunk_concurrency=2)
    add_batch(deps, jsonl([request("a"), request("b")]))
    real = process.process_chunk_async
    ended_while: list[str] = []

    async def first_fails_second_unwinds_slowly(event: Any, step_deps: Any, **options: Any) -> Any:
        if event.chunk.index == 0:
            await asyncio.sleep(0.05)  # the other one is sending by now
            raise RuntimeError("no journal")
        try:
            return await real(event, step_deps, **options)
        except asyncio.CancelledError:
            for _ in range(20):  # unwinding takes a while, like a client closing its connections
                await asyncio.sleep(0.001)
            raise
        finally:
            ended_while.append(get_batch(step_deps).status)

    monkeypatch.setattr(process, "process_chunk_async", first_fails_second_unwinds_slowly)
    drive(bound(deps, step_attempts=1))

    assert get_batch(deps).status == "failed"
    assert ended_while == ["in_progress"]  # it had ended before the batch was marked failed


class HoldsLastOfFirstChunk(FakeUpstream):
    """Answers "r1", the first chunk's last request, only once "r2", the second chunk's first, was
    sent: a runner that waits for a chunk's last answer before it starts the next never finishes."""

    def __init__(self) -> None:
        super().__init__()
        self.second_chunk_sent = asyncio.Event()

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> Any:
        content = orjson.loads(body)["messages"][-1]["content"]
        if content == "r2":
            self.second_chunk_sent.set()
        if content == "r1":
            await asyncio.wait_for(self.second_chunk_sent.wait(), 10)
        return await super().send(endpoint, body, deadline)


def test_the_next_chunk_starts_while_the_last_requests_of_one_are_out() -> None:
    upstream = HoldsLastOfFirstChunk()
    deps = make_deps(upstream, chunk_max_lines=2, chunk_concurrency=1, requests_per_chunk=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(4)]))

    drive(bound(deps))

    assert upstream.second_chunk_sent.is_set()
    batch = get_batch(deps)
    assert batch.status == "completed"
    # r1 was answered (not timed out): r2 went out while r1 was still waiting
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 4, "failed": 0}


def test_a_chunk_that_fails_after_sending_everything_gives_its_turn_and_slots_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batch_api.workflow import process

    upstream = FakeUpstream()
    deps = make_deps(upstream, chunk_max_lines=2, chunk_concurrency=1, requests_per_chunk=2)
    add_batch(deps, jsonl([request(f"r{i}") for i in range(6)]))
    real = process.process_chunk_async
    failed: list[int] = []

    async def first_run_fails(event: Any, step_deps: Any, **options: Any) -> Any:
        output = await real(event, step_deps, **options)
        if event.chunk.index not in failed:  # every chunk's first run: sent it all, then failed
            failed.append(event.chunk.index)
            raise RuntimeError("lost the progress write")
        return output

    monkeypatch.setattr(process, "process_chunk_async", first_run_fails)
    drive(bound(deps))

    batch = get_batch(deps)
    assert batch.status == "completed" and sorted(failed) == [0, 1, 2]
    assert batch.request_counts.model_dump() == {"total": 6, "completed": 6, "failed": 0}


def test_wait_idle_gives_up_at_its_timeout_while_a_batch_is_busy(monkeypatch: pytest.MonkeyPatch) -> None:
    chunks = HeldChunks(monkeypatch)
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))
    workflow = bound(deps)
    workflow.start(PROJECT, "batch_test")
    assert chunks.entered.wait(10)

    assert workflow.wait_idle(0.05) is False
    assert not chunks.let_go.is_set()  # it returned at its timeout, not when the batch ended

    chunks.release.set()
    assert workflow.wait_idle(10)
    assert get_batch(deps).status == "completed"


def test_stop_waits_up_to_its_timeout_for_a_batch_that_does_not_let_go(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    chunks = HeldChunks(monkeypatch)
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))
    workflow = bound(deps)
    workflow.start(PROJECT, "batch_test")
    assert chunks.entered.wait(10)

    began = time.monotonic()
    workflow.stop(timeout=0.1)
    waited = time.monotonic() - began

    assert waited >= 0.09  # it gave the batch its time (less a clock tick)
    assert not chunks.let_go.is_set()  # and then returned without it, and without the chunk pool
    chunks.release.set()
    assert workflow.wait_idle(10)
    assert get_batch(deps).status == "in_progress"  # left for resume on the next start


def test_a_chunk_left_unfinished_without_a_shutdown_fails_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    from batch_api.workflow import process

    deps = make_deps(FakeUpstream(), chunk_max_lines=1)
    add_batch(deps, jsonl([request("a"), request("b")]))
    real = process.process_chunk_async

    async def second_never_finishes(event: Any, step_deps: Any, **options: Any) -> Any:
        output = await real(event, step_deps, **options)
        return output.model_copy(update={"done": False}) if event.chunk.index == 1 else output

    monkeypatch.setattr(process, "process_chunk_async", second_never_finishes)
    drive(bound(deps))

    batch = get_batch(deps)
    assert batch.status == "failed"
    assert [(entry.code, entry.message) for entry in batch.errors] == [
        ("internal_error", "chunk 1 did not finish")
    ]


# ---------------------------------------------------------------- retries


def failing_validation(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from batch_api.workflow import validate

    attempts: list[int] = []

    def broken(event: Any, step_deps: Any) -> Any:
        attempts.append(1)
        raise RuntimeError("bad disk")

    monkeypatch.setattr(validate, "validate_batch", broken)
    return attempts


def test_a_validation_that_keeps_failing_ends_the_batch_failed_naming_the_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    attempts = failing_validation(monkeypatch)
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))

    drive(bound(deps, step_attempts=2))

    assert len(attempts) == 2
    batch = get_batch(deps)
    assert batch.status == "failed"
    assert [entry.message for entry in batch.errors] == [
        "validate failed after 2 attempts: RuntimeError('bad disk')"
    ]


class RecordingStop(threading.Event):
    """The runner's stop event, recording each backoff instead of waiting it out."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[float | None] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        return self.is_set()


def test_retries_back_off_doubling_from_the_base_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    failing_validation(monkeypatch)
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("a")]))
    workflow = LocalWorkflow(step_attempts=4, step_backoff_seconds=0.5)
    workflow.bind(deps)
    deps.workflow = workflow
    stopping = workflow._stopping = RecordingStop()

    drive(workflow)

    assert get_batch(deps).status == "failed"
    assert stopping.waits[:3] == [0.5, 1.0, 2.0]  # before the 2nd, 3rd and 4th attempts


class UnlistableJournal:
    """A journal with only the port's methods, like the DynamoDB one: it cannot list its batches."""

    def __init__(self) -> None:
        self._lines = MemoryJournal()

    def append(self, batch_id: str, chunk_index: int, lines: list[bytes]) -> None:
        self._lines.append(batch_id, chunk_index, lines)

    def read(self, batch_id: str, chunk_index: int) -> Iterator[bytes]:
        return self._lines.read(batch_id, chunk_index)

    def delete_batch(self, batch_id: str) -> None:
        self._lines.delete_batch(batch_id)


def test_resume_works_with_a_journal_that_cannot_list_its_batches() -> None:
    deps = replace(make_deps(FakeUpstream()), journal=cast(Any, UnlistableJournal()))
    add_batch(deps, jsonl([request("a")]))
    workflow = bound(deps)

    assert workflow.resume() == 1
    assert workflow.wait_idle(30)

    assert get_batch(deps).status == "completed"
