"""The capacity of one upstream, shared by every batch, chunk and event loop of the process.

`CapacityGate` admits one request attempt at a time:

- **A global ceiling.** At most `limit` attempts are in flight across all batches (the configured
  `max_in_flight` is the most it will ever be).
- **Adaptive (AIMD).** The effective limit starts low and doubles each round trip until the upstream
  first pushes back (slow start); then it grows by one per round trip (by `PROBE` within one of the
  level that was pushed back last) and is cut to `DECREASE` of itself when an attempt is answered 429
  or 503. Only attempts started after the last cut can cut it
  again, so one burst of refusals counts once. A `Retry-After` on such an answer also holds new
  attempts back until it has passed.
- **Fair share.** Waiting attempts are queued per batch and the batches take turns (round robin) as
  slots free up, so a small batch behind a large one waits for a few slots, not for the large batch.
- **Rates (optional).** Requests and tokens per minute (`RateLimit`), paced before an attempt queues
  for a slot; tokens are estimated from the request and corrected from the answer's `usage`.

Thread-safe: the local runner's chunks share one event loop, but a Lambda worker, a test or an
embedding program may use the gate from several threads and loops; a waiter is woken on its own loop
(`call_soon_threadsafe` when that is another thread's).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

logger = logging.getLogger(__name__)

THROTTLE_STATUSES = frozenset({429, 503})
INITIAL_LIMIT = 8.0  # slow start begins here (or at max_in_flight if that is lower)
DECREASE = 0.9  # the limit after a push back, as a fraction of what it was
PROBE = 0.25  # near the level that was pushed back last, grow this much per round trip instead of 1
MAX_HOLD_SECONDS = 60.0  # the longest Retry-After the gate honours for new attempts
BURST_SECONDS = 1.0  # a rate limit lets this many seconds' worth of units through at once
BYTES_PER_TOKEN = 4  # the usual rough estimate for English text and JSON
MAX_OUTPUT_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def estimate_tokens(body: bytes) -> int:
    """Tokens a request may take, before it runs: its size / 4, plus the output it allows (the
    answer's `usage` corrects the estimate)."""
    estimate = len(body) // BYTES_PER_TOKEN
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return estimate
    if isinstance(parsed, dict):
        for name in MAX_OUTPUT_FIELDS:
            value = parsed.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return estimate + value
    return estimate


def answer_tokens(body: Any) -> int:
    """The tokens an answer's `usage` reports (0 when it reports none)."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return 0
    total = usage.get("total_tokens")
    if isinstance(total, int):
        return total
    parts = [usage.get(k) for k in ("prompt_tokens", "completion_tokens", "input_tokens", "output_tokens")]
    return sum(p for p in parts if isinstance(p, int))


@dataclass
class RateLimit:
    """At most `per_minute` units a minute, as GCRA: every unit moves a theoretical time on by
    60 / per_minute seconds, and a use may start once that time is less than `BURST_SECONDS` ahead of
    now. Reservations are made under a lock, so callers on any thread share one budget."""

    per_minute: int
    clock: Callable[[], float] = time.monotonic
    # the part of `per_minute` this process may use (on AWS: its lease's part of the upstream, so the
    # workers together stay within the rate)
    share: float = 1.0
    _theoretical: float = field(default=float("-inf"), init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self) -> None:
        if self.per_minute < 1:
            raise ValueError("a rate must allow at least 1 a minute")

    @property
    def interval(self) -> float:
        return 60.0 / (self.per_minute * self.share)

    def reserve(self, units: float) -> float:
        """Take `units` now; returns the seconds to wait before using them."""
        with self._lock:
            now = self.clock()
            self._theoretical = max(self._theoretical, now) + units * self.interval
            return max(0.0, self._theoretical - now - BURST_SECONDS)

    def adjust(self, units: float) -> None:
        """Correct an earlier reservation by `units` (negative: fewer were used than reserved)."""
        with self._lock:
            self._theoretical += units * self.interval


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]
    admitted: bool = False  # set under the gate's lock when a slot is handed over


@dataclass
class GateStats:
    """What the gate reports (logs, metrics)."""

    in_flight: int
    limit: float
    waiting: int
    waiting_batches: int
    throttled: int
    admitted: int
    answered: int  # attempts that got an HTTP answer
    answer_seconds: float  # their latencies, summed (admission to answer)


@dataclass
class CapacityGate:
    name: str
    max_in_flight: int
    clock: Callable[[], float] = time.monotonic
    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None
    limit: float = field(init=False)
    in_flight: int = field(default=0, init=False)
    throttled: int = field(default=0, init=False)  # attempts answered 429/503
    admitted: int = field(default=0, init=False)
    answered: int = field(default=0, init=False)  # attempts that got an HTTP answer
    answer_seconds: float = field(default=0.0, init=False)  # their latencies, summed
    _slow_start: bool = field(default=True, init=False)
    _last_cut: float = field(default=float("-inf"), init=False)
    _pushed_back_at: float = field(default=float("inf"), init=False)  # in flight at the last push back
    _hold_until: float = field(default=float("-inf"), init=False)
    _waiting: dict[str, deque[_Waiter]] = field(default_factory=dict, init=False)
    _turns: deque[str] = field(default_factory=deque, init=False)  # batches with waiters, in turn order
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _requests: RateLimit | None = field(default=None, init=False)
    _tokens: RateLimit | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"upstream {self.name}: max_in_flight must be at least 1")
        self.limit = min(float(self.max_in_flight), INITIAL_LIMIT)
        if self.requests_per_minute is not None:
            self._requests = RateLimit(self.requests_per_minute, self.clock)
        if self.tokens_per_minute is not None:
            self._tokens = RateLimit(self.tokens_per_minute, self.clock)

    @property
    def counts_tokens(self) -> bool:
        return self._tokens is not None

    def share_rates(self, share: float) -> None:
        """Use only `share` (0 < share <= 1) of the requests and tokens per minute: this process's
        part when other processes send to the upstream too (a worker's lease of its slots)."""
        if not 0 < share <= 1:
            raise ValueError(f"a share of the rates must be in (0, 1], not {share}")
        for rate in (self._requests, self._tokens):
            if rate is not None:
                rate.share = share

    async def pace(self, tokens: int = 0) -> None:
        """Wait until one more request (of about `tokens` tokens) fits the per-minute rates."""
        wait = 0.0
        if self._requests is not None:
            wait = self._requests.reserve(1)
        if self._tokens is not None and tokens > 0:
            wait = max(wait, self._tokens.reserve(tokens))
        if wait > 0:
            await asyncio.sleep(wait)

    def used_tokens(self, estimated: int, actual: int) -> None:
        """The answer's `usage` says how many tokens the request really took."""
        if self._tokens is not None and actual > 0:
            self._tokens.adjust(actual - estimated)

    # ---------------------------------------------------------------- admission

    async def acquire(self, batch_id: str) -> float:
        """Wait for a slot for one attempt of `batch_id`; returns the admission time (pass it to
        `release`). Cancelling the wait gives up the place in the queue."""
        hold = self._hold_until - self.clock()
        if hold > 0:
            await asyncio.sleep(hold)
        loop = asyncio.get_running_loop()
        with self._lock:
            if not self._turns and self.in_flight < int(self.limit):
                return self._admit()
            waiter = _Waiter(loop, loop.create_future())
            queue = self._waiting.get(batch_id)
            if queue is None:
                queue = self._waiting[batch_id] = deque()
                self._turns.append(batch_id)
            queue.append(waiter)
        try:
            await waiter.future
        except asyncio.CancelledError:
            with self._lock:
                if waiter.admitted:
                    self._finish()  # admitted just as it was cancelled: give the slot back
                else:
                    self._forget(batch_id, waiter)
            raise
        return self.clock()

    def release(
        self, admitted_at: float, status: int | None, headers: Mapping[str, str] | None = None
    ) -> None:
        """One attempt admitted at `admitted_at` ended with HTTP `status` (None: no answer)."""
        now = self.clock()
        with self._lock:
            if status is not None:
                self.answered += 1
                self.answer_seconds += now - admitted_at
            if status in THROTTLE_STATUSES:
                self.throttled += 1
                if admitted_at > self._last_cut:
                    self._pushed_back_at = min(self.limit, float(self.in_flight))
                    self.limit = max(1.0, self._pushed_back_at * DECREASE)
                    self._last_cut = now
                    self._slow_start = False
                    logger.info(
                        "upstream %s pushed back (HTTP %s): limit now %.1f", self.name, status, self.limit
                    )
                hold = _retry_after(headers)
                if hold:
                    self._hold_until = max(self._hold_until, now + min(hold, MAX_HOLD_SECONDS))
            elif status is not None and status < 500:
                # slow start: +1 per answer (doubling per round trip); then +1 per round trip, and only
                # +PROBE within one of where the upstream pushed back last (the limit stays near it longer)
                if self._slow_start:
                    step = 1.0
                elif self.limit >= self._pushed_back_at - 1:
                    step = PROBE / self.limit
                else:
                    step = 1.0 / self.limit
                self.limit = min(float(self.max_in_flight), self.limit + step)
            self._finish()

    def stats(self) -> GateStats:
        with self._lock:
            return GateStats(
                in_flight=self.in_flight,
                limit=self.limit,
                waiting=sum(len(q) for q in self._waiting.values()),
                waiting_batches=len(self._turns),
                throttled=self.throttled,
                admitted=self.admitted,
                answered=self.answered,
                answer_seconds=self.answer_seconds,
            )

    # ---------------------------------------------------------------- under the lock

    def _admit(self) -> float:
        self.in_flight += 1
        self.admitted += 1
        return self.clock()

    def _finish(self) -> None:
        self.in_flight -= 1
        self._wake()

    def _wake(self) -> None:
        """Hand free slots to waiting batches, one per batch in turn."""
        while self._turns and self.in_flight < int(self.limit):
            batch_id = self._turns.popleft()
            queue = self._waiting[batch_id]
            waiter = queue.popleft()
            if queue:
                self._turns.append(batch_id)
            else:
                del self._waiting[batch_id]
            if waiter.future.done():  # cancelled meanwhile; its waiter leaves the queue
                continue
            waiter.admitted = True
            self.in_flight += 1
            self.admitted += 1
            if waiter.loop is _running_loop():
                waiter.loop.call_soon(_grant, waiter.future)  # our own loop: no wake-up write needed
            else:
                waiter.loop.call_soon_threadsafe(_grant, waiter.future)

    def _forget(self, batch_id: str, waiter: _Waiter) -> None:
        queue = self._waiting.get(batch_id)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._waiting[batch_id]
            self._turns.remove(batch_id)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # released outside any loop
        return None


def _grant(future: asyncio.Future[None]) -> None:
    if not future.done():  # cancelled since: its waiter gives the slot back (`admitted`)
        future.set_result(None)


def _retry_after(headers: Mapping[str, str] | None) -> float | None:
    if not headers:
        return None
    from batch_api.upstreams.openai_http import retry_after_seconds

    return retry_after_seconds(headers)
