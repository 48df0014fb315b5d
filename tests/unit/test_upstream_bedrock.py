"""The Bedrock upstream against a real bedrock-runtime client stubbed with botocore's Stubber: the
requests it makes (checked against the service model and the expected parameters), Bedrock's answers
and errors as Bedrock shapes them, and what comes out as OpenAI answers, error lines and retries."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import boto3
import orjson
import pytest
from botocore.exceptions import ConnectTimeoutError, NoCredentialsError, ReadTimeoutError
from botocore.response import StreamingBody
from botocore.stub import Stubber

from batch_api.adapters.aws.bedrock import BotoBedrockRuntime, runtime_config
from batch_api.ports import DEADLINE_PASSED, BedrockAnswer, BedrockCallError, UpstreamResponse
from batch_api.upstreams.bedrock import BedrockUpstream, bedrock_target
from batch_api.upstreams.capacity import CapacityGate

pytestmark = pytest.mark.unit

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
SONNET = "us.anthropic.claude-3-5-sonnet-20241022-v2:0"
MODELS = {
    "claude": SONNET,
    "titan": "amazon.titan-embed-text-v2:0",
    "titan-v1": "amazon.titan-embed-text-v1",
    "cohere": "cohere.embed-english-v3",
}
NOW = 1_750_000_000


class SleepRecorder:
    """Stands in for asyncio.sleep: records the waits instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


# one session for every client: it loads the service model once
SESSION = boto3.session.Session(
    aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
)


def bedrock_client() -> Any:
    return SESSION.client("bedrock-runtime", config=runtime_config(4, 60, 5))


@pytest.fixture
def stubbed() -> Iterator[tuple[Stubber, BotoBedrockRuntime]]:
    client = bedrock_client()
    with Stubber(client) as stubber:
        yield stubber, BotoBedrockRuntime(client)
        stubber.assert_no_pending_responses()


def metadata(request_id: str = "req-1", headers: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "RequestId": request_id,
        "HTTPStatusCode": 200,
        "HTTPHeaders": {"x-amzn-requestid": request_id, **(headers or {})},
        "RetryAttempts": 0,
    }


def converse_answer(
    content: list[dict[str, Any]],
    stop_reason: str = "end_turn",
    usage: tuple[int, int] = (12, 7),
    request_id: str = "req-1",
) -> dict[str, Any]:
    """A Converse answer as Bedrock gives it."""
    return {
        "output": {"message": {"role": "assistant", "content": content}},
        "stopReason": stop_reason,
        "usage": {"inputTokens": usage[0], "outputTokens": usage[1], "totalTokens": sum(usage)},
        "metrics": {"latencyMs": 420},
        "ResponseMetadata": metadata(request_id),
    }


def invoke_answer(payload: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    raw = orjson.dumps(payload)
    return {
        "body": StreamingBody(io.BytesIO(raw), len(raw)),
        "contentType": "application/json",
        "ResponseMetadata": metadata("inv-1", headers),
    }


def send(
    runtime: Any,
    body: dict[str, Any],
    endpoint: str = CHAT,
    *,
    within: float | None = None,
    **options: Any,
) -> tuple[UpstreamResponse, SleepRecorder]:
    sleep = SleepRecorder()
    options.setdefault("sleep", sleep)
    options.setdefault("rng", lambda: 1.0)
    upstream = BedrockUpstream(runtime, MODELS, region="us-east-1", clock=lambda: NOW, **options)

    async def run() -> UpstreamResponse:
        deadline = None if within is None else time.monotonic() + within
        try:
            return await upstream.send(endpoint, orjson.dumps(body), deadline)
        finally:
            await upstream.aclose()

    return asyncio.run(run()), sleep


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


# ---------------------------------------------------------------- chat


def test_a_chat_completion_goes_through_converse_and_comes_back_in_openai_shape(
    stubbed: tuple[Stubber, BotoBedrockRuntime],
) -> None:
    stubber, runtime = stubbed
    stubber.add_response(
        "converse",
        converse_answer([{"text": "Four."}], usage=(21, 3), request_id="abc-123"),
        expected_params={
            "modelId": SONNET,
            "system": [{"text": "Be brief."}, {"text": "Answer in English."}],
            "messages": [
                {"role": "user", "content": [{"text": "What is 2 + 2?"}, {"text": "Only the number."}]},
            ],
            "inferenceConfig": {"maxTokens": 50, "temperature": 0.2, "topP": 0.9, "stopSequences": ["\n\n"]},
        },
    )

    response, sleep = send(
        runtime,
        {
            "model": "claude",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
                user("What is 2 + 2?"),
                {"role": "user", "content": [{"type": "text", "text": "Only the number."}]},
            ],
            "max_completion_tokens": 50,
            "max_tokens": 999,  # the newer name wins
            "temperature": 0.2,
            "top_p": 0.9,
            "stop": "\n\n",
            "user": "someone",
        },
    )

    assert (response.status_code, response.attempts, response.request_id, sleep.waits) == (
        200,
        1,
        "abc-123",
        [],
    )
    assert response.body == {
        "id": "chatcmpl-abc-123",
        "object": "chat.completion",
        "created": NOW,
        "model": "claude",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Four.", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 21,
            "completion_tokens": 3,
            "total_tokens": 24,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("model_context_window_exceeded", "length"),
        ("tool_use", "tool_calls"),
        ("content_filtered", "content_filter"),
        ("guardrail_intervened", "content_filter"),
    ],
)
def test_stop_reasons_become_finish_reasons(
    stubbed: tuple[Stubber, BotoBedrockRuntime], stop_reason: str, finish_reason: str
) -> None:
    stubber, runtime = stubbed
    stubber.add_response("converse", converse_answer([{"text": "x"}], stop_reason))

    response, _ = send(runtime, {"model": "claude", "messages": [user("hi")]})

    assert response.body["choices"][0]["finish_reason"] == finish_reason


def test_cached_prompt_tokens_count_in_prompt_tokens_as_openai_counts_them(
    stubbed: tuple[Stubber, BotoBedrockRuntime],
) -> None:
    stubber, runtime = stubbed
    answer = converse_answer([{"text": "x"}])
    answer["usage"] = {
        "inputTokens": 3,
        "outputTokens": 1,
        "totalTokens": 109,
        "cacheReadInputTokens": 100,
        "cacheWriteInputTokens": 5,
    }
    stubber.add_response("converse", answer)

    response, _ = send(runtime, {"model": "claude", "messages": [user("hi")]})

    assert response.body["usage"] == {
        "prompt_tokens": 108,
        "completion_tokens": 1,
        "total_tokens": 109,
        "prompt_tokens_details": {"cached_tokens": 100},
    }


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_SPEC = {
    "toolSpec": {
        "name": "get_weather",
        "description": "The weather in a city",
        "inputSchema": {
            "json": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        },
    }
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time"}}
TIME_SPEC = {"toolSpec": {"name": "get_time", "inputSchema": {"json": {"type": "object", "properties": {}}}}}


def test_tools_tool_calls_and_tool_results_round_trip(stubbed: tuple[Stubber, BotoBedrockRuntime]) -> None:
    stubber, runtime = stubbed
    stubber.add_response(
        "converse",
        converse_answer(
            [
                {"text": "Checking Oslo too."},
                {"toolUse": {"toolUseId": "tooluse_2", "name": "get_weather", "input": {"city": "Oslo"}}},
            ],
            "tool_use",
            usage=(80, 30),
        ),
        expected_params={
            "modelId": SONNET,
            "messages": [
                {"role": "user", "content": [{"text": "Weather in Paris and Oslo?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {
                            "toolUse": {
                                "toolUseId": "tooluse_1",
                                "name": "get_weather",
                                "input": {"city": "Paris"},
                            }
                        }
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "18C, sunny"}]}},
                        {"text": "And Oslo?"},
                    ],
                },
            ],
            "toolConfig": {"tools": [WEATHER_SPEC, TIME_SPEC], "toolChoice": {"any": {}}},
        },
    )

    response, _ = send(
        runtime,
        {
            "model": "claude",
            "messages": [
                user("Weather in Paris and Oslo?"),
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "tooluse_1",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "tooluse_1", "content": "18C, sunny"},
                user("And Oslo?"),
            ],
            "tools": [WEATHER_TOOL, TIME_TOOL],
            "tool_choice": "required",
        },
    )

    choice = response.body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking Oslo too."
    assert choice["message"]["tool_calls"] == [
        {
            "id": "tooluse_2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
        }
    ]
    assert response.body["usage"]["total_tokens"] == 110


@pytest.mark.parametrize(
    ("tool_choice", "tool_config"),
    [
        # no toolChoice for auto, Converse's default: models other than Claude 3, Mistral Large and Nova
        # refuse the field
        (None, {"tools": [WEATHER_SPEC]}),
        ("auto", {"tools": [WEATHER_SPEC]}),
        ("required", {"tools": [WEATHER_SPEC], "toolChoice": {"any": {}}}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            {"tools": [WEATHER_SPEC], "toolChoice": {"tool": {"name": "get_weather"}}},
        ),
        ("none", None),
    ],
)
def test_tool_choice(
    stubbed: tuple[Stubber, BotoBedrockRuntime], tool_choice: Any, tool_config: dict[str, Any] | None
) -> None:
    stubber, runtime = stubbed
    expected: dict[str, Any] = {
        "modelId": SONNET,
        "messages": [{"role": "user", "content": [{"text": "hi"}]}],
    }
    if tool_config is not None:
        expected["toolConfig"] = tool_config
    stubber.add_response("converse", converse_answer([{"text": "hello"}]), expected_params=expected)
    body: dict[str, Any] = {"model": "claude", "messages": [user("hi")], "tools": [WEATHER_TOOL]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice

    response, _ = send(runtime, body)

    assert response.status_code == 200
    assert "tool_calls" not in response.body["choices"][0]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "https://x/y.png"}}],
                    }
                ]
            },
            "messages.0.content.0",
        ),
        ({"messages": [user("hi")], "n": 2}, "n"),
        ({"messages": [user("hi")], "temperature": "hot"}, "temperature"),
        ({"messages": [user("hi")], "logprobs": True}, "logprobs"),
        ({"messages": [user("hi")], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [user("hi")], "tools": [{"type": "web_search"}]}, "tools.0"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "t", "type": "function", "function": {"name": "f", "arguments": "{no"}}
                        ],
                    }
                ]
            },
            "messages.0.tool_calls.0.function.arguments",
        ),
    ],
)
def test_what_converse_cannot_do_is_a_400_before_anything_is_sent(
    stubbed: tuple[Stubber, BotoBedrockRuntime], body: dict[str, Any], param: str
) -> None:
    _stubber, runtime = stubbed  # nothing queued: a call would fail the stub

    response, _ = send(runtime, {"model": "claude", **body})

    assert response.status_code == 400
    error = response.body["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert set(error) == {"message", "type", "param", "code"}


def test_a_model_the_upstream_does_not_map_is_a_404(stubbed: tuple[Stubber, BotoBedrockRuntime]) -> None:
    _stubber, runtime = stubbed

    response, _ = send(runtime, {"model": "gpt-4o", "messages": [user("hi")]})

    assert response.status_code == 404
    assert response.body["error"]["code"] == "model_not_found"


def test_an_endpoint_bedrock_does_not_serve_is_a_400(stubbed: tuple[Stubber, BotoBedrockRuntime]) -> None:
    _stubber, runtime = stubbed

    response, _ = send(runtime, {"model": "claude", "prompt": "hi"}, "/v1/completions")

    assert response.status_code == 400
    assert "/v1/chat/completions" in response.body["error"]["message"]


# ---------------------------------------------------------------- embeddings


def test_titan_embeddings_one_call_per_input(stubbed: tuple[Stubber, BotoBedrockRuntime]) -> None:
    stubber, runtime = stubbed
    for text, vector, tokens in (("first", [0.1, 0.2], 2), ("second one", [0.3, 0.4], 3)):
        stubber.add_response(
            "invoke_model",
            invoke_answer({"embedding": vector, "inputTextTokenCount": tokens}),
            expected_params={
                "modelId": "amazon.titan-embed-text-v2:0",
                "body": orjson.dumps({"inputText": text, "dimensions": 256}),
                "contentType": "application/json",
                "accept": "application/json",
            },
        )

    response, _ = send(
        runtime, {"model": "titan", "input": ["first", "second one"], "dimensions": 256}, EMBEDDINGS
    )

    assert response.status_code == 200
    assert response.attempts == 2
    assert response.body == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": [0.1, 0.2]},
            {"object": "embedding", "index": 1, "embedding": [0.3, 0.4]},
        ],
        "model": "titan",
        "usage": {"prompt_tokens": 5, "total_tokens": 5},
    }


def test_titan_v1_takes_no_dimensions(stubbed: tuple[Stubber, BotoBedrockRuntime]) -> None:
    _stubber, runtime = stubbed

    response, _ = send(runtime, {"model": "titan-v1", "input": "x", "dimensions": 256}, EMBEDDINGS)

    assert (response.status_code, response.body["error"]["param"]) == (400, "dimensions")


def test_cohere_embeddings_in_one_call_with_the_input_type_and_usage_from_the_headers(
    stubbed: tuple[Stubber, BotoBedrockRuntime],
) -> None:
    stubber, runtime = stubbed
    stubber.add_response(
        "invoke_model",
        invoke_answer(
            {
                "id": "emb-1",
                "response_type": "embeddings_floats",
                "texts": ["a", "b"],
                "embeddings": [[0.5, 0.25], [1.0, -1.0]],
            },
            headers={"x-amzn-bedrock-input-token-count": "4"},
        ),
        expected_params={
            "modelId": "cohere.embed-english-v3",
            "body": orjson.dumps({"texts": ["a", "b"], "input_type": "search_document"}),
            "contentType": "application/json",
            "accept": "application/json",
        },
    )

    response, _ = send(
        runtime, {"model": "cohere", "input": ["a", "b"], "encoding_format": "base64"}, EMBEDDINGS
    )

    data = response.body["data"]
    assert [item["index"] for item in data] == [0, 1]
    assert list(struct.unpack("<2f", base64.b64decode(data[1]["embedding"]))) == [1.0, -1.0]
    assert response.body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}


def test_token_arrays_are_refused(stubbed: tuple[Stubber, BotoBedrockRuntime]) -> None:
    _stubber, runtime = stubbed

    response, _ = send(runtime, {"model": "titan", "input": [[1, 2, 3]]}, EMBEDDINGS)

    assert (response.status_code, response.body["error"]["param"]) == (400, "input")


# ---------------------------------------------------------------- errors and retries


def test_throttling_is_retried_with_backoff_then_succeeds_and_the_gate_backs_off(
    stubbed: tuple[Stubber, BotoBedrockRuntime],
) -> None:
    stubber, runtime = stubbed
    for _ in range(2):
        stubber.add_client_error(
            "converse", "ThrottlingException", "Too many requests, please wait before trying again.", 429
        )
    stubber.add_response("converse", converse_answer([{"text": "ok"}]))
    gate = CapacityGate("bedrock", 8)

    response, sleep = send(
        runtime, {"model": "claude", "messages": [user("hi")]}, backoff_base=1.0, backoff_max=10.0, gate=gate
    )

    assert (response.status_code, response.attempts) == (200, 3)
    assert sleep.waits == [1.0, 2.0]
    assert gate.stats().throttled == 2
    assert gate.in_flight == 0


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("ThrottlingException", 429),
        ("ModelNotReadyException", 429),
        ("ServiceUnavailableException", 503),
        ("InternalServerException", 500),
        ("ModelTimeoutException", 408),
        ("ServiceQuotaExceededException", 429),  # a 400 in the service model: "resubmit later"
    ],
)
def test_transient_errors_are_retried(
    stubbed: tuple[Stubber, BotoBedrockRuntime], code: str, status: int
) -> None:
    stubber, runtime = stubbed
    # the status Bedrock's error code stands for wins over what the answer's metadata says
    stubber.add_client_error("converse", code, "try again", 400)
    stubber.add_response("converse", converse_answer([{"text": "ok"}]))

    response, sleep = send(runtime, {"model": "claude", "messages": [user("hi")]})

    assert (response.status_code, response.attempts, len(sleep.waits)) == (200, 2, 1)


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("ValidationException", 400, "invalid_request_error"),
        ("AccessDeniedException", 403, "permission_error"),
        ("ResourceNotFoundException", 404, "not_found_error"),
        ("ModelErrorException", 424, "invalid_request_error"),
    ],
)
def test_client_errors_are_error_lines_and_not_retried(
    stubbed: tuple[Stubber, BotoBedrockRuntime], code: str, status: int, kind: str
) -> None:
    stubber, runtime = stubbed
    stubber.add_client_error(
        "converse",
        code,
        "The model returned the following errors: max_tokens: 0 is below 1",
        status,
        response_meta={"RequestId": "bad-1"},
    )

    response, sleep = send(runtime, {"model": "claude", "messages": [user("hi")], "max_tokens": 5})

    assert (response.status_code, response.attempts, sleep.waits) == (status, 1, [])
    assert response.request_id == "bad-1"
    assert response.body == {
        "error": {
            "message": "Bedrock: The model returned the following errors: max_tokens: 0 is below 1",
            "type": kind,
            "param": None,
            "code": code,
        }
    }


def test_a_request_the_api_model_refuses_is_a_400_without_a_call() -> None:
    # botocore checks the parameters against the service model before anything is sent (maxTokens >= 1)
    runtime = BotoBedrockRuntime(bedrock_client())

    response, sleep = send(runtime, {"model": "claude", "messages": [user("hi")], "max_tokens": 0})

    assert (response.status_code, response.attempts, sleep.waits) == (400, 1, [])
    assert response.body["error"]["code"] == "ValidationException"


def test_the_retry_budget_ends_with_the_last_answer(stubbed: tuple[Stubber, BotoBedrockRuntime]) -> None:
    stubber, runtime = stubbed
    for _ in range(3):
        stubber.add_client_error("converse", "ThrottlingException", "slow down", 429)

    response, sleep = send(
        runtime, {"model": "claude", "messages": [user("hi")]}, max_retries=2, backoff_base=0.5
    )

    assert (response.status_code, response.attempts) == (429, 3)
    assert response.body["error"]["type"] == "rate_limit_error"
    assert sleep.waits == [0.5, 1.0]


def test_no_retry_starts_that_would_start_after_the_deadline(
    stubbed: tuple[Stubber, BotoBedrockRuntime],
) -> None:
    stubber, runtime = stubbed
    stubber.add_client_error("converse", "ThrottlingException", "slow down", 429)

    response, sleep = send(runtime, {"model": "claude", "messages": [user("hi")]}, within=30, backoff_base=60)

    assert (response.status_code, response.attempts, sleep.waits) == (429, 1, [])


class FakeRuntime:
    """A BedrockRuntime whose calls raise what a test gives, or wait until released."""

    def __init__(self, outcomes: list[BedrockAnswer | BedrockCallError] | None = None) -> None:
        self.outcomes = outcomes or []
        self.calls = 0
        self.release = threading.Event()
        self.block = False

    def converse(self, request: Any) -> BedrockAnswer:
        self.calls += 1
        if self.block:
            self.release.wait(10)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BedrockCallError):
            raise outcome
        return outcome

    def invoke_model(self, model_id: str, body: bytes) -> BedrockAnswer:
        raise AssertionError("not used")


def test_past_its_deadline_a_request_is_not_sent() -> None:
    runtime = FakeRuntime()

    response, _ = send(runtime, {"model": "claude", "messages": [user("hi")]}, within=-1)

    assert (response.status_code, response.error_code, runtime.calls) == (None, "upstream_timeout", 0)


def test_a_call_still_out_at_the_deadline_is_given_up_and_its_slot_returned() -> None:
    runtime = FakeRuntime([BedrockAnswer(converse_answer([{"text": "late"}]))])
    runtime.block = True
    gate = CapacityGate("bedrock", 4)
    executor = ThreadPoolExecutor(
        1
    )  # the upstream's own, as the pool gives it: the loop does not wait for it
    try:
        response, sleep = send(
            runtime, {"model": "claude", "messages": [user("hi")]}, within=0.05, gate=gate, executor=executor
        )
    finally:
        runtime.release.set()
        executor.shutdown()

    assert (response.status_code, response.error_code, runtime.calls) == (None, "upstream_timeout", 1)
    assert DEADLINE_PASSED in (response.error_message or "")
    assert sleep.waits == []
    assert gate.in_flight == 0


def test_timeouts_and_lost_connections_are_retried_missing_credentials_are_not() -> None:
    timeout = BedrockCallError("upstream_timeout", "Read timeout", None, retryable=True)
    ok = BedrockAnswer(converse_answer([{"text": "ok"}]))
    retried, sleep = send(FakeRuntime([timeout, ok]), {"model": "claude", "messages": [user("hi")]})
    no_credentials = BedrockCallError("upstream_credentials_error", "Unable to locate credentials", None)
    failed, failed_sleep = send(FakeRuntime([no_credentials]), {"model": "claude", "messages": [user("hi")]})

    assert (retried.status_code, retried.attempts, len(sleep.waits)) == (200, 2, 1)
    assert (failed.status_code, failed.error_code, failed.attempts, failed_sleep.waits) == (
        None,
        "upstream_credentials_error",
        1,
        [],
    )
    assert "Unable to locate credentials" in (failed.error_message or "")


class RaisingClient:
    """Just enough of a bedrock-runtime client for the adapter, raising `error` on every call."""

    def __init__(self, error: Exception) -> None:
        self.meta = bedrock_client().meta
        self.error = error

    def converse(self, **params: Any) -> Any:
        raise self.error


@pytest.mark.parametrize(
    ("error", "code", "retryable"),
    [
        (ReadTimeoutError(endpoint_url="https://bedrock-runtime"), "upstream_timeout", True),
        (ConnectTimeoutError(endpoint_url="https://bedrock-runtime"), "upstream_timeout", True),
        (NoCredentialsError(), "upstream_credentials_error", False),
    ],
)
def test_the_adapter_turns_botocore_failures_into_transport_errors(
    error: Exception, code: str, retryable: bool
) -> None:
    runtime = BotoBedrockRuntime(RaisingClient(error))

    with pytest.raises(BedrockCallError) as caught:
        runtime.converse({"modelId": SONNET, "messages": []})

    assert (caught.value.code, caught.value.status, caught.value.retryable) == (code, None, retryable)


def test_the_client_makes_one_attempt_per_call() -> None:
    assert bedrock_client().meta.config.retries == {"mode": "standard", "total_max_attempts": 1}


@pytest.mark.parametrize(
    ("model_id", "kind", "foundation_model", "region"),
    [
        (
            "anthropic.claude-3-haiku-20240307-v1:0",
            "foundation-model",
            "anthropic.claude-3-haiku-20240307-v1:0",
            None,
        ),
        (SONNET, "inference-profile", "anthropic.claude-3-5-sonnet-20241022-v2:0", None),
        (
            "global.anthropic.claude-sonnet-4-20250514-v1:0",
            "inference-profile",
            "anthropic.claude-sonnet-4-20250514-v1:0",
            None,
        ),
        (
            "arn:aws:bedrock:eu-west-1::foundation-model/amazon.titan-embed-text-v2:0",
            "foundation-model",
            "amazon.titan-embed-text-v2:0",
            "eu-west-1",
        ),
        (
            "arn:aws:bedrock:eu-west-1:123456789012:inference-profile/eu.amazon.nova-pro-v1:0",
            "inference-profile",
            "amazon.nova-pro-v1:0",
            "eu-west-1",
        ),
    ],
)
def test_model_ids_are_classified_for_iam(
    model_id: str, kind: str, foundation_model: str, region: str | None
) -> None:
    target = bedrock_target(model_id)
    assert (target.kind, target.foundation_model, target.region) == (kind, foundation_model, region)


@pytest.mark.parametrize(
    "model_id",
    [
        "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123",
        "arn:aws:bedrock:us-east-1:123456789012:provisioned-model/abc123",
        "claude",
        "*",
    ],
)
def test_model_ids_iam_cannot_be_limited_to_are_refused(model_id: str) -> None:
    with pytest.raises(ValueError):
        bedrock_target(model_id)


def test_the_clients_are_made_per_region_in_the_given_or_the_process_region() -> None:
    from batch_api.adapters.aws.bedrock import BedrockClients
    from batch_api.config import Settings

    clients = BedrockClients(Settings(aws_region="eu-central-1", upstream_timeout_seconds=90), SESSION)

    assert (clients.region(None), clients.region("us-west-2")) == ("eu-central-1", "us-west-2")
    runtime = clients("us-west-2", 16)
    assert clients("us-west-2", 16) is runtime
    config = runtime.client.meta.config
    assert (runtime.client.meta.region_name, config.max_pool_connections, config.read_timeout) == (
        "us-west-2",
        16,
        90,
    )
    assert config.retries == {"mode": "standard", "total_max_attempts": 1}
