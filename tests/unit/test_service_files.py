"""Files use cases on the in-memory fakes."""

from __future__ import annotations

import pytest

from batch_api import object_keys
from batch_api.contract.errors import InvalidRequest, NotFound
from batch_api.contract.models import BATCH_INPUT_DEFAULT_TTL, BatchRecord
from batch_api.deps import Deps
from batch_api.service import files
from tests.unit.conftest import T0, FixedClock

pytestmark = pytest.mark.unit

DATA = b'{"custom_id": "a"}\n'


def test_create_file_writes_blob_and_record(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "in.jsonl", "batch", DATA)

    assert record.bytes == len(DATA)
    assert record.created_at == T0
    assert record.expires_at == T0 + BATCH_INPUT_DEFAULT_TTL  # batch inputs expire after 30 days
    assert deps.blobs.get(object_keys.file_key(record.id)) == DATA
    assert deps.metadata.get_file("p1", record.id) == record
    assert record.to_wire().status == "processed"


def test_non_batch_files_do_not_expire_by_default(deps: Deps) -> None:
    assert files.create_file(deps, "p1", "a.txt", "user_data", DATA).expires_at is None


def test_expires_after_sets_expiry_and_hints_the_store(deps: Deps) -> None:
    record = files.create_file(
        deps, "p1", "a.txt", "user_data", DATA, {"anchor": "created_at", "seconds": 7200}
    )
    assert record.expires_at == T0 + 7200
    assert deps.blobs.expiry[record.blob_key] == T0 + 7200  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("policy", "param"),
    [
        ({"anchor": "last_active_at", "seconds": 7200}, "expires_after.anchor"),
        ({"anchor": "created_at", "seconds": 3599}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": 2592001}, "expires_after.seconds"),
        ({"anchor": "created_at", "seconds": "7200"}, "expires_after.seconds"),
        ({"anchor": "created_at"}, "expires_after.seconds"),
    ],
)
def test_bad_expires_after_names_the_param(deps: Deps, policy: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        files.create_file(deps, "p1", "a.jsonl", "batch", DATA, policy)
    assert raised.value.param == param
    assert deps.blobs.list_keys("files/") == []


@pytest.mark.parametrize("purpose", ["batch_output", "nonsense", ""])
def test_purpose_must_be_uploadable(deps: Deps, purpose: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        files.create_file(deps, "p1", "a.txt", purpose, DATA)
    assert raised.value.param == "purpose"


def test_failed_record_write_leaves_no_blob(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_create(record: object) -> None:
        raise RuntimeError("store down")

    monkeypatch.setattr(deps.metadata, "create_file", broken_create)
    with pytest.raises(RuntimeError):
        files.create_file(deps, "p1", "in.jsonl", "batch", DATA)
    assert deps.blobs.list_keys("") == []


def test_retrieve_hides_other_projects_deleted_and_expired_files(deps: Deps, clock: FixedClock) -> None:
    record = files.create_file(
        deps, "p1", "a.txt", "user_data", DATA, {"anchor": "created_at", "seconds": 3600}
    )
    assert files.retrieve_file(deps, "p1", record.id) == record

    with pytest.raises(NotFound) as raised:
        files.retrieve_file(deps, "p2", record.id)
    assert raised.value.message == f"No such File object: {record.id}"

    clock.advance(3600)
    with pytest.raises(NotFound):
        files.retrieve_file(deps, "p1", record.id)

    with pytest.raises(NotFound):
        files.retrieve_file(deps, "p1", "file-unknown")


def test_delete_removes_record_and_blob(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)

    assert files.delete_file(deps, "p1", record.id).model_dump() == {
        "id": record.id,
        "object": "file",
        "deleted": True,
    }
    assert not deps.blobs.exists(record.blob_key)
    with pytest.raises(NotFound):
        files.retrieve_file(deps, "p1", record.id)
    with pytest.raises(NotFound):
        files.delete_file(deps, "p1", record.id)


def test_other_project_cannot_delete(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    with pytest.raises(NotFound):
        files.delete_file(deps, "p2", record.id)
    assert deps.blobs.exists(record.blob_key)


def test_content_returns_record_and_key(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    assert files.file_content(deps, "p1", record.id) == (record, object_keys.file_key(record.id))


def test_list_pages_with_has_more(deps: Deps, clock: FixedClock) -> None:
    made = []
    for i in range(5):
        made.append(files.create_file(deps, "p1", f"{i}.jsonl", "batch" if i % 2 == 0 else "user_data", DATA))
        clock.advance(1)
    files.create_file(deps, "p2", "other.jsonl", "batch", DATA)

    page, has_more = files.list_files(deps, "p1", limit=2)
    assert [r.id for r in page] == [made[4].id, made[3].id]  # newest first by default
    assert has_more

    page, has_more = files.list_files(deps, "p1", limit=2, after=made[3].id)
    assert [r.id for r in page] == [made[2].id, made[1].id]
    assert has_more

    page, has_more = files.list_files(deps, "p1", limit=2, after=made[1].id)
    assert [r.id for r in page] == [made[0].id]
    assert not has_more

    page, _ = files.list_files(deps, "p1", order="asc", purpose="batch")
    assert [r.id for r in page] == [made[0].id, made[2].id, made[4].id]


@pytest.mark.parametrize(
    ("kwargs", "param"), [({"order": "up"}, "order"), ({"limit": 0}, "limit"), ({"limit": 10_001}, "limit")]
)
def test_list_rejects_bad_query(deps: Deps, kwargs: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        files.list_files(deps, "p1", **kwargs)  # type: ignore[arg-type]
    assert raised.value.param == param


def test_sweep_deletes_expired_bodies_and_marks_them(deps: Deps, clock: FixedClock) -> None:
    short = files.create_file(
        deps, "p1", "a.txt", "user_data", DATA, {"anchor": "created_at", "seconds": 3600}
    )
    kept = files.create_file(deps, "p2", "b.txt", "user_data", DATA)
    assert files.sweep_expired_files(deps) == 0

    clock.advance(3600)
    assert files.sweep_expired_files(deps) == 1
    assert not deps.blobs.exists(short.blob_key)
    assert deps.metadata.get_file("p1", short.id).deleted  # type: ignore[union-attr]
    assert deps.blobs.exists(kept.blob_key)
    assert files.sweep_expired_files(deps) == 0


def _batch_reading(deps: Deps, project_id: str, file_id: str, batch_id: str = "batch_x") -> None:
    deps.metadata.create_batch(
        BatchRecord(
            id=batch_id,
            project_id=project_id,
            endpoint="/v1/chat/completions",
            input_file_id=file_id,
            status="in_progress",
            created_at=T0,
            expires_at=T0 + 86400,
        )
    )


def test_delete_keeps_the_body_of_a_running_batchs_input_until_it_ends(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    _batch_reading(deps, "p1", record.id)

    files.delete_file(deps, "p1", record.id)
    with pytest.raises(NotFound):
        files.retrieve_file(deps, "p1", record.id)
    assert deps.blobs.exists(record.blob_key)  # the batch still reads it

    files.release_input_file(deps, "p1", record.id)  # the batch is still running: nothing happens
    assert deps.blobs.exists(record.blob_key)
    deps.metadata.update_batch("p1", "batch_x", {"status": "completed"}, expected_status={"in_progress"})
    files.release_input_file(deps, "p1", record.id)
    assert not deps.blobs.exists(record.blob_key)


def test_release_leaves_a_live_input_file_alone(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    files.release_input_file(deps, "p1", record.id)
    assert deps.blobs.exists(record.blob_key)


def test_a_batch_of_another_project_does_not_keep_a_body(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    _batch_reading(deps, "p2", record.id)
    files.delete_file(deps, "p1", record.id)
    assert not deps.blobs.exists(record.blob_key)


def test_sweep_marks_a_running_batchs_expired_input_but_keeps_its_body(deps: Deps, clock: FixedClock) -> None:
    record = files.create_file(
        deps, "p1", "a.jsonl", "batch", DATA, {"anchor": "created_at", "seconds": 3600}
    )
    _batch_reading(deps, "p1", record.id)
    clock.advance(3600)

    assert files.sweep_expired_files(deps) == 1
    assert deps.metadata.get_file("p1", record.id).deleted  # type: ignore[union-attr]
    assert deps.blobs.exists(record.blob_key)
    assert files.sweep_expired_files(deps) == 0  # marked: not listed again

    deps.metadata.update_batch("p1", "batch_x", {"status": "cancelled"}, expected_status={"in_progress"})
    files.release_input_file(deps, "p1", record.id)
    assert not deps.blobs.exists(record.blob_key)
