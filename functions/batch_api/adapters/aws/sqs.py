"""The webhook delivery queue on SQS (`webhooks.queue.DeliveryQueue`)."""

from __future__ import annotations

from typing import Any


class SqsDeliveryQueue:
    def __init__(self, client: Any, queue_url: str) -> None:
        self.client = client
        self.queue_url = queue_url

    def send_later(self, body: bytes, delay_seconds: int) -> None:
        self.client.send_message(
            QueueUrl=self.queue_url, MessageBody=body.decode(), DelaySeconds=delay_seconds
        )

    def retry_later(self, receipt_handle: str, delay_seconds: int) -> None:
        self.client.change_message_visibility(
            QueueUrl=self.queue_url, ReceiptHandle=receipt_handle, VisibilityTimeout=delay_seconds
        )
