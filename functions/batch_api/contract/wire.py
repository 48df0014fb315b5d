"""The objects the API answers with, as the OpenAI API (and the `openai` SDK's types) shape them.

These models are the one home of the wire shapes: stored records turn themselves into them
(`to_wire()`), the API routes return them, and the served OpenAPI document is generated from them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

BatchStatus = Literal[
    "validating", "failed", "in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"
]
UploadStatus = Literal["pending", "completed", "cancelled", "expired"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- errors


class ErrorDetail(_Wire):
    message: str = Field(description="What went wrong, for people.")
    type: str = Field(description="The kind of error, e.g. `invalid_request_error`.")
    param: str | None = Field(description="The parameter the error is about, if any.")
    code: str | None = Field(description="A machine-readable code, if any.")


class ErrorEnvelope(_Wire):
    """Every non-2xx answer, whoever produces it (the API, the HTTP server, the gateway)."""

    error: ErrorDetail


# ---------------------------------------------------------------- files


class FileObject(_Wire):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    expires_at: int | None = Field(description="When the file stops being available (unix seconds).")
    filename: str
    purpose: str = Field(
        description="assistants, batch, fine-tune, vision, user_data, evals; batch_output for batch results."
    )
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None


class FileDeleted(_Wire):
    id: str
    object: Literal["file"] = "file"
    deleted: bool


class FileLink(_Wire):
    """Not in OpenAI's API: a signed link to a file's bytes, for clients that cannot follow the 302 of
    `GET /v1/files/{file_id}/content` themselves (a browser page whose policy keeps it on its origin
    navigates to the link instead)."""

    id: str = Field(description="The file's id.")
    object: Literal["file.link"] = "file.link"
    url: str = Field(description="A GET of this URL, with no credentials, downloads the file's bytes.")
    expires_at: int = Field(description="When the link stops working (unix seconds).")
    filename: str
    bytes: int


class FileList(_Wire):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---------------------------------------------------------------- uploads


class UploadObject(_Wire):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: UploadStatus
    file: FileObject | None = Field(description="The file made from the parts, once the upload is completed.")


class UploadPartObject(_Wire):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str


# ---------------------------------------------------------------- batches


class BatchError(_Wire):
    code: str
    message: str
    param: str | None = None
    line: int | None = Field(default=None, description="1-based line of the input file, where it applies.")


class BatchErrors(_Wire):
    object: Literal["list"] = "list"
    data: list[BatchError]


class BatchRequestCounts(_Wire):
    total: int
    completed: int
    failed: int


class InputTokensDetails(_Wire):
    cached_tokens: int


class OutputTokensDetails(_Wire):
    reasoning_tokens: int


class BatchUsage(_Wire):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class BatchObject(_Wire):
    id: str
    object: Literal["batch"] = "batch"
    endpoint: str
    model: str | None = Field(description="The one model the input file's requests name.")
    errors: BatchErrors | None
    input_file_id: str
    completion_window: str
    status: BatchStatus
    output_file_id: str | None
    error_file_id: str | None
    created_at: int
    in_progress_at: int | None
    expires_at: int
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    request_counts: BatchRequestCounts
    usage: BatchUsage
    metadata: dict[str, str] | None


class BatchList(_Wire):
    object: Literal["list"] = "list"
    data: list[BatchObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Health(_Wire):
    status: Literal["ok"] = "ok"
