"""Lambda's SQS event source, played once by hand (moto routes bus -> queue, but runs no function)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def invoke_with_messages(
    sqs: Any, queue_url: str, messages: list[dict[str, Any]], invoke: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    """Hand the received `messages` to `invoke` as an SQS event, then delete those it did not report
    as batch item failures (as the event source does); its answer."""
    records = [
        {
            "messageId": m["MessageId"],
            "receiptHandle": m["ReceiptHandle"],
            "body": m["Body"],
            "attributes": m.get("Attributes", {}),
            "eventSource": "aws:sqs",
        }
        for m in messages
    ]
    answer: dict[str, Any] = invoke({"Records": records})
    failed = {item["itemIdentifier"] for item in answer["batchItemFailures"]}
    for message in messages:
        if message["MessageId"] not in failed:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return answer
