"""The periodic sweep: every kind of expired record in one pass, each independent of the others."""

from __future__ import annotations

import logging
import time

import pytest

from batch_api.contract.models import IDEMPOTENCY_KEY_TTL
from batch_api.deps import Deps
from batch_api.service import files, housekeeping, uploads
from batch_api.workflow.runner_local import LocalWorkflow
from tests.unit.conftest import FixedClock, make_deps

pytestmark = pytest.mark.unit


def _expiring_things(deps: Deps) -> None:
    files.create_file(deps, "p1", "a.txt", "user_data", b"x", {"anchor": "created_at", "seconds": 3600})
    uploads.add_part(deps, "p1", uploads.create_upload(deps, "p1", "f", "batch", 1, "text/plain").id, b"x")
    deps.metadata.claim_idempotency_key("p1", "key-1", "batch_1", deps.now())


def test_one_pass_sweeps_files_uploads_and_idempotency_keys(deps: Deps, clock: FixedClock) -> None:
    _expiring_things(deps)
    assert housekeeping.sweep(deps) == {"files": 0, "uploads": 0, "idempotency_keys": 0}

    clock.advance(IDEMPOTENCY_KEY_TTL)  # past every expiry (and the uploads' grace)
    assert housekeeping.sweep(deps) == {"files": 1, "uploads": 1, "idempotency_keys": 1}
    assert deps.blobs.list_keys("") == []
    assert deps.metadata.idempotency == {}  # type: ignore[attr-defined]
    assert housekeeping.sweep(deps) == {"files": 0, "uploads": 0, "idempotency_keys": 0}


def test_a_failing_kind_does_not_stop_the_others(
    deps: Deps, clock: FixedClock, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _expiring_things(deps)
    clock.advance(IDEMPOTENCY_KEY_TTL)

    def broken(now: int, limit: int) -> list[object]:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(deps.metadata, "list_expired_files", broken)
    with caplog.at_level(logging.INFO, logger=housekeeping.__name__):
        assert housekeeping.sweep(deps) == {"uploads": 1, "idempotency_keys": 1}
    assert "sweep of expired files failed" in caplog.text
    assert "uploads: 1, idempotency_keys: 1" in caplog.text


def test_the_local_runner_sweeps_periodically_and_survives_a_failing_pass(clock: FixedClock) -> None:
    deps = make_deps(clock, file_sweep_interval_seconds=0.01)
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
    assert passes[1] == {"files": 1, "uploads": 1, "idempotency_keys": 1}
    assert passes[2] == {"files": 0, "uploads": 0, "idempotency_keys": 0}
