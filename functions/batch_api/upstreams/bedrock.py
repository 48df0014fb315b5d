"""Amazon Bedrock as an upstream: OpenAI request bodies translated to Bedrock calls, and back.

- `/v1/chat/completions` -> Converse: messages (system and developer ones become `system`; assistant
  `tool_calls` become toolUse blocks, `tool` messages toolResult blocks), temperature, top_p,
  max_tokens / max_completion_tokens, stop, tools and tool_choice. The answer comes back as an OpenAI
  `chat.completion` with `usage`. Images, audio, `n` > 1, logprobs and JSON response formats are
  refused with a 400 naming the parameter, before anything is sent.
- `/v1/embeddings` -> InvokeModel: Amazon Titan Text Embeddings (one input per call; v2 takes
  `dimensions`) and Cohere Embed (up to 96 texts per call, `input_type` search_document unless the
  body names one), answered as an OpenAI embeddings list with `usage`.

The model a line names is looked up in the upstream's model map (OpenAI-side name -> Bedrock model id,
inference profile id, or either's ARN). Calls go through the `ports.BedrockRuntime` port (the boto3
client lives in `adapters/aws/bedrock.py`) on a thread pool, with the HTTP client's retry rules
(`openai_http`: backoff, deadlines) applied to Bedrock's statuses: throttling (429), a model not ready
(429), timeouts (408) and 5xx are retried; validation (400), access (403) and unknown models (404) end
the request at once, in the error file with an OpenAI-shaped error body.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import orjson

from batch_api.contract.ids import new_request_id
from batch_api.ports import (
    DEADLINE_PASSED,
    BedrockAnswer,
    BedrockCallError,
    BedrockRuntime,
    UpstreamResponse,
)
from batch_api.upstreams.capacity import CapacityGate, answer_tokens, estimate_tokens
from batch_api.upstreams.openai_http import backoff_seconds, in_time, should_retry

logger = logging.getLogger(__name__)

CHAT = "/v1/chat/completions"
EMBEDDINGS = "/v1/embeddings"
ENDPOINTS = (CHAT, EMBEDDINGS)
COHERE_MAX_TEXTS = 96  # Cohere Embed on Bedrock takes at most this many texts per call
COHERE_DEFAULT_INPUT_TYPE = "search_document"
# Converse's stop reasons -> OpenAI's finish_reason
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
# OpenAI's error `type` by HTTP status
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
}
# ---------------------------------------------------------------- model ids

# cross-Region (system-defined) inference profiles: a geography before the model id
PROFILE_PREFIX = re.compile(r"^(us|us-gov|eu|apac|jp|au|ca|global)\.(?=[a-z0-9-]+\.)")
MODEL_ID = re.compile(r"^[a-z0-9-]+(\.[A-Za-z0-9._:-]+)+$")
MODEL_ARN = re.compile(
    r"^arn:(?P<partition>aws[a-z-]*):bedrock:(?P<region>[a-z0-9-]+):(?P<account>\d{12})?:"
    r"(?P<type>foundation-model|inference-profile)/(?P<id>[A-Za-z0-9._:-]+)$"
)


@dataclass(frozen=True)
class BedrockTarget:
    """What a model id of the upstream's map calls, as IAM must allow it: a foundation model, or an
    inference profile routing to `foundation_model` (in the Regions the profile chooses)."""

    model_id: str  # as configured: what Converse and InvokeModel are called with
    kind: Literal["foundation-model", "inference-profile"]
    resource_id: str  # the foundation model's or the profile's id
    foundation_model: str  # the model that answers
    region: str | None = None  # an ARN's; None: the upstream's
    account: str | None = None  # an inference profile ARN's


def bedrock_target(model_id: str) -> BedrockTarget:
    """Classify a configured model id; `ValueError` for what this upstream cannot call (or grant)."""
    if model_id.startswith("arn:"):
        match = MODEL_ARN.match(model_id)
        if match is None:
            raise ValueError(
                f"{model_id!r} is not a foundation model or inference profile ARN (application inference "
                "profiles and other resources are not supported: IAM could not be limited to their models)"
            )
        resource = match["id"]
        if match["type"] == "foundation-model":
            return BedrockTarget(model_id, "foundation-model", resource, resource, match["region"])
        if match["account"] is None:
            raise ValueError(f"{model_id!r}: an inference profile ARN names its account")
        return BedrockTarget(
            model_id,
            "inference-profile",
            resource,
            _profile_model(model_id, resource),
            match["region"],
            match["account"],
        )
    if not MODEL_ID.match(model_id):
        raise ValueError(
            f"{model_id!r} is not a Bedrock model id (like anthropic.claude-3-haiku-20240307-v1:0)"
        )
    if PROFILE_PREFIX.match(model_id):
        return BedrockTarget(model_id, "inference-profile", model_id, _profile_model(model_id, model_id))
    return BedrockTarget(model_id, "foundation-model", model_id, model_id)


def _profile_model(model_id: str, profile_id: str) -> str:
    base = PROFILE_PREFIX.sub("", profile_id, count=1)
    if base == profile_id:
        raise ValueError(f"{model_id!r}: not a cross-Region inference profile id (like us.<model id>)")
    return base


# ---------------------------------------------------------------- translation


class TranslationError(ValueError):
    """The request asks for something Bedrock cannot do through this translation: a 400 line."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_body(
    message: str, status: int, *, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """An OpenAI error envelope (all four keys) for an answer of HTTP `status`."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _text_of(content: Any, param: str, *, allow_images: bool = False) -> list[str]:
    """The text parts of an OpenAI message content (a string or a list of parts)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [content] if content else []
    if not isinstance(content, list):
        raise TranslationError("content must be a string or a list of content parts", param)
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if part["text"]:
                texts.append(part["text"])
            continue
        if kind in ("image_url", "input_audio", "file"):
            raise TranslationError(
                f"content parts of type {kind!r} are not supported by the Bedrock upstream (text only)",
                f"{param}.{index}",
            )
        raise TranslationError(f"unsupported content part {kind!r}", f"{param}.{index}")
    return texts


def _tool_use(call: Any, param: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if (
        not isinstance(function, dict)
        or not isinstance(function.get("name"), str)
        or call.get("type", "function") != "function"
    ):
        raise TranslationError("a tool call needs type 'function' and a function name", param)
    raw = function.get("arguments") or "{}"
    try:
        arguments = orjson.loads(raw) if isinstance(raw, str) else raw
    except orjson.JSONDecodeError:
        raise TranslationError(
            "tool call arguments must be a JSON object", f"{param}.function.arguments"
        ) from None
    if not isinstance(arguments, dict):
        raise TranslationError("tool call arguments must be a JSON object", f"{param}.function.arguments")
    return {"toolUse": {"toolUseId": str(call.get("id") or ""), "name": function["name"], "input": arguments}}


def _messages(messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """OpenAI messages -> (Converse system blocks, Converse messages). Consecutive messages of one
    Converse role are merged (Converse wants user and assistant turns to alternate; tool results are
    user turns)."""
    if not isinstance(messages, list) or not messages:
        raise TranslationError("messages must be a non-empty list", "messages")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for index, message in enumerate(messages):
        param = f"messages.{index}"
        if not isinstance(message, dict):
            raise TranslationError("each message must be an object", param)
        role = message.get("role")
        content = message.get("content")
        if role in ("system", "developer"):
            system.extend({"text": text} for text in _text_of(content, f"{param}.content"))
        elif role == "user":
            add("user", [{"text": text} for text in _text_of(content, f"{param}.content")])
        elif role == "assistant":
            blocks: list[dict[str, Any]] = [{"text": text} for text in _text_of(content, f"{param}.content")]
            calls = message.get("tool_calls") or []
            if not isinstance(calls, list):
                raise TranslationError("tool_calls must be a list", f"{param}.tool_calls")
            blocks += [_tool_use(call, f"{param}.tool_calls.{i}") for i, call in enumerate(calls)]
            add("assistant", blocks)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise TranslationError("a tool message needs its tool_call_id", f"{param}.tool_call_id")
            texts = _text_of(content, f"{param}.content")
            result = {"toolUseId": call_id, "content": [{"text": text} for text in texts] or [{"text": ""}]}
            add("user", [{"toolResult": result}])
        else:
            raise TranslationError(f"unsupported message role {role!r}", f"{param}.role")
    if not turns:
        raise TranslationError("messages must hold at least one user message", "messages")
    return system, turns


def _tool_config(body: Mapping[str, Any], has_tool_blocks: bool) -> dict[str, Any] | None:
    tools = body.get("tools")
    choice = body.get("tool_choice")
    if not tools:
        if choice not in (None, "none", "auto"):
            raise TranslationError("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list):
        raise TranslationError("tools must be a list", "tools")
    specs = []
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise TranslationError("only tools of type 'function' are supported", f"tools.{index}")
        if not isinstance(function.get("name"), str):
            raise TranslationError("a function tool needs a name", f"tools.{index}.function.name")
        spec: dict[str, Any] = {
            "name": function["name"],
            "inputSchema": {"json": function.get("parameters") or {"type": "object", "properties": {}}},
        }
        if function.get("description"):
            spec["description"] = function["description"]
        specs.append({"toolSpec": spec})
    config: dict[str, Any] = {"tools": specs}
    if choice is None or choice == "auto":
        pass  # Converse's default; and only some models (Claude 3, Mistral Large, Nova) take a toolChoice
    elif choice == "required":
        config["toolChoice"] = {"any": {}}
    elif choice == "none":
        # Converse has no "none": leave the tools out, unless earlier turns used them (Converse then
        # insists on the tool config; no choice is given, and the model may still call one)
        return {"tools": specs} if has_tool_blocks else None
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if not isinstance(name, str):
            raise TranslationError("tool_choice names no function", "tool_choice.function.name")
        config["toolChoice"] = {"tool": {"name": name}}
    else:
        raise TranslationError(f"unsupported tool_choice {choice!r}", "tool_choice")
    return config


def _unsupported(body: Mapping[str, Any]) -> None:
    """Refuse what Converse cannot do rather than answer something else than was asked."""
    n = body.get("n")
    if n not in (None, 1):
        raise TranslationError("the Bedrock upstream gives one choice per request (n must be 1)", "n")
    for name in ("logprobs", "top_logprobs", "logit_bias", "audio", "prediction"):
        if body.get(name) not in (None, False, {}):
            raise TranslationError(f"{name} is not supported by the Bedrock upstream", name)
    for name in ("frequency_penalty", "presence_penalty"):
        if body.get(name) not in (None, 0, 0.0):
            raise TranslationError(f"{name} is not supported by the Bedrock upstream", name)
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type") != "text"
    ):
        raise TranslationError(
            "only the text response_format is supported by the Bedrock upstream", "response_format"
        )
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise TranslationError("only text output is supported by the Bedrock upstream", "modalities")


def converse_request(model_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completion request body -> Converse's request (`TranslationError` when it asks for
    what Converse cannot do)."""
    _unsupported(body)
    system, messages = _messages(body.get("messages"))
    request: dict[str, Any] = {"modelId": model_id, "messages": messages}
    if system:
        request["system"] = system
    inference: dict[str, Any] = {}
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    for name, target, kinds in (
        (field, "maxTokens", (int,)),
        ("temperature", "temperature", (int, float)),
        ("top_p", "topP", (int, float)),
    ):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise TranslationError(f"{name} must be a number", name)
        inference[target] = value
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(item, str) for item in stops):
            raise TranslationError("stop must be a string or a list of strings", "stop")
        inference["stopSequences"] = stops
    if inference:
        request["inferenceConfig"] = inference
    has_tool_blocks = any("toolUse" in b or "toolResult" in b for m in messages for b in m["content"])
    tools = _tool_config(body, has_tool_blocks)
    if tools is not None:
        request["toolConfig"] = tools
    return request


def chat_completion(answer: BedrockAnswer, model: str, created: int) -> dict[str, Any]:
    """Converse's answer -> an OpenAI chat.completion for `model` (the name the request used)."""
    output = answer.body.get("output") or {}
    blocks = (output.get("message") or {}).get("content") or []
    texts = [block["text"] for block in blocks if isinstance(block.get("text"), str)]
    tool_calls = [
        {
            "id": block["toolUse"].get("toolUseId", ""),
            "type": "function",
            "function": {
                "name": block["toolUse"].get("name", ""),
                "arguments": orjson.dumps(block["toolUse"].get("input", {})).decode(),
            },
        }
        for block in blocks
        if isinstance(block.get("toolUse"), dict)
    ]
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    stop_reason = answer.body.get("stopReason")
    usage = answer.body.get("usage") or {}
    cached = int(usage.get("cacheReadInputTokens", 0))
    # OpenAI's prompt_tokens counts cached tokens too (`cached_tokens` says how many); Converse's
    # inputTokens leaves out what it read from or wrote to the prompt cache
    prompt = int(usage.get("inputTokens", 0)) + cached + int(usage.get("cacheWriteInputTokens", 0))
    completion = int(usage.get("outputTokens", 0))
    return {
        "id": f"chatcmpl-{answer.request_id or new_request_id()}",
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(str(stop_reason), "stop"),
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        },
    }


EmbeddingFamily = Literal["titan-v1", "titan-v2", "cohere"]


def embedding_family(model_id: str) -> EmbeddingFamily:
    lowered = model_id.lower()
    if "amazon.titan-embed-text-v1" in lowered:
        return "titan-v1"
    if "amazon.titan-embed-text-v2" in lowered:
        return "titan-v2"
    if "cohere.embed" in lowered:
        return "cohere"
    raise TranslationError(
        f"the Bedrock upstream embeds with Amazon Titan Text Embeddings and Cohere Embed models; {model_id} is neither",
        "model",
    )


def embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return list(value)
    if isinstance(value, list) and value:
        raise TranslationError("the Bedrock upstream embeds text; token arrays are not supported", "input")
    raise TranslationError("input must be a string or a non-empty list of strings", "input")


def embedding_calls(model_id: str, body: Mapping[str, Any]) -> tuple[EmbeddingFamily, list[bytes]]:
    """The InvokeModel bodies an OpenAI embeddings request takes (`TranslationError` when it cannot)."""
    family = embedding_family(model_id)
    texts = embedding_inputs(body)
    encoding = body.get("encoding_format")
    if encoding not in (None, "float", "base64"):
        raise TranslationError("encoding_format must be 'float' or 'base64'", "encoding_format")
    dimensions = body.get("dimensions")
    if family == "cohere":
        if dimensions is not None and "embed-v4" not in model_id:
            raise TranslationError(f"{model_id} does not take dimensions", "dimensions")
        input_type = body.get("input_type", COHERE_DEFAULT_INPUT_TYPE)
        calls = []
        for start in range(0, len(texts), COHERE_MAX_TEXTS):
            request: dict[str, Any] = {
                "texts": texts[start : start + COHERE_MAX_TEXTS],
                "input_type": input_type,
            }
            if dimensions is not None:
                request["output_dimension"] = dimensions
            calls.append(orjson.dumps(request))
        return family, calls
    if dimensions is not None and family == "titan-v1":
        raise TranslationError(f"{model_id} does not take dimensions", "dimensions")
    extra = {} if dimensions is None else {"dimensions": dimensions}
    return family, [orjson.dumps({"inputText": text, **extra}) for text in texts]


def _vectors(family: EmbeddingFamily, answer: BedrockAnswer) -> tuple[list[list[float]], int]:
    """The vectors of one InvokeModel answer and the input tokens it reports."""
    body = answer.body
    if family == "cohere":
        embeddings = body.get("embeddings")
        if isinstance(embeddings, dict):  # asked for by type: {"float": [...]}
            embeddings = embeddings.get("float")
        if not isinstance(embeddings, list):
            raise ValueError("the Cohere answer holds no embeddings")
        tokens = answer.headers.get("x-amzn-bedrock-input-token-count", "0")
        return embeddings, int(tokens) if tokens.isdigit() else 0
    embedding = body.get("embedding")
    if not isinstance(embedding, list):
        raise ValueError("the Titan answer holds no embedding")
    return [embedding], int(body.get("inputTextTokenCount", 0))


def _encode(vector: list[float], encoding: Any) -> list[float] | str:
    if encoding == "base64":  # as OpenAI sends it: little-endian float32
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector


def embeddings_response(
    family: EmbeddingFamily, answers: Sequence[BedrockAnswer], model: str, encoding: Any
) -> dict[str, Any]:
    """InvokeModel answers (in input order) -> an OpenAI embeddings list for `model`."""
    data: list[dict[str, Any]] = []
    tokens = 0
    for answer in answers:
        vectors, used = _vectors(family, answer)
        tokens += used
        for vector in vectors:
            data.append({"object": "embedding", "index": len(data), "embedding": _encode(vector, encoding)})
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


# ---------------------------------------------------------------- the client


class BedrockUpstream:
    """`ports.Upstream` over Amazon Bedrock. Every attempt takes a slot of the upstream's gate (if any)
    while it runs on `executor`; `send` never raises for Bedrock's or the network's failures."""

    def __init__(
        self,
        runtime: BedrockRuntime,
        model_ids: Mapping[str, str],
        *,
        executor: Executor | None = None,
        region: str = "",
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.time,
        gate: CapacityGate | None = None,
        batch_id: str = "",
    ) -> None:
        self.runtime = runtime
        self.model_ids = dict(model_ids)
        self.executor = executor
        self.region = region
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._sleep = sleep
        self._rng = rng
        self._clock = clock
        self._gate = gate
        self._batch_id = batch_id

    @property
    def gate(self) -> CapacityGate | None:
        return self._gate

    def __repr__(self) -> str:
        return f"BedrockUpstream(region={self.region!r}, models={sorted(self.model_ids)!r})"

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        try:
            request = orjson.loads(body)
        except orjson.JSONDecodeError:
            request = None
        if not isinstance(request, dict):
            return _refused(TranslationError("the request body must be a JSON object"))
        model = request.get("model")
        model_id = self.model_ids.get(model) if isinstance(model, str) else None
        if model_id is None or not isinstance(model, str):
            message = f"The model {model!r} is not one this Bedrock upstream maps to a Bedrock model."
            return UpstreamResponse(
                status_code=404,
                body=error_body(message, 404, code="model_not_found", param="model"),
                request_id=new_request_id(),
            )
        tokens = estimate_tokens(body) if self._gate is not None and self._gate.counts_tokens else 0
        try:
            if endpoint == CHAT:
                response = await self._chat(model, model_id, request, tokens, deadline)
            elif endpoint == EMBEDDINGS:
                response = await self._embeddings(model, model_id, request, tokens, deadline)
            else:
                raise TranslationError(
                    f"the Bedrock upstream serves {' and '.join(ENDPOINTS)}, not {endpoint}", None
                )
        except TranslationError as exc:
            return _refused(exc)
        if tokens and self._gate is not None:
            self._gate.used_tokens(tokens, answer_tokens(response.body))
        return response

    async def _chat(
        self, model: str, model_id: str, request: Mapping[str, Any], tokens: int, deadline: float | None
    ) -> UpstreamResponse:
        converse = converse_request(model_id, request)
        outcome = await self._call(partial(self.runtime.converse, converse), tokens, deadline)
        if isinstance(outcome, UpstreamResponse):
            return outcome
        answer, attempts = outcome
        return UpstreamResponse(
            status_code=200,
            body=chat_completion(answer, model, int(self._clock())),
            request_id=answer.request_id or new_request_id(),
            attempts=attempts,
        )

    async def _embeddings(
        self, model: str, model_id: str, request: Mapping[str, Any], tokens: int, deadline: float | None
    ) -> UpstreamResponse:
        family, calls = embedding_calls(model_id, request)
        answers: list[BedrockAnswer] = []
        attempts = 0
        for index, call in enumerate(calls):  # one at a time: each holds a slot of the gate
            outcome = await self._call(
                partial(self.runtime.invoke_model, model_id, call),
                tokens if index == 0 else 0,
                deadline,
            )
            if isinstance(outcome, UpstreamResponse):
                return outcome
            answers.append(outcome[0])
            attempts += outcome[1]
        try:
            body = embeddings_response(family, answers, model, request.get("encoding_format"))
        except (ValueError, TypeError) as exc:
            return UpstreamResponse(
                status_code=None,
                error_code="upstream_invalid_response",
                error_message=f"Bedrock answered {model_id} with a body this upstream cannot read: {exc}",
                attempts=attempts,
            )
        return UpstreamResponse(
            status_code=200,
            body=body,
            request_id=answers[-1].request_id or new_request_id(),
            attempts=attempts,
        )

    async def _call(
        self, call: Callable[[], BedrockAnswer], tokens: int, deadline: float | None
    ) -> tuple[BedrockAnswer, int] | UpstreamResponse:
        """One Bedrock call with retries: its answer and the attempts it took, or the final failure."""
        attempt = 0
        while True:
            attempt += 1
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return self._transport_failure(
                    "upstream_timeout", "no time was left to send it", max(1, attempt - 1)
                )
            outcome = await self._attempt(call, tokens if attempt == 1 else 0, left)
            if isinstance(outcome, BedrockAnswer):
                return outcome, attempt
            failure = outcome
            retryable = failure.retryable if failure.status is None else should_retry(failure.status, {})
            if retryable and attempt <= self.max_retries:
                delay = backoff_seconds(
                    attempt - 1, None, base=self.backoff_base, cap=self.backoff_max, rng=self._rng
                )
                if in_time(delay, deadline):
                    logger.info(
                        "Bedrock %s: %s on attempt %d, retrying in %.2f s",
                        self.region,
                        failure.code,
                        attempt,
                        delay,
                    )
                    await self._sleep(delay)
                    continue
            if failure.status is None:
                return self._transport_failure(failure.code, failure.message, attempt)
            return UpstreamResponse(
                status_code=failure.status,
                body=error_body(f"Bedrock: {failure.message}", failure.status, code=failure.code),
                request_id=failure.request_id or new_request_id(),
                attempts=attempt,
            )

    async def _attempt(
        self, call: Callable[[], BedrockAnswer], tokens: int, left: float | None
    ) -> BedrockAnswer | BedrockCallError:
        """One call on the executor, holding a slot of the gate (if any) while it runs, and given up
        (its thread finishes on its own; the answer is dropped) when the caller's time runs out."""
        admitted = 0.0
        began = time.monotonic()
        if self._gate is not None:
            await self._gate.pace(tokens)
            admitted = await self._gate.acquire(self._batch_id)
        status: int | None = None
        try:
            if left is not None:
                left -= time.monotonic() - began  # spent waiting for the rates and a slot
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.executor, call)
            try:
                answer = await asyncio.wait_for(future, timeout=None if left is None else max(left, 0.001))
            except TimeoutError:
                return BedrockCallError("upstream_timeout", DEADLINE_PASSED, None)
            except BedrockCallError as exc:
                status = exc.status
                return exc
            status = 200
            return answer
        finally:
            if self._gate is not None:
                self._gate.release(admitted, status, None)

    def _transport_failure(self, code: str, detail: str, attempts: int) -> UpstreamResponse:
        noun = "attempt" if attempts == 1 else "attempts"
        message = f"request to Amazon Bedrock ({self.region or 'default region'}) failed after {attempts} {noun}: {detail}"
        logger.warning("upstream %s", message)
        return UpstreamResponse(status_code=None, error_code=code, error_message=message, attempts=attempts)

    async def aclose(self) -> None:
        """Nothing to close: the boto3 client and the executor are the upstream's, shared by its clients."""


def _refused(exc: TranslationError) -> UpstreamResponse:
    """A request refused before anything was sent: a 400 line, as OpenAI answers a bad parameter."""
    return UpstreamResponse(
        status_code=400,
        body=error_body(
            exc.message,
            400,
            code="unsupported_parameter" if exc.param else "invalid_request",
            param=exc.param,
        ),
        request_id=new_request_id(),
    )
