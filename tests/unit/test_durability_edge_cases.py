"""Durability and race edge cases: crashes between writes, concurrent completes, inputs removed mid-batch."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batch_api import object_keys
from batch_api.adapters.local.sqlite import SqliteMetadataStore
from batch_api.contract.errors import ConditionFailed, InvalidRequest
from batch_api.contract.models import BatchRecord, FileRecord
from batch_api.service import uploads
from batch_api.service.files import delete_file, sweep_expired_files
from batch_api.workflow.finalize import finalize_batch
from batch_api.workflow.manifest import load_manifest
from batch_api.workflow.process import process_chunk
from batch_api.workflow.runner_local import LocalWorkflow
from batch_api.workflow.validate import validate_batch
from tests.unit.builders import (
    PROJECT,
    RecordingMetadata,
    SmallPieceBlobStore,
    add_batch,
    file_lines,
    get_batch,
    ids,
    jsonl,
    make_deps,
    request,
)
from tests.unit.fakes_upstream import FakeUpstream

pytestmark = pytest.mark.unit


def _add_batch_with_short_lived_input(deps: Any, data: bytes, input_ttl: int) -> None:
    """Like add_batch, but the input file expires after `input_ttl` seconds (expires_after >= 3600)."""
    now = deps.now()
    deps.blobs.put(object_keys.file_key("file-input"), data)
    deps.metadata.create_file(
        FileRecord(
            id="file-input",
            project_id=PROJECT,
            bytes=len(data),
            created_at=now,
            expires_at=now + input_ttl,
            filename="input.jsonl",
            purpose="batch",
            blob_key=object_keys.file_key("file-input"),
        )
    )
    deps.metadata.create_batch(
        BatchRecord(
            id="batch_test",
            project_id=PROJECT,
            endpoint="/v1/chat/completions",
            input_file_id="file-input",
            created_at=now,
            expires_at=now + 86400,
        )
    )


def _drive(deps: Any) -> None:
    workflow = LocalWorkflow(step_attempts=2, step_backoff_seconds=0.0)
    workflow.bind(deps)
    try:
        workflow.start(PROJECT, "batch_test")
        assert workflow.wait_idle(20)
    finally:
        workflow.stop()


# ---------------------------------------------------------------- input file gone mid-batch


@pytest.mark.parametrize("how", ["sweeper_expiry", "user_delete"])
def test_input_file_removed_mid_batch_does_not_throw_away_finished_results(how: str) -> None:
    """The input file expires (sweeper) or is deleted while the batch is in_progress: the next chunk's
    ranged read raises KeyError, the step fails every retry, fail_batch marks the batch `failed` and
    deletes the journals, so the results of requests that already ran (and were paid for) are lost."""
    deps = make_deps(FakeUpstream(), chunk_max_lines=2)
    _add_batch_with_short_lived_input(deps, jsonl([request(f"r{i}") for i in range(6)]), input_ttl=3600)
    assert validate_batch(ids(), deps).next == "process"
    first = load_manifest(deps, "batch_test")[0]
    process_chunk({**ids(), "chunk": first.model_dump()}, deps)  # r0, r1 ran upstream

    if how == "sweeper_expiry":
        deps.clock.advance(3600)  # the input file expires; the batch still has ~23 h
        assert sweep_expired_files(deps) == 1
    else:
        delete_file(deps, PROJECT, "file-input")

    _drive(deps)

    batch = get_batch(deps)
    assert batch.status != "failed", batch.errors
    assert batch.output_file_id is not None
    assert {"r0", "r1"} <= {line["custom_id"] for line in file_lines(deps, batch.output_file_id)}


# ---------------------------------------------------------------- lost terminal events


class _CrashOnFirstPublish:
    """An event sink whose first publish dies (kill -9 or EventBridge throttling right after the
    terminal status was stored)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.crashed = False

    def publish(self, detail_type: str, detail: Any) -> None:
        if not self.crashed:
            self.crashed = True
            raise RuntimeError("crash between the terminal update and the event")
        self.events.append((detail_type, dict(detail)))


@pytest.mark.parametrize("kind", ["completed", "failed_validation"])
def test_terminal_event_is_published_after_a_crash_between_status_and_event(kind: str) -> None:
    """finalize/_fail store the terminal status, then publish. If publishing fails (or the process
    dies) in between, every re-run sees a terminal batch and returns early: the event is never sent."""
    deps = make_deps(FakeUpstream())
    sink = _CrashOnFirstPublish()
    deps.events = sink  # type: ignore[assignment]
    lines = [request("r0"), request("r1")] if kind == "completed" else [b"{not json"]
    add_batch(deps, jsonl(lines))

    def run() -> None:
        outcome = validate_batch(ids(), deps)
        if outcome.next == "process":
            for chunk in load_manifest(deps, "batch_test"):
                process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)
        if outcome.next != "done":
            finalize_batch(ids(), deps)

    with pytest.raises(RuntimeError):
        run()
    run()  # the retry / the resume after restart

    expected = "batch.completed" if kind == "completed" else "batch.failed"
    assert [t for t, _ in sink.events] == [expected]


def test_journal_is_removed_after_a_crash_between_terminal_update_and_journal_delete() -> None:
    """finalize deletes the journals after the terminal update; a crash in between leaves them, and
    resume() only looks at non-terminal batches, so the journal (a full copy of the results) stays
    on disk forever."""
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("r0"), request("r1")]))
    validate_batch(ids(), deps)
    for chunk in load_manifest(deps, "batch_test"):
        process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)
    real_delete = deps.journal.delete_batch
    deps.journal.delete_batch = lambda batch_id: (_ for _ in ()).throw(RuntimeError("kill -9"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        finalize_batch(ids(), deps)
    deps.journal.delete_batch = real_delete  # type: ignore[method-assign]
    assert get_batch(deps).status == "completed"

    workflow = LocalWorkflow(step_attempts=1, step_backoff_seconds=0.0)
    workflow.bind(deps)
    try:
        workflow.resume()
        assert workflow.wait_idle(10)
    finally:
        workflow.stop()
    assert list(deps.journal.read("batch_test", 0)) == []


def test_chunk_progress_is_removed_after_a_crash_before_its_deletion() -> None:
    """finalize deletes the progress records, then the journals; a crash before the first leaves both,
    and resume() finishes the clean-up for a batch it no longer runs."""
    deps = make_deps(FakeUpstream(), chunk_max_lines=1)
    add_batch(deps, jsonl([request("r0"), request("r1")]))
    validate_batch(ids(), deps)
    for chunk in load_manifest(deps, "batch_test"):
        process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)
    real_delete = deps.metadata.delete_chunk_progress
    deps.metadata.delete_chunk_progress = lambda batch_id: (_ for _ in ()).throw(RuntimeError("kill -9"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        finalize_batch(ids(), deps)
    deps.metadata.delete_chunk_progress = real_delete  # type: ignore[method-assign]
    assert get_batch(deps).status == "completed"
    assert len(deps.metadata.list_chunk_progress("batch_test")) == 2

    workflow = LocalWorkflow(step_attempts=1, step_backoff_seconds=0.0)
    workflow.bind(deps)
    try:
        workflow.resume()
        assert workflow.wait_idle(10)
    finally:
        workflow.stop()
    assert deps.metadata.list_chunk_progress("batch_test") == []
    assert list(deps.journal.read("batch_test", 0)) == []


# ---------------------------------------------------------------- cancel during validate + crash


class _CancelThenCrash(RecordingMetadata):
    """The user's cancel lands just before validate's `validating -> in_progress` update, and the
    process dies right after that update lost (before the plan is stored under `cancelling`)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = True

    def update_batch(self, project_id: str, batch_id: str, changes: Any, *, expected_status: Any) -> Any:
        expected = set(expected_status)
        if self.armed and expected == {"validating"} and changes.get("status") == "in_progress":
            super().update_batch(
                project_id, batch_id, {"status": "cancelling"}, expected_status={"validating"}
            )
            raise ConditionFailed(batch_id)
        if self.armed and expected == {"cancelling"} and "request_counts" in changes:
            self.armed = False
            raise RuntimeError("kill -9 before the plan was recorded")
        return super().update_batch(project_id, batch_id, changes, expected_status=expected_status)


def test_cancel_during_validate_then_crash_keeps_counts_consistent() -> None:
    """After the crash the manifest exists, so validate does not run again and request_counts.total is
    never set: the batch ends `cancelled` with total=0 but failed=N (and no model)."""
    deps = make_deps(FakeUpstream())
    deps.metadata = _CancelThenCrash()
    add_batch(deps, jsonl([request(f"r{i}") for i in range(3)]))
    with pytest.raises(RuntimeError):
        validate_batch(ids(), deps)

    assert validate_batch(ids(), deps).next == "finalize"  # resume
    finalize_batch(ids(), deps)

    batch = get_batch(deps)
    assert batch.status == "cancelled"
    counts = batch.request_counts
    assert counts.failed == 3
    assert counts.total == counts.completed + counts.failed
    assert batch.model == "gpt-test"


# ---------------------------------------------------------------- uploads: racing completes


class _HookedBlobs(SmallPieceBlobStore):
    """Runs `hook` once, when the second part is opened for reading."""

    def __init__(self) -> None:
        super().__init__()
        self.hook: Any = None

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        if self.hook is not None and key.endswith(self.second_part):
            hook, self.hook = self.hook, None
            hook()
        return super().iter_range(key, start, end, chunk_size)


def test_two_racing_upload_completes_loser_gets_a_clean_answer() -> None:
    """Both requests see `pending` and start stitching. The winner deletes the parts while the loser
    still reads them: the loser's read raises KeyError, which the API answers as a bare 500 (and the
    SDK retries) instead of 400 invalid_upload_status."""
    deps = make_deps()
    blobs = _HookedBlobs()
    deps.blobs = blobs
    upload = uploads.create_upload(deps, PROJECT, "in.jsonl", "batch", 8, "application/jsonl")
    p1 = uploads.add_part(deps, PROJECT, upload.id, b'{"a":')
    p2 = uploads.add_part(deps, PROJECT, upload.id, b"1}\n")
    blobs.second_part = p2.id
    winner: list[Any] = []
    blobs.hook = lambda: winner.append(uploads.complete_upload(deps, PROJECT, upload.id, [p1.id, p2.id]))

    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, PROJECT, upload.id, [p1.id, p2.id])
    assert raised.value.code == "invalid_upload_status"
    assert winner and winner[0][0].status == "completed"


# ---------------------------------------------------------------- SQLite: a failed COMMIT wedges the store


class _CommitFailsOnce:
    """A connection proxy whose next COMMIT fails (disk full, I/O error)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail_commit = True

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT" and self.fail_commit:
            self.fail_commit = False
            raise sqlite3.OperationalError("disk I/O error")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def test_sqlite_store_recovers_after_a_failed_commit(tmp_path: Path) -> None:
    """`_write` rolls back only when the body raises; when COMMIT itself raises the transaction stays
    open on the one shared connection, and every later write fails with 'cannot start a transaction
    within a transaction' until the process restarts."""
    store = SqliteMetadataStore(tmp_path / "m.sqlite3")
    real = store._conn
    store._conn = _CommitFailsOnce(real)  # type: ignore[assignment]
    record = FileRecord(
        id="file-a",
        project_id=PROJECT,
        bytes=1,
        created_at=1,
        filename="a",
        purpose="batch",
        blob_key="files/a",
    )
    with pytest.raises(sqlite3.OperationalError):
        store.create_file(record)
    store.create_file(record.model_copy(update={"id": "file-b", "blob_key": "files/b"}))
    assert store.get_file(PROJECT, "file-b") is not None


# ---------------------------------------------------------------- output expiry lost on a finalize retry


def test_output_file_expiry_is_set_even_if_finalize_died_after_registering_the_file() -> None:
    """_write_file registers the FileRecord, then sets the blob's expiry (on AWS: the `expire-days`
    tag the lifecycle rules match). A crash or a tagging error in between, and the re-run finds the
    record and returns early, so the object is never tagged and S3 never deletes it."""
    deps = make_deps(FakeUpstream())
    add_batch(deps, jsonl([request("r0")]), output_expires_after_seconds=7200)
    validate_batch(ids(), deps)
    for chunk in load_manifest(deps, "batch_test"):
        process_chunk({**ids(), "chunk": chunk.model_dump()}, deps)
    real_set_expiry = deps.blobs.set_expiry
    deps.blobs.set_expiry = lambda key, at: (_ for _ in ()).throw(RuntimeError("PutObjectTagging throttled"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        finalize_batch(ids(), deps)
    deps.blobs.set_expiry = real_set_expiry  # type: ignore[method-assign]

    finalize_batch(ids(), deps)  # the step's retry

    batch = get_batch(deps)
    assert batch.status == "completed"
    assert batch.output_file_id is not None
    assert object_keys.file_key(batch.output_file_id) in deps.blobs.expiry


# ---------------------------------------------------------------- uploads: crash inside complete


def test_upload_complete_retried_after_a_crash_makes_one_file() -> None:
    """complete_upload stores the FileRecord (a new random id) before moving the upload to
    `completed`. If that update fails (crash, throttling), the upload is still pending and the retry
    stitches a second file: the project now lists two live copies, one of which no Upload points at."""
    deps = make_deps()
    upload = uploads.create_upload(deps, PROJECT, "in.jsonl", "batch", 3, "application/jsonl")
    part = uploads.add_part(deps, PROJECT, upload.id, b"{}\n")
    real_update = deps.metadata.update_upload
    deps.metadata.update_upload = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kill -9"))  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        uploads.complete_upload(deps, PROJECT, upload.id, [part.id])
    deps.metadata.update_upload = real_update  # type: ignore[method-assign]

    _completed, file = uploads.complete_upload(deps, PROJECT, upload.id, [part.id])

    listed = deps.metadata.list_files(
        PROJECT, purpose=None, order="desc", after=None, limit=100, now=deps.now()
    )
    assert [f.id for f in listed] == [file.id]
