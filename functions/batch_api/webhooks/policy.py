"""The delivery policy, in one place for the local deliverer and the AWS delivery function.

- Delivered: the receiver answered 2xx. Anything else is a failed attempt that is tried again: 3xx
  (a redirect is never followed), 4xx, 5xx, a timeout, a refused connection, an address the guard
  refuses. The answer's body is never read.
- Backoff: exponential from `base_seconds`, doubling per failed attempt up to `max_delay_seconds`, each
  delay jittered to between half and all of itself (so receivers that fail together do not get their
  retries together).
- Window: OpenAI's 72 hours, counted from the first attempt. The last retry is moved to the window's end
  when the backoff would pass it; a failure at or after the end gives up (logged, and on AWS a metric).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WINDOW_SECONDS = 72 * 3600
BASE_SECONDS = 10.0
MAX_DELAY_SECONDS = 3600.0
TIMEOUT_SECONDS = 10.0


def is_delivered(status_code: int | None) -> bool:
    return status_code is not None and 200 <= status_code < 300


@dataclass(frozen=True)
class RetryPolicy:
    window_seconds: float = WINDOW_SECONDS
    base_seconds: float = BASE_SECONDS
    max_delay_seconds: float = MAX_DELAY_SECONDS
    timeout_seconds: float = TIMEOUT_SECONDS  # connect and answer, each attempt

    def delay(self, failed_attempts: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the `failed_attempts`-th failed attempt (1 for the first)."""
        exponent = min(max(failed_attempts - 1, 0), 62)
        full = min(self.base_seconds * (2.0**exponent), self.max_delay_seconds)
        return full * (0.5 + 0.5 * rand())

    def next_attempt_at(
        self,
        *,
        failed_attempts: int,
        now: float,
        first_attempt_at: float,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """When to try again after a failed attempt at `now`; None: the window is over, give up."""
        deadline = first_attempt_at + self.window_seconds
        if now >= deadline:
            return None
        return min(now + self.delay(failed_attempts, rand), deadline)
