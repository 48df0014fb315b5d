"""Step 1: validate the input file and plan its chunks, in one streaming pass.

The file is read with ranged reads, line by line; memory holds one read piece, one line, the set of
custom_ids seen and at most `max_batch_errors` error entries, whatever the file's size.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from batch_api import object_keys
from batch_api.contract import models
from batch_api.contract.errors import ConditionFailed
from batch_api.contract.models import (
    TERMINAL_STATUSES,
    BatchErrorEntry,
    BatchRecord,
    ChunkPlan,
    RequestCounts,
)
from batch_api.contract.steps import BatchRef, ValidateOutput, parse_step
from batch_api.deps import Deps
from batch_api.workflow.lines import split_lines
from batch_api.workflow.manifest import write_manifest
from batch_api.workflow.terminal import after_terminal, end_batch, get_batch

logger = logging.getLogger(__name__)

# How OpenAI names each endpoint in its messages ("Chat Completions: Streaming is not supported ...").
ENDPOINT_NAMES = {
    "/v1/chat/completions": "Chat Completions",
    "/v1/completions": "Completions",
    "/v1/embeddings": "Embeddings",
    "/v1/responses": "Responses",
    "/v1/moderations": "Moderations",
}

# The body field each endpoint cannot do without (besides `model`).
REQUIRED_BODY_FIELD = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/responses": "input",
    "/v1/moderations": "input",
}
REQUIRED_LINE_FIELDS = ("custom_id", "method", "url", "body")


def _limits() -> tuple[int, int, int]:
    # read at call time so tests can lower the limits without building 200 MB files
    return models.MAX_REQUESTS_PER_BATCH, models.MAX_BATCH_FILE_BYTES, models.MAX_EMBEDDING_INPUTS


def embedding_input_count(value: Any) -> int:
    """How many inputs an embeddings `input` holds: a string or one token array is one; a list of
    strings or of token arrays is one per element."""
    if isinstance(value, list):
        if value and all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return 1
        return len(value)
    return 1


@dataclass
class _Scan:
    """What one pass over the file finds: errors (capped), counts, and the chunk plan."""

    endpoint: str
    max_errors: int
    chunk_max_lines: int
    chunk_max_bytes: int
    max_embedding_inputs: int
    errors: list[BatchErrorEntry] = field(default_factory=list)
    error_count: int = 0
    requests: int = 0
    embedding_inputs: int = 0
    model: str | None = None
    model_line: int = 0
    first_line_of: dict[str, int] = field(default_factory=dict)
    chunks: list[ChunkPlan] = field(default_factory=list)
    chunk_start: int = 0
    chunk_first_line: int = 1
    chunk_lines: int = 0

    def error(self, code: str, message: str, *, param: str | None = None, line: int | None = None) -> None:
        self.error_count += 1
        if len(self.errors) < self.max_errors:
            self.errors.append(BatchErrorEntry(code=code, message=message, param=param, line=line))

    def plan(self, start: int, end: int, line_no: int) -> None:
        """Place one request line [start, end) in the current chunk, or close it and open a new one."""
        if self.chunk_lines and (
            self.chunk_lines >= self.chunk_max_lines or end - self.chunk_start > self.chunk_max_bytes
        ):
            self.close_chunk(start)
            self.chunk_start, self.chunk_first_line = start, line_no
        self.chunk_lines += 1

    def close_chunk(self, end: int) -> None:
        self.chunks.append(
            ChunkPlan(
                index=len(self.chunks),
                start=self.chunk_start,
                end=end,
                first_line=self.chunk_first_line,
                lines=self.chunk_lines,
            )
        )
        self.chunk_lines = 0

    def check_line(self, raw: bytes, line_no: int) -> None:
        """Check one non-blank line; every problem found becomes an error entry."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            self.error("invalid_json_line", "This line is not parseable as valid JSON.", line=line_no)
            return
        if not isinstance(obj, dict):
            self.error(
                "invalid_json_line",
                f"Line {line_no} is JSON but not an object; each line must be one request object.",
                line=line_no,
            )
            return
        missing = [name for name in REQUIRED_LINE_FIELDS if name not in obj]
        for name in missing:
            self._missing(name, line_no)
        if "custom_id" in obj:
            self._check_custom_id(obj["custom_id"], line_no)
        if "method" in obj and obj["method"] != "POST":
            self.error(
                "invalid_request",
                f"Line {line_no} has method {_show(obj['method'])}; only 'POST' is supported.",
                param="method",
                line=line_no,
            )
        if "url" in obj and obj["url"] != self.endpoint:
            self.error(
                "invalid_url",
                "The URL provided for this request does not match the batch endpoint.",
                param="url",
                line=line_no,
            )
        if "body" in obj:
            body = obj["body"]
            if isinstance(body, dict):
                self._check_body(body, line_no)
            else:
                self.error(
                    "invalid_request",
                    f"Line {line_no} has a 'body' that is not a JSON object.",
                    param="body",
                    line=line_no,
                )

    def _missing(self, param: str, line_no: int) -> None:
        self.error(
            "missing_required_parameter", f"Missing required parameter: '{param}'.", param=param, line=line_no
        )

    def _check_custom_id(self, custom_id: Any, line_no: int) -> None:
        if not isinstance(custom_id, str) or not custom_id:
            self.error(
                "invalid_request",
                f"Line {line_no} has custom_id {_show(custom_id)}; it must be a non-empty string.",
                param="custom_id",
                line=line_no,
            )
            return
        first = self.first_line_of.setdefault(custom_id, line_no)
        if first != line_no:
            self.error(
                "duplicate_custom_id",
                f"Line {line_no} repeats custom_id {_show(custom_id)}, already used on line {first}; "
                "custom_id must be unique within the file.",
                param="custom_id",
                line=line_no,
            )

    def _check_body(self, body: dict[str, Any], line_no: int) -> None:
        if body.get("stream") is True:
            self.error(
                "streaming_unsupported",
                f"{ENDPOINT_NAMES.get(self.endpoint, self.endpoint)}: Streaming is not supported in the Batch API.",
                param="body.stream",
                line=line_no,
            )
        model = body.get("model")
        if model is None:
            self._missing("body.model", line_no)
        elif not isinstance(model, str) or not model:
            self.error(
                "invalid_request",
                f"Line {line_no} has body.model {_show(model)}; it must be a non-empty string.",
                param="body.model",
                line=line_no,
            )
        elif self.model is None:
            self.model, self.model_line = model, line_no
        elif model != self.model:
            self.error(
                "mismatched_model",
                f"Line {line_no} uses model {_show(model)}, but line {self.model_line} uses "
                f"{_show(self.model)}; a batch file must use one model.",
                param="body.model",
                line=line_no,
            )
        required = REQUIRED_BODY_FIELD.get(self.endpoint)
        if required is not None and body.get(required) is None:
            self._missing(f"body.{required}", line_no)
        if self.endpoint == "/v1/embeddings" and body.get("input") is not None:
            before = self.embedding_inputs
            self.embedding_inputs += embedding_input_count(body["input"])
            if before <= self.max_embedding_inputs < self.embedding_inputs:
                self.error(
                    "too_many_embedding_inputs",
                    f"The embedding inputs add up to more than {self.max_embedding_inputs:,} by line "
                    f"{line_no}; split the file into smaller batches.",
                    line=line_no,
                )


def _show(value: Any) -> str:
    """A short printable form of a user's value for an error message."""
    text = orjson.dumps(value).decode() if not isinstance(value, str) else f"'{value}'"
    return text if len(text) <= 80 else text[:77] + "..."


def scan_file(deps: Deps, blob_key: str, endpoint: str) -> _Scan:
    """Read the file once: check every line and plan the chunks as we go."""
    max_requests, max_bytes, max_embedding_inputs = _limits()
    settings = deps.settings
    scan = _Scan(
        endpoint=endpoint,
        max_errors=settings.max_batch_errors,
        chunk_max_lines=settings.chunk_max_lines,
        chunk_max_bytes=settings.chunk_max_bytes,
        max_embedding_inputs=max_embedding_inputs,
    )
    size = deps.blobs.size(blob_key)
    if size > max_bytes:
        scan.error(
            "file_too_large",
            f"The input file is {size:,} bytes; a batch file may be at most {max_bytes:,} bytes.",
            param="input_file_id",
        )
        return scan
    line_no = 0
    end = 0
    for start, end, raw in split_lines(deps.blobs.iter_range(blob_key)):
        line_no += 1
        if not raw.strip():
            continue  # blank lines are allowed; they still count for line numbers
        scan.requests += 1
        if scan.requests == max_requests + 1:
            scan.error(
                "batch_too_large",
                f"Line {line_no} is request number {max_requests + 1:,}; a batch may hold at most "
                f"{max_requests:,} requests. Split the file into smaller batches.",
                line=line_no,
            )
        scan.plan(start, end, line_no)
        scan.check_line(raw, line_no)
    if scan.model is not None and deps.upstream_for(scan.model) is None:
        scan.error(  # OpenAI's words for a model it does not batch
            "model_not_found",
            f"The provided model '{scan.model}' is not supported by the Batch API.",
            param="body.model",
            line=scan.model_line,
        )
    if scan.requests == 0:
        scan.error("empty_file", "The input file has no requests.", param="input_file_id")
    elif scan.chunk_lines:
        scan.close_chunk(end)
    return scan


def validate_batch(event: BatchRef | Mapping[str, Any], deps: Deps) -> ValidateOutput:
    """Validate the batch's input file and plan its chunks. `next` says what comes next: "process"
    (with the manifest), "finalize" (cancelled meanwhile), or "done" (with the terminal status)."""
    step = parse_step(BatchRef, event)
    project_id, batch_id = step.project_id, step.batch_id
    batch = get_batch(deps, project_id, batch_id)
    if batch.is_terminal:
        after_terminal(deps, batch)  # a crash may have come between the terminal update and the clean-up
        return _outcome(batch)
    if not _needs_validation(batch):
        return _outcome(batch)

    # A batch keeps its input: the body stays, even if the file is deleted or expires, until the batch
    # ends. Only a delete that raced batches.create itself can have removed it.
    input_file = deps.metadata.get_file(project_id, batch.input_file_id)
    try:
        if input_file is None:
            raise KeyError  # no record reads like no body
        scan = scan_file(deps, input_file.blob_key, batch.endpoint)
    except KeyError:  # the blob store's "absent"
        return _fail(
            deps,
            batch,
            [
                BatchErrorEntry(
                    code="invalid_request",
                    message=f"The input file {batch.input_file_id} was deleted before the batch could read it.",
                    param="input_file_id",
                )
            ],
        )
    if scan.errors:
        logger.info(
            "batch %s failed validation: %d errors, %d kept in the batch",
            batch_id,
            scan.error_count,
            len(scan.errors),
        )
        return _fail(deps, batch, scan.errors)

    write_manifest(deps, batch_id, scan.chunks)
    planned = {
        "model": scan.model,
        "request_counts": RequestCounts(total=scan.requests),
        "chunk_count": len(scan.chunks),
    }
    try:
        batch = deps.metadata.update_batch(
            project_id,
            batch_id,
            {**planned, "status": "in_progress", "in_progress_at": deps.now()},
            expected_status={"validating"},
        )
    except ConditionFailed:
        batch = get_batch(deps, project_id, batch_id)
        if batch.status == "cancelling":
            # cancelled while we validated: finalize still needs the plan to write batch_cancelled lines
            batch = deps.metadata.update_batch(project_id, batch_id, planned, expected_status={"cancelling"})
    return _outcome(batch)


def _needs_validation(batch: BatchRecord) -> bool:
    if batch.status == "validating":
        return True
    # Cancelled during validation before the plan was recorded on the batch (a crash may have come after
    # the manifest was written but before the record was updated): finish the plan, so finalize can
    # account for every line. The record decides, not the manifest: a valid plan has at least one chunk.
    return batch.status == "cancelling" and batch.chunk_count == 0


def _fail(deps: Deps, batch: BatchRecord, errors: list[BatchErrorEntry]) -> ValidateOutput:
    """End the batch `failed` with `errors`, or `cancelled` with them if the user cancelled it while it
    validated (it answered `cancelling`, so it ends `cancelled`)."""
    entries = [e.model_dump() for e in errors]

    def decide(current: BatchRecord) -> dict[str, Any]:
        if current.status == "cancelling":
            return {"status": "cancelled", "cancelled_at": deps.now(), "errors": entries}
        if current.status != "validating":  # planned meanwhile by another run: not ours to end
            raise _Planned()
        return {"status": "failed", "failed_at": deps.now(), "errors": entries}

    try:
        return _outcome(end_batch(deps, batch.project_id, batch.id, decide))
    except _Planned:
        return _outcome(get_batch(deps, batch.project_id, batch.id))


class _Planned(Exception):
    """Another run of validate planned the batch while this one found it invalid."""


def _outcome(batch: BatchRecord) -> ValidateOutput:
    """The step's answer, derived from the stored record so a re-run answers the same."""
    ids = {"project_id": batch.project_id, "batch_id": batch.id}
    if batch.status in TERMINAL_STATUSES:
        return ValidateOutput(**ids, next="done", status=batch.status)
    return ValidateOutput(
        **ids,
        next="process" if batch.status == "in_progress" else "finalize",
        manifest_key=object_keys.manifest_key(batch.id),
        chunk_count=batch.chunk_count,
    )
