"""Batches: create (with the synchronous checks), retrieve, list, cancel.

The workflow (validate -> chunks -> finalize) does the work; these use cases only write the record,
start the workflow and report progress from the per-chunk counts while it runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batch_api.contract import ids
from batch_api.contract.errors import (
    AlreadyExists,
    ConditionFailed,
    Conflict,
    InvalidRequest,
    NotFound,
    ServerError,
    json_kind,
)
from batch_api.contract.models import (
    CANCELLABLE_STATUSES,
    ENDPOINTS,
    MAX_METADATA_KEY,
    MAX_METADATA_PAIRS,
    MAX_METADATA_VALUE,
    OUTPUT_DEFAULT_TTL,
    BatchRecord,
    FileRecord,
    RequestCounts,
    Usage,
)
from batch_api.deps import Deps
from batch_api.service.files import expires_after_seconds

BATCH_LIST_MAX_LIMIT = 100
BATCH_LIST_DEFAULT_LIMIT = 20
MAX_IDEMPOTENCY_KEY = 255
_CANCEL_ATTEMPTS = 10  # each lost race means the status moved on; there are only a few statuses
_LIVE_COUNT_STATUSES = frozenset({"in_progress", "finalizing", "cancelling"})


def validate_metadata(metadata: object) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, Mapping):
        raise InvalidRequest(
            "Invalid type for 'metadata': expected an object.", param="metadata", code="invalid_type"
        )
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(
            f"Invalid 'metadata': too many properties. Expected at most {MAX_METADATA_PAIRS}, got {len(metadata)}.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if not isinstance(key, str) or len(key) > MAX_METADATA_KEY:
            raise InvalidRequest(
                f"Invalid 'metadata': keys must be strings of at most {MAX_METADATA_KEY} characters.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
        if not isinstance(value, str):
            raise InvalidRequest(
                f"Invalid type for 'metadata.{key}': expected a string, but got {json_kind(value)} instead.",
                param=f"metadata.{key}",
                code="invalid_type",
            )
        if len(value) > MAX_METADATA_VALUE:
            raise InvalidRequest(
                f"Invalid 'metadata.{key}': string too long. Expected at most {MAX_METADATA_VALUE} characters, "
                f"got {len(value)}.",
                param=f"metadata.{key}",
                code="string_above_max_length",
            )
    return dict(metadata)


def _check_request(endpoint: str, completion_window: str) -> None:
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(
            f"Invalid value for 'endpoint': {endpoint!r}. Supported values are: {', '.join(ENDPOINTS)}.",
            param="endpoint",
            code="invalid_value",
        )
    if completion_window != "24h":
        raise InvalidRequest(
            f"Invalid value for 'completion_window': {completion_window!r}. Supported values are: '24h'.",
            param="completion_window",
            code="invalid_value",
        )


def _check_input_file(deps: Deps, project_id: str, input_file_id: str) -> FileRecord:
    record = deps.metadata.get_file(project_id, input_file_id)
    if record is None or not record.is_live(deps.now()):
        raise InvalidRequest(
            f"Could not find file {input_file_id}.", param="input_file_id", code="invalid_request"
        )
    if record.purpose != "batch":
        raise InvalidRequest(
            f"The input file {input_file_id} has purpose '{record.purpose}', but a batch input file must have "
            "purpose 'batch'.",
            param="input_file_id",
            code="invalid_request",
        )
    return record


def create_batch(
    deps: Deps,
    project_id: str,
    endpoint: str,
    input_file_id: str,
    completion_window: str,
    metadata: Mapping[str, Any] | None = None,
    output_expires_after: Mapping[str, Any] | None = None,
    idempotency_key: str | None = None,
) -> BatchRecord:
    """Check the request, write the batch (`validating`) and start its workflow.

    With an idempotency key, the first request binds the key to a batch id; a replay returns that
    batch (and creates it, if the first attempt died between claiming the key and writing the batch).
    """
    _check_request(endpoint, completion_window)
    checked_metadata = validate_metadata(metadata)
    output_ttl = expires_after_seconds(output_expires_after, param="output_expires_after")
    input_file = _check_input_file(deps, project_id, input_file_id)
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(
            f"The Idempotency-Key header must have 1 to {MAX_IDEMPOTENCY_KEY} characters.",
            param="Idempotency-Key",
            code="invalid_value",
        )

    now = deps.now()
    batch_id = ids.new_batch_id()
    request = _BatchRequest(
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        metadata=checked_metadata,
        output_expires_after_seconds=output_ttl if output_ttl is not None else OUTPUT_DEFAULT_TTL,
    )
    if idempotency_key is not None:
        batch_id = deps.metadata.claim_idempotency_key(project_id, idempotency_key, batch_id, now)
        existing = deps.metadata.get_batch(project_id, batch_id)
        if existing is not None:
            return _replayed(deps, existing, request)

    record = BatchRecord(
        id=batch_id,
        project_id=project_id,
        endpoint=endpoint,
        input_file_id=input_file_id,
        completion_window=completion_window,
        status="validating",
        created_at=now,
        expires_at=now + deps.settings.completion_window_seconds,
        metadata=request.metadata,
        output_expires_after_seconds=request.output_expires_after_seconds,
    )
    if input_file.expires_at is not None:
        # the batch reads the input until it ends: the store must not expire it meanwhile (S3's lifecycle
        # rule would delete it on its day whatever the batch); the batch's end gives the expiry back
        # (files.release_input_file). Before the record: a failure here leaves no batch behind.
        deps.blobs.clear_expiry(input_file.blob_key)
    try:
        deps.metadata.create_batch(record)  # the batch now holds its input (`files.input_of_active_batch`)
    except AlreadyExists:
        # A concurrent request with the same idempotency key wrote it first.
        existing = deps.metadata.get_batch(project_id, batch_id)
        if existing is None:
            raise
        return _replayed(deps, existing, request)
    deps.workflow.start(project_id, batch_id)
    return record


@dataclass(frozen=True)
class _BatchRequest:
    """The parameters of a create that an Idempotency-Key binds to."""

    endpoint: str
    input_file_id: str
    completion_window: str
    metadata: dict[str, str] | None
    output_expires_after_seconds: int

    def made(self, batch: BatchRecord) -> bool:
        """Whether `batch` is what this request would have created."""
        return (
            batch.endpoint,
            batch.input_file_id,
            batch.completion_window,
            batch.metadata,
            batch.output_expires_after_seconds,
        ) == (
            self.endpoint,
            self.input_file_id,
            self.completion_window,
            self.metadata,
            self.output_expires_after_seconds,
        )


def _replayed(deps: Deps, batch: BatchRecord, request: _BatchRequest) -> BatchRecord:
    """The batch an Idempotency-Key already names, if this request asks for the same one; a key reused
    with other parameters is refused (as Stripe and Powertools' payload validation refuse it)."""
    if not request.made(batch):
        raise Conflict(
            "Keys for idempotent requests can only be used with the same parameters they were first used "
            f"with. This Idempotency-Key created batch {batch.id} with other parameters; use a new key.",
            param="Idempotency-Key",
            code="idempotency_key_reused",
        )
    if batch.status == "validating":
        deps.workflow.start(batch.project_id, batch.id)  # harmless if running; revives a start that was lost
    return with_live_counts(deps, batch)


def with_live_counts(deps: Deps, batch: BatchRecord) -> BatchRecord:
    """While chunks run, counts and usage are the sums of the per-chunk progress records."""
    if batch.status not in _LIVE_COUNT_STATUSES:
        return batch
    progress = deps.metadata.list_chunk_progress(batch.id)
    if not progress:
        return batch
    usage = Usage()
    for chunk in progress:
        usage = usage.add(chunk.usage)
    counts = RequestCounts(
        total=batch.request_counts.total,
        completed=sum(chunk.completed for chunk in progress),
        failed=sum(chunk.failed for chunk in progress),
    )
    return batch.model_copy(update={"request_counts": counts, "usage": usage})


def retrieve_batch(deps: Deps, project_id: str, batch_id: str) -> BatchRecord:
    batch = deps.metadata.get_batch(project_id, batch_id)
    if batch is None:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    return with_live_counts(deps, batch)


def list_batches(
    deps: Deps, project_id: str, *, after: str | None = None, limit: int = BATCH_LIST_DEFAULT_LIMIT
) -> tuple[list[BatchRecord], bool]:
    """Newest first, one page; the bool says whether more follow."""
    if not 1 <= limit <= BATCH_LIST_MAX_LIMIT:
        raise InvalidRequest(
            f"Invalid value for 'limit': {limit}. It must be between 1 and {BATCH_LIST_MAX_LIMIT}.",
            param="limit",
            code="invalid_value",
        )
    records = deps.metadata.list_batches(project_id, after=after, limit=limit + 1)
    return [with_live_counts(deps, batch) for batch in records[:limit]], len(records) > limit


def cancel_batch(deps: Deps, project_id: str, batch_id: str) -> BatchRecord:
    """validating|in_progress|finalizing -> cancelling; workers notice and finalize ends it `cancelled`."""
    for _ in range(_CANCEL_ATTEMPTS):
        batch = retrieve_batch(deps, project_id, batch_id)
        if batch.status in ("cancelling", "cancelled"):
            return batch
        if batch.status not in CANCELLABLE_STATUSES:
            raise Conflict(
                f"Cannot cancel a batch with status '{batch.status}'.", code="batch_not_cancellable"
            )
        try:
            cancelled = deps.metadata.update_batch(
                project_id,
                batch_id,
                {"status": "cancelling", "cancelling_at": deps.now()},
                expected_status=CANCELLABLE_STATUSES,
            )
        except ConditionFailed:
            continue  # the status moved under us: decide again from the new one
        return with_live_counts(deps, cancelled)
    raise ServerError(f"Could not cancel batch {batch_id}: its status kept changing. Please retry.")
