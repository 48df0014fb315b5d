"""The local twin of the Step Functions state machine: the same steps, in the same order, in-process.

validate -> process every chunk of the manifest (at most `chunk_concurrency` chunks of the batch
sending at once, like the Distributed Map's MaxConcurrency; every batch's chunks on one event loop)
-> finalize. A step that raises is retried with backoff, like a Lambda task's Retry; when the retries
run out the batch ends `failed`, like the state machine's Catch. Durability comes from the steps, not from here: every step is idempotent and
the journal records each finished request, so `resume()` after a crash simply runs the batch again.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TypeVar

from batch_api.contract.models import ChunkPlan
from batch_api.contract.steps import BatchRef, FailInput, ProcessInput, ProcessOutput, StepError
from batch_api.deps import Deps
from batch_api.upstreams import loops

logger = logging.getLogger(__name__)

StepIn = TypeVar("StepIn", bound=BatchRef)
StepOut = TypeVar("StepOut")

STEP_ATTEMPTS = 4
STEP_BACKOFF_SECONDS = 1.0


class StepFailed(Exception):
    """A step kept failing after its retries."""


class LocalWorkflow:
    """Implements the Workflow port for the local process.

    Create it, build `Deps` with it, then `bind(deps)`; `resume()` picks up what a previous process
    left unfinished.
    """

    def __init__(
        self, *, step_attempts: int = STEP_ATTEMPTS, step_backoff_seconds: float = STEP_BACKOFF_SECONDS
    ):
        self._deps: Deps | None = None
        self._lock = threading.Lock()
        self._running: dict[str, threading.Thread] = {}
        self._stopping = threading.Event()
        # every batch runs its chunks on one loop, each at most `chunk_concurrency` at once, so one big
        # batch cannot hold every turn; the upstream's capacity gate shares the requests in flight
        # fairly between the batches
        self._chunk_loop = _ChunkLoop()
        self._step_attempts = step_attempts
        self._step_backoff = step_backoff_seconds

    def bind(self, deps: Deps) -> None:
        self._deps = deps

    @property
    def deps(self) -> Deps:
        if self._deps is None:
            raise RuntimeError("LocalWorkflow.bind(deps) was not called")
        return self._deps

    # ---------------------------------------------------------------- the port

    def start(self, project_id: str, batch_id: str) -> None:
        """Start driving the batch on its own thread; starting a batch already running is a no-op."""
        with self._lock:
            if self._stopping.is_set():
                return  # shutting down: resume() will pick it up on the next start
            thread = self._running.get(batch_id)
            if thread is not None and thread.is_alive():
                return
            thread = threading.Thread(
                target=self._drive, args=(project_id, batch_id), name=f"batch-{batch_id[-8:]}", daemon=True
            )
            self._running[batch_id] = thread
        thread.start()

    # ---------------------------------------------------------------- lifecycle

    def resume(self) -> int:
        """Start every batch a previous process left in a non-terminal status; return how many.

        Ended batches whose terminal event was never published are announced first.
        First drop the chunk progress and journals of batches that are not active (terminal, or
        unknown): a crash between a batch's terminal update and their deletion leaves them behind
        otherwise (finalize deletes the journals last, so journals are what such a crash leaves).
        """
        from batch_api.workflow.terminal import announce_pending

        announce_pending(self.deps)  # ended batches whose event a crash left unpublished
        active = self.deps.metadata.list_active_batches()
        self._drop_stale_journals({batch.id for batch in active})
        for batch in active:
            logger.info("resuming batch %s (status %s)", batch.id, batch.status)
            self.start(batch.project_id, batch.id)
        return len(active)

    def _drop_stale_journals(self, active_ids: set[str]) -> None:
        journal = self.deps.journal
        # local journals can list their batches (`FilesystemJournal.batch_ids`); it is not a port method
        batch_ids = getattr(journal, "batch_ids", None)
        if batch_ids is None:
            return
        for batch_id in batch_ids():
            if batch_id not in active_ids:
                logger.info("removing the journal of batch %s, which is no longer running", batch_id)
                self.deps.metadata.delete_chunk_progress(batch_id)
                journal.delete_batch(batch_id)

    def start_sweeper(self, sweep: Callable[[], object]) -> None:
        """Run `sweep` (`service.housekeeping.sweep`: expired files, uploads and idempotency keys) now and
        every `file_sweep_interval_seconds`; it logs what it did."""
        self.every(self.deps.settings.file_sweep_interval_seconds, sweep, name="sweeper")

    def every(self, interval: float, task: Callable[[], object], *, name: str) -> None:
        """Run `task` now and every `interval` seconds on a daemon thread `name`, until the stop; a
        failing run is logged and the next one comes as usual."""

        def loop() -> None:
            while not self._stopping.is_set():
                try:
                    task()
                except Exception:
                    logger.exception("%s failed; will try again", name)
                self._stopping.wait(interval)

        threading.Thread(target=loop, name=name, daemon=True).start()

    def begin_stop(self) -> None:
        """Stop taking work, without waiting. Running chunks see no time left (`_time_left`): they start
        no new request and abandon those in flight at their next progress tick; the journal keeps what
        finished."""
        self._stopping.set()

    def stop(self, timeout: float = 5.0) -> None:
        """`begin_stop`, then wait up to `timeout` seconds for the batches being driven to let go."""
        self.begin_stop()
        deadline = time.monotonic() + timeout
        for thread in list(self._running.values()):
            thread.join(deadline - time.monotonic())  # a negative timeout joins like 0

    def wait_idle(self, timeout: float) -> bool:
        """For tests and benchmarks: wait until no batch is being driven."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = [t for t in self._running.values() if t.is_alive()]
            if not busy:
                return True
            busy[0].join(deadline - time.monotonic())
        return False

    # ---------------------------------------------------------------- the state machine

    def _drive(self, project_id: str, batch_id: str) -> None:
        from batch_api.workflow.finalize import fail_batch, finalize_batch
        from batch_api.workflow.manifest import load_manifest
        from batch_api.workflow.validate import validate_batch

        deps = self.deps
        ref = BatchRef(project_id=project_id, batch_id=batch_id)
        try:
            validated = self._step("validate", validate_batch, ref)
            if validated.next == "process":
                self._process_all(ref, load_manifest(deps, batch_id))
            if validated.next in ("process", "finalize"):
                self._step("finalize", finalize_batch, ref)
        except StepFailed as exc:
            if self._stopping.is_set():
                return
            logger.error("batch %s failed in a step: %s", batch_id, exc)
            try:
                failure = FailInput(
                    project_id=project_id,
                    batch_id=batch_id,
                    error=StepError(code="internal_error", message=str(exc)),
                )
                fail_batch(failure, deps)
            except Exception:
                logger.exception("could not mark batch %s failed; it resumes on the next start", batch_id)
        except _Stopping:
            logger.info("batch %s left for the next start", batch_id)
        finally:
            with self._lock:
                # start() never replaces a live thread's entry, so this one is still ours
                del self._running[batch_id]

    def _process_all(self, ref: BatchRef, chunks: list[ChunkPlan]) -> None:
        """Run the batch's chunks on the chunk loop, at most `chunk_concurrency` at once, and wait."""
        with self._lock:
            if self._stopping.is_set():
                raise _Stopping()
        loop = self._chunk_loop.acquire()
        try:
            asyncio.run_coroutine_threadsafe(self._run_chunks(ref, chunks), loop).result()
        finally:
            self._chunk_loop.release()

    async def _run_chunks(self, ref: BatchRef, chunks: list[ChunkPlan]) -> None:
        from batch_api.workflow import process

        settings = self.deps.settings
        turns = asyncio.Semaphore(max(1, settings.chunk_concurrency))
        # the batch's requests in flight, shared by its chunks: a chunk sending its last requests hands
        # its turn to the next one, which takes the slots those requests free, so the batch keeps
        # chunk_concurrency x requests_per_chunk in flight from chunk to chunk
        slots = asyncio.Semaphore(max(1, settings.chunk_concurrency) * settings.requests_per_chunk)

        async def run(chunk: ChunkPlan) -> ProcessOutput:
            await turns.acquire()
            holds_turn = True

            def next_may_start() -> None:
                nonlocal holds_turn
                if holds_turn:
                    holds_turn = False
                    turns.release()

            step = partial(
                process.process_chunk_async,
                time_left=self._time_left,
                shared=process.SharedSlots(slots, next_may_start),
            )
            event = ProcessInput(project_id=ref.project_id, batch_id=ref.batch_id, chunk=chunk)
            try:
                return await self._step_async("process", step, event)
            finally:
                next_may_start()

        tasks = [asyncio.create_task(run(chunk)) for chunk in chunks]
        try:
            for task in tasks:
                result = await task
                if not result.done:
                    if self._stopping.is_set():  # the chunk stopped for the shutdown
                        raise _Stopping()
                    # Only a Lambda runs out of time; locally a chunk finishes unless we shut down.
                    raise StepFailed(f"chunk {result.index} did not finish")
        finally:
            # after a failure or the stop: chunks not started never start, running ones abandon the
            # requests in flight (the journal keeps what finished)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def _time_left(self) -> float:
        """A running chunk's time budget: unlimited, until the process shuts down."""
        return 0.0 if self._stopping.is_set() else math.inf

    def _step(self, name: str, fn: Callable[[StepIn, Deps], StepOut], event: StepIn) -> StepOut:
        last: Exception | None = None
        for attempt in range(self._step_attempts):
            if self._stopping.is_set():
                raise _Stopping()
            try:
                return fn(event, self.deps)
            except Exception as exc:
                last = exc
                self._stopping.wait(self._attempt_failed(name, event, attempt, exc))
        raise StepFailed(f"{name} failed after {self._step_attempts} attempts: {last!r}")

    async def _step_async(
        self, name: str, fn: Callable[[StepIn, Deps], Awaitable[StepOut]], event: StepIn
    ) -> StepOut:
        """`_step` for a step that runs on the chunk loop."""
        last: Exception | None = None
        for attempt in range(self._step_attempts):
            if self._stopping.is_set():
                raise _Stopping()
            try:
                return await fn(event, self.deps)
            except Exception as exc:
                last = exc
                backoff = self._attempt_failed(name, event, attempt, exc)
                await asyncio.to_thread(self._stopping.wait, backoff)  # the loop goes on meanwhile
        raise StepFailed(f"{name} failed after {self._step_attempts} attempts: {last!r}")

    def _attempt_failed(self, name: str, event: BatchRef, attempt: int, exc: Exception) -> float:
        """Log a failed attempt of a step; returns the seconds to wait before the next one."""
        logger.warning(
            "step %s of batch %s failed (attempt %d/%d): %r",
            name,
            event.batch_id,
            attempt + 1,
            self._step_attempts,
            exc,
            exc_info=attempt == self._step_attempts - 1,
        )
        return self._step_backoff * (2**attempt)


class _ChunkLoop:
    """The event loop every chunk of every batch runs on, on a thread of its own ("chunks").

    One loop rather than a thread and loop per chunk: the requests of all chunks share one pooled
    client session per upstream (`upstreams.loops`), and the chunks do not take the interpreter's lock
    from each other on every send, read and journal append (bench/results/pipeline_overhead.md
    measures the step). Chunks do little else on it: local store calls, each well under a
    millisecond (with the aws backend in this process, a development mode, they are network calls
    the loop waits for). The loop runs while some batch uses it (`acquire` /
    `release`); the last user's release cancels what is left on it, closes its upstream sessions and
    ends the thread, and the next `acquire` starts a new one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Event | None = None

    def acquire(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            self._users += 1
            if self._loop is None:
                started = threading.Event()
                threading.Thread(target=self._serve, args=(started,), name="chunks", daemon=True).start()
                started.wait()
            assert self._loop is not None
            return self._loop

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users or self._loop is None or self._done is None:
                return
            loop, done = self._loop, self._done
            self._loop = self._done = None
        loop.call_soon_threadsafe(done.set)

    def _serve(self, started: threading.Event) -> None:
        runner = loops.keep_loop()
        done = asyncio.Event()
        self._loop, self._done = runner.get_loop(), done  # under acquire's lock, which waits for us
        started.set()
        try:
            runner.run(_until(done))
        finally:
            try:
                loops.close_loop(runner)
            except Exception:
                logger.warning("closing the chunk loop failed", exc_info=True)


async def _until(done: asyncio.Event) -> None:
    """Wait for `done`, then cancel every other task on the loop and wait for them to end (before
    the upstream sessions close, so no request of theirs fails on a closed session)."""
    await done.wait()
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


class _Stopping(Exception):
    """The process is shutting down; the batch is left for the next start."""
