"""Pydantic models of the OpenAI Files, Uploads and Batches contract, and our stored records.

A stored record is the wire object plus the fields we keep for ourselves (the owning project, the
blob key, ...). `to_wire()` gives exactly what the OpenAI API would return (`contract/wire.py`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from batch_api.contract import wire

ENDPOINTS = ("/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations")
Endpoint = Literal[
    "/v1/responses", "/v1/chat/completions", "/v1/embeddings", "/v1/completions", "/v1/moderations"
]

BatchStatus = wire.BatchStatus
TERMINAL_STATUSES: frozenset[str] = frozenset({"failed", "completed", "expired", "cancelled"})
ACTIVE_STATUSES: frozenset[str] = frozenset({"validating", "in_progress", "finalizing", "cancelling"})
CANCELLABLE_STATUSES: frozenset[str] = frozenset({"validating", "in_progress", "finalizing"})

FilePurpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals", "batch_output"]
UPLOADABLE_PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")

# The MIME types an upload may declare, per purpose. JSON Lines has no single registered type, so the
# names tools use for it are all accepted; purposes missing here (assistants, user_data) take any type.
JSONL_MIME_TYPES = (
    "application/jsonl",
    "application/x-jsonl",
    "application/jsonlines",
    "application/x-jsonlines",
    "application/ndjson",
    "application/x-ndjson",
    "application/json",
    "text/jsonl",
    "text/plain",
)
IMAGE_MIME_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
MIME_TYPES_BY_PURPOSE: dict[str, tuple[str, ...]] = {
    "batch": JSONL_MIME_TYPES,
    "fine-tune": JSONL_MIME_TYPES,
    "evals": JSONL_MIME_TYPES,
    "vision": IMAGE_MIME_TYPES,
}

BATCH_INPUT_DEFAULT_TTL = 30 * 86400
OUTPUT_DEFAULT_TTL = 30 * 86400
OUTPUT_EXPIRES_MIN = 3600
OUTPUT_EXPIRES_MAX = 30 * 86400
UPLOAD_TTL = 3600
IDEMPOTENCY_KEY_TTL = 86400  # an Idempotency-Key binds to its batch for 24 h, as Stripe's keys do

MAX_REQUESTS_PER_BATCH = 50_000
MAX_BATCH_FILE_BYTES = 200 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 50_000
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=False)


# ---------------------------------------------------------------- files


class FileRecord(_Record):
    id: str
    project_id: str
    bytes: int
    created_at: int
    expires_at: int | None = None
    filename: str
    purpose: str
    blob_key: str
    deleted: bool = False

    def to_wire(self) -> wire.FileObject:
        return wire.FileObject(
            id=self.id,
            bytes=self.bytes,
            created_at=self.created_at,
            expires_at=self.expires_at,
            filename=self.filename,
            purpose=self.purpose,
        )

    def is_live(self, now: int) -> bool:
        return not self.deleted and (self.expires_at is None or self.expires_at > now)


# ---------------------------------------------------------------- uploads

UploadStatus = wire.UploadStatus


class UploadPartRecord(_Record):
    id: str
    upload_id: str
    created_at: int
    bytes: int
    blob_key: str

    def to_wire(self) -> wire.UploadPartObject:
        return wire.UploadPartObject(id=self.id, created_at=self.created_at, upload_id=self.upload_id)


class UploadRecord(_Record):
    id: str
    project_id: str
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    mime_type: str
    status: UploadStatus = "pending"
    file_id: str | None = None
    file_expires_after_seconds: int | None = None

    def to_wire(self, file: FileRecord | None = None) -> wire.UploadObject:
        return wire.UploadObject(
            id=self.id,
            bytes=self.bytes,
            created_at=self.created_at,
            expires_at=self.expires_at,
            filename=self.filename,
            purpose=self.purpose,
            status=self.status,
            file=file.to_wire() if file is not None else None,
        )


# ---------------------------------------------------------------- batches


class BatchErrorEntry(BaseModel):
    code: str
    message: str
    param: str | None = None
    line: int | None = None


class RequestCounts(BaseModel):
    total: int = 0
    completed: int = 0
    failed: int = 0


class Usage(BaseModel):
    input_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0

    def add(self, other: Usage) -> Usage:
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
            total_tokens=self.total_tokens + other.total_tokens,
        )

    def to_wire(self) -> wire.BatchUsage:
        return wire.BatchUsage(
            input_tokens=self.input_tokens,
            input_tokens_details=wire.InputTokensDetails(cached_tokens=self.cached_tokens),
            output_tokens=self.output_tokens,
            output_tokens_details=wire.OutputTokensDetails(reasoning_tokens=self.reasoning_tokens),
            total_tokens=self.total_tokens,
        )


class BatchRecord(_Record):
    id: str
    project_id: str
    endpoint: str
    model: str | None = None
    errors: list[BatchErrorEntry] = Field(default_factory=list)
    input_file_id: str
    completion_window: str = "24h"
    status: BatchStatus = "validating"
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int
    in_progress_at: int | None = None
    expires_at: int
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    request_counts: RequestCounts = Field(default_factory=RequestCounts)
    usage: Usage = Field(default_factory=Usage)
    metadata: dict[str, str] | None = None
    output_expires_after_seconds: int = OUTPUT_DEFAULT_TTL
    chunk_count: int = 0
    # terminal, but its event not yet published (`workflow/terminal.py`)
    event_pending: bool = False

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_wire(self) -> wire.BatchObject:
        return wire.BatchObject(
            id=self.id,
            endpoint=self.endpoint,
            model=self.model,
            errors=(
                wire.BatchErrors(data=[wire.BatchError(**e.model_dump()) for e in self.errors])
                if self.errors
                else None
            ),
            input_file_id=self.input_file_id,
            completion_window=self.completion_window,
            status=self.status,
            output_file_id=self.output_file_id,
            error_file_id=self.error_file_id,
            created_at=self.created_at,
            in_progress_at=self.in_progress_at,
            expires_at=self.expires_at,
            finalizing_at=self.finalizing_at,
            completed_at=self.completed_at,
            failed_at=self.failed_at,
            expired_at=self.expired_at,
            cancelling_at=self.cancelling_at,
            cancelled_at=self.cancelled_at,
            request_counts=wire.BatchRequestCounts(**self.request_counts.model_dump()),
            usage=self.usage.to_wire(),
            metadata=self.metadata,
        )

    def event_detail(self) -> dict[str, Any]:
        """The batch as terminal events carry it: the wire object and its project."""
        return {**self.to_wire().model_dump(), "project_id": self.project_id}


class ChunkProgress(BaseModel):
    """What one chunk has finished so far. Written whole (overwrite), so a retried chunk never double-counts."""

    index: int
    completed: int = 0
    failed: int = 0
    usage: Usage = Field(default_factory=Usage)
    done: bool = False


class ChunkPlan(BaseModel):
    """One entry of `batches/{id}/manifest.json`: a byte range of the input file and its lines."""

    index: int
    start: int
    end: int
    first_line: int
    lines: int
