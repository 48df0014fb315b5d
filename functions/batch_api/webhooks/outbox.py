"""The local delivery: terminal events go into a durable outbox, a thread sends what is due.

`OutboxEventSink` wraps the server's EventSink. `workflow/terminal.announce` publishes before it clears
the batch's `event_pending` mark, so the outbox rows (one per endpoint that hears the batch's project)
are committed before the mark goes: a kill -9 between the terminal status and the delivery leaves the
mark (the next start's `announce_pending` enqueues again, a no-op for rows already there) or the rows
(the deliverer sends them after the restart). The event id is derived from (batch, status), so a
second enqueue is the same row and receivers see one id however often it is attempted.

`OutboxDeliverer` sends due deliveries (`policy.RetryPolicy`), each attempt signed afresh.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from batch_api.ports import Clock, EventSink, WebhookDelivery, WebhookOutbox
from batch_api.webhooks.endpoints import Endpoints
from batch_api.webhooks.events import build_event, event_from_body, signed_headers
from batch_api.webhooks.policy import RetryPolicy, is_delivered
from batch_api.webhooks.sender import Post

logger = logging.getLogger(__name__)

DUE_BATCH = 32  # deliveries one pass takes at most
SENDERS = 4  # attempts in flight at once, so one slow receiver does not hold up the others
IDLE_WAIT_SECONDS = 30.0  # how long the deliverer sleeps with nothing due (an enqueue wakes it)
PURGE_INTERVAL_SECONDS = 3600.0  # how often ended deliveries past their keeping time are removed


class OutboxEventSink:
    """ports.EventSink: enqueue the webhook deliveries of a terminal event, then publish it to `inner`."""

    def __init__(
        self,
        inner: EventSink,
        outbox: WebhookOutbox,
        endpoints: Endpoints,
        *,
        clock: Clock,
        on_enqueued: Callable[[], None] = lambda: None,
    ) -> None:
        self.inner = inner
        self.outbox = outbox
        self.endpoints = endpoints
        self._clock = clock
        self._on_enqueued = on_enqueued

    def publish(self, detail_type: str, detail: Mapping[str, Any]) -> None:
        event = build_event(detail_type, detail)
        if event is not None:
            now = self._clock()
            deliveries = [
                WebhookDelivery(
                    event_id=event.id,
                    endpoint=endpoint.key,
                    project_id=event.project_id,
                    url=endpoint.url,
                    body=event.body,
                    first_at=now,
                    next_at=now,
                )
                for endpoint in self.endpoints.for_project(event.project_id)
            ]
            if deliveries and self.outbox.enqueue(deliveries):
                self._on_enqueued()
        self.inner.publish(detail_type, detail)


class OutboxDeliverer:
    """Sends the outbox's due deliveries; `start()` runs it on a thread until `stop()`."""

    def __init__(
        self,
        outbox: WebhookOutbox,
        endpoints: Endpoints,
        post: Post,
        policy: RetryPolicy,
        *,
        clock: Clock,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.outbox = outbox
        self.endpoints = endpoints
        self.post = post
        self.policy = policy
        self._clock = clock
        self._rand = rand
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=SENDERS, thread_name_prefix="webhook")

    def wake(self) -> None:
        self._wake.set()

    def attempt(self, delivery: WebhookDelivery) -> WebhookDelivery:
        """One attempt at `delivery`; store and return its new state."""
        endpoint = self.endpoints.get(delivery.endpoint)
        now = self._clock()
        if endpoint is None or endpoint.secret is None:
            logger.error(
                "webhook %s for event %s: the endpoint is no longer configured; giving up",
                delivery.endpoint,
                delivery.event_id,
            )
            done = replace(delivery, state="gave_up", next_at=now, last_error="endpoint not configured")
            self.outbox.record(done)
            return done
        event = event_from_body(delivery.body, delivery.project_id)
        headers = signed_headers(event, endpoint.secret.get_secret_value(), int(now))
        answer = self.post(endpoint.url, delivery.body, headers)
        attempts = delivery.attempts + 1
        after = self._clock()
        if is_delivered(answer.status_code):
            logger.info(
                "webhook %s: event %s (%s) delivered to %s after %d attempt(s)",
                delivery.endpoint,
                event.id,
                event.type,
                endpoint.url,
                attempts,
            )
            done = replace(delivery, state="delivered", attempts=attempts, next_at=after, last_error=None)
        else:
            next_at = self.policy.next_attempt_at(
                failed_attempts=attempts, now=after, first_attempt_at=delivery.first_at, rand=self._rand
            )
            if next_at is None:
                logger.error(
                    "webhook %s: event %s (%s) not delivered to %s in %d attempts over %.0f hours "
                    "(last: %s); giving up",
                    delivery.endpoint,
                    event.id,
                    event.type,
                    endpoint.url,
                    attempts,
                    self.policy.window_seconds / 3600,
                    answer.describe(),
                )
                done = replace(
                    delivery, state="gave_up", attempts=attempts, next_at=after, last_error=answer.describe()
                )
            else:
                logger.warning(
                    "webhook %s: event %s attempt %d to %s failed (%s); next in %.0f s",
                    delivery.endpoint,
                    event.id,
                    attempts,
                    endpoint.url,
                    answer.describe(),
                    next_at - after,
                )
                done = replace(delivery, attempts=attempts, next_at=next_at, last_error=answer.describe())
        self.outbox.record(done)
        return done

    def deliver_due(self) -> int:
        """Attempt every delivery due now (a few at once); return how many were attempted."""
        due = self.outbox.due(self._clock(), DUE_BATCH)
        for result in self._pool.map(self._attempt_logged, due):
            del result
        return len(due)

    def _attempt_logged(self, delivery: WebhookDelivery) -> WebhookDelivery | None:
        try:
            return self.attempt(delivery)
        except Exception:
            logger.exception("webhook %s: event %s: attempt failed", delivery.endpoint, delivery.event_id)
            return None

    # ---------------------------------------------------------------- the thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        purged_at = 0.0
        while not self._stop.is_set():
            try:
                while self.deliver_due() == DUE_BATCH and not self._stop.is_set():
                    pass  # more are due: go on at once
                if self._clock() - purged_at >= PURGE_INTERVAL_SECONDS:
                    purged_at = self._clock()
                    self.outbox.purge(purged_at)
            except Exception:
                logger.exception("webhook delivery pass failed; will try again")
            next_at = self.outbox.next_due_at()
            wait = IDLE_WAIT_SECONDS if next_at is None else max(0.0, next_at - self._clock())
            self._wake.wait(min(wait, IDLE_WAIT_SECONDS))
            self._wake.clear()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop sending. Nothing is lost: a delivery's row changes only after its attempt, so one cut
        short is attempted again on the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
