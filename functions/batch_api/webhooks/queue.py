"""The AWS delivery: EventBridge rule -> SQS queue -> this logic in the delivery function.

A message is either the terminal event as EventBridge put it on the queue, or one endpoint's delivery
(put on the queue by this code). An event is only fanned out: one delivery message per endpoint that
hears its project, at once, before any attempt (so a retry never sends again to an endpoint that took
it, and an invocation that dies mid-way, handing the event back, can only have queued deliveries, not
started retry chains). A delivery message is one attempt, bounded by the sender's timeout, so an
invocation lasts at most its batch size times that. A delivery that fails stays on the queue: its
visibility timeout is set to the next backoff and the function reports it as a batch item failure, so
SQS hands it back then (`ApproximateReceiveCount` counts its attempts). After 72 hours from the first attempt the delivery is dropped with an error log
and the `WebhookGaveUp` metric (alarmed); the dead-letter queue takes what this code cannot handle at
all (a malformed message, a function that keeps failing).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from batch_api.ports import Clock
from batch_api.webhooks.endpoints import Endpoints, WebhookEndpoint
from batch_api.webhooks.events import WebhookEvent, build_event, event_from_body, signed_headers
from batch_api.webhooks.policy import RetryPolicy, is_delivered
from batch_api.webhooks.sender import Attempt, Post

logger = logging.getLogger(__name__)

MAX_SEND_DELAY_SECONDS = 900  # SQS DelaySeconds
MAX_VISIBILITY_SECONDS = 43_200  # SQS: 12 hours per ChangeMessageVisibility
DELIVERY_KIND = "webhook_delivery"


class DeliveryQueue(Protocol):
    def send_later(self, body: bytes, delay_seconds: int) -> None:
        """Put a message on the delivery queue, visible after `delay_seconds` (at most 900)."""

    def retry_later(self, receipt_handle: str, delay_seconds: int) -> None:
        """Make a received message visible again after `delay_seconds` (at most 12 hours)."""


@dataclass
class QueueDelivery:
    endpoints: Endpoints
    secrets: Callable[[], Mapping[str, str]]  # endpoint name -> whsec_ secret (cached by the caller)
    queue: DeliveryQueue
    post: Post
    policy: RetryPolicy
    clock: Clock
    on_gave_up: Callable[[str, str], None] = lambda endpoint, event_id: None
    rand: Callable[[], float] = field(default=random.random)

    def handle(self, records: Sequence[Mapping[str, Any]]) -> list[str]:
        """Handle an SQS batch; return the message ids to report as batch item failures."""
        failures: list[str] = []
        for record in records:
            message_id = str(record.get("messageId"))
            try:
                if not self._handle(record):
                    failures.append(message_id)
            except Exception:
                logger.exception("webhook message %s could not be handled; SQS will hand it back", message_id)
                failures.append(message_id)
        return failures

    def _handle(self, record: Mapping[str, Any]) -> bool:
        """True when the message is done with (delivered, given up, or handed on as deliveries)."""
        message = orjson.loads(record["body"])
        if message.get("kind") == DELIVERY_KIND:
            return self._redeliver(record, message)
        event = build_event(str(message.get("detail-type")), message.get("detail") or {})
        if event is None:
            logger.warning("ignoring a %s event on the webhook queue", message.get("detail-type"))
            return True
        now = self.clock()
        for endpoint in self.endpoints.for_project(event.project_id):
            delivery = {
                "kind": DELIVERY_KIND,
                "endpoint": endpoint.key,
                "project_id": event.project_id,
                "event": event.body.decode(),
                "first_attempt_at": now,
                "failed_attempts": 0,
            }
            self.queue.send_later(orjson.dumps(delivery), 0)
        return True

    def _redeliver(self, record: Mapping[str, Any], message: Mapping[str, Any]) -> bool:
        event = event_from_body(str(message["event"]).encode(), str(message["project_id"]))
        key = str(message["endpoint"])
        receives = int((record.get("attributes") or {}).get("ApproximateReceiveCount", 1))
        failed_before = int(message["failed_attempts"]) + receives - 1
        endpoint = self.endpoints.get(key)
        if endpoint is None:
            logger.error("webhook %s is no longer configured; dropping event %s", key, event.id)
            self.on_gave_up(key, event.id)
            return True
        answer = self._attempt(endpoint, event)
        if is_delivered(answer.status_code):
            logger.info("webhook %s: event %s delivered after %d attempts", key, event.id, failed_before + 1)
            return True
        failed = failed_before + 1
        now = self.clock()
        next_at = self.policy.next_attempt_at(
            failed_attempts=failed,
            now=now,
            first_attempt_at=float(message["first_attempt_at"]),
            rand=self.rand,
        )
        if next_at is None:
            self._give_up(key, event, failed, answer)
            return True
        delay = max(1, min(int(next_at - now + 0.999), MAX_VISIBILITY_SECONDS))
        logger.warning(
            "webhook %s: event %s attempt %d failed (%s); next in %d s",
            key,
            event.id,
            failed,
            answer.describe(),
            delay,
        )
        self.queue.retry_later(str(record["receiptHandle"]), delay)
        return False

    def _attempt(self, endpoint: WebhookEndpoint, event: WebhookEvent) -> Attempt:
        secret = self.secrets().get(endpoint.key)
        if not secret:
            return Attempt(None, f"no secret for endpoint {endpoint.key} in the webhook secrets")
        headers = signed_headers(event, secret, int(self.clock()))
        return self.post(endpoint.url, event.body, headers)

    def _give_up(self, key: str, event: WebhookEvent, attempts: int, answer: Attempt) -> None:
        logger.error(
            "webhook %s: event %s (%s) not delivered in %d attempts over %.0f hours (last: %s); giving up",
            key,
            event.id,
            event.type,
            attempts,
            self.policy.window_seconds / 3600,
            answer.describe(),
        )
        self.on_gave_up(key, event.id)
