"""The mock upstream: OpenAI shapes (judged by the openai SDK's own types), determinism, errors, server."""

from __future__ import annotations

import asyncio
import base64
import math
import struct
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer
from openai.types import Completion, CreateEmbeddingResponse, ModerationCreateResponse
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from batch_api.upstreams.mock import MockRequestError, MockUpstream, mock_response
from batch_api.upstreams.mock_server import create_app
from batch_api.upstreams.openai_http import OpenAIHttpUpstream

pytestmark = pytest.mark.unit

CHAT_BODY = {
    "model": "gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]},
    ],
}
COMPLETION_BODY = {"model": "gpt-3.5-turbo-instruct", "prompt": "Say hello to the world"}
EMBEDDING_BODY = {"model": "text-embedding-3-small", "input": ["first text", "second text here", "third"]}
RESPONSES_BODY = {"model": "gpt-4.1", "instructions": "Be brief.", "input": "Tell me a short joke"}
MODERATION_BODY = {"model": "omni-moderation-latest", "input": ["I like cats", "and dogs"]}

SDK_TYPES: list[tuple[str, dict[str, Any], Any]] = [
    ("/v1/chat/completions", CHAT_BODY, ChatCompletion),
    ("/v1/completions", COMPLETION_BODY, Completion),
    ("/v1/embeddings", EMBEDDING_BODY, CreateEmbeddingResponse),
    ("/v1/responses", RESPONSES_BODY, Response),
    ("/v1/moderations", MODERATION_BODY, ModerationCreateResponse),
]


@pytest.mark.parametrize(("endpoint", "body", "sdk_type"), SDK_TYPES, ids=[e for e, _, _ in SDK_TYPES])
def test_answers_parse_with_the_sdk_types_and_are_deterministic(
    endpoint: str, body: dict[str, Any], sdk_type: Any
) -> None:
    answer = mock_response(endpoint, body)

    parsed = sdk_type.model_validate(answer)
    assert parsed.model == body["model"]
    assert mock_response(endpoint, dict(body)) == answer
    changed = {**body, "model": body["model"] + "-other"}
    assert mock_response(endpoint, changed) != answer
    # Must survive a JSON round trip unchanged (it is written into output files).
    assert orjson.loads(orjson.dumps(answer)) == answer


def test_chat_completion_content_and_usage() -> None:
    answer = ChatCompletion.model_validate(mock_response("/v1/chat/completions", CHAT_BODY))

    [choice] = answer.choices
    assert choice.message.role == "assistant"
    assert "synthetic mock answer" in (choice.message.content or "")
    assert "capital of France" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    usage = answer.usage
    assert usage is not None
    assert usage.prompt_tokens == 9  # words of the system and user messages
    assert usage.completion_tokens == len((choice.message.content or "").split())
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_honours_n_and_max_tokens() -> None:
    answer = mock_response("/v1/chat/completions", {**CHAT_BODY, "n": 3, "max_completion_tokens": 4})

    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" for c in answer["choices"])
    assert all(len(c["message"]["content"].split()) == 4 for c in answer["choices"])
    assert answer["usage"]["completion_tokens"] == 12


def test_completions_one_choice_per_prompt() -> None:
    answer = Completion.model_validate(
        mock_response("/v1/completions", {"model": "m", "prompt": ["one two", "three", [1, 2, 3]]})
    )

    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.object == "text_completion"
    assert answer.usage is not None and answer.usage.prompt_tokens == 2 + 1 + 3


def test_embeddings_one_unit_vector_per_input() -> None:
    answer = CreateEmbeddingResponse.model_validate(mock_response("/v1/embeddings", EMBEDDING_BODY))

    assert [d.index for d in answer.data] == [0, 1, 2]
    assert all(len(d.embedding) == 8 for d in answer.data)
    assert all(math.isclose(math.hypot(*d.embedding), 1.0, abs_tol=1e-4) for d in answer.data)
    assert answer.data[0].embedding != answer.data[1].embedding
    assert answer.usage.prompt_tokens == answer.usage.total_tokens == 2 + 3 + 1


def test_embeddings_dimensions_token_arrays_and_base64() -> None:
    wide = mock_response("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 1536})
    tokens = mock_response("/v1/embeddings", {"model": "m", "input": [5, 6, 7]})
    floats = mock_response("/v1/embeddings", {"model": "m", "input": "hi", "dimensions": 4})
    packed = mock_response(
        "/v1/embeddings", {"model": "m", "input": "hi", "dimensions": 4, "encoding_format": "base64"}
    )

    assert len(wide["data"][0]["embedding"]) == 1536
    assert len(tokens["data"]) == 1  # one token array is one input
    decoded = struct.unpack("<4f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats["data"][0]["embedding"], abs=1e-6)


def test_responses_output_text_and_usage() -> None:
    answer = Response.model_validate(mock_response("/v1/responses", RESPONSES_BODY))

    assert answer.status == "completed"
    assert "synthetic mock answer" in answer.output_text
    assert "short joke" in answer.output_text
    usage = answer.usage
    assert usage is not None
    assert usage.input_tokens == 7  # words of instructions and input
    assert usage.output_tokens == len(answer.output_text.split())
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_responses_accepts_message_items_and_stops_at_max_output_tokens() -> None:
    body = {
        "model": "m",
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "a b c d e f"}]}],
        "max_output_tokens": 3,
    }
    answer = Response.model_validate(mock_response("/v1/responses", body))

    assert answer.status == "incomplete"
    assert len(answer.output_text.split()) == 3


def test_moderations_one_result_per_input() -> None:
    answer = ModerationCreateResponse.model_validate(mock_response("/v1/moderations", MODERATION_BODY))
    multimodal = mock_response(
        "/v1/moderations",
        {"input": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:x"}}]},
    )

    assert len(answer.results) == 2
    assert not any(r.flagged for r in answer.results)
    assert len(multimodal["results"]) == 1
    assert multimodal["results"][0]["category_applied_input_types"]["violence"] == ["text", "image"]


@pytest.mark.parametrize(
    ("endpoint", "body", "status", "param"),
    [
        ("/v1/images/generations", {"model": "m"}, 404, None),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, 400, "model"),
        ("/v1/chat/completions", {"model": "m"}, 400, "messages"),
        ("/v1/embeddings", {"model": "m", "input": [{"bad": 1}]}, 400, "input"),
        ("/v1/embeddings", {"model": "m", "input": "x", "dimensions": 0}, 400, "dimensions"),
        ("/v1/responses", {"model": "m"}, 400, "input"),
    ],
)
def test_requests_a_server_would_reject(
    endpoint: str, body: dict[str, Any], status: int, param: str | None
) -> None:
    with pytest.raises(MockRequestError) as caught:
        mock_response(endpoint, body)

    assert caught.value.status == status
    assert caught.value.param == param
    assert set(caught.value.envelope()["error"]) == {"message", "type", "param", "code"}


def test_mock_upstream_answers_in_process_after_its_latency() -> None:
    async def run() -> tuple[Any, Any, Any, float]:
        client = MockUpstream(latency_seconds=0.05)
        started = time.perf_counter()
        ok = await client.send("/v1/chat/completions", orjson.dumps(CHAT_BODY))
        elapsed = time.perf_counter() - started
        bad_json = await client.send("/v1/chat/completions", b"{not json")
        unknown = await client.send("/v1/nope", orjson.dumps(CHAT_BODY))
        await client.aclose()
        return ok, bad_json, unknown, elapsed

    ok, bad_json, unknown, elapsed = asyncio.run(run())

    assert ok.status_code == 200
    assert ok.body == mock_response("/v1/chat/completions", CHAT_BODY)
    assert ok.request_id and ok.request_id.startswith("req_")
    assert elapsed >= 0.05
    assert bad_json.status_code == 400 and bad_json.body["error"]["type"] == "invalid_request_error"
    assert unknown.status_code == 404


def test_mock_server_serves_every_endpoint_over_http() -> None:
    async def run() -> tuple[list[Any], Any, dict[str, Any]]:
        server = TestServer(create_app(latency_seconds=0.01))
        await server.start_server()
        try:
            base_url = str(server.make_url("/v1"))
            async with OpenAIHttpUpstream(base_url, "sk-any") as client:
                answers = [await client.send(endpoint, orjson.dumps(body)) for endpoint, body, _ in SDK_TYPES]
                missing_model = await client.send("/v1/embeddings", orjson.dumps({"input": "x"}))
            async with aiohttp.ClientSession() as session, session.get(f"{base_url}/models") as models:
                return answers, missing_model, await models.json()
        finally:
            await server.close()

    answers, missing_model, models = asyncio.run(run())

    for (endpoint, body, sdk_type), answer in zip(SDK_TYPES, answers, strict=True):
        assert answer.status_code == 200, endpoint
        assert answer.body == mock_response(endpoint, body)
        assert answer.request_id.startswith("req_mock")
        sdk_type.model_validate(answer.body)
    assert missing_model.status_code == 400
    assert missing_model.body["error"]["param"] == "model"
    assert models["object"] == "list" and models["data"]


def test_the_mock_times_out_at_a_deadline_it_cannot_meet_and_answers_before_one_it_can() -> None:
    mock = MockUpstream(latency_seconds=5.0)
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})

    async def both() -> tuple[Any, Any, float]:
        began = time.monotonic()
        late = await mock.send("/v1/chat/completions", body, began + 0.05)
        took = time.monotonic() - began
        fast = await MockUpstream(latency_seconds=0.01).send(
            "/v1/chat/completions", body, time.monotonic() + 5
        )
        return late, fast, took

    late, fast, took = asyncio.run(both())
    assert (late.status_code, late.error_code) == (None, "upstream_timeout") and took < 1
    assert fast.status_code == 200
