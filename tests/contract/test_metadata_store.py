"""Contract: MetadataStore. Every adapter must behave as the in-memory reference does."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from batch_api.adapters.local.sqlite import SCHEMA_VERSION, SqliteMetadataStore
from batch_api.contract.errors import AlreadyExists, ConditionFailed
from batch_api.contract.models import (
    IDEMPOTENCY_KEY_TTL,
    BatchErrorEntry,
    BatchRecord,
    ChunkProgress,
    FileRecord,
    RequestCounts,
    UploadPartRecord,
    UploadRecord,
    Usage,
)
from batch_api.ports import MetadataStore

pytestmark = pytest.mark.contract

NOW = 1_700_000_000


def make_file(
    file_id: str, *, project: str = "proj-a", created_at: int = NOW, **fields: object
) -> FileRecord:
    values: dict[str, object] = {
        "id": file_id,
        "project_id": project,
        "bytes": 10,
        "created_at": created_at,
        "filename": f"{file_id}.jsonl",
        "purpose": "batch",
        "blob_key": f"files/{file_id}",
    }
    values.update(fields)
    return FileRecord.model_validate(values)


def make_batch(
    batch_id: str, *, project: str = "proj-a", created_at: int = NOW, **fields: object
) -> BatchRecord:
    values: dict[str, object] = {
        "id": batch_id,
        "project_id": project,
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "created_at": created_at,
        "expires_at": created_at + 86400,
    }
    values.update(fields)
    return BatchRecord.model_validate(values)


def make_upload(
    upload_id: str, *, project: str = "proj-a", expires_at: int = NOW + 3600, **fields: object
) -> UploadRecord:
    values: dict[str, object] = {
        "id": upload_id,
        "project_id": project,
        "bytes": 100,
        "created_at": NOW,
        "expires_at": expires_at,
        "filename": "big.jsonl",
        "purpose": "batch",
        "mime_type": "application/jsonl",
    }
    values.update(fields)
    return UploadRecord.model_validate(values)


def ids(records: list[FileRecord] | list[BatchRecord]) -> list[str]:
    return [r.id for r in records]


# ---------------------------------------------------------------- files


def test_file_round_trips_and_is_scoped_to_its_project(metadata_store: MetadataStore) -> None:
    record = make_file("file-1", expires_at=NOW + 60)
    metadata_store.create_file(record)

    assert metadata_store.get_file("proj-a", "file-1") == record
    assert metadata_store.get_file("proj-b", "file-1") is None
    assert metadata_store.get_file("proj-a", "file-missing") is None


def test_create_file_with_a_taken_id_raises_already_exists(metadata_store: MetadataStore) -> None:
    metadata_store.create_file(make_file("file-1"))
    with pytest.raises(AlreadyExists):
        metadata_store.create_file(make_file("file-1", project="proj-b", filename="other"))
    assert metadata_store.get_file("proj-a", "file-1") == make_file("file-1")


def test_mark_file_deleted_once_and_only_in_its_project(metadata_store: MetadataStore) -> None:
    metadata_store.create_file(make_file("file-1"))

    assert metadata_store.mark_file_deleted("proj-b", "file-1") is False
    assert metadata_store.mark_file_deleted("proj-a", "file-1") is True
    assert metadata_store.mark_file_deleted("proj-a", "file-1") is False
    assert metadata_store.mark_file_deleted("proj-a", "file-missing") is False

    deleted = metadata_store.get_file("proj-a", "file-1")
    assert deleted is not None and deleted.deleted is True  # get still returns it; callers decide liveness
    assert (
        metadata_store.list_files("proj-a", purpose=None, order="desc", after=None, limit=10, now=NOW) == []
    )


def test_list_files_orders_by_created_at_then_id(metadata_store: MetadataStore) -> None:
    for file_id, created_at in [("file-b", NOW), ("file-a", NOW), ("file-c", NOW - 5), ("file-d", NOW + 5)]:
        metadata_store.create_file(make_file(file_id, created_at=created_at))

    def listing(order: str) -> list[str]:
        return ids(
            metadata_store.list_files("proj-a", purpose=None, order=order, after=None, limit=10, now=NOW)
        )

    assert listing("asc") == ["file-c", "file-a", "file-b", "file-d"]
    assert listing("desc") == ["file-d", "file-b", "file-a", "file-c"]


def test_list_files_pages_with_after_in_both_orders(metadata_store: MetadataStore) -> None:
    for i in range(5):
        metadata_store.create_file(make_file(f"file-{i}", created_at=NOW + i))

    def page(order: str, after: str | None, limit: int = 2) -> list[str]:
        return ids(
            metadata_store.list_files("proj-a", purpose=None, order=order, after=after, limit=limit, now=NOW)
        )

    assert page("desc", None) == ["file-4", "file-3"]
    assert page("desc", "file-3") == ["file-2", "file-1"]
    assert page("desc", "file-1") == ["file-0"]
    assert page("desc", "file-0") == []
    assert page("asc", None) == ["file-0", "file-1"]
    assert page("asc", "file-1") == ["file-2", "file-3"]
    assert page("asc", "file-3", limit=10) == ["file-4"]


def test_list_files_after_an_unknown_or_foreign_id_is_empty(metadata_store: MetadataStore) -> None:
    metadata_store.create_file(make_file("file-mine"))
    metadata_store.create_file(make_file("file-theirs", project="proj-b", created_at=NOW + 10))

    for after in ("file-nope", "file-theirs"):
        assert (
            metadata_store.list_files("proj-a", purpose=None, order="asc", after=after, limit=10, now=NOW)
            == []
        )


def test_list_files_filters_purpose_project_and_liveness(metadata_store: MetadataStore) -> None:
    metadata_store.create_file(make_file("file-batch"))
    metadata_store.create_file(make_file("file-out", purpose="batch_output", created_at=NOW + 1))
    metadata_store.create_file(make_file("file-expired", expires_at=NOW))  # expires_at <= now: gone
    metadata_store.create_file(make_file("file-later", expires_at=NOW + 1, created_at=NOW + 2))
    metadata_store.create_file(make_file("file-deleted", deleted=True))
    metadata_store.create_file(make_file("file-other-project", project="proj-b"))

    def listing(purpose: str | None) -> list[str]:
        return ids(
            metadata_store.list_files("proj-a", purpose=purpose, order="asc", after=None, limit=10, now=NOW)
        )

    assert listing(None) == ["file-batch", "file-out", "file-later"]
    assert listing("batch") == ["file-batch", "file-later"]
    assert listing("batch_output") == ["file-out"]
    assert listing("evals") == []
    # the cursor is judged by the same filter: a file of another purpose is not in the listing
    assert (
        metadata_store.list_files("proj-a", purpose="batch", order="asc", after="file-out", limit=10, now=NOW)
        == []
    )


def test_list_expired_files_spans_projects_in_expiry_order(metadata_store: MetadataStore) -> None:
    metadata_store.create_file(make_file("file-late", expires_at=NOW))
    metadata_store.create_file(make_file("file-early", project="proj-b", expires_at=NOW - 100))
    metadata_store.create_file(make_file("file-live", expires_at=NOW + 1))
    metadata_store.create_file(make_file("file-forever"))
    metadata_store.create_file(make_file("file-gone", expires_at=NOW - 50, deleted=True))

    assert ids(metadata_store.list_expired_files(NOW, 10)) == ["file-early", "file-late"]
    assert ids(metadata_store.list_expired_files(NOW, 1)) == ["file-early"]
    assert metadata_store.list_expired_files(NOW - 101, 10) == []

    metadata_store.mark_file_deleted("proj-b", "file-early")
    assert ids(metadata_store.list_expired_files(NOW, 10)) == ["file-late"]


# ---------------------------------------------------------------- uploads


def test_upload_round_trips_scoped_and_unique(metadata_store: MetadataStore) -> None:
    metadata_store.create_upload(make_upload("upload_1"))

    assert metadata_store.get_upload("proj-a", "upload_1") == make_upload("upload_1")
    assert metadata_store.get_upload("proj-b", "upload_1") is None
    with pytest.raises(AlreadyExists):
        metadata_store.create_upload(make_upload("upload_1"))


def test_update_upload_is_conditional_on_status(metadata_store: MetadataStore) -> None:
    metadata_store.create_upload(make_upload("upload_1"))

    updated = metadata_store.update_upload(
        "proj-a", "upload_1", {"status": "completed", "file_id": "file-9"}, expected_status=["pending"]
    )
    assert (updated.status, updated.file_id) == ("completed", "file-9")
    assert metadata_store.get_upload("proj-a", "upload_1") == updated

    with pytest.raises(ConditionFailed):
        metadata_store.update_upload(
            "proj-a", "upload_1", {"status": "cancelled"}, expected_status=["pending"]
        )
    with pytest.raises(ConditionFailed):
        metadata_store.update_upload(
            "proj-b", "upload_1", {"status": "cancelled"}, expected_status=["completed"]
        )
    with pytest.raises(ConditionFailed):
        metadata_store.update_upload(
            "proj-a", "upload_nope", {"status": "cancelled"}, expected_status=["pending"]
        )
    assert metadata_store.get_upload("proj-a", "upload_1") == updated


def test_upload_parts_come_back_in_insertion_order_per_upload(metadata_store: MetadataStore) -> None:
    parts = [
        UploadPartRecord(id=part_id, upload_id="upload_1", created_at=NOW, bytes=5, blob_key=f"k/{part_id}")
        for part_id in ("part_z", "part_a", "part_m")
    ]
    for part in parts:
        metadata_store.add_upload_part(part)
    metadata_store.add_upload_part(
        UploadPartRecord(id="part_x", upload_id="upload_2", created_at=NOW, bytes=1, blob_key="k/x")
    )

    assert metadata_store.get_upload_parts("upload_1") == parts
    assert metadata_store.get_upload_parts("upload_none") == []


def test_list_expired_uploads_spans_projects_in_expiry_order_and_only_pending(
    metadata_store: MetadataStore,
) -> None:
    metadata_store.create_upload(make_upload("upload_late", expires_at=NOW))
    metadata_store.create_upload(make_upload("upload_early", project="proj-b", expires_at=NOW - 100))
    metadata_store.create_upload(make_upload("upload_live", expires_at=NOW + 1))
    metadata_store.create_upload(make_upload("upload_done", expires_at=NOW - 50, status="completed"))
    metadata_store.create_upload(make_upload("upload_cancelled", expires_at=NOW - 50, status="cancelled"))
    metadata_store.create_upload(make_upload("upload_expired", expires_at=NOW - 50, status="expired"))

    assert ids(metadata_store.list_expired_uploads(NOW, 10)) == ["upload_early", "upload_late"]
    assert metadata_store.list_expired_uploads(NOW, 10)[0] == make_upload(
        "upload_early", project="proj-b", expires_at=NOW - 100
    )
    assert ids(metadata_store.list_expired_uploads(NOW, 1)) == ["upload_early"]
    assert metadata_store.list_expired_uploads(NOW, 0) == []
    assert metadata_store.list_expired_uploads(NOW - 101, 10) == []
    assert ids(metadata_store.list_expired_uploads(NOW + 1, 10)) == [
        "upload_early",
        "upload_late",
        "upload_live",
    ]


def test_an_upload_leaves_the_expired_listing_when_it_leaves_pending(metadata_store: MetadataStore) -> None:
    for upload_id in ("upload_a", "upload_b", "upload_c"):
        metadata_store.create_upload(make_upload(upload_id, expires_at=NOW - 10))

    metadata_store.update_upload("proj-a", "upload_a", {"status": "expired"}, expected_status=["pending"])
    metadata_store.update_upload(
        "proj-a", "upload_b", {"status": "completed", "file_id": "file-b"}, expected_status=["pending"]
    )
    assert ids(metadata_store.list_expired_uploads(NOW, 10)) == ["upload_c"]
    with pytest.raises(ConditionFailed):  # marking it expired is conditional on pending, like any update
        metadata_store.update_upload("proj-a", "upload_b", {"status": "expired"}, expected_status=["pending"])
    stored = metadata_store.get_upload("proj-a", "upload_b")
    assert stored is not None and stored.status == "completed"

    # a later expiry moves it in the listing; a (hypothetical) move back to pending lists it again
    metadata_store.update_upload("proj-a", "upload_c", {"expires_at": NOW + 5}, expected_status=["pending"])
    assert metadata_store.list_expired_uploads(NOW, 10) == []
    metadata_store.update_upload("proj-a", "upload_a", {"status": "pending"}, expected_status=["expired"])
    assert ids(metadata_store.list_expired_uploads(NOW + 5, 10)) == ["upload_a", "upload_c"]


# ---------------------------------------------------------------- batches


def test_batch_round_trips_every_field(metadata_store: MetadataStore) -> None:
    record = make_batch(
        "batch_1",
        model="gpt-4o-mini",
        metadata={"team": "search"},
        errors=[BatchErrorEntry(code="invalid_json_line", message="line 3 is not JSON", line=3)],
        request_counts=RequestCounts(total=3, completed=1, failed=1),
        usage=Usage(input_tokens=5, output_tokens=7, total_tokens=12),
        chunk_count=2,
    )
    metadata_store.create_batch(record)

    assert metadata_store.get_batch("proj-a", "batch_1") == record
    assert metadata_store.get_batch("proj-b", "batch_1") is None
    with pytest.raises(AlreadyExists):
        metadata_store.create_batch(make_batch("batch_1"))


def test_list_batches_newest_first_with_after(metadata_store: MetadataStore) -> None:
    for i in range(4):
        metadata_store.create_batch(make_batch(f"batch_{i}", created_at=NOW + i))
    metadata_store.create_batch(make_batch("batch_3b", created_at=NOW + 3))  # same second: id breaks the tie
    metadata_store.create_batch(make_batch("batch_theirs", project="proj-b", created_at=NOW + 99))

    assert ids(metadata_store.list_batches("proj-a", after=None, limit=10)) == [
        "batch_3b",
        "batch_3",
        "batch_2",
        "batch_1",
        "batch_0",
    ]
    assert ids(metadata_store.list_batches("proj-a", after=None, limit=2)) == ["batch_3b", "batch_3"]
    assert ids(metadata_store.list_batches("proj-a", after="batch_3", limit=2)) == ["batch_2", "batch_1"]
    assert metadata_store.list_batches("proj-a", after="batch_0", limit=2) == []
    assert metadata_store.list_batches("proj-a", after="batch_unknown", limit=2) == []
    assert metadata_store.list_batches("proj-a", after="batch_theirs", limit=2) == []


def test_update_batch_applies_changes_only_from_an_expected_status(metadata_store: MetadataStore) -> None:
    metadata_store.create_batch(make_batch("batch_1"))

    updated = metadata_store.update_batch(
        "proj-a",
        "batch_1",
        {
            "status": "in_progress",
            "in_progress_at": NOW + 1,
            "request_counts": RequestCounts(total=10),  # pydantic model
            "usage": {"input_tokens": 3, "total_tokens": 3},  # or a plain dict
        },
        expected_status=["validating"],
    )
    assert updated.status == "in_progress"
    assert updated.in_progress_at == NOW + 1
    assert updated.request_counts == RequestCounts(total=10)
    assert updated.usage == Usage(input_tokens=3, total_tokens=3)
    assert metadata_store.get_batch("proj-a", "batch_1") == updated

    with pytest.raises(ConditionFailed):
        metadata_store.update_batch("proj-a", "batch_1", {"status": "failed"}, expected_status=["validating"])
    with pytest.raises(ConditionFailed):
        metadata_store.update_batch(
            "proj-b", "batch_1", {"status": "failed"}, expected_status=["in_progress"]
        )
    with pytest.raises(ConditionFailed):
        metadata_store.update_batch(
            "proj-a", "batch_nope", {"status": "failed"}, expected_status=["in_progress"]
        )
    assert metadata_store.get_batch("proj-a", "batch_1") == updated


def test_concurrent_conditional_updates_have_exactly_one_winner(metadata_store: MetadataStore) -> None:
    metadata_store.create_batch(make_batch("batch_1"))
    winners: list[int] = []
    start = threading.Barrier(8)

    def contend(worker: int) -> None:
        start.wait()
        try:
            metadata_store.update_batch(
                "proj-a",
                "batch_1",
                {"status": "cancelling", "cancelling_at": worker},
                expected_status=["validating", "in_progress"],
            )
        except ConditionFailed:
            return
        winners.append(worker)

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(winners) == 1
    stored = metadata_store.get_batch("proj-a", "batch_1")
    assert stored is not None and stored.cancelling_at == winners[0]


def test_list_active_batches_spans_projects_and_skips_terminal(metadata_store: MetadataStore) -> None:
    statuses = [
        "validating",
        "failed",
        "in_progress",
        "finalizing",
        "completed",
        "expired",
        "cancelling",
        "cancelled",
    ]
    for i, status in enumerate(statuses):
        metadata_store.create_batch(
            make_batch(f"batch_{status}", project=f"proj-{i % 2}", created_at=NOW - i, status=status)
        )

    assert ids(metadata_store.list_active_batches()) == [
        "batch_cancelling",
        "batch_finalizing",
        "batch_in_progress",
        "batch_validating",
    ]


def test_unannounced_batches_are_the_ended_ones_whose_event_is_pending(metadata_store: MetadataStore) -> None:
    """The terminal commit marks `event_pending` (the outbox); clearing it takes the batch off the list.
    Active batches are never on it, and a pending event keeps no batch on the active list."""
    for i, batch_id in enumerate(("batch_a", "batch_b", "batch_c")):
        metadata_store.create_batch(
            make_batch(batch_id, project=f"proj-{i % 2}", created_at=NOW + i, status="finalizing")
        )
    for batch_id in ("batch_a", "batch_b"):
        project = "proj-0" if batch_id == "batch_a" else "proj-1"
        metadata_store.update_batch(
            project,
            batch_id,
            {"status": "completed", "completed_at": NOW, "event_pending": True},
            expected_status={"finalizing"},
        )

    assert ids(metadata_store.list_unannounced_batches()) == ["batch_a", "batch_b"]
    assert ids(metadata_store.list_active_batches()) == ["batch_c"]

    metadata_store.update_batch("proj-0", "batch_a", {"event_pending": False}, expected_status={"completed"})
    assert ids(metadata_store.list_unannounced_batches()) == ["batch_b"]
    stored = metadata_store.get_batch("proj-0", "batch_a")
    assert stored is not None and (stored.status, stored.event_pending) == ("completed", False)


def test_a_batch_holds_its_input_from_its_creation_until_it_ends(metadata_store: MetadataStore) -> None:
    metadata_store.create_batch(make_batch("batch_2", input_file_id="file-in"))
    metadata_store.create_batch(make_batch("batch_1", input_file_id="file-in", status="in_progress"))
    metadata_store.create_batch(make_batch("batch_other", input_file_id="file-other"))

    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_1", "batch_2"]
    assert metadata_store.input_holders("proj-a", "file-other") == ["batch_other"]
    assert metadata_store.input_holders("proj-a", "file-none") == []

    metadata_store.update_batch(
        "proj-a", "batch_1", {"status": "cancelling"}, expected_status={"in_progress"}
    )
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_1", "batch_2"]  # not ended yet
    with pytest.raises(ConditionFailed):  # an end that loses its condition changes nothing
        metadata_store.update_batch(
            "proj-a", "batch_1", {"status": "cancelled"}, expected_status={"validating"}
        )
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_1", "batch_2"]

    metadata_store.update_batch(
        "proj-a", "batch_1", {"status": "cancelled", "event_pending": True}, expected_status={"cancelling"}
    )
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_2"]  # ended, event pending or not
    metadata_store.update_batch("proj-a", "batch_1", {"event_pending": False}, expected_status={"cancelled"})
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_2"]

    # a (hypothetical) move back to a live status holds the input again
    metadata_store.update_batch("proj-a", "batch_1", {"status": "in_progress"}, expected_status={"cancelled"})
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_1", "batch_2"]


@pytest.mark.parametrize("status", ["failed", "completed", "expired", "cancelled"])
def test_every_terminal_status_releases_the_input(metadata_store: MetadataStore, status: str) -> None:
    metadata_store.create_batch(make_batch("batch_1", status="validating"))
    metadata_store.create_batch(make_batch("batch_ended", status=status))  # created ended: holds nothing
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_1"]

    metadata_store.update_batch(
        "proj-a", "batch_1", {"status": status, f"{status}_at": NOW}, expected_status={"validating"}
    )
    assert metadata_store.input_holders("proj-a", "file-in") == []


def test_a_create_that_finds_its_id_taken_holds_nothing(metadata_store: MetadataStore) -> None:
    """As a replayed Idempotency-Key that names another input file does: the batch that exists keeps
    its own input, and the refused one's input is held by no one."""
    metadata_store.create_batch(make_batch("batch_1", input_file_id="file-in"))
    with pytest.raises(AlreadyExists):
        metadata_store.create_batch(make_batch("batch_1", input_file_id="file-other"))

    assert metadata_store.input_holders("proj-a", "file-other") == []
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_1"]


def test_input_holders_are_scoped_by_project(metadata_store: MetadataStore) -> None:
    """File ids are one namespace, but a batch of another project naming the same id holds nothing of
    this project's file."""
    metadata_store.create_batch(make_batch("batch_a", project="proj-a", input_file_id="file-in"))
    metadata_store.create_batch(make_batch("batch_b", project="proj-b", input_file_id="file-in"))

    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_a"]
    assert metadata_store.input_holders("proj-b", "file-in") == ["batch_b"]
    assert metadata_store.input_holders("proj-c", "file-in") == []

    metadata_store.update_batch("proj-b", "batch_b", {"status": "failed"}, expected_status={"validating"})
    assert metadata_store.input_holders("proj-b", "file-in") == []
    assert metadata_store.input_holders("proj-a", "file-in") == ["batch_a"]


def test_chunk_progress_overwrites_instead_of_adding(metadata_store: MetadataStore) -> None:
    metadata_store.put_chunk_progress("batch_1", ChunkProgress(index=2, completed=5))
    metadata_store.put_chunk_progress("batch_1", ChunkProgress(index=0, completed=1, failed=1))
    metadata_store.put_chunk_progress("batch_2", ChunkProgress(index=0, completed=99))
    retried = ChunkProgress(
        index=2, completed=3, failed=2, usage=Usage(input_tokens=4, total_tokens=4), done=True
    )
    metadata_store.put_chunk_progress("batch_1", retried)

    assert metadata_store.list_chunk_progress("batch_1") == [
        ChunkProgress(index=0, completed=1, failed=1),
        retried,
    ]
    assert metadata_store.list_chunk_progress("batch_none") == []


def test_idempotency_key_first_claim_wins_per_project(metadata_store: MetadataStore) -> None:
    assert metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_first", NOW) == "batch_first"
    assert metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_second", NOW + 1) == "batch_first"
    assert metadata_store.claim_idempotency_key("proj-b", "key-1", "batch_other", NOW) == "batch_other"


def test_delete_chunk_progress_removes_only_that_batchs_progress(metadata_store: MetadataStore) -> None:
    metadata_store.create_batch(make_batch("batch_1", status="completed"))
    for index in range(30):  # more than one DynamoDB batch write
        metadata_store.put_chunk_progress("batch_1", ChunkProgress(index=index, completed=1))
    metadata_store.put_chunk_progress("batch_2", ChunkProgress(index=0, completed=99))

    metadata_store.delete_chunk_progress("batch_1")
    metadata_store.delete_chunk_progress("batch_1")  # again, and for a batch with none: fine
    metadata_store.delete_chunk_progress("batch_none")

    assert metadata_store.list_chunk_progress("batch_1") == []
    assert metadata_store.list_chunk_progress("batch_2") == [ChunkProgress(index=0, completed=99)]
    assert metadata_store.get_batch("proj-a", "batch_1") == make_batch("batch_1", status="completed")


def test_idempotency_key_expires_a_day_after_its_claim(metadata_store: MetadataStore) -> None:
    expiry = NOW + IDEMPOTENCY_KEY_TTL
    assert metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_first", NOW) == "batch_first"
    assert metadata_store.claim_idempotency_key("proj-b", "key-1", "batch_other", NOW + 10) == "batch_other"

    assert metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_early", expiry - 1) == "batch_first"
    # at its expiry the record counts as absent, whether or not anything removed it yet
    assert metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_new", expiry) == "batch_new"
    # the new claim is a record of its own, expiring a day after it
    assert metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_3", expiry + 1) == "batch_new"
    assert (
        metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_4", expiry + IDEMPOTENCY_KEY_TTL - 1)
        == "batch_new"
    )
    # the other project's key expires on its own clock
    assert metadata_store.claim_idempotency_key("proj-b", "key-1", "batch_b2", expiry) == "batch_other"
    assert metadata_store.claim_idempotency_key("proj-b", "key-1", "batch_b3", expiry + 10) == "batch_b3"


def test_purge_of_idempotency_keys_keeps_the_live_ones(metadata_store: MetadataStore) -> None:
    metadata_store.claim_idempotency_key("proj-a", "key-old", "batch_old", NOW)
    metadata_store.claim_idempotency_key("proj-a", "key-live", "batch_live", NOW + 100)
    later = NOW + IDEMPOTENCY_KEY_TTL

    assert metadata_store.purge_expired_idempotency_keys(NOW) == 0
    # the stores that purge remove the expired key; DynamoDB leaves it to TTL (0)
    assert metadata_store.purge_expired_idempotency_keys(later) in (0, 1)
    assert metadata_store.purge_expired_idempotency_keys(later) == 0

    assert metadata_store.claim_idempotency_key("proj-a", "key-live", "batch_x", later) == "batch_live"
    assert metadata_store.claim_idempotency_key("proj-a", "key-old", "batch_y", later) == "batch_y"


@pytest.mark.parametrize("state", ["absent", "expired"])
def test_concurrent_claims_of_a_free_key_agree_on_one_winner(
    metadata_store: MetadataStore, state: str
) -> None:
    claimed_at = NOW
    if state == "expired":
        metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_old", NOW)
        claimed_at = NOW + IDEMPOTENCY_KEY_TTL
    results: list[str] = []
    start = threading.Barrier(8)

    def claim(worker: int) -> None:
        start.wait()
        results.append(metadata_store.claim_idempotency_key("proj-a", "key-1", f"batch_{worker}", claimed_at))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(results) == 8 and len(set(results)) == 1 and results[0] != "batch_old"
    assert metadata_store.claim_idempotency_key("proj-a", "key-1", "batch_late", claimed_at + 1) == results[0]


def test_records_survive_reopening_the_store(open_metadata_store: Callable[[], MetadataStore]) -> None:
    first = open_metadata_store()
    first.create_file(make_file("file-1", expires_at=NOW + 10))
    first.create_upload(make_upload("upload_1"))
    first.create_batch(make_batch("batch_1"))
    updated = first.update_batch(
        "proj-a", "batch_1", {"status": "in_progress"}, expected_status=["validating"]
    )
    first.put_chunk_progress("batch_1", ChunkProgress(index=0, completed=2))
    first.claim_idempotency_key("proj-a", "key-1", "batch_1", NOW)

    second = open_metadata_store()
    assert second.get_file("proj-a", "file-1") == make_file("file-1", expires_at=NOW + 10)
    assert second.get_upload("proj-a", "upload_1") == make_upload("upload_1")
    assert second.get_batch("proj-a", "batch_1") == updated
    assert ids(second.list_active_batches()) == ["batch_1"]
    assert second.input_holders("proj-a", "file-in") == ["batch_1"]
    assert second.list_chunk_progress("batch_1") == [ChunkProgress(index=0, completed=2)]
    assert second.claim_idempotency_key("proj-a", "key-1", "batch_2", NOW) == "batch_1"


# ---------------------------------------------------------------- SQLite specifics


def test_sqlite_sets_wal_and_schema_version(tmp_path: Path) -> None:
    with SqliteMetadataStore(tmp_path / "db" / "metadata.sqlite3") as store:
        assert store._query("PRAGMA journal_mode") == [("wal",)]
        assert store._query("PRAGMA user_version") == [(SCHEMA_VERSION,)]


def test_sqlite_purges_expired_idempotency_keys(tmp_path: Path) -> None:
    with SqliteMetadataStore(tmp_path / "metadata.sqlite3") as store:
        store.claim_idempotency_key("proj-a", "key-old", "batch_old", NOW)
        store.claim_idempotency_key("proj-a", "key-live", "batch_live", NOW + 1)

        assert store.purge_expired_idempotency_keys(NOW + IDEMPOTENCY_KEY_TTL) == 1
        assert store._query("SELECT key, expires_at FROM idempotency_keys") == [
            ("key-live", NOW + 1 + IDEMPOTENCY_KEY_TTL)
        ]


def test_sqlite_upgrades_a_version_1_database(tmp_path: Path) -> None:
    """Version 1 kept idempotency keys without an expiry: they get one, a day after their creation."""
    path = tmp_path / "metadata.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE idempotency_keys (project_id TEXT NOT NULL, key TEXT NOT NULL,"
            " resource_id TEXT NOT NULL, created_at INTEGER NOT NULL, PRIMARY KEY (project_id, key))"
        )
        conn.execute("INSERT INTO idempotency_keys VALUES ('proj-a', 'key-1', 'batch_v1', ?)", (NOW,))
        conn.execute("PRAGMA user_version=1")
    conn.close()

    with SqliteMetadataStore(path) as store:
        assert store._query("PRAGMA user_version") == [(SCHEMA_VERSION,)]
        assert (
            store.claim_idempotency_key("proj-a", "key-1", "batch_x", NOW + IDEMPOTENCY_KEY_TTL - 1)
            == "batch_v1"
        )
        assert (
            store.claim_idempotency_key("proj-a", "key-1", "batch_new", NOW + IDEMPOTENCY_KEY_TTL)
            == "batch_new"
        )
    with SqliteMetadataStore(path) as store:  # opening the upgraded file again changes nothing
        assert (
            store.claim_idempotency_key("proj-a", "key-1", "batch_y", NOW + IDEMPOTENCY_KEY_TTL)
            == "batch_new"
        )


def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite3"
    with SqliteMetadataStore(path) as store:
        store._query(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(RuntimeError, match="newer"):
        SqliteMetadataStore(path)


def test_sqlite_conditional_update_is_atomic_across_connections(tmp_path: Path) -> None:
    """Two stores on one file (as two processes would be): the second writer sees the first's commit."""
    path = tmp_path / "metadata.sqlite3"
    with SqliteMetadataStore(path) as one, SqliteMetadataStore(path) as two:
        one.create_batch(make_batch("batch_1"))
        two.update_batch("proj-a", "batch_1", {"status": "in_progress"}, expected_status=["validating"])
        with pytest.raises(ConditionFailed):
            one.update_batch("proj-a", "batch_1", {"status": "failed"}, expected_status=["validating"])
        with pytest.raises(AlreadyExists):
            two.create_batch(make_batch("batch_1"))


def test_sqlite_failed_update_changes_nothing(tmp_path: Path) -> None:
    """An invalid change rolls the whole transaction back and leaves the store usable."""
    with SqliteMetadataStore(tmp_path / "metadata.sqlite3") as store:
        store.create_batch(make_batch("batch_1"))
        with pytest.raises(ValueError):  # pydantic ValidationError
            store.update_batch("proj-a", "batch_1", {"status": "bogus"}, expected_status=["validating"])
        assert store.get_batch("proj-a", "batch_1") == make_batch("batch_1")
        store.update_batch("proj-a", "batch_1", {"status": "in_progress"}, expected_status=["validating"])


def test_sqlite_many_threads_writing_at_once(tmp_path: Path) -> None:
    with SqliteMetadataStore(tmp_path / "metadata.sqlite3") as store:

        def write(worker: int) -> None:
            for i in range(25):
                store.create_file(make_file(f"file-{worker}-{i:02d}", created_at=NOW + i))
                store.put_chunk_progress("batch_1", ChunkProgress(index=worker, completed=i))

        threads = [threading.Thread(target=write, args=(w,)) for w in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        files = store.list_files("proj-a", purpose=None, order="asc", after=None, limit=1000, now=NOW)
        assert len(files) == 150
        assert [(p.index, p.completed) for p in store.list_chunk_progress("batch_1")] == [
            (w, 24) for w in range(6)
        ]


def test_sqlite_commits_survive_kill_9(tmp_path: Path) -> None:
    """A process killed right after a write returns: the record is there when the file is reopened."""
    path = tmp_path / "metadata.sqlite3"
    script = f"""
import os, signal
from pathlib import Path
from batch_api.adapters.local.sqlite import SqliteMetadataStore
from batch_api.contract.models import ChunkProgress
store = SqliteMetadataStore(Path({str(path)!r}))
store.put_chunk_progress("batch_1", ChunkProgress(index=0, completed=7))
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert result.returncode == -signal.SIGKILL

    with SqliteMetadataStore(path) as store:
        assert store.list_chunk_progress("batch_1") == [ChunkProgress(index=0, completed=7)]


def test_sqlite_finds_a_files_holders_through_its_partial_index(tmp_path: Path) -> None:
    """A lookup by (project, file) in the index of the batches that hold their input, not a scan of
    the batches."""
    with SqliteMetadataStore(tmp_path / "metadata.sqlite3") as store:
        for i in range(20):
            store.create_batch(make_batch(f"batch_{i:02d}", input_file_id=f"file-{i % 4}"))
        statements: list[str] = []
        store._conn.set_trace_callback(statements.append)
        try:
            assert store.input_holders("proj-a", "file-1") == [f"batch_{i:02d}" for i in range(1, 20, 4)]
        finally:
            store._conn.set_trace_callback(None)

        [lookup] = statements
        plan = [row[3] for row in store._query(f"EXPLAIN QUERY PLAN {lookup}")]
        assert plan == ["SEARCH batches USING INDEX batches_holding (project_id=? AND <expr>=?)"]
