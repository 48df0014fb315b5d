"""OpenAIHttpUpstream against the scriptable fake server: retries, timeouts, pooling, URL joining."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from pydantic import SecretStr, ValidationError

from batch_api.config import Settings
from batch_api.local.cli import describe
from batch_api.upstreams import MockUpstream, OpenAIHttpUpstream, make_upstream_factory
from batch_api.upstreams.gated import GatedUpstream
from batch_api.upstreams.openai_http import join_url, retry_after_seconds
from tests.support.fake_upstream import FakeUpstreamServer, free_port

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer() as server:
        yield server


class SleepRecorder:
    """Stands in for asyncio.sleep: records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def chat_body(directive: str, text: str = "hello there") -> bytes:
    return orjson.dumps({"model": "m", "messages": [{"role": "user", "content": text}], "user": directive})


def send_one(
    base_url: str, body: bytes, endpoint: str = CHAT, *, within: float | None = None, **options: Any
) -> tuple[Any, SleepRecorder]:
    """Send `body` once; `within`: the seconds until the request's deadline (None: no deadline)."""
    sleep = SleepRecorder()
    options.setdefault("sleep", sleep)

    async def run() -> Any:
        async with OpenAIHttpUpstream(base_url, options.pop("api_key", None), **options) as client:
            deadline = None if within is None else time.monotonic() + within
            return await client.send(endpoint, body, deadline)

    return asyncio.run(run()), sleep


def test_429_is_retried_after_the_wait_the_server_asks_for(fake: FakeUpstreamServer) -> None:
    response, sleep = send_one(fake.base_url, chat_body("id=r429;status=429;times=2;retry_after=3"))

    assert response.status_code == 200
    assert response.body["object"] == "chat.completion"
    assert response.attempts == 3
    assert sleep.waits == [3.0, 3.0]
    assert fake.attempts("r429") == 3


def test_retry_after_zero_and_retry_after_ms_are_honoured(fake: FakeUpstreamServer) -> None:
    zero, zero_sleep = send_one(fake.base_url, chat_body("id=r429zero;status=429;times=1"))
    millis, millis_sleep = send_one(
        fake.base_url, chat_body("id=r503ms;status=503;times=1;retry_after_ms=250")
    )

    assert (zero.status_code, zero_sleep.waits) == (200, [0.0])
    assert (millis.status_code, millis_sleep.waits) == (200, [0.25])


def test_a_very_long_retry_after_is_capped(fake: FakeUpstreamServer) -> None:
    _response, sleep = send_one(
        fake.base_url, chat_body("id=rlong;status=429;times=1;retry_after=3600"), backoff_max=5.0
    )
    assert sleep.waits == [60.0]


def test_500_then_success_waits_with_full_jitter(fake: FakeUpstreamServer) -> None:
    response, sleep = send_one(
        fake.base_url, chat_body("id=r500;status=500;times=1"), backoff_base=0.1, rng=lambda: 0.5
    )

    assert response.status_code == 200
    assert response.attempts == 2
    assert sleep.waits == [pytest.approx(0.05)]


def test_backoff_doubles_up_to_the_cap_and_the_last_answer_is_returned(fake: FakeUpstreamServer) -> None:
    response, sleep = send_one(
        fake.base_url,
        chat_body("id=always500;status=500"),
        max_retries=4,
        backoff_base=1.0,
        backoff_max=5.0,
        rng=lambda: 1.0,
    )

    assert sleep.waits == [1.0, 2.0, 4.0, 5.0]
    assert response.status_code == 500
    assert response.attempts == 5
    assert response.body["error"]["message"].startswith("fake upstream answered 500")
    assert response.error_code is None
    assert fake.attempts("always500") == 5


@pytest.mark.parametrize("status", [408, 409, 429, 502])
def test_retryable_statuses(fake: FakeUpstreamServer, status: int) -> None:
    response, _sleep = send_one(fake.base_url, chat_body(f"id=retryable{status};status={status};times=1"))
    assert (response.status_code, response.attempts) == (200, 2)


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_client_errors_are_not_retried(fake: FakeUpstreamServer, status: int) -> None:
    response, sleep = send_one(fake.base_url, chat_body(f"id=final{status};status={status}"))

    assert response.status_code == status
    assert response.attempts == 1
    assert sleep.waits == []
    assert set(response.body["error"]) == {"message", "type", "param", "code"}
    assert response.request_id.startswith("req_fake1_")
    assert response.headers["X-Request-Id"] == response.headers["x-request-id"] == response.request_id
    assert fake.attempts(f"final{status}") == 1


def test_x_should_retry_overrides_the_status(fake: FakeUpstreamServer) -> None:
    no_retry, _ = send_one(fake.base_url, chat_body("id=xsr-false;status=500;should_retry=false"))
    retry, _ = send_one(fake.base_url, chat_body("id=xsr-true;status=400;times=1;should_retry=true"))

    success, _ = send_one(fake.base_url, chat_body("id=xsr-success;status=200;should_retry=true"))

    assert (no_retry.status_code, no_retry.attempts) == (500, 1)
    assert (retry.status_code, retry.attempts) == (200, 2)
    assert (success.status_code, success.attempts) == (200, 1)


def test_non_json_error_body_becomes_an_error_envelope(fake: FakeUpstreamServer) -> None:
    response, _ = send_one(fake.base_url, chat_body("id=html502;status=502;invalid_json"), max_retries=1)

    assert response.status_code == 502
    assert response.attempts == 2
    assert response.body == {"error": {"message": "<html>not json</html>", "type": "upstream_error"}}


def test_unparseable_2xx_is_a_failure_and_not_retried(fake: FakeUpstreamServer) -> None:
    response, _ = send_one(fake.base_url, chat_body("id=bad200;invalid_json"))

    assert response.status_code is None
    assert response.error_code == "upstream_invalid_response"
    assert "127.0.0.1" in response.error_message
    assert response.attempts == 1


def test_timeout_fails_after_the_budget(fake: FakeUpstreamServer) -> None:
    response, sleep = send_one(fake.base_url, chat_body("id=slow;delay=5"), timeout=0.2, max_retries=1)

    assert response.status_code is None
    assert response.error_code == "upstream_timeout"
    assert response.attempts == 2
    assert f"127.0.0.1:{fake.port}" in response.error_message
    assert "2 attempts" in response.error_message
    assert len(sleep.waits) == 1
    assert fake.attempts("slow") == 2


def test_an_attempt_never_runs_past_the_deadline(fake: FakeUpstreamServer) -> None:
    began = time.monotonic()
    response, sleep = send_one(fake.base_url, chat_body("id=past-deadline;delay=5"), within=0.3)

    assert time.monotonic() - began < 2  # not the client's 600 s, nor the 5 s the server takes
    assert (response.status_code, response.error_code, response.attempts) == (None, "upstream_timeout", 1)
    assert "no complete answer in the time the worker had left" in response.error_message
    assert sleep.waits == []  # and no retry: it could not end in time either


def test_no_retry_starts_that_would_start_after_the_deadline(fake: FakeUpstreamServer) -> None:
    response, sleep = send_one(
        fake.base_url, chat_body("id=late-retry;status=500;times=1"), within=5, backoff_base=20, rng=lambda: 1
    )

    assert (response.status_code, response.attempts) == (500, 1)  # the answer it had, not a retry in 20 s
    assert sleep.waits == [] and fake.attempts("late-retry") == 1
    retried, sleep = send_one(
        fake.base_url, chat_body("id=early-retry;status=500;times=1"), within=5, backoff_base=2, rng=lambda: 1
    )
    assert (retried.status_code, retried.attempts, sleep.waits) == (200, 2, [2.0])  # 2 s: still in time


def test_past_its_deadline_a_request_is_not_sent(fake: FakeUpstreamServer) -> None:
    response, _ = send_one(fake.base_url, chat_body("id=never-sent"), within=-1)

    assert (response.status_code, response.error_code) == (None, "upstream_timeout")
    assert "no time was left to send it" in response.error_message
    assert fake.attempts("never-sent") == 0


def test_a_slow_first_attempt_then_a_fast_one_succeeds(fake: FakeUpstreamServer) -> None:
    response, _ = send_one(fake.base_url, chat_body("id=slow-once;delay=5;times=1"), timeout=0.2)
    assert (response.status_code, response.attempts) == (200, 2)


def test_connection_refused_fails_after_the_budget() -> None:
    port = free_port()
    response, sleep = send_one(f"http://127.0.0.1:{port}/v1", chat_body("x"), max_retries=2)

    assert response.status_code is None
    assert response.error_code == "upstream_connection_error"
    assert response.attempts == 3
    assert f"127.0.0.1:{port}" in response.error_message
    assert "3 attempts" in response.error_message
    assert len(sleep.waits) == 2


def test_dropped_connection_is_retried(fake: FakeUpstreamServer) -> None:
    response, _ = send_one(fake.base_url, chat_body("id=drop;disconnect;times=1"))
    assert (response.status_code, response.attempts) == (200, 2)


def test_headers_and_body_are_sent_as_given(fake: FakeUpstreamServer) -> None:
    body = chat_body("id=auth", text="  spacing  kept ")
    send_one(fake.base_url, body, api_key="sk-secret-123")
    send_one(fake.base_url, chat_body("id=no-auth"))

    [with_key] = [r for r in fake.requests if r.key == "auth"]
    [without_key] = [r for r in fake.requests if r.key == "no-auth"]
    assert with_key.headers["authorization"] == "Bearer sk-secret-123"
    assert with_key.headers["content-type"] == "application/json"
    assert with_key.raw_body == body
    assert with_key.path == CHAT
    assert "authorization" not in without_key.headers


def test_the_key_does_not_show_in_repr() -> None:
    assert "sk-secret" not in repr(OpenAIHttpUpstream("http://h/v1", "sk-secret"))


def test_one_pooled_session_serves_many_concurrent_sends(fake: FakeUpstreamServer) -> None:
    async def run() -> tuple[list[Any], bool]:
        client = OpenAIHttpUpstream(fake.base_url, max_connections=4)
        try:
            first = await client.send(CHAT, chat_body("id=pool-warmup"))
            session = client._session
            answers = await asyncio.gather(
                *(client.send(CHAT, chat_body(f"id=pool-{i};delay=0.02")) for i in range(40))
            )
            return [first, *answers], client._session is session
        finally:
            await client.aclose()

    answers, same_session = asyncio.run(run())

    assert same_session
    assert all(a.status_code == 200 and a.attempts == 1 for a in answers)
    pooled = [r for r in fake.requests if r.key is not None and r.key.startswith("pool-")]
    assert len(pooled) == 41
    assert len({r.peer_port for r in pooled}) <= 4


def test_aclose_is_safe_before_use_and_twice() -> None:
    async def run() -> None:
        client = OpenAIHttpUpstream("http://127.0.0.1:1/v1")
        await client.aclose()
        await client.aclose()

    asyncio.run(run())


def test_cancellation_propagates(fake: FakeUpstreamServer) -> None:
    async def run() -> None:
        async with OpenAIHttpUpstream(fake.base_url) as client:
            task = asyncio.create_task(client.send(CHAT, chat_body("id=hang-cancel;hang")))
            await asyncio.sleep(0.1)
            task.cancel()
            await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(run())


@pytest.mark.parametrize(
    ("base_url", "endpoint", "expected"),
    [
        ("http://h:8001/v1", "/v1/chat/completions", "http://h:8001/v1/chat/completions"),
        ("http://h:8001/v1/", "/v1/embeddings", "http://h:8001/v1/embeddings"),
        ("http://h:8001", "/v1/embeddings", "http://h:8001/v1/embeddings"),
        ("http://h:8001/", "/v1/responses", "http://h:8001/v1/responses"),
        ("https://proxy.example/openai/v1", "/v1/moderations", "https://proxy.example/openai/v1/moderations"),
        ("https://proxy.example/openai", "/v1/completions", "https://proxy.example/openai/v1/completions"),
        ("http://h/v10", "/v1/completions", "http://h/v10/v1/completions"),
    ],
)
def test_join_url(base_url: str, endpoint: str, expected: str) -> None:
    assert join_url(base_url, endpoint) == expected


@pytest.mark.parametrize("suffix", ["/v1", "/v1/", "", "/"])
def test_base_urls_with_and_without_v1_reach_the_endpoint(fake: FakeUpstreamServer, suffix: str) -> None:
    base = f"http://127.0.0.1:{fake.port}{suffix}"
    response, _ = send_one(
        base, orjson.dumps({"model": "e", "input": "x", "user": f"id=join{suffix}"}), "/v1/embeddings"
    )

    assert response.status_code == 200
    [received] = [r for r in fake.requests if r.key == f"join{suffix}"]
    assert received.path == "/v1/embeddings"


def test_invalid_base_url_is_rejected_up_front() -> None:
    with pytest.raises(ValueError, match="http"):
        OpenAIHttpUpstream("localhost:8001/v1")


def test_retry_after_parsing() -> None:
    now = 1_700_000_000.0
    in_ten_seconds = email.utils.formatdate(now + 10, usegmt=True)

    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "1.5"}) == 1.5
    assert retry_after_seconds({"retry-after": in_ten_seconds}, now=now) == pytest.approx(10.0)
    assert retry_after_seconds({"retry-after": email.utils.formatdate(now - 5, usegmt=True)}, now=now) == 0.0
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after-ms": "nope", "retry-after": "9"}) == 9.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({"retry-after": "-3"}) is None
    assert retry_after_seconds({}) is None


def test_factory_builds_the_mock_by_default() -> None:
    factory = make_upstream_factory(Settings(upstream=None, upstream_url=None, mock_latency_seconds=0.25))
    client = factory()

    assert isinstance(client, GatedUpstream) and isinstance(client.inner, MockUpstream)
    assert client.inner.latency_seconds == 0.25
    assert client.gate is factory.gates["default"]  # every client shares the upstream's capacity
    assert factory() is not client


def test_factory_builds_http_clients_from_settings() -> None:
    settings = Settings(
        upstream_url="http://model:8001/v1",
        upstream_api_key=SecretStr("sk-abc"),
        upstream_timeout_seconds=30,
        upstream_connect_timeout_seconds=2,
        upstream_max_retries=7,
        upstream_backoff_base_seconds=0.25,
        upstream_backoff_max_seconds=9,
        requests_per_chunk=48,
        upstream_max_in_flight=96,
    )
    client = make_upstream_factory(settings)()

    assert isinstance(client, OpenAIHttpUpstream)
    assert (client.base_url, client.timeout, client.connect_timeout) == ("http://model:8001/v1", 30, 2)
    assert (client.max_retries, client.backoff_base, client.backoff_max) == (7, 0.25, 9)
    # the upstream's ceiling, not one chunk's share: chunks on one loop share the session
    assert client.max_connections == 96
    assert client._headers["Authorization"] == "Bearer sk-abc"


def test_factory_requires_a_url_for_http() -> None:
    with pytest.raises(ValueError, match="UPSTREAM_URL"):
        make_upstream_factory(Settings(upstream="http", upstream_url=None))


def test_credentials_in_the_base_url_become_basic_auth_and_appear_in_no_message() -> None:
    port = free_port()
    url = f"http://batch-user:s3cr3t%2Fpw@127.0.0.1:{port}/v1"

    async def attempt() -> Any:
        client = OpenAIHttpUpstream(url, max_retries=0)
        try:
            assert client.base_url == f"http://127.0.0.1:{port}/v1"
            assert (
                client._headers["Authorization"] == "Basic YmF0Y2gtdXNlcjpzM2NyM3QvcHc="
            )  # the password unquoted
            return client, await client.send("/v1/chat/completions", b"{}")
        finally:
            await client.aclose()

    client, response = asyncio.run(attempt())
    assert response.error_code == "upstream_connection_error"
    for text in (response.error_message, repr(client), repr(Settings(upstream_url=url))):
        assert "s3cr3t" not in str(text)

    with pytest.raises(ValueError, match="give one"):
        OpenAIHttpUpstream(url, "sk-key")
    with pytest.raises(ValidationError) as raised:
        Settings(upstream_url=url, upstream_api_key="sk-key")  # type: ignore[arg-type]
    assert "give one of them" in describe(raised.value)
    assert "s3cr3t" not in describe(raised.value)


class RecordingGate:
    """Stands in for a CapacityGate: records what the client asks of it."""

    counts_tokens = True

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def pace(self, tokens: int = 0) -> None:
        self.calls.append(("pace", tokens))

    async def acquire(self, batch_id: str) -> float:
        self.calls.append(("acquire", batch_id))
        return 1.5

    def release(self, admitted_at: float, status: int | None, headers: Any = None) -> None:
        self.calls.append(("release", admitted_at, status, headers.get("retry-after") if headers else None))

    def used_tokens(self, estimated: int, actual: int) -> None:
        self.calls.append(("used", estimated, actual))


def test_every_attempt_takes_and_returns_a_slot_and_tokens_are_reserved_once(
    fake: FakeUpstreamServer,
) -> None:
    gate = RecordingGate()
    body = chat_body("id=gated;status=429;times=1;retry_after=0")
    response, _sleep = send_one(fake.base_url, body, gate=gate, batch_id="batch_7")
    assert response.status_code == 200
    estimate = len(body) // 4
    actual = response.body["usage"]["total_tokens"]
    assert gate.calls == [
        ("pace", estimate),
        ("acquire", "batch_7"),
        ("release", 1.5, 429, "0"),  # the slot is back before the retry's pause
        ("pace", 0),  # the retry counts as a request, its tokens were reserved already
        ("acquire", "batch_7"),
        ("release", 1.5, 200, None),
        ("used", estimate, actual),
    ]


def test_an_attempt_that_gets_no_answer_still_returns_its_slot() -> None:
    gate = RecordingGate()
    response, _sleep = send_one(f"http://127.0.0.1:{free_port()}/v1", chat_body(""), gate=gate, max_retries=0)
    assert response.status_code is None
    assert [c[0] for c in gate.calls] == ["pace", "acquire", "release"]
    assert gate.calls[2][2] is None


def test_the_gated_mock_takes_a_slot_per_request_and_reports_its_tokens() -> None:
    gate = RecordingGate()
    body = chat_body("")
    client = GatedUpstream(MockUpstream(), gate, "batch_9")  # type: ignore[arg-type]
    response = asyncio.run(client.send(CHAT, body))
    assert response.status_code == 200
    assert gate.calls == [
        ("pace", len(body) // 4),
        ("acquire", "batch_9"),
        ("release", 1.5, 200, None),
        ("used", len(body) // 4, response.body["usage"]["total_tokens"]),
    ]
