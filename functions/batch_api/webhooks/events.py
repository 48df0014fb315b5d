"""The webhook event of a terminal batch status, and its signature, exactly as OpenAI sends them.

Body: `{"id": "evt_...", "object": "event", "type": "batch.completed", "created_at": T,
"data": {"id": "batch_..."}}` (the SDK's `Batch*WebhookEvent`s). Headers (Standard Webhooks):
`webhook-id`, `webhook-timestamp` (unix seconds), `webhook-signature` = `v1,<base64 HMAC-SHA256>` of
`{webhook-id}.{webhook-timestamp}.{body}` under the base64-decoded part of the `whsec_` secret.

The event id is derived from (batch id, status), so every announcement of the same end (a republish
after a crash, every retry, every process) carries the same id, and receivers can deduplicate on it.
Each attempt is signed afresh: the SDK refuses timestamps more than 5 minutes old.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

BATCH_EVENT_TYPES = ("batch.completed", "batch.failed", "batch.expired", "batch.cancelled")


def terminal_event_pattern(source: str) -> dict[str, list[str]]:
    """The EventBridge pattern of the events webhooks announce (the stack's rule; tests' moto rule)."""
    return {"source": [source], "detail-type": list(BATCH_EVENT_TYPES)}


SECRET_PREFIX = "whsec_"
# the batch field holding the time of each terminal status: the event's `created_at`
_TERMINAL_TIME = {
    "batch.completed": "completed_at",
    "batch.failed": "failed_at",
    "batch.expired": "expired_at",
    "batch.cancelled": "cancelled_at",
}


class InvalidWebhookSecret(ValueError):
    """Not a `whsec_<base64>` secret."""


@dataclass(frozen=True)
class WebhookEvent:
    """One event, as every attempt sends it: the id and the body bytes never change."""

    id: str
    type: str
    project_id: str
    created_at: int
    body: bytes


def event_id(batch_id: str, status: str) -> str:
    """The one id of the event announcing that `batch_id` reached `status`."""
    digest = hashlib.sha256(f"{batch_id}:{status}".encode()).hexdigest()[:32]
    return f"evt_{digest}"


def build_event(detail_type: str, detail: Mapping[str, Any]) -> WebhookEvent | None:
    """The webhook event for a terminal batch event (`EventSink.publish`'s arguments, or the
    EventBridge event's `detail-type` and `detail`); None for any other event."""
    if detail_type not in BATCH_EVENT_TYPES:
        return None
    batch_id = str(detail["id"])
    status = detail_type.removeprefix("batch.")
    created_at = detail.get(_TERMINAL_TIME[detail_type]) or detail.get("created_at") or 0
    identifier = event_id(batch_id, status)
    body = orjson.dumps(
        {
            "id": identifier,
            "object": "event",
            "type": detail_type,
            "created_at": int(created_at),
            "data": {"id": batch_id},
        }
    )
    return WebhookEvent(
        id=identifier,
        type=detail_type,
        project_id=str(detail.get("project_id") or ""),
        created_at=int(created_at),
        body=body,
    )


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` secret (what the SDK decodes it to)."""
    if not secret.startswith(SECRET_PREFIX):
        raise InvalidWebhookSecret("a webhook secret starts with 'whsec_' followed by base64")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX) :], validate=True)
    except ValueError as exc:
        raise InvalidWebhookSecret("the part after 'whsec_' is not base64") from exc
    if len(key) < 16:
        raise InvalidWebhookSecret("a webhook secret holds at least 16 bytes after 'whsec_'")
    return key


def new_secret() -> str:
    """A fresh `whsec_` secret (32 random bytes)."""
    import secrets

    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signature(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`."""
    signed = webhook_id.encode() + b"." + str(timestamp).encode() + b"." + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


def signed_headers(event: WebhookEvent, secret: str, timestamp: int) -> dict[str, str]:
    """The headers of one attempt to send `event`, signed with `secret` at `timestamp`."""
    return {
        "content-type": "application/json",
        "webhook-id": event.id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret_key(secret), event.id, timestamp, event.body),
    }


def event_from_body(body: bytes, project_id: str) -> WebhookEvent:
    """An event read back from its stored body (the outbox, a queued delivery)."""
    document = orjson.loads(body)
    return WebhookEvent(
        id=document["id"],
        type=document["type"],
        project_id=project_id,
        created_at=int(document["created_at"]),
        body=body,
    )
