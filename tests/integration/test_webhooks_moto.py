"""Webhooks on AWS under moto: a batch's terminal status, committed by the real terminal path with the
AWS adapters, goes to the EventBridge bus, the rule (the stack's pattern) puts it on the SQS queue, and
the delivery function's handler delivers it, signed, to a local receiver that verifies it with the
openai SDK. moto routes bus -> queue itself; the queue -> function hop (Lambda's SQS event source) is
driven here: messages are received and passed to the handler in the event shape Lambda uses, and what
it reports as failed is left on the queue, as Lambda does. The receiver runs on 127.0.0.1 over http,
which the function's own guard refuses, so the test hands the handler a sender with the local guard
(the public guard is tested in tests/unit/test_webhooks.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import boto3
import openai
import pytest
from openai.types.webhooks import BatchCancelledWebhookEvent, BatchCompletedWebhookEvent

from batch_api.bootstrap_aws import build_aws_deps, build_webhook_delivery
from batch_api.config import Settings
from batch_api.handlers import webhooks as webhook_handler
from batch_api.webhooks.events import event_id, new_secret, terminal_event_pattern
from batch_api.webhooks.sender import AddressGuard, WebhookSender
from batch_api.workflow.terminal import end_batch
from tests.integration.conftest import (
    BATCH_ID,
    BUS,
    PROJECT,
    REGION,
    AwsWorld,
    LambdaContext,
    load_event,
    seed_batch,
    seed_input_file,
)
from tests.support.sqs_source import invoke_with_messages
from tests.support.webhook_receiver import WebhookReceiver

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:No application metrics to publish")]

SECRET = new_secret()
SECRETS_NAME = "batch-api/test/webhook-secrets"
ENDPOINT = "receiver"


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    served = WebhookReceiver()
    yield served
    served.close()


@pytest.fixture
def webhook_queue(aws: AwsWorld) -> str:
    """The stack's wiring: a rule on the bus for terminal events -> the delivery queue (with a DLQ)."""
    sqs = aws.sqs
    dlq_arn = sqs.get_queue_attributes(
        QueueUrl=sqs.create_queue(QueueName="webhooks-dlq")["QueueUrl"], AttributeNames=["QueueArn"]
    )["Attributes"]["QueueArn"]
    url: str = sqs.create_queue(
        QueueName="webhooks",
        Attributes={"RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "200"})},
    )["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    events = boto3.client("events", region_name=REGION)
    events.put_rule(
        Name="webhooks", EventBusName=BUS, EventPattern=json.dumps(terminal_event_pattern("batch-api"))
    )
    events.put_targets(Rule="webhooks", EventBusName=BUS, Targets=[{"Id": "queue", "Arn": arn}])
    boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name=SECRETS_NAME, SecretString=json.dumps({ENDPOINT: SECRET})
    )
    return url


@pytest.fixture
def delivery_env(
    lambda_env: dict[str, str], webhook_queue: str, receiver: WebhookReceiver, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    """The delivery function's environment as the stack sets it, and its logic with the local guard."""
    monkeypatch.setenv(
        "BATCH_API_WEBHOOKS", json.dumps([{"name": ENDPOINT, "url": receiver.url, "project": PROJECT}])
    )
    monkeypatch.setenv("BATCH_API_WEBHOOK_SECRETS_SECRET_NAME", SECRETS_NAME)
    monkeypatch.setenv("BATCH_API_WEBHOOK_QUEUE_URL", webhook_queue)
    monkeypatch.setenv("BATCH_API_WEBHOOK_BACKOFF_BASE_SECONDS", "0.01")  # retries due within a second
    local_post = WebhookSender(AddressGuard.local(), timeout_seconds=5).post
    delivery = build_webhook_delivery(Settings(backend="aws"), post=local_post)
    monkeypatch.setattr(webhook_handler, "get_delivery", lambda: delivery)
    yield


def end_cancelled() -> None:
    deps = build_aws_deps(Settings(backend="aws"), workflow=_NoWorkflow())
    seed_input_file(deps)
    seed_batch(deps)
    now = deps.now()
    end_batch(deps, PROJECT, BATCH_ID, lambda batch: {"status": "cancelled", "cancelled_at": now})


class _NoWorkflow:
    def start(self, project_id: str, batch_id: str) -> None:
        raise AssertionError("nothing starts here")


def invoke_with_queue(aws: AwsWorld, queue_url: str, *, timeout: float = 10.0) -> dict[str, Any]:
    """What Lambda's SQS event source does once: receive what is visible, invoke the handler with it,
    delete what it did not report as failed. Waits (SQS long polling) until a message is there."""
    deadline = time.monotonic() + timeout
    messages: list[dict[str, Any]] = []
    while not messages and time.monotonic() < deadline:
        messages = aws.sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1, AttributeNames=["All"]
        ).get("Messages", [])
    assert messages, "no message reached the webhook queue"
    return invoke_with_messages(
        aws.sqs, queue_url, messages, lambda event: webhook_handler.handler(event, LambdaContext())
    )


def verified(body: bytes, headers: dict[str, str]) -> Any:
    return openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1").webhooks.unwrap(
        body, headers, secret=SECRET
    )


def test_a_terminal_status_reaches_the_receiver_signed_through_bus_queue_and_function(
    aws: AwsWorld, webhook_queue: str, delivery_env: None, receiver: WebhookReceiver
) -> None:
    end_cancelled()
    assert invoke_with_queue(aws, webhook_queue) == {"batchItemFailures": []}  # fanned out
    assert receiver.received == []
    assert invoke_with_queue(aws, webhook_queue) == {"batchItemFailures": []}  # delivered
    (got,) = receiver.wait_for(1)
    event = verified(got.body, got.headers)
    assert isinstance(event, BatchCancelledWebhookEvent)
    assert event.id == event_id(BATCH_ID, "cancelled") and event.data.id == BATCH_ID


def test_a_failing_receiver_gets_the_same_event_again_through_the_queue(
    aws: AwsWorld, webhook_queue: str, delivery_env: None, receiver: WebhookReceiver
) -> None:
    receiver.answers = [500, 503]
    end_cancelled()
    # the event message is done with once a delivery message for the endpoint is queued
    assert invoke_with_queue(aws, webhook_queue) == {"batchItemFailures": []}
    # attempts 1 and 2 fail: the delivery message stays, visible again after the backoff
    for _ in range(2):
        assert len(invoke_with_queue(aws, webhook_queue)["batchItemFailures"]) == 1
    assert invoke_with_queue(aws, webhook_queue) == {"batchItemFailures": []}  # attempt 3 delivers
    attempts = receiver.wait_for(3)
    assert [a.status for a in attempts] == [500, 503, 200]
    assert {a.headers["webhook-id"] for a in attempts} == {event_id(BATCH_ID, "cancelled")}
    assert all(isinstance(verified(a.body, a.headers), BatchCancelledWebhookEvent) for a in attempts)
    assert aws.sqs.receive_message(QueueUrl=webhook_queue, WaitTimeSeconds=0).get("Messages") is None


def test_the_sample_sqs_event_is_delivered_by_the_handler(
    aws: AwsWorld, webhook_queue: str, delivery_env: None, receiver: WebhookReceiver
) -> None:
    sample = load_event("webhooks/sqs_batch.json")
    assert webhook_handler.handler(sample, LambdaContext()) == {"batchItemFailures": []}  # fanned out
    assert invoke_with_queue(aws, webhook_queue) == {"batchItemFailures": []}  # its delivery
    (got,) = receiver.wait_for(1)
    event = verified(got.body, got.headers)
    assert isinstance(event, BatchCompletedWebhookEvent)
    assert (event.data.id, event.created_at) == (BATCH_ID, 1795780800)
