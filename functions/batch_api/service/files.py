"""Files: create, list, retrieve, delete, download, and the sweep of expired files.

A file is a blob (`files/{id}`) plus a FileRecord. The blob is written first and the record last, so a
record always points at a complete body; a failed record write removes the blob again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import orjson

from batch_api import object_keys
from batch_api.contract import ids
from batch_api.contract.errors import InvalidRequest, NotFound
from batch_api.contract.models import (
    BATCH_INPUT_DEFAULT_TTL,
    OUTPUT_EXPIRES_MAX,
    OUTPUT_EXPIRES_MIN,
    UPLOADABLE_PURPOSES,
    FileRecord,
)
from batch_api.contract.wire import FileDeleted
from batch_api.deps import Deps

FILE_LIST_MAX_LIMIT = 10_000
FILE_ORDERS = ("asc", "desc")
BATCH_FILE_SUFFIX = ".jsonl"
# How far into a file the first line is looked for; a longer first line is left to batch validation.
FIRST_LINE_LIMIT = 16 * 1024 * 1024


def invalid_batch_file(param: str) -> InvalidRequest:
    """OpenAI's answer to a `batch` file that is not JSONL, by its name or by its first line."""
    return InvalidRequest(
        "Invalid file format for Batch API. Must be .jsonl", param=param, code="invalid_file_format"
    )


def check_batch_filename(purpose: str, filename: str, param: str) -> None:
    if purpose == "batch" and not filename.lower().endswith(BATCH_FILE_SUFFIX):
        raise invalid_batch_file(param)


class FirstLine:
    """Watches a file's bytes go by and keeps its first non-blank line (up to `FIRST_LINE_LIMIT`)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.line: bytes | None = None
        self.done = False

    def feed(self, piece: bytes | memoryview) -> None:
        if self.done:
            return
        self._buffer += piece
        while not self.done:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > FIRST_LINE_LIMIT:
                    self.done = True  # too long to judge here
                return
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            if line.strip():
                self.line, self.done = line, True

    def finish(self) -> None:
        if not self.done and self._buffer.strip():
            self.line = bytes(self._buffer)
        self.done = True

    def is_json_object(self) -> bool:
        """False only when there is a first line and it is not a JSON object."""
        if self.line is None:
            return True
        try:
            return isinstance(orjson.loads(self.line), dict)
        except orjson.JSONDecodeError:
            return False


def check_batch_content(purpose: str, pieces: Iterable[bytes | memoryview], param: str) -> None:
    """For `batch` files: the first line must be a JSON object (the whole file is checked when a batch
    validates it)."""
    if purpose != "batch":
        return
    first = FirstLine()
    for piece in pieces:
        first.feed(piece)
        if first.done:
            break
    first.finish()
    if not first.is_json_object():
        raise invalid_batch_file(param)


def validate_purpose(purpose: object) -> str:
    """The purposes a caller may upload with (`batch_output` is ours to write)."""
    if not isinstance(purpose, str) or purpose not in UPLOADABLE_PURPOSES:
        raise InvalidRequest(
            f"Invalid value for 'purpose': {purpose!r}. Supported values are: {', '.join(UPLOADABLE_PURPOSES)}.",
            param="purpose",
            code="invalid_value",
        )
    return purpose


def expires_after_seconds(expires_after: Mapping[str, Any] | None, *, param: str) -> int | None:
    """Check an `{anchor: "created_at", seconds}` expiry policy; return its seconds (None when absent).

    `param` names the policy in errors (`expires_after`, `output_expires_after`).
    """
    if expires_after is None:
        return None
    if not isinstance(expires_after, Mapping):
        raise InvalidRequest(
            f"Invalid type for '{param}': expected an object.", param=param, code="invalid_type"
        )
    anchor = expires_after.get("anchor")
    if anchor != "created_at":
        raise InvalidRequest(
            f"Invalid value for '{param}.anchor': {anchor!r}. Supported values are: 'created_at'.",
            param=f"{param}.anchor",
            code="invalid_value",
        )
    seconds = expires_after.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise InvalidRequest(
            f"Invalid type for '{param}.seconds': expected an integer.",
            param=f"{param}.seconds",
            code="invalid_type",
        )
    if not OUTPUT_EXPIRES_MIN <= seconds <= OUTPUT_EXPIRES_MAX:
        raise InvalidRequest(
            f"Invalid value for '{param}.seconds': {seconds}. It must be between {OUTPUT_EXPIRES_MIN} (1 hour) "
            f"and {OUTPUT_EXPIRES_MAX} (30 days).",
            param=f"{param}.seconds",
            code="invalid_value",
        )
    return seconds


def file_expires_at(purpose: str, created_at: int, seconds: int | None) -> int | None:
    """An explicit policy wins; `batch` input files expire after 30 days; other files never do."""
    if seconds is not None:
        return created_at + seconds
    if purpose == "batch":
        return created_at + BATCH_INPUT_DEFAULT_TTL
    return None


def _not_found(file_id: str) -> NotFound:
    return NotFound(f"No such File object: {file_id}", param="id")


def create_file(
    deps: Deps,
    project_id: str,
    filename: str,
    purpose: str,
    data: bytes,
    expires_after: Mapping[str, Any] | None = None,
) -> FileRecord:
    validate_purpose(purpose)
    seconds = expires_after_seconds(expires_after, param="expires_after")
    check_batch_filename(purpose, filename, "file")
    check_batch_content(purpose, (memoryview(data),), "file")
    now = deps.now()
    file_id = ids.new_file_id()
    record = FileRecord(
        id=file_id,
        project_id=project_id,
        bytes=len(data),
        created_at=now,
        expires_at=file_expires_at(purpose, now, seconds),
        filename=filename,
        purpose=purpose,
        blob_key=object_keys.file_key(file_id),
    )
    store_file(deps, record, lambda: deps.blobs.put(record.blob_key, data))
    return record


def store_file(deps: Deps, record: FileRecord, write_blob: Callable[[], object]) -> None:
    """Write the body (via `write_blob()`), then the record; undo the body if the record write fails."""
    write_blob()
    try:
        if record.expires_at is not None:
            deps.blobs.set_expiry(record.blob_key, record.expires_at)
        deps.metadata.create_file(record)
    except BaseException:
        deps.blobs.delete(record.blob_key)
        raise


def list_files(
    deps: Deps,
    project_id: str,
    *,
    purpose: str | None = None,
    order: str = "desc",
    limit: int = FILE_LIST_MAX_LIMIT,
    after: str | None = None,
) -> tuple[list[FileRecord], bool]:
    """Live files of the project, one page; the bool says whether more follow."""
    if order not in FILE_ORDERS:
        raise InvalidRequest(
            f"Invalid value for 'order': {order!r}. Supported values are: 'asc', 'desc'.",
            param="order",
            code="invalid_value",
        )
    if not 1 <= limit <= FILE_LIST_MAX_LIMIT:
        raise InvalidRequest(
            f"Invalid value for 'limit': {limit}. It must be between 1 and {FILE_LIST_MAX_LIMIT}.",
            param="limit",
            code="invalid_value",
        )
    records = deps.metadata.list_files(
        project_id, purpose=purpose, order=order, after=after, limit=limit + 1, now=deps.now()
    )
    return records[:limit], len(records) > limit


def retrieve_file(deps: Deps, project_id: str, file_id: str) -> FileRecord:
    """The live file, else 404: unknown, another project's, deleted and expired look the same."""
    record = deps.metadata.get_file(project_id, file_id)
    if record is None or not record.is_live(deps.now()):
        raise _not_found(file_id)
    return record


def delete_file(deps: Deps, project_id: str, file_id: str) -> FileDeleted:
    """Mark the file deleted (404 from now on) and remove its body, unless a batch that has not ended
    still reads it as input: then the body stays until that batch ends (`release_input_file`)."""
    record = retrieve_file(deps, project_id, file_id)
    # The record goes first: a reader never finds a live record whose body is gone. And a batch that
    # ends after this point sees the record deleted and removes the body itself.
    if not deps.metadata.mark_file_deleted(project_id, file_id):
        raise _not_found(file_id)
    if not input_of_active_batch(deps, record):
        deps.blobs.delete(record.blob_key)
    return FileDeleted(id=file_id, deleted=True)


def input_of_active_batch(deps: Deps, record: FileRecord) -> bool:
    """Whether a batch that has not reached a terminal status uses the file as its input: the file's
    holders, looked up by (project, file) (a read of every active batch of every project would grow
    with the whole service's load)."""
    return bool(deps.metadata.input_holders(record.project_id, record.id))


def release_input_file(deps: Deps, project_id: str, file_id: str) -> None:
    """Called when a batch has ended, unless another running batch still reads its input file: if the
    file was deleted or has expired meanwhile, remove the body that was kept for the batch; if it is
    still live, give the store back the file's own expiry (`create_batch` took it away)."""
    record = deps.metadata.get_file(project_id, file_id)
    if record is None or input_of_active_batch(deps, record):
        return
    if not record.is_live(deps.now()):
        deps.blobs.delete(record.blob_key)
    elif record.expires_at is not None:
        deps.blobs.set_expiry(record.blob_key, record.expires_at)


def file_content(deps: Deps, project_id: str, file_id: str) -> tuple[FileRecord, str]:
    """The live file and the blob key of its body; the handler decides between inline and redirect."""
    record = retrieve_file(deps, project_id, file_id)
    return record, record.blob_key


def read_content(deps: Deps, project_id: str, record: FileRecord) -> bytes:
    """The whole body of a file `file_content` returned. A delete (or the expiry sweep) that removed the
    body since is a 404, as the file is now."""
    try:
        return deps.blobs.get(record.blob_key)
    except KeyError:
        raise _not_found(record.id) from None


def sweep_expired_files(deps: Deps, limit: int = 1000) -> int:
    """Delete the bodies of files whose `expires_at` passed and mark them deleted; return how many.

    The body goes first, so a crash in between leaves a record the next sweep finishes, never an
    orphaned body. Expired files are already invisible to the API, whatever the sweep's lag. The body
    of an input file that a batch still running reads is kept: the record is marked deleted, and the
    batch removes the body when it ends (`release_input_file`).
    """
    expired = deps.metadata.list_expired_files(deps.now(), limit)
    for record in expired:
        if not input_of_active_batch(deps, record):
            deps.blobs.delete(record.blob_key)
        deps.metadata.mark_file_deleted(record.project_id, record.id)
    return len(expired)
