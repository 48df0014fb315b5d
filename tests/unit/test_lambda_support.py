"""The small pure pieces behind the Lambda entry points: the secret's shapes, the failed-step error
entry, request metrics, the upstream factory's key lookup and the boto3 client configuration."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import SecretStr

from batch_api import bootstrap_aws
from batch_api.adapters.aws import secrets
from batch_api.adapters.aws.clients import client_config
from batch_api.adapters.aws.secrets import UpstreamSecretError, parse_api_key
from batch_api.config import Settings
from batch_api.handlers.workflow import FAIL_MESSAGE_MAX_CHARS, batch_error
from batch_api.ports import UpstreamResponse
from batch_api.upstreams import make_upstream_factory
from batch_api.upstreams.metered import (
    REQUESTS_FAILED,
    REQUESTS_SUCCEEDED,
    UPSTREAM_LATENCY,
    MeteredUpstream,
    metered,
)
from batch_api.upstreams.openai_http import OpenAIHttpUpstream

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- the secret


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("sk-plain", "sk-plain"),
        ("  sk-padded\n", "sk-padded"),
        (b"sk-binary", "sk-binary"),
        ('{"api_key": "sk-json"}', "sk-json"),
        ('{"api_key": " sk-json ", "other": 1}', "sk-json"),
        ("{not json", "{not json"),
    ],
)
def test_secret_shapes(value: str | bytes, key: str) -> None:
    assert parse_api_key("s", value).get_secret_value() == key


@pytest.mark.parametrize("value", ["", "   ", '{"key": "sk"}', '{"api_key": ""}', '{"api_key": 7}'])
def test_unusable_secrets_name_the_secret_but_not_the_value(value: str) -> None:
    with pytest.raises(UpstreamSecretError, match="'team/upstream'") as raised:
        parse_api_key("team/upstream", value)
    assert "sk" not in str(raised.value).replace("'team/upstream'", "")


def test_the_upstream_key_is_read_from_its_secret_for_every_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """A rotated secret reaches the next chunk invocation without a cold start (the reader caches);
    every client of one upstream shares its capacity gate whatever the key."""
    keys = iter(["sk-first", "sk-first", "sk-rotated"])
    read: list[str] = []

    def reader(settings: Settings, name: str) -> SecretStr:
        read.append(name)
        return SecretStr(next(keys))

    monkeypatch.setattr(secrets, "read_upstream_key", reader)
    pool = bootstrap_aws.aws_upstream_pool(
        Settings(upstream_url="http://127.0.0.1:9/v1", upstream_secret_name="team/upstream")
    )
    assert read == []  # wiring checks the URL without reading the secret
    first, again, rotated = pool(), pool(), pool()
    assert all(isinstance(c, OpenAIHttpUpstream) for c in (first, again, rotated))
    assert read == ["team/upstream"] * 3
    assert [c._headers["Authorization"] for c in (first, again, rotated)] == [  # type: ignore[union-attr]
        "Bearer sk-first",
        "Bearer sk-first",
        "Bearer sk-rotated",
    ]
    assert first._gate is rotated._gate is pool.gates["default"]  # type: ignore[union-attr]


def test_each_upstream_of_the_stack_reads_its_own_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets, "read_upstream_key", lambda settings, name: SecretStr(f"key-of-{name}"))
    upstreams = [
        {"name": "vllm", "base_url": "http://gpu:8000/v1", "api_key_secret": "s/vllm", "models": ["llama"]},
        {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key_secret": "s/openai"},
        {"name": "open", "base_url": "http://open:8000/v1", "models": ["free"]},
    ]
    pool = bootstrap_aws.aws_upstream_pool(Settings(upstreams_json=json.dumps(upstreams)))
    llama, other, free = pool(model="llama"), pool(model="gpt-4o"), pool(model="free")
    assert llama._headers["Authorization"] == "Bearer key-of-s/vllm"  # type: ignore[union-attr]
    assert other._headers["Authorization"] == "Bearer key-of-s/openai"  # type: ignore[union-attr]
    assert "Authorization" not in free._headers  # type: ignore[union-attr]


def test_a_secret_key_needs_the_aws_backend() -> None:
    upstreams = [{"name": "vllm", "base_url": "http://gpu:8000/v1", "api_key_secret": "s/vllm"}]
    with pytest.raises(ValueError, match="'vllm': api_key_secret needs the aws backend"):
        make_upstream_factory(Settings(upstreams_json=json.dumps(upstreams)))


def test_a_bad_upstream_url_fails_at_wiring_time() -> None:
    with pytest.raises(ValueError, match="URL"):
        bootstrap_aws.aws_upstream_pool(Settings(upstream_url="not a url", upstream_secret_name="s"))


# ---------------------------------------------------------------- the failed-step error entry


def test_a_lambda_cause_keeps_type_and_message_but_not_the_trace() -> None:
    cause = json.dumps(
        {"errorMessage": "disk full", "errorType": "OSError", "stackTrace": ['  File "/var/task/x.py"']}
    )
    error = batch_error(None, cause, "OSError")
    assert error.model_dump() == {
        "code": "internal_error",
        "message": "The batch failed because a workflow step failed (OSError: disk full).",
    }
    # the same Cause passed through as the message of the "error" shape
    assert batch_error("internal_error", cause) == error


def test_a_states_error_without_a_lambda_cause() -> None:
    message = batch_error(None, "Task timed out", "States.Timeout").message
    assert message == "The batch failed because a workflow step failed (States.Timeout: Task timed out)."
    assert batch_error(None, None).message == "The batch failed because a workflow step failed."


def test_long_causes_are_trimmed() -> None:
    message = batch_error(None, "x" * 50_000, "E").message
    assert len(message) == FAIL_MESSAGE_MAX_CHARS and message.endswith("…")


# ---------------------------------------------------------------- request metrics


class RecordingMetrics:
    def __init__(self) -> None:
        self.added: list[tuple[str, str, float]] = []
        self.per_upstream: list[tuple[str, str, str, float]] = []

    def add_metric(self, name: str, unit: Any, value: float) -> None:
        self.added.append((name, str(getattr(unit, "value", unit)), value))

    def add_upstream_metrics(self, upstream: str, reported: Any) -> None:
        for name, unit, values in reported:
            for value in values:
                self.per_upstream.append((upstream, name, str(getattr(unit, "value", unit)), value))


class ScriptedUpstream:
    def __init__(self, *answers: UpstreamResponse | Exception) -> None:
        self.answers = list(answers)
        self.closed = False

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def aclose(self) -> None:
        self.closed = True


def test_requests_are_counted_per_client_and_timed_per_request() -> None:
    inner = ScriptedUpstream(
        UpstreamResponse(status_code=200),
        UpstreamResponse(status_code=201),
        UpstreamResponse(status_code=500),
        UpstreamResponse(status_code=None, error_code="timeout"),
        RuntimeError("client bug"),
    )
    sink = RecordingMetrics()
    client = metered(lambda **_route: inner, sink)()
    assert isinstance(client, MeteredUpstream)

    async def run() -> None:
        for _ in range(4):
            await client.send("/v1/chat/completions", b"{}")
        with pytest.raises(RuntimeError):
            await client.send("/v1/chat/completions", b"{}")
        await client.aclose()

    asyncio.run(run())
    assert inner.closed
    latencies = [value for name, unit, value in sink.added if name == UPSTREAM_LATENCY]
    assert len(latencies) == 4 and all(value >= 0 for value in latencies)
    # to 0.1 ms: each value is a few bytes in the EMF log (it is written per request, twice)
    assert all(value == round(value, 1) and len(repr(value)) <= 8 for value in latencies)
    assert {unit for name, unit, _ in sink.added if name == UPSTREAM_LATENCY} == {"Milliseconds"}
    counts = [(name, unit, value) for name, unit, value in sink.added if name != UPSTREAM_LATENCY]
    assert counts == [(REQUESTS_SUCCEEDED, "Count", 2), (REQUESTS_FAILED, "Count", 3)]


def test_cancelled_requests_are_not_counted() -> None:
    class Hanging(ScriptedUpstream):
        async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
            await asyncio.sleep(60)
            raise AssertionError("unreachable")

    sink = RecordingMetrics()
    client = MeteredUpstream(Hanging(), sink)

    async def run() -> None:
        task = asyncio.create_task(client.send("/v1/embeddings", b"{}"))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await client.aclose()

    asyncio.run(run())
    assert sink.added == []


# ---------------------------------------------------------------- boto3 configuration


def test_s3_addressing_follows_the_endpoint() -> None:
    assert client_config(Settings(), s3=True).s3 == {"addressing_style": "virtual"}
    moto = Settings(aws_endpoint_url="http://127.0.0.1:5000")
    assert client_config(moto, s3=True).s3 == {"addressing_style": "path"}
    config = client_config(Settings())
    assert config.retries == {"mode": "standard", "max_attempts": 6}
    assert config.max_pool_connections == 32


def test_a_gated_client_reports_its_upstreams_push_back_and_limit_when_it_closes() -> None:
    from batch_api.upstreams.capacity import CapacityGate
    from batch_api.upstreams.gated import GatedUpstream
    from batch_api.upstreams.metered import UPSTREAM_LIMIT, UPSTREAM_THROTTLED

    gate = CapacityGate("up", 16)
    gate.throttled = 5  # before this client
    inner = GatedUpstream(
        ScriptedUpstream(UpstreamResponse(status_code=429), UpstreamResponse(status_code=200)), gate, "b"
    )
    sink = RecordingMetrics()
    client = metered(lambda **_route: inner, sink)()

    async def run() -> None:
        await client.send("/v1/chat/completions", b"{}")
        await client.send("/v1/chat/completions", b"{}")
        await client.aclose()

    asyncio.run(run())
    latencies = [value for _up, name, _unit, value in sink.per_upstream if name == UPSTREAM_LATENCY]
    assert latencies == [value for name, _unit, value in sink.added if name == UPSTREAM_LATENCY]
    assert len(latencies) == 2 and all(value >= 0 for value in latencies)
    assert [entry for entry in sink.per_upstream if entry[1] != UPSTREAM_LATENCY] == [
        ("up", UPSTREAM_THROTTLED, "Count", 1),
        ("up", UPSTREAM_LIMIT, "Count", gate.limit),
    ]
    assert {unit for _up, name, unit, _v in sink.per_upstream if name == UPSTREAM_LATENCY} == {"Milliseconds"}
    sink.per_upstream.clear()
    asyncio.run(client.aclose())  # a second close reports what happened since the first: nothing
    assert sink.per_upstream == [
        ("up", UPSTREAM_THROTTLED, "Count", 0),
        ("up", UPSTREAM_LIMIT, "Count", gate.limit),
    ]
    assert {name for name, _unit, _value in sink.added} == {
        UPSTREAM_LATENCY,
        REQUESTS_SUCCEEDED,
        REQUESTS_FAILED,
    }


def test_lease_grants_report_the_upstreams_held_slots_and_its_queue_of_waiting_batches() -> None:
    from batch_api.adapters.memory import MemoryCapacityLeases
    from batch_api.upstreams.metered import (
        CAPACITY_HELD,
        CAPACITY_WAITING_BATCHES,
        CAPACITY_WAITS,
        MeteredLeases,
    )

    sink = RecordingMetrics()
    store = MemoryCapacityLeases()
    leases = MeteredLeases(store, sink)
    assert leases.acquire("up", "w1", "big", 8, 8).slots == 8
    assert leases.acquire("up", "w2", "small", 8, 8).slots == 0
    assert leases.acquire("up", "w3", "third", 8, 8).slots == 0
    assert leases.acquire("other", "w4", "x", 2, 8).slots == 2
    assert sink.per_upstream == [
        ("up", CAPACITY_HELD, "Count", 8),
        ("up", CAPACITY_WAITING_BATCHES, "Count", 0),
        ("up", CAPACITY_HELD, "Count", 8),
        ("up", CAPACITY_WAITING_BATCHES, "Count", 1),
        ("up", CAPACITY_WAITS, "Count", 1),
        ("up", CAPACITY_HELD, "Count", 8),
        ("up", CAPACITY_WAITING_BATCHES, "Count", 2),
        ("up", CAPACITY_WAITS, "Count", 1),
        ("other", CAPACITY_HELD, "Count", 2),
        ("other", CAPACITY_WAITING_BATCHES, "Count", 0),
    ]
    leases.renew("up", "w1")
    leases.release("up", "w1")
    assert store.held("up") == 0 and store.held("other") == 2


def test_per_upstream_metrics_are_emf_lines_with_the_upstream_dimension(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from aws_lambda_powertools.metrics import MetricUnit

    from batch_api.handlers.observability import LambdaMetrics, metrics

    LambdaMetrics(metrics).add_upstream_metrics(
        "vllm-a",
        [
            ("CapacityHeld", MetricUnit.Count, [12]),
            ("UpstreamLatency", MetricUnit.Milliseconds, [float(i) for i in range(150)]),
            ("UpstreamThrottled", MetricUnit.Count, []),  # nothing to write
        ],
    )
    lines = [json.loads(text) for text in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2  # a document holds at most 100 values of a metric
    for line in lines:
        assert line["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "BatchApi"
        assert line["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["service", "Upstream"]]
        assert (line["service"], line["Upstream"]) == ("batch-api", "vllm-a")
        assert "UpstreamThrottled" not in line
    assert lines[0]["CapacityHeld"] == [12.0] or lines[1]["CapacityHeld"] == [12.0]
    written = [value for line in lines for value in line.get("UpstreamLatency", [])]
    assert written == [float(i) for i in range(150)]
    LambdaMetrics(metrics).add_upstream_metrics("vllm-a", [("UpstreamThrottled", MetricUnit.Count, [])])
    assert capsys.readouterr().out == ""  # nothing reported, nothing written


def test_with_a_signer_role_download_links_are_signed_by_it_and_without_one_by_the_function() -> None:
    from batch_api.adapters.aws.links import AssumedRoleSigner

    base = {
        "backend": "aws",
        "table_name": "t",
        "bucket_name": "b",
        "event_bus_name": "e",
        "aws_region": "us-east-1",
        "state_machine_arn": "arn:aws:states:us-east-1:123456789012:stateMachine:m",
        "upstream_url": "http://127.0.0.1:9/v1",
    }
    role = "arn:aws:iam::123456789012:role/links"
    signed = bootstrap_aws.build_aws_deps(Settings(**base, download_signer_role_arn=role))  # no AWS call
    signer = signed.blobs.link_signer  # type: ignore[attr-defined]
    assert isinstance(signer, AssumedRoleSigner) and signer.role_arn == role
    assert signer.expires_at == float("-inf")  # nothing assumed until the first link
    plain = bootstrap_aws.build_aws_deps(Settings(**base))
    assert plain.blobs.link_signer is None  # type: ignore[attr-defined]


def test_threads_signing_links_at_once_share_one_assumed_session() -> None:
    import datetime
    import threading

    from batch_api.adapters.aws.links import AssumedRoleSigner

    calls: list[str] = []
    expiration = datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)

    class Sts:
        def assume_role(self, **request: Any) -> dict[str, Any]:
            calls.append(request["RoleArn"])
            threading.Event().wait(0.01)  # an STS round trip: the others arrive meanwhile
            return {"Credentials": {"AccessKeyId": f"ASIA{len(calls)}", "Expiration": expiration}}

    signer = AssumedRoleSigner(Sts(), "arn:aws:iam::1:role/links", lambda c: c["AccessKeyId"])
    start = threading.Barrier(8)
    got: list[Any] = []

    def sign() -> None:
        start.wait()
        got.append(signer(1800))

    threads = [threading.Thread(target=sign) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert calls == ["arn:aws:iam::1:role/links"] and got == ["ASIA1"] * 8
