"""The periodic sweep: every kind of expired record in one pass, each independent of the others."""

from __future__ import annotations

import logging
import time

import pytest

from batch_api.contract.models import IDEMPOTENCY_KEY_TTL, BatchRecord
from batch_api.deps import Deps
from batch_api.service import files, housekeeping, uploads
from batch_api.workflow.runner_local import LocalWorkflow
from tests.unit.builders import FakeClock, make_deps

pytestmark = pytest.mark.unit


def _expiring_things(deps: Deps) -> None:
    files.create_file(deps, "p1", "a.txt", "user_data", b"x", {"anchor": "created_at", "seconds": 3600})
    uploads.add_part(
        deps, "p1", uploads.create_upload(deps, "p1", "f.jsonl", "batch", 1, "text/plain").id, b"x"
    )
    deps.metadata.claim_idempotency_key("p1", "key-1", "batch_1", deps.now())


def test_one_pass_sweeps_files_uploads_and_idempotency_keys(deps: Deps, clock: FakeClock) -> None:
    _expiring_things(deps)
    assert housekeeping.sweep(deps) == {
        "files": 0,
        "uploads": 0,
        "idempotency_keys": 0,
        "unannounced_events": 0,
    }

    clock.advance(IDEMPOTENCY_KEY_TTL)  # past every expiry (and the uploads' grace)
    assert housekeeping.sweep(deps) == {
        "files": 1,
        "uploads": 1,
        "idempotency_keys": 1,
        "unannounced_events": 0,
    }
    assert deps.blobs.list_keys("") == []
    assert deps.metadata.idempotency == {}  # type: ignore[attr-defined]
    assert housekeeping.sweep(deps) == {
        "files": 0,
        "uploads": 0,
        "idempotency_keys": 0,
        "unannounced_events": 0,
    }


def test_a_failing_kind_does_not_stop_the_others(
    deps: Deps, clock: FakeClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _expiring_things(deps)
    clock.advance(IDEMPOTENCY_KEY_TTL)

    def broken(now: int, limit: int) -> list[object]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(deps.metadata, "list_expired_files", broken)
    with caplog.at_level(logging.INFO, logger=housekeeping.__name__):
        assert housekeeping.sweep(deps) == {"uploads": 1, "idempotency_keys": 1, "unannounced_events": 0}
    assert "sweep of files failed" in caplog.text
    assert "uploads: 1, idempotency_keys: 1" in caplog.text


def test_the_local_runner_sweeps_periodically_and_survives_a_failing_pass(clock: FakeClock) -> None:
    deps = make_deps(clock=clock, file_sweep_interval_seconds=0.01)
    _expiring_things(deps)
    clock.advance(IDEMPOTENCY_KEY_TTL)
    passes: list[dict[str, int]] = []

    def sweep() -> None:
        if not passes:
            passes.append({})
            raise RuntimeError("first pass fails")
        passes.append(housekeeping.sweep(deps))

    workflow = LocalWorkflow()
    workflow.bind(deps)
    workflow.start_sweeper(sweep)
    try:
        deadline = time.monotonic() + 10
        while len(passes) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        workflow.stop()
    assert passes[1] == {"files": 1, "uploads": 1, "idempotency_keys": 1, "unannounced_events": 0}
    assert passes[2] == {"files": 0, "uploads": 0, "idempotency_keys": 0, "unannounced_events": 0}


def test_a_pass_announces_an_ended_batch_whose_event_a_crash_left_unpublished(deps: Deps) -> None:
    """The terminal status is committed with `event_pending` before the event goes out; a crash in
    between leaves the mark, and the sweep publishes the event and clears it."""
    record = BatchRecord(
        id="batch_1",
        project_id="p1",
        endpoint="/v1/chat/completions",
        input_file_id="file-in",
        created_at=deps.now(),
        expires_at=deps.now() + 86400,
        status="completed",
        completed_at=deps.now(),
        event_pending=True,
    )
    deps.metadata.create_batch(record)
    deps.metadata.create_batch(record.model_copy(update={"id": "batch_2", "event_pending": False}))

    assert housekeeping.sweep(deps)["unannounced_events"] == 1

    assert [(kind, detail["id"]) for kind, detail in deps.events.events] == [  # type: ignore[attr-defined]
        ("batch.completed", "batch_1")
    ]
    stored = deps.metadata.get_batch("p1", "batch_1")
    assert stored is not None and stored.event_pending is False
    assert housekeeping.sweep(deps)["unannounced_events"] == 0


def test_a_pass_takes_at_most_its_limit_of_each_kind(deps: Deps, clock: FakeClock) -> None:
    for _ in range(2):
        _expiring_things(deps)
    clock.advance(IDEMPOTENCY_KEY_TTL)
    first = housekeeping.sweep(deps, limit=1)
    assert (first["files"], first["uploads"]) == (1, 1)
    second = housekeeping.sweep(deps, limit=1)
    assert (second["files"], second["uploads"]) == (1, 1)
    assert deps.blobs.list_keys("") == []
