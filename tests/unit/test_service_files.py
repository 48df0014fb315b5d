"""Files use cases on the in-memory fakes."""

from __future__ import annotations

from typing import Any

import pytest

from batch_api import object_keys
from batch_api.contract.errors import InvalidRequest, NotFound
from batch_api.contract.models import BATCH_INPUT_DEFAULT_TTL, BatchRecord, FileRecord
from batch_api.deps import Deps
from batch_api.service import files
from batch_api.service.housekeeping import SWEEP_LIMIT
from tests.unit.builders import T0, FakeClock

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


def test_retrieve_hides_other_projects_deleted_and_expired_files(deps: Deps, clock: FakeClock) -> None:
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


def test_list_pages_with_has_more(deps: Deps, clock: FakeClock) -> None:
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


def test_sweep_deletes_expired_bodies_and_marks_them(deps: Deps, clock: FakeClock) -> None:
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


def test_release_keeps_a_live_input_file_and_gives_the_store_its_expiry_back(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    deps.blobs.clear_expiry(record.blob_key)
    files.release_input_file(deps, "p1", record.id)
    assert deps.blobs.exists(record.blob_key)
    assert deps.blobs.expiry[record.blob_key] == record.expires_at  # type: ignore[attr-defined]


def test_a_batch_keeps_the_store_from_expiring_its_input_until_the_last_one_using_it_ends(
    deps: Deps,
) -> None:
    from batch_api.service import batches

    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    expiry: dict[str, int] = deps.blobs.expiry  # type: ignore[attr-defined]
    assert expiry[record.blob_key] == record.expires_at
    first = batches.create_batch(deps, "p1", "/v1/chat/completions", record.id, "24h")
    assert record.blob_key not in expiry  # S3's lifecycle rule would delete it whatever the batch
    second = batches.create_batch(deps, "p1", "/v1/chat/completions", record.id, "24h")

    deps.metadata.update_batch("p1", first.id, {"status": "completed"}, expected_status={"validating"})
    files.release_input_file(deps, "p1", record.id)
    assert record.blob_key not in expiry  # the second batch still reads it
    deps.metadata.update_batch("p1", second.id, {"status": "failed"}, expected_status={"validating"})
    files.release_input_file(deps, "p1", record.id)
    assert expiry[record.blob_key] == record.expires_at


def test_a_refused_batch_leaves_its_inputs_expiry_alone(deps: Deps) -> None:
    from batch_api.service import batches

    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    with pytest.raises(InvalidRequest):
        batches.create_batch(deps, "p1", "/v1/chat/completions", record.id, "48h")
    assert deps.blobs.expiry[record.blob_key] == record.expires_at  # type: ignore[attr-defined]


def test_a_batch_of_another_project_does_not_keep_a_body(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    _batch_reading(deps, "p2", record.id)
    files.delete_file(deps, "p1", record.id)
    assert not deps.blobs.exists(record.blob_key)


def test_delete_sweep_and_release_look_up_the_files_holders_and_read_no_other_batch(
    deps: Deps, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    hour = {"anchor": "created_at", "seconds": 3600}
    held = files.create_file(deps, "p1", "held.jsonl", "batch", DATA, hour)
    free = files.create_file(deps, "p1", "free.jsonl", "batch", DATA, hour)
    deleted = files.create_file(deps, "p1", "deleted.jsonl", "batch", DATA)
    _batch_reading(deps, "p1", held.id)
    _batch_reading(deps, "p1", deleted.id, "batch_d")
    _batch_reading(deps, "p2", free.id, "batch_theirs")  # another project's batch naming the same id

    def every_active_batch() -> list[BatchRecord]:
        raise AssertionError("read every active batch of every project")

    monkeypatch.setattr(deps.metadata, "list_active_batches", every_active_batch)
    asked: list[tuple[str, str]] = []
    lookup = deps.metadata.input_holders

    def recording(project_id: str, file_id: str) -> list[str]:
        asked.append((project_id, file_id))
        return lookup(project_id, file_id)

    monkeypatch.setattr(deps.metadata, "input_holders", recording)

    files.delete_file(deps, "p1", deleted.id)
    assert deps.blobs.exists(deleted.blob_key)  # batch_d reads it
    clock.advance(3600)
    assert files.sweep_expired_files(deps) == 2
    assert deps.blobs.exists(held.blob_key) and not deps.blobs.exists(free.blob_key)
    assert sorted(asked) == sorted([("p1", deleted.id), ("p1", held.id), ("p1", free.id)])

    for batch_id, record in (("batch_x", held), ("batch_d", deleted)):
        deps.metadata.update_batch("p1", batch_id, {"status": "completed"}, expected_status={"in_progress"})
        files.release_input_file(deps, "p1", record.id)
        assert not deps.blobs.exists(record.blob_key)
    assert asked[-2:] == [("p1", held.id), ("p1", deleted.id)]


def test_sweep_marks_a_running_batchs_expired_input_but_keeps_its_body(deps: Deps, clock: FakeClock) -> None:
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


def _refused_as_not_jsonl(deps: Deps, data: bytes) -> bool:
    try:
        files.create_file(deps, "p1", "in.jsonl", "batch", data)
    except InvalidRequest as error:
        assert (error.param, error.code) == ("file", "invalid_file_format")
        return True
    return False


@pytest.mark.parametrize(
    ("data", "refused"),
    [
        (b"", False),  # nothing to judge: left to batch validation
        (b"\n \n", False),
        (b'\n{"custom_id": "a"}\n{"custom_id": "b"}\n', False),  # a leading blank line is skipped
        (b'\r\n\n{"custom_id": "a"}\n', False),
        (b'{"custom_id": "a"}\nnot json\n', False),  # only the first line is judged here
        (b'not json\n{"custom_id": "a"}\n', True),
        (b'\n[1, 2]\n{"custom_id": "a"}\n', True),
        (b'{"custom_id": "a"}', False),  # a first line without a newline is still judged
        (b"not json", True),
        (b"\n\nnot json", True),
    ],
)
def test_a_batch_files_first_non_blank_line_must_be_a_json_object(
    deps: Deps, data: bytes, refused: bool
) -> None:
    assert _refused_as_not_jsonl(deps, data) is refused
    assert (deps.blobs.list_keys("files/") == []) is refused


def test_a_first_line_of_exactly_the_scan_limit_is_judged(deps: Deps) -> None:
    assert _refused_as_not_jsonl(deps, b"x" * files.FIRST_LINE_LIMIT)


def test_a_first_line_longer_than_the_scan_limit_is_left_to_batch_validation(deps: Deps) -> None:
    assert not _refused_as_not_jsonl(deps, b"x" * (files.FIRST_LINE_LIMIT + 1))


def test_first_line_finish_ends_the_watch() -> None:
    first = files.FirstLine()
    first.feed(b'{"a": 1}')
    first.finish()
    assert first.done
    first.feed(b"2}\n")  # later bytes change nothing
    assert first.line == b'{"a": 1}'
    assert first.is_json_object()


@pytest.mark.parametrize("policy", [["created_at", 7200], "created_at", 7200])
def test_expires_after_that_is_not_an_object_is_refused(deps: Deps, policy: object) -> None:
    with pytest.raises(InvalidRequest) as raised:
        files.create_file(deps, "p1", "a.txt", "user_data", DATA, policy)  # type: ignore[arg-type]
    assert (raised.value.message, raised.value.param, raised.value.code) == (
        "Invalid type for 'expires_after': expected an object.",
        "expires_after",
        "invalid_type",
    )
    assert deps.blobs.list_keys("files/") == []


def test_list_limit_of_one_is_accepted(deps: Deps, clock: FakeClock) -> None:
    older = files.create_file(deps, "p1", "a.txt", "user_data", DATA)
    clock.advance(1)
    newer = files.create_file(deps, "p1", "b.txt", "user_data", DATA)

    assert files.list_files(deps, "p1", limit=1) == ([newer], True)
    assert files.list_files(deps, "p1", limit=1, after=newer.id) == ([older], False)


def test_list_with_exactly_limit_files_has_no_more(deps: Deps, clock: FakeClock) -> None:
    made = []
    for name in ("a.txt", "b.txt"):
        made.append(files.create_file(deps, "p1", name, "user_data", DATA))
        clock.advance(1)
    assert files.list_files(deps, "p1", limit=2, order="asc") == (made, False)


def test_list_reads_one_file_beyond_the_page_from_the_store(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("a.txt", "b.txt", "c.txt", "d.txt"):
        files.create_file(deps, "p1", name, "user_data", DATA)
    original = deps.metadata.list_files
    asked: list[int] = []

    def recording_list(project_id: str, **query: Any) -> list[FileRecord]:
        asked.append(query["limit"])
        return original(project_id, **query)

    monkeypatch.setattr(deps.metadata, "list_files", recording_list)
    page, has_more = files.list_files(deps, "p1", limit=1)
    assert (len(page), has_more) == (1, True)
    assert asked == [1 + 1]


def test_delete_that_loses_a_race_with_another_delete_is_a_404(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    monkeypatch.setattr(deps.metadata, "mark_file_deleted", lambda project_id, file_id: False)

    with pytest.raises(NotFound) as raised:
        files.delete_file(deps, "p1", record.id)
    assert raised.value.message == f"No such File object: {record.id}"
    assert deps.blobs.exists(record.blob_key)  # the delete that won removes it


def test_reading_a_body_removed_since_is_a_404(deps: Deps) -> None:
    record = files.create_file(deps, "p1", "a.jsonl", "batch", DATA)
    found, _ = files.file_content(deps, "p1", record.id)
    assert files.read_content(deps, "p1", found) == DATA

    files.delete_file(deps, "p1", record.id)
    with pytest.raises(NotFound) as raised:
        files.read_content(deps, "p1", found)
    assert raised.value.message == f"No such File object: {record.id}"


def _expired_files(deps: Deps, clock: FakeClock, count: int) -> list[FileRecord]:
    made = [
        files.create_file(
            deps, "p1", f"{i}.txt", "user_data", DATA, {"anchor": "created_at", "seconds": 3600}
        )
        for i in range(count)
    ]
    clock.advance(3600)
    return made


def test_a_sweep_handles_at_most_limit_files_and_the_next_takes_the_rest(
    deps: Deps, clock: FakeClock
) -> None:
    made = _expired_files(deps, clock, 3)
    assert files.sweep_expired_files(deps, limit=2) == 2
    assert sum(deps.blobs.exists(r.blob_key) for r in made) == 1
    assert files.sweep_expired_files(deps, limit=2) == 1
    assert not any(deps.blobs.exists(r.blob_key) for r in made)


def test_a_sweep_by_default_handles_a_housekeeping_pass_worth_of_files(deps: Deps, clock: FakeClock) -> None:
    _expired_files(deps, clock, SWEEP_LIMIT + 1)
    assert files.sweep_expired_files(deps) == SWEEP_LIMIT
    assert files.sweep_expired_files(deps) == 1


def test_a_sweep_with_nothing_expired_does_not_read_the_active_batches(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    files.create_file(deps, "p1", "a.jsonl", "batch", DATA)

    def no_batches() -> list[BatchRecord]:
        raise AssertionError("active batches read with nothing to sweep")

    monkeypatch.setattr(deps.metadata, "list_active_batches", no_batches)
    assert files.sweep_expired_files(deps) == 0
