"""Uploads: a large file sent as parts, then stitched into one file.

Parts live at `uploads/{id}/parts/{part}` until `complete` concatenates them, in the order the
caller names, into `files/{file_id}` (`BlobStore.concatenate`: never the whole file in memory; on S3
copied server-side when the parts allow it, else read and re-cut in parallel), creates the
FileRecord and drops the parts. An Upload may hold at most `max_upload_bytes`, what the deployment
can assemble within one API request's time (on AWS the stack sets it; see infra/constructs/api.py).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

from batch_api import object_keys
from batch_api.contract import ids
from batch_api.contract.errors import (
    AlreadyExists,
    ConditionFailed,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
)
from batch_api.contract.models import (
    MIME_TYPES_BY_PURPOSE,
    UPLOAD_TTL,
    FileRecord,
    UploadPartRecord,
    UploadRecord,
)
from batch_api.contract.wire import UploadObject
from batch_api.deps import Deps
from batch_api.service.files import (
    FirstLine,
    check_batch_filename,
    expires_after_seconds,
    file_expires_at,
    invalid_batch_file,
    validate_purpose,
)

MAX_UPLOAD_BYTES = 8 * 1024**3
MAX_PART_BYTES = 64 * 1024**2
# The sweep leaves an expired upload alone this long, so a part or a complete that started just before
# the expiry (stitching 8 GB takes minutes) finishes before its parts are deleted.
SWEEP_GRACE_SECONDS = 15 * 60
CANCELLABLE_UPLOAD_STATUSES = ("pending", "expired")
_TOKEN = re.compile(r"^[A-Za-z0-9!#$&^_.+-]{1,127}/[A-Za-z0-9!#$&^_.+-]{1,127}$")


def check_mime_type(purpose: str, mime_type: str) -> None:
    """The declared MIME type must be a type (`type/subtype`, parameters allowed) that suits the purpose."""
    base = mime_type.split(";", 1)[0].strip().lower()
    if not _TOKEN.match(base):
        raise InvalidRequest(
            f"Invalid value for 'mime_type': {mime_type!r} is not a MIME type (type/subtype).",
            param="mime_type",
            code="invalid_value",
        )
    allowed = MIME_TYPES_BY_PURPOSE.get(purpose)
    if allowed is not None and base not in allowed:
        raise InvalidRequest(
            f"Invalid value for 'mime_type': {base!r} is not supported for purpose '{purpose}'. "
            f"Supported values are: {', '.join(allowed)}.",
            param="mime_type",
            code="invalid_value",
        )


def _get_upload(deps: Deps, project_id: str, upload_id: str) -> UploadRecord:
    record = deps.metadata.get_upload(project_id, upload_id)
    if record is None:
        raise NotFound(f"No such Upload object: {upload_id}", param="upload_id")
    return record


def status_at(upload: UploadRecord, now: int) -> str:
    """The upload's status as the API shows it: a pending upload past its expiry is `expired` already,
    whether or not the sweep has stored that yet."""
    if upload.status == "pending" and upload.expires_at <= now:
        return "expired"
    return upload.status


def _require_pending(deps: Deps, upload: UploadRecord) -> None:
    status = status_at(upload, deps.now())
    if status == "expired":
        raise InvalidRequest(f"Upload {upload.id} has expired.", param="upload_id", code="upload_expired")
    if status != "pending":
        raise InvalidRequest(
            f"Upload {upload.id} is already {status}.", param="upload_id", code="invalid_upload_status"
        )


def create_upload(
    deps: Deps,
    project_id: str,
    filename: str,
    purpose: str,
    byte_count: int,
    mime_type: str,
    expires_after: Mapping[str, Any] | None = None,
) -> UploadRecord:
    """Open an upload of `byte_count` bytes; it takes parts for one hour."""
    validate_purpose(purpose)
    file_ttl = expires_after_seconds(expires_after, param="expires_after")
    if not filename:
        raise InvalidRequest("'filename' must not be empty.", param="filename", code="invalid_value")
    if not mime_type:
        raise InvalidRequest("'mime_type' must not be empty.", param="mime_type", code="invalid_value")
    if byte_count < 0:
        raise InvalidRequest(
            f"Invalid value for 'bytes': {byte_count}. It must be >= 0.", param="bytes", code="invalid_value"
        )
    limit = min(MAX_UPLOAD_BYTES, deps.settings.max_upload_bytes)
    if byte_count > limit:
        why = (
            "(8 GB)"
            if limit == MAX_UPLOAD_BYTES
            else "on this deployment: what it can assemble within the time of one API request"
        )
        raise InvalidRequest(
            f"Invalid value for 'bytes': {byte_count}. An Upload can hold at most {limit} bytes {why}.",
            param="bytes",
            code="invalid_value",
        )
    check_mime_type(purpose, mime_type)
    check_batch_filename(purpose, filename, "filename")
    now = deps.now()
    record = UploadRecord(
        id=ids.new_upload_id(),
        project_id=project_id,
        bytes=byte_count,
        created_at=now,
        expires_at=now + UPLOAD_TTL,
        filename=filename,
        purpose=purpose,
        mime_type=mime_type,
        file_expires_after_seconds=file_ttl,
    )
    deps.metadata.create_upload(record)
    return record


def add_part(deps: Deps, project_id: str, upload_id: str, data: bytes) -> UploadPartRecord:
    upload = _get_upload(deps, project_id, upload_id)
    _require_pending(deps, upload)
    if len(data) > MAX_PART_BYTES:
        raise PayloadTooLarge(
            f"A Part can hold at most {MAX_PART_BYTES} bytes; this one has {len(data)}.", param="data"
        )
    part_id = ids.new_part_id()
    part = UploadPartRecord(
        id=part_id,
        upload_id=upload_id,
        created_at=deps.now(),
        bytes=len(data),
        blob_key=object_keys.upload_part_key(upload_id, part_id),
    )
    deps.blobs.put(part.blob_key, data)
    try:
        deps.metadata.add_upload_part(part)
    except BaseException:
        deps.blobs.delete(part.blob_key)
        raise
    return part


def _ordered_parts(
    upload: UploadRecord, stored: list[UploadPartRecord], part_ids: list[str]
) -> list[UploadPartRecord]:
    by_id = {part.id: part for part in stored}
    if len(set(part_ids)) != len(part_ids):
        raise InvalidRequest("'part_ids' must not name a Part twice.", param="part_ids", code="invalid_value")
    ordered = []
    for index, part_id in enumerate(part_ids):
        part = by_id.get(part_id)
        if part is None:
            raise InvalidRequest(
                f"Part {part_id} does not belong to Upload {upload.id}.",
                param=f"part_ids[{index}]",
                code="invalid_value",
            )
        ordered.append(part)
    total = sum(part.bytes for part in ordered)
    if total != upload.bytes:
        raise InvalidRequest(
            f"The Parts add up to {total} bytes, but Upload {upload.id} was created with bytes={upload.bytes}.",
            param="part_ids",
            code="invalid_value",
        )
    return ordered


def complete_upload(
    deps: Deps, project_id: str, upload_id: str, part_ids: list[str], md5: str | None = None
) -> tuple[UploadRecord, FileRecord]:
    """Stitch the named parts into a new file; the upload becomes `completed` with that file.

    The file's id is derived from the upload's (`ids.upload_file_id`) and its body's key from the part
    list (`keys.stitched_file_key`), so a complete retried after a crash or a failed update finds the
    file the first attempt registered instead of making a second one, and two completes that name
    different parts never overwrite each other's body. Of concurrent completes exactly one succeeds;
    the others answer from the upload's state: 400 `invalid_upload_status`.
    """
    upload = _get_upload(deps, project_id, upload_id)
    _require_pending(deps, upload)
    parts = _ordered_parts(upload, deps.metadata.get_upload_parts(upload_id), part_ids)

    file_id = ids.upload_file_id(upload_id)
    blob_key = object_keys.stitched_file_key(file_id, part_ids)
    record = deps.metadata.get_file(project_id, file_id)
    if record is None:
        try:
            record = _stitch(deps, project_id, upload, file_id, blob_key, parts, md5)
        except KeyError:
            # A part vanished under us: a concurrent complete (or cancel) won and dropped the parts.
            _require_pending(deps, _get_upload(deps, project_id, upload_id))
            raise
    elif md5 is not None:  # registered by an earlier attempt: check its body against this md5
        _check_md5(_md5_of(deps, record.blob_key), md5)
    if record.blob_key != blob_key:
        # A concurrent complete naming other parts registered the file; it finishes the upload.
        _require_pending(deps, _get_upload(deps, project_id, upload_id))
        raise InvalidRequest(
            f"Upload {upload_id} is already being completed with other parts.",
            param="upload_id",
            code="invalid_upload_status",
        )
    try:
        completed = deps.metadata.update_upload(
            project_id, upload_id, {"status": "completed", "file_id": file_id}, expected_status=["pending"]
        )
    except ConditionFailed:
        current = _get_upload(deps, project_id, upload_id)
        if current.file_id != file_id:
            # A cancel won the race: the file belongs to no upload, so take it back.
            deps.metadata.mark_file_deleted(project_id, file_id)
            deps.blobs.delete(record.blob_key)
        _require_pending(deps, current)  # raises: the upload is completed or cancelled now
        raise
    deps.blobs.delete_prefix(object_keys.upload_prefix(upload_id))
    return completed, record


def _check_md5(actual: str, given: str) -> None:
    if actual != given.lower():
        raise InvalidRequest(
            f"The md5 of the Parts is {actual}, not the {given} that was given.",
            param="md5",
            code="invalid_value",
        )


def _md5_of(deps: Deps, blob_key: str) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in deps.blobs.iter_range(blob_key):
        digest.update(chunk)
    return digest.hexdigest()


def _stitch(
    deps: Deps,
    project_id: str,
    upload: UploadRecord,
    file_id: str,
    blob_key: str,
    parts: list[UploadPartRecord],
    md5: str | None,
) -> FileRecord:
    """Concatenate the parts into `blob_key` and register the file (once, whoever registers it: the
    record returned may be another complete's)."""
    now = deps.now()
    record = FileRecord(
        id=file_id,
        project_id=project_id,
        bytes=upload.bytes,
        created_at=now,
        expires_at=file_expires_at(upload.purpose, now, upload.file_expires_after_seconds),
        filename=upload.filename,
        purpose=upload.purpose,
        blob_key=blob_key,
    )
    if upload.purpose == "batch" and not _first_line(deps, parts).is_json_object():
        raise invalid_batch_file("part_ids")  # judged from the parts: nothing written yet
    # Without an md5 to check nobody needs the bytes: the store may assemble the file without reading
    # it (S3 copies the parts server-side).
    digest = hashlib.md5(usedforsecurity=False) if md5 is not None else None
    sources = [(part.blob_key, part.bytes) for part in parts]
    deps.blobs.concatenate(blob_key, sources, on_bytes=digest.update if digest is not None else None)
    if md5 is not None and digest is not None:
        try:
            _check_md5(digest.hexdigest(), md5)
        except InvalidRequest:
            _drop_unless_registered(deps, project_id, file_id, blob_key)
            raise
    try:
        if record.expires_at is not None:
            deps.blobs.set_expiry(blob_key, record.expires_at)
        deps.metadata.create_file(record)
    except AlreadyExists:
        # a concurrent complete of this upload registered it first
        _drop_unless_registered(deps, project_id, file_id, blob_key)
        existing = deps.metadata.get_file(project_id, file_id)
        return existing if existing is not None else record
    except BaseException:
        deps.blobs.delete(blob_key)
        raise
    return record


def _first_line(deps: Deps, parts: list[UploadPartRecord]) -> FirstLine:
    """The first line of the parts in this order, reading no further than it (`KeyError` if a part
    is gone)."""
    first_line = FirstLine()
    for part in parts:
        pieces = deps.blobs.iter_range(part.blob_key)
        try:
            for piece in pieces:
                first_line.feed(piece)
                if first_line.done:
                    return first_line
        finally:
            getattr(pieces, "close", lambda: None)()  # the rest of the part is not wanted
    first_line.finish()
    return first_line


def _drop_unless_registered(deps: Deps, project_id: str, file_id: str, blob_key: str) -> None:
    """Remove a stitched body, unless the registered file points at it (a complete with the same parts)."""
    registered = deps.metadata.get_file(project_id, file_id)
    if registered is None or registered.blob_key != blob_key:
        deps.blobs.delete(blob_key)


def cancel_upload(deps: Deps, project_id: str, upload_id: str) -> UploadRecord:
    """pending -> cancelled and drop the parts; cancelling again returns the cancelled upload. An expired
    upload can be cancelled too, whether or not the sweep has marked it `expired` yet."""
    upload = _get_upload(deps, project_id, upload_id)
    if upload.status == "cancelled":
        return upload
    if upload.status not in CANCELLABLE_UPLOAD_STATUSES:
        raise InvalidRequest(
            f"Upload {upload_id} is already {upload.status} and cannot be cancelled.",
            param="upload_id",
            code="invalid_upload_status",
        )
    try:
        cancelled = deps.metadata.update_upload(
            project_id, upload_id, {"status": "cancelled"}, expected_status=CANCELLABLE_UPLOAD_STATUSES
        )
    except ConditionFailed:
        return cancel_upload(deps, project_id, upload_id)  # the state moved; answer for the new one
    deps.blobs.delete_prefix(object_keys.upload_prefix(upload_id))
    return cancelled


def upload_wire(
    deps: Deps, project_id: str, upload: UploadRecord, file: FileRecord | None = None
) -> UploadObject:
    """The Upload object; a pending upload past its expiry shows as `expired`, and a completed one
    carries its file."""
    status = status_at(upload, deps.now())
    if status != upload.status:
        upload = upload.model_copy(update={"status": status})
    if file is None and upload.file_id is not None:
        file = deps.metadata.get_file(project_id, upload.file_id)
    return upload.to_wire(file)


def sweep_expired_uploads(deps: Deps, limit: int) -> int:
    """Delete the parts of pending uploads whose `expires_at` passed (more than `SWEEP_GRACE_SECONDS`
    ago) and mark them `expired`; return how many were marked.

    The parts go first, so a crash in between leaves a pending upload the next sweep finishes, never
    parts nobody lists. The API already treats such an upload as expired (no part, complete or cancel
    is accepted), whatever the sweep's lag; an upload that was completed or cancelled meanwhile keeps
    that status (the update is conditional on `pending`).
    """
    swept = 0
    for upload in deps.metadata.list_expired_uploads(deps.now() - SWEEP_GRACE_SECONDS, limit):
        deps.blobs.delete_prefix(object_keys.upload_prefix(upload.id))
        try:
            deps.metadata.update_upload(
                upload.project_id, upload.id, {"status": "expired"}, expected_status=["pending"]
            )
        except ConditionFailed:
            continue
        swept += 1
    return swept
