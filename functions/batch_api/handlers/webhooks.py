"""The webhook delivery function: an SQS batch of terminal events (from the bus's rule) and retried
deliveries in, partial batch failures out (`webhooks/queue.py` holds the logic)."""

from __future__ import annotations

from functools import cache
from typing import Any

from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from batch_api.bootstrap_aws import build_webhook_delivery
from batch_api.config import Settings
from batch_api.handlers.observability import logger, metrics, route_library_logs, tracer
from batch_api.webhooks.queue import QueueDelivery

GAVE_UP_METRIC = "WebhookGaveUp"


def _gave_up(endpoint: str, event_id: str) -> None:
    metrics.add_metric(name=GAVE_UP_METRIC, unit=MetricUnit.Count, value=1)


@cache
def get_delivery() -> QueueDelivery:
    delivery = build_webhook_delivery(Settings(backend="aws"), on_gave_up=_gave_up)
    route_library_logs()
    return delivery


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    failures = get_delivery().handle(event.get("Records") or [])
    logger.info(
        "webhook messages handled",
        extra={"received": len(event.get("Records") or []), "retrying": len(failures)},
    )
    return {"batchItemFailures": [{"itemIdentifier": message_id} for message_id in failures]}
