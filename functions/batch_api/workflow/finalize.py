"""Step 3: finalize a batch (output and error files, counts, terminal status), and the catch-all fail.

Idempotent at every point: file ids are deterministic and a file whose record exists is not written
again; the terminal status is committed by `workflow/terminal.end_batch` (conditional on the status it
was decided from, then announced and cleaned up), and a batch already terminal is only cleaned up.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from batch_api import object_keys
from batch_api.contract.errors import AlreadyExists, ConditionFailed
from batch_api.contract.ids import output_file_id
from batch_api.contract.models import (
    BatchErrorEntry,
    BatchRecord,
    ChunkPlan,
    FileRecord,
    RequestCounts,
    Usage,
)
from batch_api.contract.steps import BatchRef, FailInput, FinalizeOutput, StepError, parse_step
from batch_api.deps import Deps
from batch_api.workflow.lines import never_ran_line, parse_line, split_lines
from batch_api.workflow.manifest import load_manifest
from batch_api.workflow.tally import FAILURE, SUCCESS, ChunkTally, read_tally
from batch_api.workflow.terminal import after_terminal, end_batch, get_batch

logger = logging.getLogger(__name__)

WRITE_PIECE_BYTES = 1 << 20  # lines are handed to write_stream in pieces of about this size

NEVER_RAN_MESSAGES = {
    "batch_cancelled": "The batch was cancelled before this request ran.",
    "batch_expired": "The batch expired (its completion window ended) before this request ran.",
}


class FinalizeError(RuntimeError):
    """The batch is in a state finalize cannot make sense of: a bug in the caller or a step."""


def finalize_batch(event: BatchRef | Mapping[str, Any], deps: Deps) -> FinalizeOutput:
    """Write the output/error files and set the terminal status: `cancelled` whenever the batch is
    `cancelling` when the status is committed, even if every request had finished."""
    step = parse_step(BatchRef, event)
    project_id, batch_id = step.project_id, step.batch_id
    ids = {"project_id": project_id, "batch_id": batch_id}
    batch = get_batch(deps, project_id, batch_id)
    if batch.status == "in_progress":
        try:
            batch = deps.metadata.update_batch(
                project_id,
                batch_id,
                {"status": "finalizing", "finalizing_at": deps.now()},
                expected_status={"in_progress"},
            )
        except ConditionFailed:  # the user cancelled (or another run moved on) meanwhile
            batch = get_batch(deps, project_id, batch_id)
    if batch.is_terminal:
        after_terminal(deps, batch)  # a crash may have come between the terminal update and the clean-up
        return FinalizeOutput(**ids, status=batch.status)
    final = end_batch(deps, project_id, batch_id, lambda current: _results(deps, current))
    logger.info(
        "batch %s %s: %d completed, %d failed",
        batch_id,
        final.status,
        final.request_counts.completed,
        final.request_counts.failed,
    )
    return FinalizeOutput(**ids, status=final.status)


def _results(deps: Deps, batch: BatchRecord) -> dict[str, Any]:
    """Write the output and error files of a `finalizing` or `cancelling` batch; return the terminal
    changes (status, files, counts, usage)."""
    if batch.status not in ("finalizing", "cancelling"):
        raise FinalizeError(f"batch {batch.id} cannot be finalized from status {batch.status!r}")
    now = deps.now()
    chunks = _chunks(deps, batch, batch.status == "cancelling")
    tallies = [read_tally(deps, batch.id, chunk.index, batch.endpoint) for chunk in chunks]
    never_ran = sum(
        max(0, chunk.lines - len(tally.done_ids)) for chunk, tally in zip(chunks, tallies, strict=True)
    )
    never_ran_code, errors = _why_never_ran(deps, batch, never_ran, now)
    completed = sum(t.completed for t in tallies)
    failed = sum(t.failed for t in tallies) + never_ran
    usage = Usage()
    for tally in tallies:
        usage = usage.add(tally.usage)

    output_lines = _journal_lines(deps, batch.id, chunks, tallies, SUCCESS)
    error_lines = _error_lines(deps, batch, chunks, tallies, never_ran_code)
    status = (
        "cancelled"
        if batch.status == "cancelling"
        else "expired"
        if never_ran_code == "batch_expired"
        else "completed"
    )
    changes: dict[str, Any] = {
        "status": status,
        f"{status}_at": now,
        "output_file_id": _write_file(deps, batch, "output", _coalesce(output_lines), now)
        if completed
        else None,
        "error_file_id": _write_file(deps, batch, "error", _coalesce(error_lines), now) if failed else None,
        "request_counts": RequestCounts(total=batch.request_counts.total, completed=completed, failed=failed),
        "usage": usage,
    }
    if errors:
        changes["errors"] = [e.model_dump() for e in [*batch.errors, *errors]]
    return changes


def _why_never_ran(
    deps: Deps, batch: BatchRecord, never_ran: int, now: int
) -> tuple[str | None, list[BatchErrorEntry]]:
    """The error code of the lines for requests that never ran (`batch_cancelled`, `batch_expired`),
    and an entry for `errors` when they cannot get lines (their input is gone)."""
    if not never_ran:
        return None, []
    if batch.status == "cancelling":
        return "batch_cancelled", []
    if now >= batch.expires_at:
        return "batch_expired", []
    if _input_blob_key(deps, batch) is None:
        # process stopped because the input body is gone (it should be kept while the batch runs, so this
        # is a defence): keep what finished, count the unreadable rest as failed
        logger.warning(
            "batch %s: the input file's body is gone; %d requests that never ran are counted failed "
            "without error lines",
            batch.id,
            never_ran,
        )
        entry = BatchErrorEntry(
            code="input_file_missing",
            message=f"The body of input file {batch.input_file_id} was gone before {never_ran} "
            "requests could run; they are counted as failed and have no lines in the error file.",
            param="input_file_id",
        )
        return None, [entry]
    raise FinalizeError(
        f"batch {batch.id}: {never_ran} requests never ran, but the batch is neither cancelled nor expired"
    )


def fail_batch(event: FailInput | Mapping[str, Any], deps: Deps) -> FinalizeOutput:
    """End a batch after a step failed unexpectedly, with `error`. It ends `failed` with that error, or
    `cancelled` (the error kept in `errors`) if it was being cancelled. A batch already terminal is left
    as it is; no output is written from the journals.
    """
    step = parse_step(FailInput, event)
    project_id, batch_id = step.project_id, step.batch_id
    ids = {"project_id": project_id, "batch_id": batch_id}
    if deps.metadata.get_batch(project_id, batch_id) is None:
        return FinalizeOutput(**ids, status=None)
    error = step.error or StepError()
    entry = BatchErrorEntry(
        code=error.code or "internal_error",
        message=error.message or "The batch failed because of an internal error.",
    ).model_dump()

    def decide(current: BatchRecord) -> dict[str, Any]:
        if current.status == "cancelling":  # it answered `cancelling`: it ends `cancelled`
            return {
                "status": "cancelled",
                "cancelled_at": deps.now(),
                "errors": [*(e.model_dump() for e in current.errors), entry],
            }
        return {"status": "failed", "failed_at": deps.now(), "errors": [entry]}

    final = end_batch(deps, project_id, batch_id, decide)
    return FinalizeOutput(**ids, status=final.status)


# ---------------------------------------------------------------- helpers


def _chunks(deps: Deps, batch: BatchRecord, cancelling: bool) -> list[ChunkPlan]:
    try:
        return load_manifest(deps, batch.id)
    except KeyError:
        if cancelling:  # cancelled before any plan existed: there is nothing to account for
            return []
        raise


def _journal_lines(
    deps: Deps, batch_id: str, chunks: list[ChunkPlan], tallies: list[ChunkTally], kind: int
) -> Iterator[bytes]:
    """The journal lines of every chunk of one kind (SUCCESS or FAILURE), each custom_id once: the
    lines the tallies counted, sorted by the kinds they noted (no line is parsed again)."""
    for chunk, tally in zip(chunks, tallies, strict=True):
        kinds = tally.line_kinds
        for position, line in enumerate(deps.journal.read(batch_id, chunk.index)):
            if position >= len(kinds):
                break  # appended after the count (a straggler): not counted, so not written either
            if kinds[position] == kind:
                yield line


def _error_lines(
    deps: Deps, batch: BatchRecord, chunks: list[ChunkPlan], tallies: list[ChunkTally], code: str | None
) -> Iterator[bytes]:
    yield from _journal_lines(deps, batch.id, chunks, tallies, FAILURE)
    if code is None:
        return
    blob_key = _input_blob_key(deps, batch)
    if blob_key is None:
        logger.warning(
            "batch %s: the input file is gone, so never-ran requests are counted as failed without lines",
            batch.id,
        )
        return
    message = NEVER_RAN_MESSAGES[code]
    for chunk, tally in zip(chunks, tallies, strict=True):
        if len(tally.done_ids) >= chunk.lines:
            continue
        for _start, _end, raw in split_lines(deps.blobs.iter_range(blob_key, chunk.start, chunk.end)):
            if not raw.strip():
                continue
            custom_id = parse_line(raw)["custom_id"]
            if custom_id not in tally.done_ids:
                yield never_ran_line(batch.id, custom_id, code, message)


def _input_blob_key(deps: Deps, batch: BatchRecord) -> str | None:
    record = deps.metadata.get_file(batch.project_id, batch.input_file_id)
    if record is None or not deps.blobs.exists(record.blob_key):
        return None
    return record.blob_key


def _coalesce(lines: Iterable[bytes], size: int = WRITE_PIECE_BYTES) -> Iterator[bytes]:
    """Group lines into pieces of about `size` bytes: fewer, larger writes to the blob store."""
    piece: list[bytes] = []
    length = 0
    for line in lines:
        piece.append(line)
        length += len(line)
        if length >= size:
            yield b"".join(piece)
            piece, length = [], 0
    if piece:
        yield b"".join(piece)


def _write_file(deps: Deps, batch: BatchRecord, kind: str, pieces: Iterable[bytes], now: int) -> str | None:
    """Write the batch's output or error file once and register it; a re-run finds the record and skips.
    None when there is nothing to write (failures with no line: their input could not be read).

    The blob's expiry (on S3 the tag the lifecycle rules match) is set before the record is created and
    again when a re-run finds the record, so a crash or a tagging error in between cannot leave an
    output file that is never deleted. Setting it twice is harmless.
    """
    file_id = output_file_id(batch.id, kind)
    blob_key = object_keys.file_key(file_id)
    existing = deps.metadata.get_file(batch.project_id, file_id)
    if existing is not None:  # the record is created after the body is whole, so the body is there
        if existing.expires_at is not None and not existing.deleted:
            deps.blobs.set_expiry(existing.blob_key, existing.expires_at)
        return file_id
    pieces = iter(pieces)
    first = next(pieces, None)
    if first is None:
        return None
    size = deps.blobs.write_stream(blob_key, itertools.chain((first,), pieces))
    expires_at = now + batch.output_expires_after_seconds
    deps.blobs.set_expiry(blob_key, expires_at)
    record = FileRecord(
        id=file_id,
        project_id=batch.project_id,
        bytes=size,
        created_at=now,
        expires_at=expires_at,
        filename=f"{batch.id}_{kind}.jsonl",
        purpose="batch_output",
        blob_key=blob_key,
    )
    with contextlib.suppress(AlreadyExists):  # a concurrent run registered it first; the bodies are the same
        deps.metadata.create_file(record)
    return file_id
