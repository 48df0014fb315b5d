"""Webhooks: the event and its signature (judged by the openai SDK), the retry policy, the address
guard, one HTTP attempt, and the local outbox and deliverer (fake clock, no sleeps)."""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai.types.webhooks import (
    BatchCancelledWebhookEvent,
    BatchCompletedWebhookEvent,
    BatchExpiredWebhookEvent,
    BatchFailedWebhookEvent,
)

from batch_api.adapters.local.webhook_outbox import SqliteWebhookOutbox
from batch_api.webhooks.endpoints import (
    Endpoints,
    WebhookConfigError,
    WebhookEndpoint,
    parse_flag,
    with_key_projects,
)
from batch_api.webhooks.events import (
    InvalidWebhookSecret,
    build_event,
    event_id,
    new_secret,
    signed_headers,
)
from batch_api.webhooks.outbox import OutboxDeliverer, OutboxEventSink
from batch_api.webhooks.policy import RetryPolicy, is_delivered
from batch_api.webhooks.sender import AddressGuard, RefusedUrl, WebhookSender, is_public_address
from tests.support.webhook_receiver import WebhookReceiver

SECRET = new_secret()
NOW = 1_800_000_000


def detail(
    status: str = "completed", batch_id: str = "batch_abc", project: str = "proj_a"
) -> dict[str, object]:
    return {
        "id": batch_id,
        "status": status,
        f"{status}_at": NOW - 5,
        "created_at": NOW - 100,
        "project_id": project,
    }


def sdk() -> openai.OpenAI:
    return openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1", webhook_secret=SECRET)


# ------------------------------------------------------------------ the event and its signature


@pytest.mark.parametrize(
    ("status", "typed"),
    [
        ("completed", BatchCompletedWebhookEvent),
        ("failed", BatchFailedWebhookEvent),
        ("expired", BatchExpiredWebhookEvent),
        ("cancelled", BatchCancelledWebhookEvent),
    ],
)
def test_the_sdk_unwraps_every_terminal_event_into_its_type(status: str, typed: type) -> None:
    import time

    event = build_event(f"batch.{status}", detail(status))
    assert event is not None
    now = int(time.time())  # the SDK checks the timestamp against its own clock
    unwrapped = sdk().webhooks.unwrap(event.body, signed_headers(event, SECRET, now))
    assert isinstance(unwrapped, typed)
    assert unwrapped.id == event.id == event_id("batch_abc", status)
    assert unwrapped.data.id == "batch_abc"
    assert unwrapped.created_at == NOW - 5
    assert unwrapped.object == "event"


def test_signature_is_hmac_sha256_of_id_timestamp_and_body_under_the_decoded_secret() -> None:
    event = build_event("batch.completed", detail())
    assert event is not None
    headers = signed_headers(event, SECRET, NOW)
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    expected = base64.b64encode(
        hmac.new(key, f"{event.id}.{NOW}.".encode() + event.body, hashlib.sha256).digest()
    ).decode()
    assert headers["webhook-signature"] == f"v1,{expected}"
    assert headers["webhook-id"] == event.id
    assert headers["webhook-timestamp"] == str(NOW)


def test_the_sdk_refuses_a_tampered_body_another_secret_or_an_old_timestamp() -> None:
    import time

    event = build_event("batch.completed", detail())
    assert event is not None
    now = int(time.time())
    headers = signed_headers(event, SECRET, now)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk().webhooks.unwrap(event.body.replace(b"batch_abc", b"batch_xyz"), headers)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk().webhooks.unwrap(event.body, signed_headers(event, new_secret(), now))
    with pytest.raises(openai.InvalidWebhookSignatureError):
        sdk().webhooks.unwrap(event.body, signed_headers(event, SECRET, now - 600))


def test_event_id_and_body_are_stable_per_batch_and_status() -> None:
    first, again = build_event("batch.completed", detail()), build_event("batch.completed", detail())
    assert first == again
    other = build_event("batch.cancelled", detail("cancelled"))
    assert other is not None and first is not None and other.id != first.id
    assert build_event("batch.in_progress", detail()) is None
    assert orjson.loads(first.body) == {
        "id": first.id,
        "object": "event",
        "type": "batch.completed",
        "created_at": NOW - 5,
        "data": {"id": "batch_abc"},
    }


@pytest.mark.parametrize(
    "secret", ["sk-abc", "whsec_***not-base64***", "whsec_" + base64.b64encode(b"short").decode()]
)
def test_a_secret_that_is_not_whsec_base64_is_refused_without_echoing_it(secret: str) -> None:
    with pytest.raises(ValueError, match=r"webhook secret|base64"):  # pydantic's ValidationError
        WebhookEndpoint(url="https://example.com/h", secret=secret)  # type: ignore[arg-type]
    if secret.startswith("whsec_"):
        with pytest.raises(InvalidWebhookSecret):
            signed_headers(build_event("batch.completed", detail()), secret, NOW)  # type: ignore[arg-type]
    with pytest.raises(WebhookConfigError) as caught:
        parse_flag(
            f"https://example.com/h,{secret}" if secret.startswith("whsec_") else "https://example.com/h"
        )
    assert secret not in str(caught.value)


# ------------------------------------------------------------------ endpoints


def test_flag_forms_and_project_matching() -> None:
    every = parse_flag(f"https://example.com/a?x=1,2,{SECRET}")
    assert every.url == "https://example.com/a?x=1,2" and every.project is None
    scoped = parse_flag(f"http://127.0.0.1:9/h,{SECRET},key-one")
    mapped = with_key_projects([every, scoped], ["key-one"], lambda key: f"proj_of_{key}")
    endpoints = Endpoints(mapped)
    assert [e.url for e in endpoints.for_project("proj_of_key-one")] == [every.url, scoped.url]
    assert [e.url for e in endpoints.for_project("proj_other")] == [every.url]
    assert mapped[1].key == scoped.key  # the name survives the mapping: outbox rows keep their endpoint
    with pytest.raises(WebhookConfigError):
        Endpoints([every, every])


# ------------------------------------------------------------------ the policy


def test_backoff_doubles_with_jitter_and_caps() -> None:
    policy = RetryPolicy(base_seconds=10, max_delay_seconds=3600)
    assert [policy.delay(n, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert [policy.delay(n, rand=lambda: 0.0) for n in (1, 2, 3)] == [5, 10, 20]
    assert policy.delay(30, rand=lambda: 1.0) == 3600
    assert is_delivered(200) and is_delivered(204)
    assert not any(is_delivered(code) for code in (None, 199, 301, 302, 400, 410, 500, 503))


def test_retries_span_72_hours_from_the_first_attempt_then_give_up() -> None:
    policy = RetryPolicy()
    start, now, failed = 0.0, 0.0, 0
    while True:
        failed += 1
        next_at = policy.next_attempt_at(
            failed_attempts=failed, now=now, first_attempt_at=start, rand=lambda: 1.0
        )
        if next_at is None:
            break
        assert next_at > now
        now = next_at
    assert now == start + 72 * 3600  # the last attempt lands on the window's end, not past it
    assert 70 < failed < 100


# ------------------------------------------------------------------ the address guard


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # instance metadata
        "100.64.0.1",  # CGNAT
        "0.0.0.0",
        "224.0.0.1",
        "::1",
        "fe80::1",
        "fd00:ec2::254",  # the IPv6 metadata endpoint (ULA)
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert not is_public_address(address)
    guard = AddressGuard.public(resolve=lambda host, port: [address])
    with pytest.raises(RefusedUrl):
        guard.address_for("hooks.example.com", 443)


def test_public_guard_takes_https_to_public_addresses_only() -> None:
    assert is_public_address("93.184.216.34") and is_public_address("2606:4700::1111")
    guard = AddressGuard.public(resolve=lambda host, port: ["93.184.216.34", "10.0.0.1"])
    with pytest.raises(RefusedUrl):  # one private answer among public ones is enough to refuse
        guard.address_for("hooks.example.com", 443)
    with pytest.raises(RefusedUrl):
        guard.check_url("http://hooks.example.com/x")
    with pytest.raises(RefusedUrl):
        guard.check_url("https://169.254.169.254/latest")
    guard.check_url("https://hooks.example.com/x")
    assert (
        AddressGuard.public(resolve=lambda h, p: ["93.184.216.34"]).address_for("h", 443) == "93.184.216.34"
    )


# ------------------------------------------------------------------ one attempt


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    served = WebhookReceiver()
    yield served
    served.close()


def test_attempt_connects_to_the_checked_address_with_the_host_name(receiver: WebhookReceiver) -> None:
    asked: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        asked.append(host)
        return ["127.0.0.1"]

    sender = WebhookSender(
        AddressGuard(allow_http=True, allow_private=True, resolve=resolve), timeout_seconds=5
    )
    answer = sender.post(f"http://hooks.invalid:{receiver.port}/in?x=1", b"{}", {"webhook-id": "evt_1"})
    assert answer.status_code == 200
    (got,) = receiver.wait_for(1)
    assert asked == ["hooks.invalid"]
    assert got.path == "/in?x=1" and got.headers["host"] == f"hooks.invalid:{receiver.port}"


def test_a_redirect_is_a_failed_attempt_and_is_not_followed(receiver: WebhookReceiver) -> None:
    target = WebhookReceiver()
    try:
        receiver.answers = [302]
        receiver.redirect_to = target.url
        answer = WebhookSender(AddressGuard.local(), timeout_seconds=5).post(receiver.url, b"{}", {})
        assert answer.status_code == 302 and not is_delivered(answer.status_code)
        assert target.received == []
    finally:
        target.close()


def test_public_guard_never_calls_a_local_receiver(receiver: WebhookReceiver) -> None:
    sender = WebhookSender(AddressGuard.public(), timeout_seconds=5)
    assert sender.post(receiver.url, b"{}", {}).error is not None  # http
    https_local = WebhookSender(AddressGuard.public(resolve=lambda h, p: ["127.0.0.1"]), timeout_seconds=5)
    assert "refused" in (https_local.post("https://hooks.example.com/h", b"{}", {}).error or "")
    assert receiver.received == []


def test_a_receiver_that_does_not_answer_is_a_timeout() -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)  # accepts the connection, never answers
    try:
        port = listener.getsockname()[1]
        answer = WebhookSender(AddressGuard.local(), timeout_seconds=0.2).post(
            f"http://127.0.0.1:{port}/", b"{}", {}
        )
        assert answer.status_code is None and answer.error == "timeout"
    finally:
        listener.close()


def test_a_receiver_answering_a_byte_at_a_time_is_cut_off_at_the_attempt_s_timeout() -> None:
    """The timeout bounds the whole attempt: each byte arrives well within it, the answer never does."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def drip() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                if stop.wait(0.05):  # a byte every 50 ms, a quarter of the timeout
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        began = time.monotonic()
        answer = WebhookSender(AddressGuard.local(), timeout_seconds=0.5).post(
            f"http://127.0.0.1:{listener.getsockname()[1]}/", b"{}", {}
        )
        took = time.monotonic() - began
        assert answer.status_code is None and answer.error == "timeout"
        assert took < 3  # not the 50 s the drip would take
    finally:
        stop.set()
        listener.close()
        dripper.join(5)


# ------------------------------------------------------------------ the outbox and the deliverer


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingSink:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, object]]] = []

    def publish(self, detail_type: str, detail: object) -> None:
        self.published.append((detail_type, dict(detail)))  # type: ignore[call-overload]


def _wired(tmp_path: Path, receiver: WebhookReceiver, *, project: str | None = "proj_a"):  # type: ignore[no-untyped-def]
    clock = FakeClock(NOW)
    outbox = SqliteWebhookOutbox(tmp_path / "webhooks.sqlite3")
    endpoints = Endpoints([WebhookEndpoint(url=receiver.url, secret=SECRET, project=project)])  # type: ignore[arg-type]
    sender = WebhookSender(AddressGuard.local(), timeout_seconds=5)
    deliverer = OutboxDeliverer(outbox, endpoints, sender.post, RetryPolicy(), clock=clock, rand=lambda: 1.0)
    sink = OutboxEventSink(RecordingSink(), outbox, endpoints, clock=clock, on_enqueued=deliverer.wake)
    return clock, outbox, deliverer, sink


def test_enqueue_is_once_per_event_and_endpoint_and_only_for_the_project(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    _, outbox, _, sink = _wired(tmp_path, receiver)
    sink.publish("batch.completed", detail())
    sink.publish("batch.completed", detail())  # announced again after a crash
    sink.publish("batch.completed", detail(batch_id="batch_other", project="proj_b"))
    sink.publish("batch.in_progress", detail())
    assert [(d.event_id, d.state) for d in outbox.list_deliveries()] == [
        (event_id("batch_abc", "completed"), "pending")
    ]
    assert len(sink.inner.published) == 4  # type: ignore[attr-defined]


def test_announces_from_many_threads_at_once_enqueue_each_delivery_once(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """The terminal step, the restart's resume and the sweep may announce the same ends together."""
    import threading

    _, outbox, _, sink = _wired(tmp_path, receiver)
    start = threading.Barrier(8)

    def announce(worker: int) -> None:
        start.wait()
        for i in range(40):
            sink.publish("batch.completed", detail(batch_id=f"batch_{(worker + i) % 10}"))

    threads = [threading.Thread(target=announce, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    got = sorted(d.event_id for d in outbox.list_deliveries())
    assert got == sorted(event_id(f"batch_{n}", "completed") for n in range(10))
    assert len(sink.inner.published) == 8 * 40  # type: ignore[attr-defined]


def test_failed_attempts_retry_with_backoff_and_the_same_id_each_signed_afresh(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    clock, outbox, deliverer, sink = _wired(tmp_path, receiver)
    receiver.answers = [500, 404, 302]
    sink.publish("batch.completed", detail())
    expected_delays = [10, 20, 40]
    for delay in expected_delays:
        assert deliverer.deliver_due() == 1
        (pending,) = outbox.list_deliveries()
        assert pending.state == "pending" and pending.next_at == clock.now + delay
        clock.now += delay - 1
        assert deliverer.deliver_due() == 0  # not due yet
        clock.now += 1
    assert deliverer.deliver_due() == 1
    (done,) = outbox.list_deliveries()
    assert done.state == "delivered" and done.attempts == 4
    attempts = receiver.wait_for(4)
    assert {a.headers["webhook-id"] for a in attempts} == {event_id("batch_abc", "completed")}
    assert len({a.headers["webhook-timestamp"] for a in attempts}) == 4
    assert len({a.body for a in attempts}) == 1
    assert deliverer.deliver_due() == 0


def test_a_receiver_failing_for_72_hours_is_given_up(tmp_path: Path, receiver: WebhookReceiver) -> None:
    clock, outbox, deliverer, sink = _wired(tmp_path, receiver)
    receiver.answers = [503] * 1000
    sink.publish("batch.failed", detail("failed"))
    while (due := outbox.next_due_at()) is not None:
        clock.now = max(clock.now, due)
        deliverer.deliver_due()
    (given_up,) = outbox.list_deliveries()
    assert given_up.state == "gave_up" and given_up.last_error == "HTTP 503"
    assert clock.now - NOW == 72 * 3600
    assert len(receiver.received) == given_up.attempts
    assert outbox.purge(clock.now + 86400) == 0  # ended rows are kept a week for inspection
    assert outbox.purge(clock.now + 8 * 86400) == 1


def test_the_deliverer_thread_sends_what_is_enqueued_and_what_a_restart_finds(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    import time

    _, _, deliverer, sink = _wired(tmp_path, receiver)
    deliverer._clock = time.time  # type: ignore[method-assign]
    sink._clock = time.time  # type: ignore[method-assign]
    sink.publish("batch.expired", detail("expired"))  # before start: what a previous process left
    deliverer.start()
    try:
        receiver.wait_for(1)
        sink.publish("batch.completed", detail(batch_id="batch_2"))
        got = receiver.wait_for(2)
    finally:
        deliverer.stop()
    assert [orjson.loads(r.body)["type"] for r in got] == ["batch.expired", "batch.completed"]


# ------------------------------------------------------------------ the AWS delivery over a queue


class FakeQueue:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, int]] = []
        self.retried: list[tuple[str, int]] = []

    def send_later(self, body: bytes, delay_seconds: int) -> None:
        self.sent.append((body, delay_seconds))

    def retry_later(self, receipt_handle: str, delay_seconds: int) -> None:
        self.retried.append((receipt_handle, delay_seconds))


def _queue_delivery(answers: dict[str, list[int]], clock: FakeClock, window: float = 72 * 3600):  # type: ignore[no-untyped-def]
    from batch_api.webhooks.queue import QueueDelivery
    from batch_api.webhooks.sender import Attempt

    posted: list[tuple[str, dict[str, str]]] = []

    def post(url: str, body: bytes, headers: object) -> Attempt:
        posted.append((url, dict(headers)))  # type: ignore[call-overload]
        scripted = answers.get(url) or []
        return Attempt(scripted.pop(0) if scripted else 200)

    endpoints = Endpoints(
        [
            WebhookEndpoint(url="https://a.example/h", name="a", project="proj_a"),
            WebhookEndpoint(url="https://b.example/h", name="b"),
        ]
    )
    gave_up: list[tuple[str, str]] = []
    queue = FakeQueue()
    delivery = QueueDelivery(
        endpoints=endpoints,
        secrets=lambda: {"a": SECRET, "b": SECRET},
        queue=queue,
        post=post,
        policy=RetryPolicy(window_seconds=window),
        clock=clock,
        on_gave_up=lambda *what: gave_up.append(what),
        rand=lambda: 1.0,
    )
    return delivery, queue, posted, gave_up


def _bus_record(status: str = "completed") -> dict[str, object]:
    body = {"id": "eb-1", "detail-type": f"batch.{status}", "source": "batch-api", "detail": detail(status)}
    return {"messageId": "m1", "receiptHandle": "r1", "body": orjson.dumps(body).decode(), "attributes": {}}


def _delivery_record(body: bytes, message_id: str, receives: int) -> dict[str, object]:
    return {
        "messageId": message_id,
        "receiptHandle": f"r-{message_id}",
        "body": body.decode(),
        "attributes": {"ApproximateReceiveCount": str(receives)},
    }


def test_an_event_is_fanned_out_to_one_delivery_per_endpoint_before_any_attempt() -> None:
    clock = FakeClock(NOW)
    delivery, queue, posted, _ = _queue_delivery({}, clock)
    assert delivery.handle([_bus_record()]) == []
    assert posted == []  # nothing attempted: an invocation dying now leaves only queued deliveries
    messages = [(orjson.loads(body), delay) for body, delay in queue.sent]
    assert [(m["endpoint"], m["failed_attempts"], delay) for m, delay in messages] == [
        ("a", 0, 0),
        ("b", 0, 0),
    ]
    assert {m["first_attempt_at"] for m, _ in messages} == {NOW}

    queue.sent.clear()  # the event handed back (its invocation died): the same deliveries again
    assert delivery.handle([_bus_record()]) == [] and len(queue.sent) == 2 and posted == []


def test_queue_delivery_retries_only_the_endpoint_that_failed_with_the_same_event() -> None:
    clock = FakeClock(NOW)
    delivery, queue, posted, _ = _queue_delivery({"https://b.example/h": [500, 500]}, clock)
    delivery.handle([_bus_record()])
    to_a, to_b = (body for body, _ in queue.sent)
    assert delivery.handle([_delivery_record(to_a, "ma", 1), _delivery_record(to_b, "mb", 1)]) == ["mb"]
    assert [url for url, _ in posted] == ["https://a.example/h", "https://b.example/h"]
    assert queue.retried == [("r-mb", 10)]  # attempt 1 failed: again after the first backoff
    clock.now += 10
    assert delivery.handle([_delivery_record(to_b, "mb", 2)]) == ["mb"]  # attempt 2 fails too
    assert queue.retried[-1] == ("r-mb", 20)
    clock.now += 20
    assert delivery.handle([_delivery_record(to_b, "mb", 3)]) == []  # attempt 3 delivers
    ids = {headers["webhook-id"] for _, headers in posted}
    assert ids == {event_id("batch_abc", "completed")}
    assert [url for url, _ in posted].count("https://a.example/h") == 1
    assert [url for url, _ in posted].count("https://b.example/h") == 3


def test_queue_delivery_gives_up_after_the_window() -> None:
    clock = FakeClock(NOW)
    delivery, queue, _, gave_up = _queue_delivery(
        {"https://a.example/h": [500] * 5, "https://b.example/h": [500] * 5}, clock, window=60
    )
    delivery.handle([_bus_record()])
    a_body = next(body for body, _ in queue.sent if orjson.loads(body)["endpoint"] == "a")
    assert delivery.handle([_delivery_record(a_body, "m3", 1)]) == ["m3"]  # in the window: retried
    clock.now += 61
    assert delivery.handle([_delivery_record(a_body, "m3", 2)]) == []  # dropped, not retried
    assert gave_up == [("a", event_id("batch_abc", "completed"))]


def test_queue_delivery_reports_a_malformed_message_as_failed() -> None:
    delivery, *_ = _queue_delivery({}, FakeClock(NOW))
    assert delivery.handle([{"messageId": "bad", "receiptHandle": "x", "body": "not json"}]) == ["bad"]


# ------------------------------------------------------------------ the outbox on the terminal path


def test_a_crash_before_the_outbox_write_is_delivered_by_the_next_announce(
    tmp_path: Path, receiver: WebhookReceiver
) -> None:
    """The terminal commit keeps `event_pending` until the webhook rows are written: a crash (here the
    outbox write failing) leaves the mark, and `announce_pending` (every start, every sweep) writes them."""
    from batch_api.contract.models import BatchRecord
    from batch_api.workflow import terminal
    from tests.unit.builders import make_deps

    deps = make_deps()
    _, outbox, deliverer, _ = _wired(tmp_path, receiver, project="p1")
    deliverer._clock = deps.clock  # type: ignore[method-assign]
    calls = {"n": 0}
    real_enqueue = outbox.enqueue

    def crash_once(deliveries: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("killed")
        return real_enqueue(deliveries)

    outbox.enqueue = crash_once  # type: ignore[method-assign]
    deps.events = OutboxEventSink(deps.events, outbox, deliverer.endpoints, clock=deps.clock)
    deps.metadata.create_batch(
        BatchRecord(
            id="batch_t",
            project_id="p1",
            endpoint="/v1/chat/completions",
            input_file_id="file-in",
            created_at=deps.now(),
            expires_at=deps.now() + 86400,
            status="in_progress",
        )
    )
    with pytest.raises(RuntimeError):
        terminal.end_batch(
            deps, "p1", "batch_t", lambda b: {"status": "completed", "completed_at": deps.now()}
        )
    assert outbox.list_deliveries() == []
    assert [b.id for b in deps.metadata.list_unannounced_batches()] == ["batch_t"]
    assert terminal.announce_pending(deps) == 1
    assert deliverer.deliver_due() == 1
    (got,) = receiver.wait_for(1)
    assert got.headers["webhook-id"] == event_id("batch_t", "completed")
    assert deps.metadata.list_unannounced_batches() == []


# ------------------------------------------------------------------ the local configuration


def test_serve_flags_and_file_give_endpoints_a_key_naming_its_project(tmp_path: Path) -> None:
    from batch_api.handlers.auth import project_id_for_key
    from batch_api.local.bootstrap import webhook_endpoints
    from batch_api.local.cli import _parser, settings_from_args

    hooks = tmp_path / "webhooks.toml"
    hooks.write_text(
        f'[[webhooks]]\nurl = "http://127.0.0.1:9/file"\nsecret = "{SECRET}"\nname = "from-file"\n'
    )
    args = _parser().parse_args(
        [
            "serve",
            "--api-key",
            "sk-a",
            "--webhook",
            f"http://127.0.0.1:9/a,{SECRET},sk-a",
            "--webhooks-file",
            str(hooks),
        ]
    )
    endpoints = webhook_endpoints(settings_from_args(args))
    assert [(e.url, e.project) for e in endpoints.all()] == [
        ("http://127.0.0.1:9/a", project_id_for_key("sk-a")),
        ("http://127.0.0.1:9/file", None),
    ]
    assert "sk-a" not in repr(endpoints.all()) and SECRET not in repr(endpoints.all())


@pytest.mark.parametrize(
    "flag",
    ["ftp://example.com/x,{secret}", "http://example.com/x", "http://example.com/x,sk-1", "{secret}"],
)
def test_a_bad_webhook_flag_stops_serve_naming_the_problem(
    flag: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from batch_api.local.cli import main

    code = main(
        ["serve", "--data-dir", str(tmp_path), "--port", "0", "--webhook", flag.format(secret=SECRET)]
    )
    assert code == 2
    assert SECRET not in capsys.readouterr().err


def test_https_goes_to_the_checked_address_and_verifies_the_certificate_for_the_host(tmp_path: Path) -> None:
    import ssl

    from tests.unit.test_http1 import self_signed

    cert, key = self_signed(tmp_path)  # for "localhost"
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    secure = WebhookReceiver(tls=server_tls)
    try:
        guard = AddressGuard(allow_http=False, allow_private=True, resolve=lambda host, port: ["127.0.0.1"])
        sender = WebhookSender(guard, timeout_seconds=5, tls=ssl.create_default_context(cafile=str(cert)))
        assert sender.post(f"https://localhost:{secure.port}/h", b"{}", {}).status_code == 200
        # the same address under another name: the certificate is checked for the name, not the address
        other = sender.post(f"https://hooks.example.com:{secure.port}/h", b"{}", {})
        assert other.status_code is None and "CERTIFICATE_VERIFY_FAILED" in (other.error or "")
        assert len(secure.received) == 1
    finally:
        secure.close()
