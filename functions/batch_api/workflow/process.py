"""Step 2: run one chunk's requests against the upstream model endpoint.

The chunk's journal is the cursor: a request whose result line is in the journal is done and is
never sent again, so a retry, a resume after kill -9, or a Lambda that ran out of time all continue
where the last run stopped. Result lines are journaled as soon as they complete (lines that complete
together share one append), so a crash loses only requests that were still in flight.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batch_api.contract.models import BatchRecord, ChunkPlan
from batch_api.contract.steps import ProcessInput, ProcessOutput, parse_step
from batch_api.deps import Deps
from batch_api.ports import Upstream, UpstreamResponse
from batch_api.upstreams import loops
from batch_api.upstreams.leases import LEASE_SECONDS, WAIT_SECONDS
from batch_api.workflow.lines import NO_TOKENS, Tokens, result_line, split_lines, tokens_of
from batch_api.workflow.tally import ChunkTally, read_tally
from batch_api.workflow.terminal import get_batch

logger = logging.getLogger(__name__)

# Lambda time budget. We stop starting requests when the remaining time drops below
# max(TIME_MARGIN_FLOOR_SECONDS, 2 x the slowest request seen in this invocation): requests already in
# flight then have room to finish and be journaled, and the state machine calls us again. Doubling the
# slowest observed request (rather than the configured upstream timeout, up to 10 minutes, which would
# leave almost no working time) adapts to the model's real latency; the floor covers the first requests,
# before any latency is known, and a final progress write. If time runs out anyway, the in-flight
# requests are abandoned at HARD_STOP_SECONDS so the journal and progress get written before Lambda kills us.
TIME_MARGIN_FLOOR_SECONDS = 30.0
HARD_STOP_SECONDS = 5.0
# Requests run at most until DEADLINE_MARGIN_SECONDS before the hard stop: they end (answered, or as
# an upstream_timeout failure) and are journaled instead of being abandoned and sent again.
DEADLINE_MARGIN_SECONDS = 1.0

# Statuses in which requests may be sent. `validating` cannot normally be seen here (the manifest is
# published only after the batch moved on) but is harmless.
RUNNABLE_STATUSES = frozenset({"in_progress", "validating"})

TimeLeft = Callable[[], float]

INPUT_MISSING = "input_missing"  # `stopped` when the input file's body vanished under a running batch


@dataclass(frozen=True)
class SharedSlots:
    """A batch's requests in flight, shared by its chunks (the local runner, whose chunks share one
    loop). `slots` bounds them across the chunks; `dispatched` is called once a chunk has started its
    last request (or stopped starting any), so that the next chunk can start while this one's last
    requests are still out and the batch keeps its requests in flight from chunk to chunk."""

    slots: asyncio.Semaphore
    dispatched: Callable[[], None]


def stop_reason(batch: BatchRecord, now: int) -> str | None:
    """Why no new request may start: "cancelled" or "expired"; None when there is no such reason."""
    if batch.status in ("cancelling", "cancelled"):
        return "cancelled"
    if batch.status == "expired" or now >= batch.expires_at:
        return "expired"
    return None


def process_chunk(
    event: ProcessInput | Mapping[str, Any], deps: Deps, *, time_left: TimeLeft | None = None
) -> ProcessOutput:
    """Run one chunk (`ProcessInput`: the batch and its `chunk` of the manifest).

    `time_left` returns the seconds this invocation may still run (a Lambda context's remaining time;
    the local runner answers 0 once it is shutting down); None means no limit. `done` false means call
    again (time ran low); `stopped` says why requests were left unrun (cancelled, expired, the input's
    body gone).
    """
    # on the thread's kept loop when it keeps one (its upstream connections carry over to the next chunk)
    return loops.run(process_chunk_async(event, deps, time_left=time_left))


async def process_chunk_async(
    event: ProcessInput | Mapping[str, Any],
    deps: Deps,
    *,
    time_left: TimeLeft | None = None,
    shared: SharedSlots | None = None,
) -> ProcessOutput:
    """The async body of `process_chunk`, for callers that already run an event loop; with `shared`
    the chunk takes its requests' slots from its batch's (instead of its lease's)."""
    step = parse_step(ProcessInput, event)
    plan = step.chunk
    batch = get_batch(deps, step.project_id, step.batch_id)
    tally = read_tally(deps, batch.id, plan.index, batch.endpoint)

    def answer(done: bool, stopped: str | None, wait_seconds: int = 0) -> ProcessOutput:
        complete = len(tally.done_ids) >= plan.lines
        return ProcessOutput(
            project_id=batch.project_id,
            batch_id=batch.id,
            index=plan.index,
            done=done or complete,
            stopped=None if complete else stopped,  # type: ignore[arg-type]
            wait_seconds=0 if complete else wait_seconds,
        )

    reason = stop_reason(batch, deps.now())
    if batch.status not in RUNNABLE_STATUSES or reason is not None:
        if not batch.is_terminal:
            deps.metadata.put_chunk_progress(batch.id, tally.progress(plan))
        return answer(True, reason)

    input_file = deps.metadata.get_file(batch.project_id, batch.input_file_id)
    if input_file is None:
        # The body is kept while the batch runs, even if the file is deleted or expires; should it be
        # gone anyway (here, or a KeyError in `_ChunkRun.requests`), retrying cannot help: stop, and let
        # finalize keep what already finished.
        _log_input_missing(batch, plan)
        deps.metadata.put_chunk_progress(batch.id, tally.progress(plan))
        return answer(True, INPUT_MISSING)
    lease = _Lease(deps, batch, plan.index)
    slots = lease.acquire()
    if slots == 0:  # the upstream is fully used by other workers: no Lambda idles waiting for it
        deps.metadata.put_chunk_progress(batch.id, tally.progress(plan))
        return answer(False, None, wait_seconds=WAIT_SECONDS)
    try:
        stopped = await _ChunkRun(
            deps, batch, plan, input_file.blob_key, tally, time_left, slots, lease, shared
        ).run()
    finally:
        lease.release()
    if stopped in ("cancelled", "expired", INPUT_MISSING):
        return answer(True, stopped)
    return answer(False, None)  # complete, or the time ran low


def _log_input_missing(batch: BatchRecord, plan: ChunkPlan) -> None:
    logger.warning(
        "batch %s chunk %d: the body of input file %s is gone; the requests not yet run are left unrun "
        "and will be counted failed",
        batch.id,
        plan.index,
        batch.input_file_id,
    )


class _Lease:
    """This invocation's share of its upstream's capacity across workers (`Deps.leases`, keyed by the
    upstream the batch's model is routed to, limited by its `max_in_flight`); without leases, or
    for a model no upstream serves (the factory refuses it next), the chunk's own `requests_per_chunk`."""

    def __init__(self, deps: Deps, batch: BatchRecord, index: int) -> None:
        self.settings = deps.settings
        self.batch_id = batch.id
        self.holder = f"{batch.id}/{index}/{uuid.uuid4().hex[:12]}"
        self.renewed_at = 0.0
        route = deps.upstream_for(batch.model) if deps.leases is not None else None
        # the store and the upstream the leases are taken on; None: no leases to take
        self.shared = (deps.leases, route) if deps.leases is not None and route is not None else None
        # the part of the upstream's requests and tokens per minute this worker may use: its slots'
        # part of the limit, so the workers together stay within the rates (all of it without leases)
        self.rate_share = 1.0

    def acquire(self) -> int:
        if self.shared is None:
            return self.settings.requests_per_chunk
        leases, route = self.shared
        self.renewed_at = time.monotonic()
        slots = leases.acquire(
            route.name, self.holder, self.batch_id, self.settings.requests_per_chunk, route.max_in_flight
        ).slots
        if slots:
            self.rate_share = slots / route.max_in_flight
        return slots

    def keep(self) -> None:
        """Renew the lease when a quarter of its time has gone."""
        if self.shared is not None and time.monotonic() - self.renewed_at >= LEASE_SECONDS / 4:
            leases, route = self.shared
            self.renewed_at = time.monotonic()
            leases.renew(route.name, self.holder)

    def release(self) -> None:
        if self.shared is not None:
            leases, route = self.shared
            try:
                leases.release(route.name, self.holder)
            except Exception:  # the lease expires by itself
                logger.warning("releasing capacity lease %s failed", self.holder, exc_info=True)


class _ChunkRun:
    """One invocation's work on a chunk: dispatch, journal, checkpoint."""

    def __init__(
        self,
        deps: Deps,
        batch: BatchRecord,
        plan: ChunkPlan,
        blob_key: str,
        tally: ChunkTally,
        time_left: TimeLeft | None,
        slots: int,
        lease: _Lease,
        shared: SharedSlots | None = None,
    ) -> None:
        self.deps = deps
        self.slots = slots  # requests in flight at most (the lease's share)
        self.lease = lease
        self.shared = shared
        self.batch = batch
        self.plan = plan
        self.blob_key = blob_key
        self.tally = tally
        self.time_left = time_left
        self.stopped: str | None = None  # "cancelled" | "expired" | "time"
        self.started = 0
        self.slowest = 0.0
        self.in_flight: set[asyncio.Task[None]] = set()
        self.pending: list[tuple[str, bytes, bool, Tokens]] = []
        self.flush_scheduled = False
        self.flush_error: BaseException | None = None

    # ---------------------------------------------------------------- input

    def requests(self) -> Iterator[tuple[str, bytes]]:
        """(custom_id, body) of each request line of the chunk not yet in the journal, in file order.

        Ends early (and sets `stopped`) if the input body vanishes while it is read."""
        try:
            pieces = self.deps.blobs.iter_range(self.blob_key, self.plan.start, self.plan.end)
            lines = split_lines(pieces)  # the offsets are not needed here
            for _start, _end, raw in lines:
                if not raw.strip():
                    continue
                obj = orjson.loads(raw)
                custom_id = obj["custom_id"]
                if custom_id not in self.tally.done_ids:
                    yield custom_id, orjson.dumps(obj["body"])
        except KeyError:  # the blob store's "absent"
            _log_input_missing(self.batch, self.plan)
            self.stopped = self.stopped or INPUT_MISSING

    # ---------------------------------------------------------------- the loop

    async def run(self) -> str | None:
        settings = self.deps.settings
        slots = self.shared.slots if self.shared is not None else asyncio.Semaphore(self.slots)

        def done(task: asyncio.Task[None]) -> None:
            # a callback, not the task's own `finally`: a task cancelled before it ran gives back its slot too
            self.in_flight.discard(task)
            slots.release()

        upstream = self.deps.upstream_factory(
            model=self.batch.model, batch_id=self.batch.id, rate_share=self.lease.rate_share
        )
        ticker = asyncio.create_task(self._tick(settings.progress_interval_seconds))
        try:
            try:
                for custom_id, body in self.requests():
                    await slots.acquire()
                    if self.flush_error is not None:
                        slots.release()
                        raise self.flush_error
                    self.stopped = self.stopped or self._stop_before_start()
                    if self.stopped is not None:
                        slots.release()
                        break
                    task = asyncio.create_task(self._send(upstream, custom_id, body))
                    self.in_flight.add(task)
                    task.add_done_callback(done)
                    self.started += 1
            finally:
                if self.shared is not None:
                    self.shared.dispatched()
            # nothing new starts now; cancelled (hard stop) requests simply stay unjournaled
            await asyncio.gather(*list(self.in_flight), return_exceptions=True)
        finally:
            ticker.cancel()
            for task in list(self.in_flight):  # only left when an error is propagating
                task.cancel()
            await asyncio.gather(ticker, *list(self.in_flight), return_exceptions=True)
            await upstream.aclose()
            self._flush()
        if self.flush_error is not None:
            raise self.flush_error
        self.deps.metadata.put_chunk_progress(self.batch.id, self.tally.progress(self.plan))
        logger.info(
            "batch %s chunk %d: sent %d, %d/%d lines done, stopped=%s",
            self.batch.id,
            self.plan.index,
            self.started,
            len(self.tally.done_ids),
            self.plan.lines,
            self.stopped,
        )
        return self.stopped

    def _deadline(self, now: float) -> float | None:
        """When a request started `now` must have its answer: before the hard stop would abandon it
        (an abandoned request is sent again by the next invocation, and billed twice), with a second
        for its line to be journaled. None without a time budget."""
        if self.time_left is None:
            return None
        left = self.time_left()
        if math.isinf(left):
            return None
        return now + left - HARD_STOP_SECONDS - DEADLINE_MARGIN_SECONDS

    def _stop_before_start(self) -> str | None:
        """The cheap checks made before every request: the deadline and this invocation's time budget
        (none left at all stops even the first request: the local runner is shutting down)."""
        if self.deps.now() >= self.batch.expires_at:
            return "expired"
        if self.time_left is not None:
            left = self.time_left()
            margin = max(TIME_MARGIN_FLOOR_SECONDS, 2 * self.slowest)
            if left <= 0 or (self.started > 0 and left < margin):
                return "time"
        return None

    async def _send(self, upstream: Upstream, custom_id: str, body: bytes) -> None:
        began = time.monotonic()
        deadline = self._deadline(began)
        if deadline is not None and deadline <= began:
            return  # out of time before it went out: not sent, not journaled; the next invocation sends it
        try:
            response = await upstream.send(self.batch.endpoint, body, deadline)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the port promises not to raise; a bug there must not lose the batch
            logger.exception("upstream client raised for %s", custom_id)
            response = UpstreamResponse(
                status_code=None,
                error_code="internal_error",
                error_message=f"The request failed: {exc!r}",
            )
        self.slowest = max(self.slowest, time.monotonic() - began)
        success = response.status_code is not None and 200 <= response.status_code < 300
        tokens = tokens_of(self.batch.endpoint, response.body) if success else NO_TOKENS
        self.pending.append((custom_id, result_line(self.batch.id, custom_id, response), success, tokens))
        if not self.flush_scheduled:
            # Interval 0 (local): runs after every task resumed in this loop iteration, so lines that complete
            # together share one append. On S3 every append is a PUT that blocks the loop for tens of ms, so
            # there the journal is flushed every interval instead (a crash re-sends at most that much).
            self.flush_scheduled = True
            delay = self.deps.settings.journal_flush_interval_seconds
            loop = asyncio.get_running_loop()
            if delay > 0:
                loop.call_later(delay, self._flush)
            else:
                loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flush_scheduled = False
        if not self.pending:
            return
        batch = self.pending
        try:
            self.deps.journal.append(self.batch.id, self.plan.index, [line for _, line, _, _ in batch])
        except Exception as exc:
            # keep the lines for the final flush; reading dedupes if part of this append landed
            logger.exception("journal append failed for batch %s chunk %d", self.batch.id, self.plan.index)
            self.flush_error = exc
            return
        self.flush_error = None
        self.pending = []
        for custom_id, _, success, tokens in batch:
            self.tally.add(custom_id, success, tokens)

    # ---------------------------------------------------------------- checkpoints

    async def _tick(self, interval: float) -> None:
        """Every interval: publish progress, notice cancel and deadline, and abandon in-flight requests
        if a Lambda is about to be killed."""
        while True:
            await asyncio.sleep(interval)
            if self.time_left is not None and self.time_left() < HARD_STOP_SECONDS:
                self.stopped = self.stopped or "time"
                for task in list(self.in_flight):
                    task.cancel()
            try:
                self._checkpoint()
            except Exception:  # transient store trouble: the final write reports a lasting one
                logger.warning("progress checkpoint failed for batch %s", self.batch.id, exc_info=True)

    def _checkpoint(self) -> None:
        self.lease.keep()
        self.deps.metadata.put_chunk_progress(self.batch.id, self.tally.progress(self.plan))
        current = self.deps.metadata.get_batch(self.batch.project_id, self.batch.id)
        if current is None:
            return
        reason = stop_reason(current, self.deps.now())
        if reason is None and current.status not in RUNNABLE_STATUSES:
            reason = "cancelled"  # finalized or failed under us: nothing more should start
        if reason is not None and self.stopped is None:
            self.stopped = reason
