"""Webhooks end to end: `batch-api serve` with webhook endpoints, batches driven by the openai SDK, and
receivers that check every request with the SDK's `client.webhooks.unwrap` (signature, timestamp and
the typed event). Each scenario runs on the local and the AWS backend."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.webhooks import BatchCancelledWebhookEvent, BatchCompletedWebhookEvent

from batch_api.handlers.auth import project_id_for_key
from batch_api.webhooks.events import event_id, new_secret
from tests.e2e.conftest import request_line, upload, wait_for
from tests.support.webhook_receiver import Received, WebhookReceiver

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
KEY_A, KEY_B = "sk-project-a", "sk-project-b"
SECRET_A, SECRET_ALL = new_secret(), new_secret()


@pytest.fixture
def make_receiver() -> Iterator[Any]:
    made: list[WebhookReceiver] = []

    def make(**kwargs: Any) -> WebhookReceiver:
        made.append(WebhookReceiver(**kwargs))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def unwrap(received: Received, secret: str) -> Any:
    """The typed event, verified as a receiver of OpenAI's webhooks verifies it."""
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1", webhook_secret=secret)
    return sdk.webhooks.unwrap(received.body, received.headers)


def run_batch(client: Any, count: int = 3) -> Any:
    lines = [request_line(CHAT, i) for i in range(count)]
    return client.batches.create(
        input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
    )


def test_each_receiver_gets_exactly_its_projects_terminal_events_signed(
    start_server: Any, make_receiver: Any
) -> None:
    only_a, everyone = make_receiver(), make_receiver()
    server = start_server(
        "--api-key",
        KEY_A,
        "--api-key",
        KEY_B,
        "--webhook",
        f"{only_a.url},{SECRET_A},{KEY_A}",
        "--webhook",
        f"{everyone.url},{SECRET_ALL}",
        "--mock-latency",
        "0.2",
    )
    client_a, client_b = server.client(api_key=KEY_A), server.client(api_key=KEY_B)
    completed = wait_for(client_a, run_batch(client_a).id)
    cancelled = client_b.batches.cancel(run_batch(client_b, count=50).id)
    cancelled = wait_for(client_b, cancelled.id)
    assert (completed.status, cancelled.status) == ("completed", "cancelled")

    heard = [unwrap(r, SECRET_ALL) for r in everyone.wait_for(2)]
    assert {(type(e), e.data.id) for e in heard} == {
        (BatchCompletedWebhookEvent, completed.id),
        (BatchCancelledWebhookEvent, cancelled.id),
    }
    [for_a] = [unwrap(r, SECRET_A) for r in only_a.wait_for(1)]
    assert isinstance(for_a, BatchCompletedWebhookEvent)
    assert for_a.id == event_id(completed.id, "completed") and for_a.data.id == completed.id
    assert for_a.created_at == completed.completed_at
    assert len(only_a.received) == 1  # project B's end never goes to A's endpoint
    with pytest.raises(openai.InvalidWebhookSignatureError):  # each endpoint has its own secret
        unwrap(only_a.received[0], SECRET_ALL)
    assert project_id_for_key(KEY_A) in server.log()  # the endpoint is logged with its project


def test_a_failing_receiver_gets_the_event_later_with_the_same_id(
    start_server: Any, make_receiver: Any
) -> None:
    receiver = make_receiver(answers=[500, 503, 404])
    server = start_server(
        "--webhook", f"{receiver.url},{SECRET_A}", env={"BATCH_API_WEBHOOK_BACKOFF_BASE_SECONDS": "0.1"}
    )
    client = server.client()
    batch = wait_for(client, run_batch(client).id)
    attempts = receiver.wait_for(4)
    assert [a.status for a in attempts] == [500, 503, 404, 200]
    events = [unwrap(a, SECRET_A) for a in attempts]  # each attempt signed afresh, each verifies
    assert {e.id for e in events} == {event_id(batch.id, "completed")}
    assert {a.headers["webhook-id"] for a in attempts} == {event_id(batch.id, "completed")}
    assert all(isinstance(e, BatchCompletedWebhookEvent) and e.data.id == batch.id for e in events)
    assert "attempt 1" in server.log() and "delivered" in server.log()


def test_kill_9_between_the_terminal_status_and_the_delivery_still_delivers(
    start_server: Any, make_receiver: Any, tmp_path: Any
) -> None:
    # the first attempt reaches the receiver, which holds it unanswered: the batch has ended, its event
    # is out of the server's hands but not delivered; then the server is killed
    receiver = make_receiver(hold_first=1, answers=[200])
    data_dir = tmp_path / "durable"
    flags = ("--webhook", f"{receiver.url},{SECRET_A}")
    server = start_server(*flags, data_dir=data_dir)
    client = server.client()
    batch = wait_for(client, run_batch(client).id)
    assert batch.status == "completed"
    receiver.wait_for(1)
    server.kill()
    receiver.release()  # its answer goes nowhere: the server never learnt the delivery worked

    restarted = start_server(*flags, data_dir=data_dir)
    attempts = receiver.wait_for(2)
    events = [unwrap(a, SECRET_A) for a in attempts]
    assert Counter(e.id for e in events) == Counter({event_id(batch.id, "completed"): 2})
    assert wait_for(restarted.client(), batch.id).status == "completed"
