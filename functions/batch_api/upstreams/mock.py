"""A deterministic stand-in for an OpenAI-compatible model server.

Used for demos (`batch-api serve` with no upstream URL), tests and benchmarks. Every answer is a
pure function of (endpoint, body): the same request always gets the same ids, text, vectors and
token counts, so runs can be compared byte for byte. Answers are shaped exactly like OpenAI's (the
tests parse them with the openai SDK's own types) and say plainly that they are synthetic.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
from collections.abc import Callable
from typing import Any

import orjson

from batch_api.ports import DEADLINE_PASSED, UpstreamResponse

# A fixed timestamp keeps answers deterministic; real servers put the current time here.
MOCK_CREATED_AT = 1_700_000_000
DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_EMBEDDING_DIMENSIONS = 4096
MAX_CHOICES = 128

_ANSWER_PREFIX = "This is a synthetic mock answer from batch-api (no model was called)."

_MODERATION_CATEGORIES = (
    "harassment",
    "harassment/threatening",
    "hate",
    "hate/threatening",
    "illicit",
    "illicit/violent",
    "self-harm",
    "self-harm/instructions",
    "self-harm/intent",
    "sexual",
    "sexual/minors",
    "violence",
    "violence/graphic",
)


class MockRequestError(ValueError):
    """The request cannot be answered; carries the HTTP status and OpenAI error fields a server would send."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code

    def envelope(self) -> dict[str, Any]:
        error_type = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": error_type, "param": self.param, "code": self.code}}


def _digest(*parts: bytes) -> str:
    hasher = hashlib.sha256()
    for part in parts:
        hasher.update(part)
        hasher.update(b"\x00")
    return hasher.hexdigest()


def _body_digest(endpoint: str, body: dict[str, Any]) -> str:
    return _digest(endpoint.encode(), orjson.dumps(body, option=orjson.OPT_SORT_KEYS))


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: whitespace-separated words. Deterministic and cheap; not tiktoken."""
    return len(text.split())


def _text_of(content: Any) -> str:
    """Flatten the text out of OpenAI content shapes: a string, a list of parts, or nested items."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(filter(None, (_text_of(item) for item in content)))
    if isinstance(content, dict):
        for key in ("text", "content", "input_text", "output_text"):
            if key in content:
                return _text_of(content[key])
    return ""


def _answer(prompt: str, choice_index: int = 0) -> str:
    words = prompt.split()
    echo = " ".join(words[:12]) + (" ..." if len(words) > 12 else "")
    choice = f" Choice {choice_index}." if choice_index else ""
    return f'{_ANSWER_PREFIX}{choice} You said: "{echo}"' if echo else f"{_ANSWER_PREFIX}{choice}"


def _limit_tokens(text: str, max_tokens: Any) -> tuple[str, str]:
    """Cut the answer to `max_tokens` words, reporting finish_reason "length" as a real model would."""
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 0:
        words = text.split()
        if len(words) > max_tokens:
            return " ".join(words[:max_tokens]), "length"
    return text, "stop"


def _choice_count(body: dict[str, Any]) -> int:
    n = body.get("n", 1)
    if n is None:
        return 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_CHOICES:
        raise MockRequestError(f"n must be an integer between 1 and {MAX_CHOICES}", param="n")
    return n


def _model(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise MockRequestError("you must provide a model parameter", param="model")
    return model


def _chat_completion(body: dict[str, Any], digest: str) -> dict[str, Any]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise MockRequestError("messages must be a non-empty array", param="messages")
    prompt = " ".join(_text_of(m.get("content")) for m in messages if isinstance(m, dict))
    last_user = next(
        (
            _text_of(m.get("content"))
            for m in reversed(messages)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        prompt,
    )
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    choices = []
    completion_tokens = 0
    for index in range(_choice_count(body)):
        text, finish_reason = _limit_tokens(_answer(last_user, index), max_tokens)
        completion_tokens += count_tokens(text)
        choices.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": text, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        )
    prompt_tokens = count_tokens(prompt)
    return {
        "id": f"chatcmpl-mock{digest[:24]}",
        "object": "chat.completion",
        "created": MOCK_CREATED_AT,
        "model": _model(body),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "service_tier": "default",
        "system_fingerprint": "fp_batch_api_mock",
    }


def _prompts(value: Any, param: str) -> list[str]:
    """A completions prompt / embeddings input: a string, a token array, or a list of either."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) and not isinstance(item, bool) for item in value):
            return [" ".join(str(token) for token in value)]
        prompts = []
        for item in value:
            if isinstance(item, str):
                prompts.append(item)
            elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
                prompts.append(" ".join(str(token) for token in item))
            else:
                raise MockRequestError(f"{param} items must be strings or arrays of token ids", param=param)
        return prompts
    raise MockRequestError(f"{param} must be a string or a non-empty array", param=param)


def _completion(body: dict[str, Any], digest: str) -> dict[str, Any]:
    prompts = _prompts(body.get("prompt"), "prompt")
    n = _choice_count(body)
    choices = []
    completion_tokens = 0
    for prompt_index, prompt in enumerate(prompts):
        for choice_index in range(n):
            text, finish_reason = _limit_tokens(" " + _answer(prompt, choice_index), body.get("max_tokens"))
            completion_tokens += count_tokens(text)
            choices.append(
                {
                    "index": prompt_index * n + choice_index,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            )
    prompt_tokens = sum(count_tokens(p) for p in prompts)
    return {
        "id": f"cmpl-mock{digest[:24]}",
        "object": "text_completion",
        "created": MOCK_CREATED_AT,
        "model": _model(body),
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": "fp_batch_api_mock",
    }


def _unit_vector(text: str, dimensions: int) -> list[float]:
    """Deterministic pseudo-random floats from the text's hash, normalised like real embeddings."""
    values: list[float] = []
    counter = 0
    seed = text.encode()
    while len(values) < dimensions:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        values.extend((word / 0xFFFFFFFF) * 2.0 - 1.0 for word in struct.unpack(">8I", block))
        counter += 1
    values = values[:dimensions]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _embeddings(body: dict[str, Any], digest: str) -> dict[str, Any]:
    inputs = _prompts(body.get("input"), "input")
    dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
    if dimensions is None:
        dimensions = DEFAULT_EMBEDDING_DIMENSIONS
    if (
        not isinstance(dimensions, int)
        or isinstance(dimensions, bool)
        or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS
    ):
        raise MockRequestError(
            f"dimensions must be an integer between 1 and {MAX_EMBEDDING_DIMENSIONS}", param="dimensions"
        )
    as_base64 = body.get("encoding_format") == "base64"
    data = []
    for index, text in enumerate(inputs):
        vector = _unit_vector(text, dimensions)
        embedding: Any = (
            base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    # An empty string still costs a token on real servers; never report zero usage for work done.
    prompt_tokens = sum(max(1, count_tokens(text)) for text in inputs)
    return {
        "object": "list",
        "data": data,
        "model": _model(body),
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def _responses(body: dict[str, Any], digest: str) -> dict[str, Any]:
    raw_input = body.get("input")
    if raw_input is None or raw_input == "" or raw_input == []:
        raise MockRequestError("input must be a non-empty string or array", param="input")
    instructions = body.get("instructions")
    prompt = _text_of(raw_input)
    full_prompt = f"{_text_of(instructions)} {prompt}".strip() if isinstance(instructions, str) else prompt
    text, finish_reason = _limit_tokens(_answer(prompt), body.get("max_output_tokens"))
    input_tokens = count_tokens(full_prompt)
    output_tokens = count_tokens(text)
    incomplete = finish_reason == "length"
    return {
        "id": f"resp_mock{digest[:40]}",
        "object": "response",
        "created_at": MOCK_CREATED_AT,
        "completed_at": None if incomplete else MOCK_CREATED_AT,
        "status": "incomplete" if incomplete else "completed",
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "instructions": instructions,
        "max_output_tokens": body.get("max_output_tokens"),
        "model": _model(body),
        "output": [
            {
                "type": "message",
                "id": f"msg_mock{digest[24:64]}",
                "status": "incomplete" if incomplete else "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
            }
        ],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text", {"format": {"type": "text"}}),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
        "user": body.get("user"),
        "metadata": body.get("metadata", {}),
    }


def _moderation_inputs(value: Any) -> list[str]:
    """Strings get one result each; a multimodal array ([{type: text|image_url, ...}]) is one input."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(isinstance(item, dict) for item in value):
            return [_text_of(value)]
    raise MockRequestError(
        "input must be a string, an array of strings, or an array of content parts", param="input"
    )


def _moderations(body: dict[str, Any], digest: str) -> dict[str, Any]:
    # The moderations endpoint has a default model; every other endpoint requires one.
    model = body.get("model") or "omni-moderation-latest"
    applied_types = (
        ["text", "image"]
        if isinstance(body.get("input"), list)
        and any(isinstance(item, dict) and item.get("type") == "image_url" for item in body["input"])
        else ["text"]
    )
    results = []
    for text in _moderation_inputs(body.get("input")):
        text_digest = hashlib.sha256(text.encode()).digest()
        scores = {
            name: round(text_digest[i] / 255 * 1e-3, 8) for i, name in enumerate(_MODERATION_CATEGORIES)
        }
        results.append(
            {
                "flagged": False,
                "categories": dict.fromkeys(_MODERATION_CATEGORIES, False),
                "category_scores": scores,
                "category_applied_input_types": {name: applied_types for name in _MODERATION_CATEGORIES},
            }
        )
    return {"id": f"modr-mock{digest[:24]}", "model": model, "results": results}


_HANDLERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "/v1/chat/completions": _chat_completion,
    "/v1/completions": _completion,
    "/v1/embeddings": _embeddings,
    "/v1/responses": _responses,
    "/v1/moderations": _moderations,
}
MOCK_ENDPOINTS = tuple(_HANDLERS)


def mock_response(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    """The deterministic OpenAI-shaped answer to `body` posted at `endpoint` (e.g. "/v1/embeddings").

    Raises `MockRequestError` (404 for an unknown endpoint, 400 for a body the endpoint would reject).
    """
    handler = _HANDLERS.get(endpoint)
    if handler is None:
        raise MockRequestError(f"Invalid URL (POST {endpoint})", status=404, code="unknown_url")
    if not isinstance(body, dict):
        raise MockRequestError("the request body must be a JSON object")
    return handler(body, _body_digest(endpoint, body))


def mock_request_id(endpoint: str, body: bytes) -> str:
    """Stable per request body, like everything else the mock answers."""
    return f"req_mock{_digest(endpoint.encode(), body)[:24]}"


def mock_answer(endpoint: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) for raw request bytes: what a server built on the mock sends back."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return 400, MockRequestError(f"We could not parse the JSON body of your request: {exc}").envelope()
    try:
        return 200, mock_response(endpoint, parsed)
    except MockRequestError as exc:
        return exc.status, exc.envelope()


class MockUpstream:
    """`ports.Upstream` answering in-process from `mock_response`, after `latency_seconds` per request."""

    def __init__(self, latency_seconds: float = 0.0) -> None:
        self.latency_seconds = latency_seconds

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        if self.latency_seconds > 0:
            left = math.inf if deadline is None else deadline - time.monotonic()
            if left < self.latency_seconds:  # it would answer too late: time out at the deadline
                await asyncio.sleep(max(0.0, left))
                return UpstreamResponse(
                    status_code=None,
                    error_code="upstream_timeout",
                    error_message=f"request to the mock failed after 1 attempt: {DEADLINE_PASSED}",
                )
            await asyncio.sleep(self.latency_seconds)
        status, answer = mock_answer(endpoint, body)
        return UpstreamResponse(
            status_code=status,
            body=answer,
            request_id=mock_request_id(endpoint, body),
            headers={"content-type": "application/json"},
        )

    async def aclose(self) -> None:
        """Nothing to release; present so callers treat every upstream alike."""
