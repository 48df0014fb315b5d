"""Batches use cases on the in-memory fakes."""

from __future__ import annotations

from typing import Any

import pytest

from batch_api.adapters.memory import RecordingWorkflow
from batch_api.contract.errors import (
    AlreadyExists,
    ConditionFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    ServerError,
)
from batch_api.contract.models import (
    IDEMPOTENCY_KEY_TTL,
    OUTPUT_DEFAULT_TTL,
    TERMINAL_STATUSES,
    ChunkProgress,
    Usage,
)
from batch_api.deps import Deps
from batch_api.service import batches, files
from tests.unit.builders import T0, FakeClock, make_deps

pytestmark = pytest.mark.unit


@pytest.fixture
def input_file_id(deps: Deps) -> str:
    return files.create_file(deps, "p1", "in.jsonl", "batch", b'{"custom_id": "a"}\n').id


def _create(deps: Deps, file_id: str, **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "endpoint": "/v1/chat/completions",
        "input_file_id": file_id,
        "completion_window": "24h",
        "metadata": None,
        "output_expires_after": None,
    }
    args.update(overrides)
    return batches.create_batch(deps, "p1", **args)


def _workflow(deps: Deps) -> RecordingWorkflow:
    assert isinstance(deps.workflow, RecordingWorkflow)
    return deps.workflow


def test_create_writes_validating_batch_and_starts_workflow(deps: Deps, input_file_id: str) -> None:
    batch = _create(
        deps,
        input_file_id,
        metadata={"team": "a"},
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )

    assert batch.status == "validating"
    assert batch.created_at == T0
    assert batch.expires_at == T0 + 86400
    assert batch.metadata == {"team": "a"}
    assert batch.output_expires_after_seconds == 7200
    assert deps.metadata.get_batch("p1", batch.id) == batch
    assert _workflow(deps).started == [("p1", batch.id)]


def test_window_length_comes_from_settings(clock: FakeClock) -> None:
    deps = make_deps(clock=clock, completion_window_seconds=60)
    file_id = files.create_file(deps, "p1", "in.jsonl", "batch", b"{}\n").id
    assert _create(deps, file_id).expires_at == T0 + 60


@pytest.mark.parametrize(
    ("overrides", "param", "code"),
    [
        ({"endpoint": "/v1/images/generations"}, "endpoint", "invalid_value"),
        ({"completion_window": "48h"}, "completion_window", "invalid_value"),
        ({"metadata": {"n": 1}}, "metadata.n", "invalid_type"),
        ({"metadata": {"k": "v" * 513}}, "metadata.k", "string_above_max_length"),
        ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65, "invalid_value"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "object_above_max_properties"),
        (
            {"output_expires_after": {"anchor": "created_at", "seconds": 60}},
            "output_expires_after.seconds",
            "invalid_value",
        ),
        (
            {"output_expires_after": {"anchor": "now", "seconds": 7200}},
            "output_expires_after.anchor",
            "invalid_value",
        ),
        ({"input_file_id": "file-missing"}, "input_file_id", "invalid_request"),
    ],
)
def test_create_rejects_bad_requests(
    deps: Deps, input_file_id: str, overrides: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        _create(deps, input_file_id, **overrides)
    assert (raised.value.param, raised.value.code) == (param, code)
    assert deps.metadata.list_batches("p1", after=None, limit=10) == []
    assert _workflow(deps).started == []


def test_metadata_at_the_limits_is_accepted(deps: Deps, input_file_id: str) -> None:
    metadata = {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)}
    assert _create(deps, input_file_id, metadata=metadata).metadata == metadata


def test_input_file_must_be_the_projects_live_batch_file(deps: Deps, clock: FakeClock) -> None:
    other = files.create_file(deps, "p2", "in.jsonl", "batch", b"{}\n")
    with pytest.raises(InvalidRequest, match="Could not find"):
        _create(deps, other.id)

    wrong = files.create_file(deps, "p1", "a.txt", "user_data", b"{}\n")
    with pytest.raises(InvalidRequest, match="purpose 'batch'") as raised:
        _create(deps, wrong.id)
    assert raised.value.param == "input_file_id"

    deleted = files.create_file(deps, "p1", "in.jsonl", "batch", b"{}\n")
    files.delete_file(deps, "p1", deleted.id)
    with pytest.raises(InvalidRequest, match="Could not find"):
        _create(deps, deleted.id)


def test_idempotency_key_replays_the_same_batch(deps: Deps, input_file_id: str, clock: FakeClock) -> None:
    first = _create(deps, input_file_id, idempotency_key="key-1")
    clock.advance(5)
    again = _create(deps, input_file_id, idempotency_key="key-1")
    other = _create(deps, input_file_id, idempotency_key="key-2")

    assert again.id == first.id
    assert again.created_at == T0
    assert other.id != first.id
    assert len(deps.metadata.list_batches("p1", after=None, limit=10)) == 2


@pytest.mark.parametrize(
    "changed",
    [
        {"endpoint": "/v1/embeddings"},
        {"metadata": {"team": "other"}},
        {"output_expires_after": {"anchor": "created_at", "seconds": 7200}},
        {"other_input": True},
    ],
)
def test_idempotency_key_reused_with_other_parameters_is_a_409(
    deps: Deps, input_file_id: str, changed: dict[str, Any]
) -> None:
    first = _create(deps, input_file_id, idempotency_key="key-1", metadata={"team": "search"})
    changed = dict(changed)  # the parameter itself is shared by every run of the test
    if changed.pop("other_input", False):
        input_file_id = files.create_file(deps, "p1", "other.jsonl", "batch", b"{}\n").id
    kwargs: dict[str, Any] = {"metadata": {"team": "search"}, **changed}
    with pytest.raises(Conflict) as raised:
        _create(deps, input_file_id, idempotency_key="key-1", **kwargs)
    assert (raised.value.status_code, raised.value.code, raised.value.param) == (
        409,
        "idempotency_key_reused",
        "Idempotency-Key",
    )
    assert first.id in raised.value.message
    assert raised.value.retryable is False  # x-should-retry: false
    assert [b.id for b in deps.metadata.list_batches("p1", after=None, limit=10)] == [first.id]


def test_idempotency_key_with_the_default_spelled_out_is_the_same_request(
    deps: Deps, input_file_id: str
) -> None:
    first = _create(deps, input_file_id, idempotency_key="key-1")
    again = _create(
        deps,
        input_file_id,
        idempotency_key="key-1",
        output_expires_after={"anchor": "created_at", "seconds": OUTPUT_DEFAULT_TTL},
    )
    assert again.id == first.id


def test_idempotency_key_expires_a_day_after_the_first_request(
    deps: Deps, input_file_id: str, clock: FakeClock
) -> None:
    first = _create(deps, input_file_id, idempotency_key="key-1")
    clock.advance(IDEMPOTENCY_KEY_TTL - 1)
    assert _create(deps, input_file_id, idempotency_key="key-1").id == first.id
    clock.advance(1)
    fresh = _create(deps, input_file_id, idempotency_key="key-1")
    assert fresh.id != first.id and fresh.created_at == T0 + IDEMPOTENCY_KEY_TTL
    assert _create(deps, input_file_id, idempotency_key="key-1").id == fresh.id
    assert len(deps.metadata.list_batches("p1", after=None, limit=10)) == 2


def test_idempotency_key_whose_first_attempt_died_creates_the_batch(deps: Deps, input_file_id: str) -> None:
    deps.metadata.claim_idempotency_key("p1", "key-1", "batch_claimed", T0)
    batch = _create(deps, input_file_id, idempotency_key="key-1")
    assert batch.id == "batch_claimed"
    assert _workflow(deps).started == [("p1", "batch_claimed")]


def test_retrieve_and_project_scoping(deps: Deps, input_file_id: str) -> None:
    batch = _create(deps, input_file_id)
    assert batches.retrieve_batch(deps, "p1", batch.id) == batch
    with pytest.raises(NotFound):
        batches.retrieve_batch(deps, "p2", batch.id)


def _start_running(deps: Deps, batch_id: str, total: int) -> None:
    deps.metadata.update_batch(
        "p1",
        batch_id,
        {
            "status": "in_progress",
            "in_progress_at": T0,
            "request_counts": {"total": total, "completed": 0, "failed": 0},
        },
        expected_status=["validating"],
    )


def test_running_batch_reports_chunk_progress(deps: Deps, input_file_id: str) -> None:
    batch = _create(deps, input_file_id)
    _start_running(deps, batch.id, 10)
    deps.metadata.put_chunk_progress(
        batch.id,
        ChunkProgress(
            index=0, completed=3, failed=1, usage=Usage(input_tokens=5, output_tokens=2, total_tokens=7)
        ),
    )
    deps.metadata.put_chunk_progress(
        batch.id, ChunkProgress(index=1, completed=2, usage=Usage(input_tokens=1, total_tokens=1))
    )

    seen = batches.retrieve_batch(deps, "p1", batch.id)
    assert seen.request_counts.model_dump() == {"total": 10, "completed": 5, "failed": 1}
    assert seen.usage.input_tokens == 6
    assert seen.usage.total_tokens == 8

    # a retried chunk overwrites its progress; the sum follows
    deps.metadata.put_chunk_progress(batch.id, ChunkProgress(index=1, completed=4))
    assert batches.retrieve_batch(deps, "p1", batch.id).request_counts.completed == 7
    [listed], _ = batches.list_batches(deps, "p1")
    assert listed.request_counts.completed == 7


def test_terminal_batch_reports_its_stored_counts(deps: Deps, input_file_id: str) -> None:
    batch = _create(deps, input_file_id)
    deps.metadata.update_batch(
        "p1",
        batch.id,
        {
            "status": "completed",
            "completed_at": T0,
            "request_counts": {"total": 2, "completed": 2, "failed": 0},
        },
        expected_status=["validating"],
    )
    deps.metadata.put_chunk_progress(batch.id, ChunkProgress(index=0, completed=99))
    assert batches.retrieve_batch(deps, "p1", batch.id).request_counts.completed == 2


@pytest.mark.parametrize("status", sorted(TERMINAL_STATUSES))
def test_a_terminal_batch_is_reported_without_reading_chunk_progress(
    deps: Deps, input_file_id: str, status: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finalize deletes a terminal batch's progress records: nothing may depend on them afterwards."""
    batch = _create(deps, input_file_id)
    deps.metadata.update_batch("p1", batch.id, {"status": status}, expected_status=["validating"])

    def no_progress(batch_id: str) -> list[ChunkProgress]:
        raise AssertionError("chunk progress read for a terminal batch")

    monkeypatch.setattr(deps.metadata, "list_chunk_progress", no_progress)
    assert batches.retrieve_batch(deps, "p1", batch.id).status == status
    assert [b.status for b in batches.list_batches(deps, "p1")[0]] == [status]
    if status == "cancelled":
        assert batches.cancel_batch(deps, "p1", batch.id).status == "cancelled"


def test_list_is_newest_first_with_pages(deps: Deps, input_file_id: str, clock: FakeClock) -> None:
    made = []
    for _ in range(5):
        made.append(_create(deps, input_file_id).id)
        clock.advance(1)
    page, has_more = batches.list_batches(deps, "p1", limit=2)
    assert [b.id for b in page] == made[:-3:-1]
    assert has_more
    page, has_more = batches.list_batches(deps, "p1", limit=3, after=made[3])
    assert [b.id for b in page] == [made[2], made[1], made[0]]
    assert not has_more
    assert batches.list_batches(deps, "p2") == ([], False)
    assert len(batches.list_batches(deps, "p1")[0]) == 5  # default limit 20


@pytest.mark.parametrize("limit", [0, 101])
def test_list_limit_range(deps: Deps, limit: int) -> None:
    with pytest.raises(InvalidRequest) as raised:
        batches.list_batches(deps, "p1", limit=limit)
    assert raised.value.param == "limit"


def test_cancel_moves_to_cancelling_and_repeats_harmlessly(
    deps: Deps, input_file_id: str, clock: FakeClock
) -> None:
    batch = _create(deps, input_file_id)
    clock.advance(3)
    cancelled = batches.cancel_batch(deps, "p1", batch.id)
    assert cancelled.status == "cancelling"
    assert cancelled.cancelling_at == T0 + 3
    clock.advance(3)
    assert batches.cancel_batch(deps, "p1", batch.id).cancelling_at == T0 + 3


@pytest.mark.parametrize("status", ["completed", "failed", "expired"])
def test_cancel_of_finished_batch_conflicts(deps: Deps, input_file_id: str, status: str) -> None:
    batch = _create(deps, input_file_id)
    deps.metadata.update_batch("p1", batch.id, {"status": status}, expected_status=["validating"])
    with pytest.raises(Conflict) as raised:
        batches.cancel_batch(deps, "p1", batch.id)
    assert raised.value.message == f"Cannot cancel a batch with status '{status}'."
    assert raised.value.retryable is False


def test_cancel_of_cancelled_batch_returns_it(deps: Deps, input_file_id: str) -> None:
    batch = _create(deps, input_file_id)
    deps.metadata.update_batch("p1", batch.id, {"status": "cancelled"}, expected_status=["validating"])
    assert batches.cancel_batch(deps, "p1", batch.id).status == "cancelled"


def test_cancel_retries_after_losing_a_race(
    deps: Deps, input_file_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _create(deps, input_file_id)
    original = deps.metadata.update_batch
    calls = []

    def racing_update(project_id: str, batch_id: str, changes: Any, *, expected_status: Any) -> Any:
        calls.append(changes)
        if len(calls) == 1:  # the workflow finished the batch just before our write
            original(project_id, batch_id, {"status": "completed"}, expected_status=["validating"])
            raise ConditionFailed(batch_id)
        return original(project_id, batch_id, changes, expected_status=expected_status)

    monkeypatch.setattr(deps.metadata, "update_batch", racing_update)
    with pytest.raises(Conflict):
        batches.cancel_batch(deps, "p1", batch.id)
    assert len(calls) == 1


def test_cancel_unknown_batch(deps: Deps) -> None:
    with pytest.raises(NotFound):
        batches.cancel_batch(deps, "p1", "batch_nope")


@pytest.mark.parametrize("metadata", [["team", "a"], "team=a", 3])
def test_metadata_that_is_not_an_object_is_refused(deps: Deps, input_file_id: str, metadata: object) -> None:
    with pytest.raises(InvalidRequest) as raised:
        _create(deps, input_file_id, metadata=metadata)
    assert (raised.value.message, raised.value.param, raised.value.code) == (
        "Invalid type for 'metadata': expected an object.",
        "metadata",
        "invalid_type",
    )
    assert _workflow(deps).started == []


@pytest.mark.parametrize("length", [1, batches.MAX_IDEMPOTENCY_KEY])
def test_an_idempotency_key_of_a_length_within_the_bounds_is_accepted(
    deps: Deps, input_file_id: str, length: int
) -> None:
    first = _create(deps, input_file_id, idempotency_key="k" * length)
    assert _create(deps, input_file_id, idempotency_key="k" * length).id == first.id


@pytest.mark.parametrize("length", [0, batches.MAX_IDEMPOTENCY_KEY + 1])
def test_an_idempotency_key_of_a_length_out_of_bounds_is_refused(
    deps: Deps, input_file_id: str, length: int
) -> None:
    with pytest.raises(InvalidRequest) as raised:
        _create(deps, input_file_id, idempotency_key="k" * length)
    assert (raised.value.param, raised.value.code) == ("Idempotency-Key", "invalid_value")
    assert f"1 to {batches.MAX_IDEMPOTENCY_KEY} characters" in raised.value.message
    assert deps.metadata.list_batches("p1", after=None, limit=10) == []


def test_a_replay_does_not_write_the_batch_again(
    deps: Deps, input_file_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _create(deps, input_file_id, idempotency_key="key-1")
    writes: list[str] = []
    original = deps.metadata.create_batch

    def counting_create(record: Any) -> None:
        writes.append(record.id)
        original(record)

    monkeypatch.setattr(deps.metadata, "create_batch", counting_create)
    assert _create(deps, input_file_id, idempotency_key="key-1").id == first.id
    assert writes == []


def _lose_the_write_to_a_concurrent_request(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, **changes: Any
) -> None:
    """The other request with the same key writes its batch (with `changes`) just before ours."""
    original = deps.metadata.create_batch

    def racing_create(record: Any) -> None:
        original(record.model_copy(update=changes))
        raise AlreadyExists(record.id)

    monkeypatch.setattr(deps.metadata, "create_batch", racing_create)


def test_losing_the_write_to_a_concurrent_request_with_the_same_key_replays_its_batch(
    deps: Deps, input_file_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lose_the_write_to_a_concurrent_request(deps, monkeypatch, created_at=T0 - 1)
    batch = _create(deps, input_file_id, idempotency_key="key-1")

    assert batch == deps.metadata.get_batch("p1", batch.id)
    assert batch.created_at == T0 - 1  # the other request's batch
    assert _workflow(deps).started == [("p1", batch.id)]
    assert len(deps.metadata.list_batches("p1", after=None, limit=10)) == 1


def test_losing_the_write_to_a_concurrent_request_with_other_parameters_is_a_409(
    deps: Deps, input_file_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _lose_the_write_to_a_concurrent_request(deps, monkeypatch, endpoint="/v1/embeddings")
    with pytest.raises(Conflict) as raised:
        _create(deps, input_file_id, idempotency_key="key-1")
    assert raised.value.code == "idempotency_key_reused"
    assert _workflow(deps).started == []


def test_a_write_conflict_without_a_batch_to_replay_is_raised(
    deps: Deps, input_file_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def conflicting_create(record: Any) -> None:
        raise AlreadyExists(record.id)

    monkeypatch.setattr(deps.metadata, "create_batch", conflicting_create)
    with pytest.raises(AlreadyExists):
        _create(deps, input_file_id, idempotency_key="key-1")
    assert _workflow(deps).started == []


def test_a_replay_of_a_validating_batch_starts_its_workflow_again(deps: Deps, input_file_id: str) -> None:
    first = _create(deps, input_file_id, idempotency_key="key-1")
    _workflow(deps).started.clear()  # the first start was lost

    assert _create(deps, input_file_id, idempotency_key="key-1").id == first.id
    assert _workflow(deps).started == [("p1", first.id)]


def test_a_replay_of_a_running_batch_reports_its_progress_without_starting_it(
    deps: Deps, input_file_id: str
) -> None:
    first = _create(deps, input_file_id, idempotency_key="key-1")
    _start_running(deps, first.id, 4)
    deps.metadata.put_chunk_progress(first.id, ChunkProgress(index=0, completed=2, failed=1))
    _workflow(deps).started.clear()

    again = _create(deps, input_file_id, idempotency_key="key-1")
    assert (again.id, again.status) == (first.id, "in_progress")
    assert again.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 1}
    assert _workflow(deps).started == []


@pytest.mark.parametrize("limit", [1, batches.BATCH_LIST_MAX_LIMIT])
def test_list_limit_bounds_are_accepted(deps: Deps, input_file_id: str, limit: int) -> None:
    made = [_create(deps, input_file_id).id for _ in range(limit + 1)]
    page, has_more = batches.list_batches(deps, "p1", limit=limit)
    assert len(page) == limit
    assert has_more
    assert {b.id for b in page} <= set(made)


def test_list_reads_one_batch_beyond_the_page_from_the_store(
    deps: Deps, input_file_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for _ in range(6):
        _create(deps, input_file_id)
    original = deps.metadata.list_batches
    asked: list[int] = []

    def recording_list(project_id: str, *, after: str | None, limit: int) -> list[Any]:
        asked.append(limit)
        return original(project_id, after=after, limit=limit)

    monkeypatch.setattr(deps.metadata, "list_batches", recording_list)
    page, has_more = batches.list_batches(deps, "p1", limit=2)
    assert (len(page), has_more) == (2, True)
    assert asked == [2 + 1]


def test_list_with_exactly_limit_batches_has_no_more(deps: Deps, input_file_id: str) -> None:
    made = [_create(deps, input_file_id).id for _ in range(3)]
    page, has_more = batches.list_batches(deps, "p1", limit=3)
    assert sorted(b.id for b in page) == sorted(made)
    assert not has_more


def test_cancel_that_keeps_losing_races_gives_up_with_a_server_error(
    deps: Deps, input_file_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _create(deps, input_file_id)
    attempts = []

    def always_raced(project_id: str, batch_id: str, changes: Any, *, expected_status: Any) -> Any:
        attempts.append(changes)
        raise ConditionFailed(batch_id)

    monkeypatch.setattr(deps.metadata, "update_batch", always_raced)
    with pytest.raises(ServerError) as raised:
        batches.cancel_batch(deps, "p1", batch.id)
    assert (
        raised.value.message == f"Could not cancel batch {batch.id}: its status kept changing. Please retry."
    )
    assert len(attempts) > 1
    assert deps.metadata.get_batch("p1", batch.id).status == "validating"  # type: ignore[union-attr]
