"""One Lambda handler per workflow step: parse the state's input, call the step, return its output.

The steps are the ones the local runner calls (`workflow/validate.py`, `process.py`, `finalize.py`);
the state machine supplies what the runner does in-process: ordering, the chunk fan-out, the
process loop until a chunk is done, retries, and the catch that ends a batch failed. Deps are built
once per container, on the first invocation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import replace
from functools import cache
from typing import Any

import orjson
from aws_lambda_powertools.utilities.parser import parse
from aws_lambda_powertools.utilities.typing import LambdaContext

from batch_api.bootstrap_aws import build_aws_deps
from batch_api.config import Settings
from batch_api.contract.steps import (
    BatchRef,
    CatchFailure,
    FailInput,
    HousekeepingOutput,
    ProcessInput,
    StepError,
)
from batch_api.deps import Deps
from batch_api.handlers.observability import (
    LambdaMetrics,
    in_lambda,
    logger,
    metrics,
    route_library_logs,
    tracer,
)
from batch_api.service.housekeeping import sweep
from batch_api.upstreams import loops
from batch_api.upstreams.metered import MeteredLeases, metered
from batch_api.workflow.finalize import fail_batch, finalize_batch
from batch_api.workflow.process import process_chunk
from batch_api.workflow.validate import validate_batch

FAIL_MESSAGE_MAX_CHARS = 1000  # a Cause can be a 32 KB stack trace; the batch keeps a readable summary

StepHandler = Callable[[dict[str, Any], LambdaContext], dict[str, Any]]


class StepsDoNotStartBatches:
    """The Workflow port for the step functions: only the API starts executions."""

    def start(self, project_id: str, batch_id: str) -> None:
        raise RuntimeError("workflow step functions do not start batches; the API does")


@cache
def get_deps() -> Deps:
    """The container's Deps, built on the first invocation (settings of the aws backend: a missing
    resource name fails with its name) and kept; upstream clients report request metrics."""
    built = build_aws_deps(Settings(backend="aws"), workflow=StepsDoNotStartBatches(), shared_capacity=True)
    route_library_logs()
    sink = LambdaMetrics(metrics)
    leases = MeteredLeases(built.leases, sink) if built.leases is not None else None
    return replace(built, upstream_factory=metered(built.upstream_factory, sink), leases=leases)


def step_handler(fn: StepHandler) -> StepHandler:
    """The decorator stack every step shares: logger context (correlation id = the batch id),
    metrics flush, tracer."""
    decorated = tracer.capture_lambda_handler(fn)
    decorated = metrics.log_metrics(capture_cold_start_metric=True)(decorated)
    wrapped: StepHandler = logger.inject_lambda_context(correlation_id_path="batch_id", clear_state=True)(
        decorated
    )
    return wrapped


@step_handler
def validate_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """`BatchRef` -> `ValidateOutput`"""
    result = validate_batch(parse(event=event, model=BatchRef), get_deps())
    logger.info("validated", extra={"next": result.next, "chunk_count": result.chunk_count})
    return result.state()


@step_handler
def process_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """`ProcessInput` -> `ProcessOutput`; the state machine calls again while `done` is false (the
    chunk's journal is the cursor)."""
    step = parse(event=event, model=ProcessInput)
    logger.append_keys(chunk_index=step.chunk.index)
    if in_lambda():
        # a warm container runs chunk after chunk: keep the loop, so upstream connections (and their
        # TLS handshakes) carry over to the next invocation; the runtime freezes or ends the process
        loops.keep_loop()
    result = process_chunk(step, get_deps(), time_left=lambda: context.get_remaining_time_in_millis() / 1000)
    logger.info("chunk processed", extra={"done": result.done, "stopped": result.stopped})
    return result.state()


@step_handler
def finalize_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """`BatchRef` (the state validate left) -> `FinalizeOutput`"""
    result = finalize_batch(parse(event=event, model=BatchRef), get_deps())
    logger.info("finalized", extra={"status": result.status})
    return result.state()


@step_handler
def fail_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """End the batch failed: `FailInput`, with an `error`, or the `failure` a Catch recorded."""
    step = parse(event=event, model=FailInput)
    if step.error is not None:
        error = batch_error(step.error.code, step.error.message)
    else:
        failure = step.failure or CatchFailure()
        error = batch_error(None, failure.Cause, failure.Error)
    logger.error("a step failed; failing the batch", extra={"error": error.model_dump()})
    failed = FailInput(project_id=step.project_id, batch_id=step.batch_id, error=error)
    return fail_batch(failed, get_deps()).state()


@step_handler
def housekeeping_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    """Scheduled hourly: the sweep the local server runs on a timer. Removes expired files' bytes and
    records, the parts of expired pending uploads and expired idempotency keys, and announces ends a
    crash left unannounced; S3 lifecycle rules and DynamoDB TTL remain the backstops."""
    removed = sweep(get_deps())
    logger.info("housekeeping sweep done", extra={"removed": removed})
    return HousekeepingOutput(removed=removed).state()


def batch_error(code: Any, cause: Any, error_name: Any = None) -> StepError:
    """The batch's error entry for a failed step. A Lambda's Cause is the JSON its runtime reports
    ({"errorMessage", "errorType", "stackTrace"}): keep the type and message, drop the trace."""
    if isinstance(cause, str) and cause.lstrip().startswith("{"):
        with contextlib.suppress(orjson.JSONDecodeError):
            cause = orjson.loads(cause)
    if isinstance(cause, dict):
        error_name = error_name or cause.get("errorType")
        cause = cause.get("errorMessage") or cause.get("Cause") or ""
    cause = str(cause or "").strip()
    detail = f"{error_name}: {cause}" if error_name and cause else str(error_name or cause)
    message = "The batch failed because a workflow step failed" + (f" ({detail})." if detail else ".")
    if len(message) > FAIL_MESSAGE_MAX_CHARS:
        message = message[: FAIL_MESSAGE_MAX_CHARS - 1] + "…"
    return StepError(code=str(code or "internal_error"), message=message)
