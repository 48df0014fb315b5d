"""The ports: small Protocols the service layer and the workflow steps depend on.

Adapters live in `adapters/local` (SQLite, a data directory, an in-process runner) and
`adapters/aws` (DynamoDB, S3, Step Functions, EventBridge). Only adapters touch storage SDKs.
Every method is synchronous; the async upstream client is the one exception.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from batch_api.contract.models import BatchRecord, ChunkProgress, FileRecord, UploadPartRecord, UploadRecord


class MetadataStore(Protocol):
    """Records scoped by project. Conditional writes raise `ConditionFailed` / `AlreadyExists`."""

    # files
    def create_file(self, record: FileRecord) -> None:
        """Insert; `AlreadyExists` if the id is taken (same id twice is how finalize stays idempotent)."""

    def get_file(self, project_id: str, file_id: str) -> FileRecord | None:
        """The record, including deleted/expired ones; callers decide liveness."""

    def list_files(
        self, project_id: str, *, purpose: str | None, order: str, after: str | None, limit: int, now: int
    ) -> list[FileRecord]:
        """Live files (not deleted, not expired at `now`) ordered by (created_at, id) `order`,
        strictly after the file `after` in that order, at most `limit` of them."""

    def mark_file_deleted(self, project_id: str, file_id: str) -> bool:
        """Return False when there was no live record to delete."""

    def list_expired_files(self, now: int, limit: int) -> list[FileRecord]:
        """Files (any project) not yet deleted whose expires_at <= now."""

    # uploads
    def create_upload(self, record: UploadRecord) -> None: ...

    def get_upload(self, project_id: str, upload_id: str) -> UploadRecord | None: ...

    def update_upload(
        self, project_id: str, upload_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> UploadRecord:
        """Apply `changes` only if the status is one of `expected_status`; else `ConditionFailed`."""

    def add_upload_part(self, part: UploadPartRecord) -> None: ...

    def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]: ...

    def list_expired_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        """Uploads (any project) still `pending` whose expires_at <= now, ordered by (expires_at, id),
        at most `limit` of them."""

    # batches
    def create_batch(self, record: BatchRecord) -> None:
        """Insert; `AlreadyExists` if the id is taken. A batch not created terminal holds its input file
        (`input_holders`) until an `update_batch` gives it a terminal status."""

    def get_batch(self, project_id: str, batch_id: str) -> BatchRecord | None: ...

    def list_batches(self, project_id: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        """Newest first by (created_at, id); strictly after the batch `after` in that order."""

    def update_batch(
        self, project_id: str, batch_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> BatchRecord:
        """Apply `changes` (field -> new value, pydantic values as dicts or models) if the status is
        one of `expected_status`; return the new record; else `ConditionFailed`."""

    def input_holders(self, project_id: str, file_id: str) -> list[str]:
        """Ids, sorted, of the batches of `project_id` that read `file_id` as input and have not ended:
        found by (project, file) alone, however many batches run. Kept in step with each batch's
        status by `create_batch` and `update_batch`, as seen by a read after either returns."""

    def list_active_batches(self) -> list[BatchRecord]:
        """Every batch (any project) whose status is not terminal: what a restart must resume."""

    def list_unannounced_batches(self) -> list[BatchRecord]:
        """Every terminal batch (any project) still marked `event_pending`: its event was not published."""

    def put_chunk_progress(self, batch_id: str, progress: ChunkProgress) -> None:
        """Overwrite the progress of one chunk."""

    def list_chunk_progress(self, batch_id: str) -> list[ChunkProgress]: ...

    def delete_chunk_progress(self, batch_id: str) -> None:
        """Remove every chunk progress record of the batch (none is fine)."""

    # idempotency keys
    def claim_idempotency_key(self, project_id: str, key: str, resource_id: str, created_at: int) -> str:
        """Record key -> resource_id, expiring `IDEMPOTENCY_KEY_TTL` after `created_at`, if the key has no
        record or only an expired one (its expiry <= `created_at`, the time of this claim); return the
        resource id stored for the key either way."""

    def purge_expired_idempotency_keys(self, now: int) -> int:
        """Remove key records whose expiry <= now; return how many this call removed. A store that
        expires records by itself (DynamoDB TTL) may leave them to that and return 0: an expired
        record is treated as absent either way."""


class BlobStore(Protocol):
    """File bodies by key (`files/{id}`, `uploads/{id}/parts/{part}`, `batches/{id}/...`)."""

    def put(self, key: str, data: bytes) -> None:
        """Write whole, atomically: readers see the old object or the new one, never a part."""

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """Write whole from an iterable without holding it in memory; atomic; return the size."""

    def concatenate(
        self,
        key: str,
        sources: Sequence[tuple[str, int]],
        *,
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> int:
        """Write the objects named by `sources` ((key, size) pairs), in order, as one object at `key`;
        atomic; return the size. `on_bytes`, when given, sees every byte in order; without it the
        store may assemble the object without reading it (S3: `UploadPartCopy`). `KeyError` if a
        source is absent (and nothing is written)."""

    def get(self, key: str) -> bytes: ...

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        """Stream bytes [start, end) (end None: to the end). `KeyError` if absent."""

    def size(self, key: str) -> int:
        """`KeyError` if absent."""

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None:
        """Absent is fine."""

    def delete_prefix(self, prefix: str) -> None: ...

    def list_keys(self, prefix: str) -> list[str]:
        """Keys under prefix, sorted."""

    def set_expiry(self, key: str, expires_at: int) -> None:
        """Hint the store to delete the object after `expires_at` (S3: lifecycle tag; local: no-op,
        the sweep removes expired files)."""

    def clear_expiry(self, key: str) -> None:
        """Take back `set_expiry`: the store keeps the object until told again (a batch reads it);
        a missing object is left alone."""

    def download_url(self, key: str, *, filename: str, expires_in: int) -> str | None:
        """A URL a client can GET the bytes from (S3 presigned, local signed link), or None."""


class ResultJournal(Protocol):
    """Append-only result lines per (batch, chunk), so finished requests survive a crash.

    Lines are the final output/error JSONL lines (bytes ending in b"\\n"). A torn last line
    (crash mid-write) is dropped on read.
    """

    def append(self, batch_id: str, chunk_index: int, lines: list[bytes]) -> None: ...

    def read(self, batch_id: str, chunk_index: int) -> Iterator[bytes]: ...

    def delete_batch(self, batch_id: str) -> None: ...


class Workflow(Protocol):
    def start(self, project_id: str, batch_id: str) -> None:
        """Start processing; starting the same batch twice is harmless."""


class EventSink(Protocol):
    def publish(self, detail_type: str, detail: Mapping[str, Any]) -> None: ...


@dataclass(frozen=True)
class UpstreamResponse:
    """What came back for one request: an HTTP answer (status_code set) or a transport failure (error set)."""

    status_code: int | None
    body: Any = None  # parsed JSON when status_code is set
    request_id: str | None = None
    error_code: str | None = None
    error_message: str | None = None
    attempts: int = 1
    headers: Mapping[str, str] = field(default_factory=dict)


# the detail of a request that was still out at its deadline (`Upstream.send`)
DEADLINE_PASSED = "no complete answer in the time the worker had left"


class Upstream(Protocol):
    """An OpenAI-compatible model endpoint. Async: one client serves many requests in flight."""

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        """POST `body` (the input line's body, unchanged) to `endpoint` (e.g. "/v1/chat/completions"),
        with retries; never raises for upstream or transport failures. `deadline` (a `time.monotonic()`
        value, None: none) is when the caller must have its answer: no attempt runs past it and no
        retry starts that would; when it passes, the request ends as an `upstream_timeout` failure."""

    async def aclose(self) -> None: ...


class UpstreamFactory(Protocol):
    def __call__(
        self, *, model: str | None = None, batch_id: str | None = None, rate_share: float = 1.0
    ) -> Upstream:
        """A fresh client bound to the running event loop, for requests of `batch_id` to `model` (the
        upstream serving that model; the batch shares its capacity fairly with the others), using
        `rate_share` of the upstream's requests and tokens per minute (its worker's share on AWS)."""


@dataclass(frozen=True)
class BedrockAnswer:
    """What a bedrock-runtime call returned: the parsed body (Converse's output, or InvokeModel's JSON
    body), Bedrock's request id and the HTTP headers (InvokeModel reports token counts in them)."""

    body: dict[str, Any]
    request_id: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)


class BedrockCallError(Exception):
    """A bedrock-runtime call that failed, as the adapter translates botocore's exceptions.

    `status` is the HTTP status Bedrock answered (its error code's: ThrottlingException 429,
    ValidationException 400, ...); None when no answer came (`code` then is one of the upstream
    client's transport codes, e.g. `upstream_timeout`, and `retryable` says whether to try again)."""

    def __init__(
        self,
        code: str,
        message: str,
        status: int | None,
        *,
        request_id: str | None = None,
        retryable: bool = False,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.request_id = request_id
        self.retryable = retryable


class BedrockRuntime(Protocol):
    """Amazon Bedrock's runtime API, as the Bedrock upstream needs it. Synchronous (the AWS SDK is):
    the upstream runs each call on a thread of its own. Raises `BedrockCallError`, nothing else."""

    def converse(self, request: Mapping[str, Any]) -> BedrockAnswer:
        """Converse with `request` as the API takes it (modelId, messages, system, ...)."""

    def invoke_model(self, model_id: str, body: bytes) -> BedrockAnswer:
        """InvokeModel with a JSON `body`; the answer's body is the model's JSON answer."""


class BedrockRuntimeFactory(Protocol):
    def region(self, region: str | None) -> str:
        """The region a client for `region` (None: the process's own, from the AWS configuration)
        calls; `ValueError` when none is configured."""

    def __call__(self, region: str, max_connections: int) -> BedrockRuntime:
        """A client for `region` holding at most `max_connections` connections (thread-safe; may be
        shared with other callers asking for the same region)."""


class UpstreamRoute(Protocol):
    """The upstream a batch's model is routed to, as the capacity leases need it."""

    @property
    def name(self) -> str: ...

    @property
    def max_in_flight(self) -> int: ...


@dataclass(frozen=True)
class Grant:
    """What a worker got of an upstream's capacity, and the upstream's state right after (metrics)."""

    slots: int  # 0: none free, the batch now counts as waiting
    held: int  # slots held by live leases on the upstream, this grant included
    waiting: int  # batches waiting for slots, this one included when it got none


class CapacityLeases(Protocol):
    """Slots of an upstream's capacity shared by workers in several processes (`upstreams/leases.py`
    decides how many a worker gets). A lease expires unless renewed, so a dead worker's come back."""

    def acquire(self, upstream: str, holder: str, batch_id: str, want: int, limit: int) -> Grant:
        """Grant `holder` (one chunk invocation of `batch_id`) up to `want` slots of `upstream`, never
        letting the live leases pass `limit`; 0 slots when none is free (the batch then counts as
        waiting)."""

    def renew(self, upstream: str, holder: str) -> None:
        """Push the holder's lease expiry on (while it works)."""

    def release(self, upstream: str, holder: str) -> None:
        """Give the holder's slots back."""


class Clock(Protocol):
    def __call__(self) -> float:
        """Unix time in seconds."""


@dataclass(frozen=True)
class WebhookDelivery:
    """One (event, endpoint) delivery in the outbox. `body` is the event as every attempt sends it."""

    event_id: str
    endpoint: str  # the endpoint's name (`WebhookEndpoint.key`)
    project_id: str
    url: str
    body: bytes
    first_at: float  # when it was enqueued: the 72-hour window starts here
    next_at: float  # when the next attempt is due
    attempts: int = 0
    state: str = "pending"  # pending | delivered | gave_up
    last_error: str | None = None


class WebhookOutbox(Protocol):
    """Durable webhook deliveries (the local server's; on AWS the SQS queue plays this role)."""

    def enqueue(self, deliveries: Sequence[WebhookDelivery]) -> int:
        """Add each delivery unless one for the same (event, endpoint) exists; return how many were new."""

    def due(self, now: float, limit: int) -> list[WebhookDelivery]:
        """Pending deliveries whose next attempt is due at `now`, soonest first."""

    def next_due_at(self) -> float | None:
        """When the soonest pending delivery is due; None when none is pending."""

    def record(self, delivery: WebhookDelivery) -> None:
        """Store the delivery's new state, attempts, next_at and last error."""

    def list_deliveries(self, event_id: str | None = None) -> list[WebhookDelivery]: ...

    def purge(self, now: float) -> int:
        """Remove deliveries that ended (delivered, given up) long enough before `now`; return how many."""
