"""Uploads use cases on the in-memory fakes."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from batch_api import object_keys
from batch_api.contract import ids
from batch_api.contract.errors import ConditionFailed, InvalidRequest, NotFound, PayloadTooLarge
from batch_api.contract.models import BATCH_INPUT_DEFAULT_TTL, MIME_TYPES_BY_PURPOSE, UPLOAD_TTL, FileRecord
from batch_api.deps import Deps
from batch_api.service import files, uploads
from tests.unit.builders import T0, FakeClock

pytestmark = pytest.mark.unit

CHUNKS = [b'{"line": "one"}\n', b'{"line": "two"}\n', b'{"n": 3}\n']
TOTAL = sum(len(c) for c in CHUNKS)


def _upload_with_parts(deps: Deps, chunks: list[bytes] = CHUNKS, **kwargs: object) -> tuple[str, list[str]]:
    upload = uploads.create_upload(
        deps,
        "p1",
        "big.jsonl",
        "batch",
        sum(len(c) for c in chunks),
        "application/jsonl",
        **kwargs,  # type: ignore[arg-type]
    )
    return upload.id, [uploads.add_part(deps, "p1", upload.id, chunk).id for chunk in chunks]


def test_create_upload(deps: Deps) -> None:
    upload = uploads.create_upload(deps, "p1", "big.jsonl", "batch", 10, "application/jsonl")
    assert upload.status == "pending"
    assert upload.expires_at == T0 + UPLOAD_TTL
    assert deps.metadata.get_upload("p1", upload.id) == upload


@pytest.mark.parametrize(
    ("args", "param"),
    [
        (("f", "batch_output", 1, "text/plain"), "purpose"),
        (("f", "batch", 8 * 1024**3 + 1, "text/plain"), "bytes"),
        (("f", "batch", -1, "text/plain"), "bytes"),
        (("", "batch", 1, "text/plain"), "filename"),
        (("f", "batch", 1, ""), "mime_type"),
    ],
)
def test_create_upload_validates(deps: Deps, args: tuple[object, ...], param: str) -> None:
    with pytest.raises(InvalidRequest) as raised:
        uploads.create_upload(deps, "p1", *args)  # type: ignore[arg-type]
    assert raised.value.param == param


def test_negative_bytes_says_it_must_not_be_negative(deps: Deps) -> None:
    with pytest.raises(InvalidRequest, match="must be >= 0"):
        uploads.create_upload(deps, "p1", "f.jsonl", "batch", -1, "text/plain")


def test_add_part_stores_the_bytes(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    assert deps.blobs.get(object_keys.upload_part_key(upload_id, part_ids[1])) == CHUNKS[1]
    assert [p.id for p in deps.metadata.get_upload_parts(upload_id)] == part_ids


def test_add_part_refuses_oversized_parts(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MAX_PART_BYTES", 4)
    upload = uploads.create_upload(deps, "p1", "f.jsonl", "batch", 10, "text/plain")
    with pytest.raises(PayloadTooLarge):
        uploads.add_part(deps, "p1", upload.id, b"12345")
    assert deps.blobs.list_keys("uploads/") == []


def test_add_part_needs_a_pending_live_upload_of_the_project(deps: Deps, clock: FakeClock) -> None:
    upload = uploads.create_upload(deps, "p1", "f.jsonl", "batch", 10, "text/plain")
    with pytest.raises(NotFound):
        uploads.add_part(deps, "p2", upload.id, b"x")
    clock.advance(UPLOAD_TTL)
    with pytest.raises(InvalidRequest, match="expired"):
        uploads.add_part(deps, "p1", upload.id, b"x")


def test_complete_concatenates_in_the_given_order(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    order = [part_ids[2], part_ids[0], part_ids[1]]
    expected = CHUNKS[2] + CHUNKS[0] + CHUNKS[1]

    upload, file = uploads.complete_upload(deps, "p1", upload_id, order, hashlib.md5(expected).hexdigest())

    assert upload.status == "completed"
    assert upload.file_id == file.id
    assert deps.blobs.get(file.blob_key) == expected
    assert file.bytes == TOTAL
    assert file.purpose == "batch"
    assert file.filename == "big.jsonl"
    assert file.expires_at == T0 + BATCH_INPUT_DEFAULT_TTL
    assert files.retrieve_file(deps, "p1", file.id) == file
    assert deps.blobs.list_keys(object_keys.upload_prefix(upload_id)) == []  # parts are gone
    wire = uploads.upload_wire(deps, "p1", upload)
    assert wire.status == "completed"
    assert wire.file is not None
    assert wire.file.id == file.id


@pytest.mark.parametrize("with_md5", [False, True])
def test_complete_hands_the_parts_to_the_store_and_shows_it_the_bytes_only_for_an_md5(
    deps: Deps, monkeypatch: pytest.MonkeyPatch, with_md5: bool
) -> None:
    """Without an md5 the store may assemble the file without reading it (S3 copies the parts
    server-side); with one, every byte passes the digest, in the order given."""
    upload_id, part_ids = _upload_with_parts(deps)
    order = [part_ids[1], part_ids[2], part_ids[0]]
    expected = CHUNKS[1] + CHUNKS[2] + CHUNKS[0]
    calls: list[tuple[str, list[tuple[str, int]], bool]] = []
    original = deps.blobs.concatenate

    def recording(key: str, sources: Any, *, on_bytes: Any = None) -> int:
        calls.append((key, list(sources), on_bytes is not None))
        return original(key, sources, on_bytes=on_bytes)

    monkeypatch.setattr(deps.blobs, "concatenate", recording)
    md5 = hashlib.md5(expected).hexdigest() if with_md5 else None
    _upload, file = uploads.complete_upload(deps, "p1", upload_id, order, md5)

    keys = [object_keys.upload_part_key(upload_id, part_id) for part_id in order]
    assert calls == [
        (
            file.blob_key,
            list(zip(keys, [len(CHUNKS[1]), len(CHUNKS[2]), len(CHUNKS[0])], strict=True)),
            with_md5,
        )
    ]
    assert deps.blobs.get(file.blob_key) == expected


def test_complete_judges_a_batch_file_by_its_first_line_reading_no_further(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = [b"\n", b'{"first": 1}\n' + b'{"n": 2}\n' * 1000, b"not json at all\n" * 1000]
    upload_id, part_ids = _upload_with_parts(deps, chunks)
    events: list[tuple[str, int]] = []
    original_range, original_concatenate = deps.blobs.iter_range, deps.blobs.concatenate

    def counting(key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20) -> Any:
        for piece in original_range(key, start, end, chunk_size):
            events.append((key.rsplit("/", 1)[-1], len(piece)))
            yield piece

    def concatenating(key: str, sources: Any, *, on_bytes: Any = None) -> int:
        events.append(("concatenate", 0))
        return original_concatenate(key, sources, on_bytes=on_bytes)

    monkeypatch.setattr(deps.blobs, "iter_range", counting)
    monkeypatch.setattr(deps.blobs, "concatenate", concatenating)
    _upload, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert file.bytes == sum(map(len, chunks))
    # this store serves 7-byte pieces: the blank first part, then two pieces of the second hold the
    # 13-byte first line; nothing more is read before the parts are put together
    assert events[: events.index(("concatenate", 0)) + 1] == [
        (part_ids[0], 1),
        (part_ids[1], 7),
        (part_ids[1], 7),
        ("concatenate", 0),
    ]


def test_complete_refuses_a_batch_file_whose_first_line_is_no_json_object(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps, [b"\n\n", b"[1, 2]\n", b'{"a": 1}\n'])
    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert raised.value.param == "part_ids"
    assert deps.blobs.list_keys("files/") == []  # the stitched body is gone again
    assert uploads.upload_wire(deps, "p1", deps.metadata.get_upload("p1", upload_id)).status == "pending"  # type: ignore[arg-type]


def test_complete_keeps_the_file_expiry_policy(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps, expires_after={"anchor": "created_at", "seconds": 7200})
    _, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert file.expires_at == T0 + 7200


def test_complete_rejects_size_mismatch(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, part_ids[:2])
    assert "bytes" in raised.value.message
    assert deps.metadata.get_upload("p1", upload_id).status == "pending"  # type: ignore[union-attr]


def test_complete_rejects_parts_of_another_upload(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    _, foreign = _upload_with_parts(deps)
    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, [*part_ids[:2], foreign[2]])
    assert raised.value.param == "part_ids[2]"


def test_complete_rejects_repeated_parts(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps, [b"ab", b"ab"])
    with pytest.raises(InvalidRequest):
        uploads.complete_upload(deps, "p1", upload_id, [part_ids[0], part_ids[0]])


def test_complete_with_wrong_md5_leaves_nothing_behind(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, part_ids, "0" * 32)
    assert raised.value.param == "md5"
    assert deps.blobs.list_keys("files/") == []
    assert files.list_files(deps, "p1") == ([], False)
    assert deps.metadata.get_upload("p1", upload_id).status == "pending"  # type: ignore[union-attr]


def test_second_complete_is_refused(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    uploads.complete_upload(deps, "p1", upload_id, part_ids)
    with pytest.raises(InvalidRequest, match="already completed"):
        uploads.complete_upload(deps, "p1", upload_id, part_ids)


def test_complete_that_loses_a_race_removes_its_file(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    original = deps.metadata.update_upload

    def cancelled_meanwhile(
        project_id: str, upload_id: str, changes: object, *, expected_status: object
    ) -> object:
        original(project_id, upload_id, {"status": "cancelled"}, expected_status=["pending"])
        raise ConditionFailed(upload_id)

    monkeypatch.setattr(deps.metadata, "update_upload", cancelled_meanwhile)
    with pytest.raises(InvalidRequest, match="cancelled"):
        uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert deps.blobs.list_keys("files/") == []
    assert files.list_files(deps, "p1") == ([], False)


def test_complete_after_a_failed_update_reuses_the_registered_file(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    original = deps.metadata.update_upload
    monkeypatch.setattr(
        deps.metadata, "update_upload", lambda *a, **k: (_ for _ in ()).throw(OSError("throttled"))
    )
    with pytest.raises(OSError):
        uploads.complete_upload(deps, "p1", upload_id, part_ids)
    monkeypatch.setattr(deps.metadata, "update_upload", original)

    completed, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert file.id == completed.file_id == ids.upload_file_id(upload_id)
    assert deps.blobs.get(file.blob_key) == b"".join(CHUNKS)
    assert [f.id for f in files.list_files(deps, "p1")[0]] == [file.id]


def test_a_complete_that_finds_the_upload_completed_keeps_the_winners_file(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    original = deps.metadata.update_upload

    def completed_meanwhile(project_id: str, upload_id: str, changes: Any, *, expected_status: Any) -> Any:
        original(project_id, upload_id, changes, expected_status=["pending"])  # the winner, same file id
        raise ConditionFailed(upload_id)

    monkeypatch.setattr(deps.metadata, "update_upload", completed_meanwhile)
    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert raised.value.code == "invalid_upload_status"
    file = files.retrieve_file(deps, "p1", ids.upload_file_id(upload_id))
    assert deps.blobs.get(file.blob_key) == b"".join(CHUNKS)


def test_expired_upload_cannot_complete_and_shows_expired(deps: Deps, clock: FakeClock) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    clock.advance(UPLOAD_TTL)
    with pytest.raises(InvalidRequest, match="expired"):
        uploads.complete_upload(deps, "p1", upload_id, part_ids)
    upload = deps.metadata.get_upload("p1", upload_id)
    assert uploads.upload_wire(deps, "p1", upload).status == "expired"  # type: ignore[arg-type]


def test_cancel_drops_parts_and_is_repeatable(deps: Deps) -> None:
    upload_id, _ = _upload_with_parts(deps)
    assert uploads.cancel_upload(deps, "p1", upload_id).status == "cancelled"
    assert deps.blobs.list_keys("uploads/") == []
    assert uploads.cancel_upload(deps, "p1", upload_id).status == "cancelled"
    with pytest.raises(InvalidRequest):
        uploads.add_part(deps, "p1", upload_id, b"x")


def test_cancel_of_completed_upload_is_refused(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    uploads.complete_upload(deps, "p1", upload_id, part_ids)
    with pytest.raises(InvalidRequest, match="completed"):
        uploads.cancel_upload(deps, "p1", upload_id)
    with pytest.raises(NotFound):
        uploads.cancel_upload(deps, "p2", upload_id)


# ---------------------------------------------------------------- the sweep of expired uploads


def _stored_status(deps: Deps, upload_id: str) -> str:
    upload = deps.metadata.get_upload("p1", upload_id)
    assert upload is not None
    return upload.status


def test_sweep_marks_expired_pending_uploads_and_drops_their_parts(deps: Deps, clock: FakeClock) -> None:
    expired_id, _ = _upload_with_parts(deps)
    completed_id, completed_parts = _upload_with_parts(deps)
    uploads.complete_upload(deps, "p1", completed_id, completed_parts)
    cancelled_id, _ = _upload_with_parts(deps)
    uploads.cancel_upload(deps, "p1", cancelled_id)
    clock.advance(60)
    later_id, _ = _upload_with_parts(deps)  # expires a minute after the others
    assert uploads.sweep_expired_uploads(deps, limit=10) == 0

    clock.advance(UPLOAD_TTL - 60 + uploads.SWEEP_GRACE_SECONDS - 1)  # expired, but within the grace
    assert uploads.sweep_expired_uploads(deps, limit=10) == 0
    assert deps.blobs.list_keys(object_keys.upload_prefix(expired_id))

    clock.advance(1)
    assert uploads.sweep_expired_uploads(deps, limit=10) == 1
    assert _stored_status(deps, expired_id) == "expired"
    assert deps.blobs.list_keys(object_keys.upload_prefix(expired_id)) == []
    assert len(deps.blobs.list_keys(object_keys.upload_prefix(later_id))) == len(
        CHUNKS
    )  # not yet past its grace
    assert (_stored_status(deps, completed_id), _stored_status(deps, cancelled_id)) == (
        "completed",
        "cancelled",
    )
    assert uploads.sweep_expired_uploads(deps, limit=10) == 0  # marked: not listed again

    clock.advance(60)
    assert uploads.sweep_expired_uploads(deps, limit=10) == 1
    assert deps.blobs.list_keys("uploads/") == []


def test_sweep_respects_its_limit(deps: Deps, clock: FakeClock) -> None:
    for _ in range(3):
        _upload_with_parts(deps)
    clock.advance(UPLOAD_TTL + uploads.SWEEP_GRACE_SECONDS)
    assert uploads.sweep_expired_uploads(deps, limit=2) == 2
    assert uploads.sweep_expired_uploads(deps, limit=2) == 1
    assert deps.blobs.list_keys("uploads/") == []


def test_sweep_leaves_an_upload_completed_meanwhile_completed_and_goes_on(
    deps: Deps, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    stale = deps.metadata.get_upload("p1", upload_id)
    _, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    expired_id, _ = _upload_with_parts(deps)
    expired = deps.metadata.get_upload("p1", expired_id)
    clock.advance(UPLOAD_TTL + uploads.SWEEP_GRACE_SECONDS)
    # a lagging index still lists the completed upload, ahead of one that did expire
    monkeypatch.setattr(deps.metadata, "list_expired_uploads", lambda now, limit: [stale, expired])

    assert uploads.sweep_expired_uploads(deps, limit=10) == 1
    assert _stored_status(deps, upload_id) == "completed"
    assert deps.blobs.get(file.blob_key) == b"".join(CHUNKS)
    assert _stored_status(deps, expired_id) == "expired"


def test_a_crash_between_dropping_parts_and_marking_is_finished_by_the_next_sweep(
    deps: Deps, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, _ = _upload_with_parts(deps)
    clock.advance(UPLOAD_TTL + uploads.SWEEP_GRACE_SECONDS)
    real_update = deps.metadata.update_upload

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("kill -9")

    monkeypatch.setattr(deps.metadata, "update_upload", killed)
    with pytest.raises(RuntimeError):
        uploads.sweep_expired_uploads(deps, limit=10)
    assert deps.blobs.list_keys("uploads/") == []
    monkeypatch.setattr(deps.metadata, "update_upload", real_update)

    assert uploads.sweep_expired_uploads(deps, limit=10) == 1
    assert _stored_status(deps, upload_id) == "expired"


def test_an_expired_upload_answers_the_same_before_and_after_the_sweep(deps: Deps, clock: FakeClock) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    clock.advance(UPLOAD_TTL + uploads.SWEEP_GRACE_SECONDS)

    def answers() -> tuple[list[tuple[str | None, str]], dict[str, Any]]:
        refusals: list[tuple[str | None, str]] = []
        for attempt in (
            lambda: uploads.add_part(deps, "p1", upload_id, b"x"),
            lambda: uploads.complete_upload(deps, "p1", upload_id, part_ids),
        ):
            with pytest.raises(InvalidRequest) as raised:
                attempt()
            refusals.append((raised.value.code, str(raised.value)))
        upload = deps.metadata.get_upload("p1", upload_id)
        assert upload is not None
        return refusals, uploads.upload_wire(deps, "p1", upload)

    before = answers()
    assert [code for code, _ in before[0]] == ["upload_expired", "upload_expired"]
    assert before[1].status == "expired"
    assert uploads.sweep_expired_uploads(deps, limit=10) == 1
    assert answers() == before
    # and it can still be cancelled, as before the sweep (docs/bad-input.md, "Not errors")
    assert uploads.cancel_upload(deps, "p1", upload_id).status == "cancelled"
    assert _stored_status(deps, upload_id) == "cancelled"


def test_an_expired_upload_cancelled_before_the_sweep_stays_cancelled(deps: Deps, clock: FakeClock) -> None:
    upload_id, _ = _upload_with_parts(deps)
    clock.advance(UPLOAD_TTL + uploads.SWEEP_GRACE_SECONDS)
    assert uploads.cancel_upload(deps, "p1", upload_id).status == "cancelled"
    assert deps.blobs.list_keys("uploads/") == []
    assert uploads.sweep_expired_uploads(deps, limit=10) == 0
    assert _stored_status(deps, upload_id) == "cancelled"


# ---------------------------------------------------------------- edges


@pytest.mark.parametrize(
    "mime_type",
    [
        "application/jsonl; charset=utf-8; profile=x",
        "application/jsonl;charset=utf-8",
        "APPLICATION/JSONL ; a=b",
    ],
)
def test_a_mime_type_with_parameters_is_judged_by_its_type(deps: Deps, mime_type: str) -> None:
    upload = uploads.create_upload(deps, "p1", "f.jsonl", "batch", 1, mime_type)
    assert upload.mime_type == mime_type


def test_a_mime_type_unfit_for_the_purpose_names_the_ones_that_fit(deps: Deps) -> None:
    allowed = MIME_TYPES_BY_PURPOSE["batch"]
    with pytest.raises(InvalidRequest) as raised:
        uploads.create_upload(deps, "p1", "f.jsonl", "batch", 1, "image/png; q=1")
    assert (raised.value.param, raised.value.code) == ("mime_type", "invalid_value")
    assert raised.value.message == (
        "Invalid value for 'mime_type': 'image/png' is not supported for purpose 'batch'. "
        f"Supported values are: {', '.join(allowed)}."
    )


def test_an_upload_over_the_deployments_ceiling_is_refused_when_created(deps: Deps) -> None:
    """On AWS the stack sets what one API request can assemble; a bigger Upload is refused before any
    part is sent, exactly at the ceiling it is taken."""
    deps.settings.max_upload_bytes = 1000
    assert uploads.create_upload(deps, "p1", "f.jsonl", "batch", 1000, "text/plain").bytes == 1000
    with pytest.raises(InvalidRequest) as raised:
        uploads.create_upload(deps, "p1", "f.jsonl", "batch", 1001, "text/plain")
    assert (raised.value.param, raised.value.code) == ("bytes", "invalid_value")
    assert raised.value.message == (
        "Invalid value for 'bytes': 1001. An Upload can hold at most 1000 bytes on this deployment: "
        "what it can assemble within the time of one API request."
    )


@pytest.mark.parametrize("byte_count", [0, uploads.MAX_UPLOAD_BYTES])
def test_an_upload_may_declare_zero_bytes_or_exactly_the_limit(deps: Deps, byte_count: int) -> None:
    assert uploads.create_upload(deps, "p1", "f.jsonl", "batch", byte_count, "text/plain").bytes == byte_count


def test_a_part_of_exactly_the_limit_is_accepted(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(uploads, "MAX_PART_BYTES", 4)
    upload = uploads.create_upload(deps, "p1", "f.jsonl", "batch", 4, "text/plain")
    part = uploads.add_part(deps, "p1", upload.id, b"1234")
    assert deps.blobs.get(part.blob_key) == b"1234"


def test_a_part_whose_record_cannot_be_written_leaves_no_body(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = uploads.create_upload(deps, "p1", "f.jsonl", "batch", 4, "text/plain")

    def throttled(part: object) -> None:
        raise OSError("throttled")

    monkeypatch.setattr(deps.metadata, "add_upload_part", throttled)
    with pytest.raises(OSError):
        uploads.add_part(deps, "p1", upload.id, b"1234")
    assert deps.blobs.list_keys("uploads/") == []


def test_the_stitched_body_lives_under_the_files_id(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    _, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert file.blob_key == object_keys.stitched_file_key(ids.upload_file_id(upload_id), part_ids)
    assert file.blob_key.startswith(f"files/{file.id}.")


def test_the_stitched_body_carries_the_files_expiry(deps: Deps) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    _, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert file.expires_at is not None
    assert deps.blobs.expiry == {file.blob_key: file.expires_at}  # type: ignore[attr-defined]


def _fail_first_update(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first complete registers the file, then its update of the upload fails (a throttle, a crash)."""
    original = deps.metadata.update_upload
    calls = {"n": 0}

    def flaky(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("throttled")
        return original(*args, **kwargs)

    monkeypatch.setattr(deps.metadata, "update_upload", flaky)


def _count_stitches(deps: Deps, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    written: list[str] = []
    original = deps.blobs.write_stream

    def recording(key: str, chunks: Any) -> int:
        written.append(key)
        return original(key, chunks)

    monkeypatch.setattr(deps.blobs, "write_stream", recording)
    return written


def test_a_retried_complete_does_not_copy_the_parts_again(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    _fail_first_update(deps, monkeypatch)
    written = _count_stitches(deps, monkeypatch)
    with pytest.raises(OSError):
        uploads.complete_upload(deps, "p1", upload_id, part_ids)

    completed, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert completed.status == "completed"
    assert written == [file.blob_key]  # stitched once, by the first attempt


def test_a_retried_complete_checks_the_md5_against_the_registered_body(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    _fail_first_update(deps, monkeypatch)
    right = hashlib.md5(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(OSError):
        uploads.complete_upload(deps, "p1", upload_id, part_ids, right)

    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, part_ids, "0" * 32)
    assert raised.value.param == "md5"
    assert right in raised.value.message
    assert _stored_status(deps, upload_id) == "pending"

    completed, file = uploads.complete_upload(deps, "p1", upload_id, part_ids, right.upper())
    assert completed.file_id == file.id
    assert deps.blobs.get(file.blob_key) == b"".join(CHUNKS)


def _registered_meanwhile(deps: Deps, monkeypatch: pytest.MonkeyPatch, *, same_parts: bool) -> dict[str, Any]:
    """While this complete stitches, a concurrent complete of the same upload registers the file: with the
    same part list (so the same body key) or with another one."""
    original = deps.blobs.write_stream
    seen: dict[str, Any] = {}

    def racing(key: str, chunks: Any) -> int:
        written = original(key, chunks)
        winner = FileRecord(
            id=key.split("/")[1].split(".")[0],
            project_id="p1",
            bytes=written,
            created_at=1,
            expires_at=None,
            filename="winner.jsonl",
            purpose="batch",
            blob_key=key if same_parts else key + ".other",
        )
        if not same_parts:
            original(winner.blob_key, iter([b'{"winner": true}\n']))
        deps.metadata.create_file(winner)
        seen["winner"] = winner
        return written

    monkeypatch.setattr(deps.blobs, "write_stream", racing)
    return seen


def test_a_complete_that_loses_the_registration_to_the_same_parts_returns_the_winners_file(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    seen = _registered_meanwhile(deps, monkeypatch, same_parts=True)
    completed, file = uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert file == seen["winner"]  # the registered record, not this attempt's own
    assert completed.file_id == file.id
    assert deps.blobs.get(file.blob_key) == b"".join(CHUNKS)  # the shared body is kept


def test_a_complete_with_a_wrong_md5_keeps_a_body_the_registered_file_points_at(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    seen = _registered_meanwhile(deps, monkeypatch, same_parts=True)
    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, part_ids, "0" * 32)
    assert raised.value.param == "md5"
    assert deps.blobs.get(seen["winner"].blob_key) == b"".join(CHUNKS)


def test_a_complete_that_loses_the_registration_to_other_parts_drops_its_body(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)
    seen = _registered_meanwhile(deps, monkeypatch, same_parts=False)
    with pytest.raises(InvalidRequest) as raised:
        uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert raised.value.code == "invalid_upload_status"
    assert deps.blobs.list_keys("files/") == [seen["winner"].blob_key]


def test_a_stitched_body_whose_record_cannot_be_written_is_removed(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, part_ids = _upload_with_parts(deps)

    def throttled(record: object) -> None:
        raise OSError("throttled")

    monkeypatch.setattr(deps.metadata, "create_file", throttled)
    with pytest.raises(OSError):
        uploads.complete_upload(deps, "p1", upload_id, part_ids)
    assert deps.blobs.list_keys("files/") == []
    assert len(deps.blobs.list_keys(object_keys.upload_prefix(upload_id))) == len(part_ids)  # retry can go on


def test_a_cancel_that_races_another_answers_for_the_state_it_finds(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    upload_id, _ = _upload_with_parts(deps)
    original = deps.metadata.update_upload

    def cancelled_meanwhile(project_id: str, upload_id: str, changes: Any, *, expected_status: Any) -> Any:
        original(project_id, upload_id, {"status": "cancelled"}, expected_status=["pending"])
        monkeypatch.setattr(deps.metadata, "update_upload", original)
        raise ConditionFailed(upload_id)

    monkeypatch.setattr(deps.metadata, "update_upload", cancelled_meanwhile)
    cancelled = uploads.cancel_upload(deps, "p1", upload_id)
    assert (cancelled.id, cancelled.status) == (upload_id, "cancelled")
