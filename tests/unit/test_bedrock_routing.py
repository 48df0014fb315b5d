"""Bedrock upstreams in the upstreams file: the checks made at start, routing by model map, and a whole
batch run by the local runner against a Bedrock upstream whose client is stubbed with botocore's Stubber."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import boto3
import orjson
import pytest
from botocore.response import StreamingBody
from botocore.stub import Stubber

from batch_api.adapters.aws.bedrock import BotoBedrockRuntime, runtime_config
from batch_api.config import Settings
from batch_api.upstreams import make_upstream_factory
from batch_api.upstreams.bedrock import BedrockUpstream
from batch_api.upstreams.routing import UpstreamPool, load_specs
from batch_api.workflow.runner_local import LocalWorkflow
from tests.unit.builders import PROJECT, add_batch, file_lines, get_batch, jsonl, make_deps, request

pytestmark = pytest.mark.unit

HAIKU = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
TITAN = "amazon.titan-embed-text-v2:0"
SESSION = boto3.session.Session(
    aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
)


class StubbedClients:
    """`ports.BedrockRuntimeFactory` handing out one stubbed client, recording what it was asked for."""

    def __init__(self, default_region: str | None = "eu-west-1") -> None:
        self.client = SESSION.client("bedrock-runtime", config=runtime_config(4, 60, 5))
        self.stubber = Stubber(self.client)
        self.default_region = default_region
        self.asked: list[tuple[str, int]] = []

    def region(self, region: str | None) -> str:
        chosen = region or self.default_region
        if chosen is None:
            raise ValueError("no AWS region for Amazon Bedrock")
        return chosen

    def __call__(self, region: str, max_connections: int) -> BotoBedrockRuntime:
        self.asked.append((region, max_connections))
        return BotoBedrockRuntime(self.client)


def bedrock_upstreams(**spec: Any) -> str:
    entry = {
        "name": "bedrock",
        "kind": "bedrock",
        "models": {"haiku": HAIKU, "titan": TITAN},
        "max_in_flight": 8,
        **spec,
    }
    return json.dumps([entry, {"name": "mock", "kind": "mock", "models": ["mock-model"]}])


def test_a_bedrock_upstream_routes_its_mapped_names_in_its_region() -> None:
    clients = StubbedClients()
    pool = make_upstream_factory(
        Settings(upstreams_json=bedrock_upstreams(region="us-west-2")), bedrock=lambda: clients
    )

    client = pool(model="haiku", batch_id="b1")

    assert isinstance(client, BedrockUpstream)
    assert client.model_ids == {"haiku": HAIKU, "titan": TITAN}
    assert clients.asked == [("us-west-2", 8)]
    assert client.gate is pool.gates["bedrock"]
    assert pool.serves("titan") and not pool.serves(HAIKU) and not pool.serves("gpt-4o")
    assert pool.specs[0].describe() == (
        f"bedrock (Amazon Bedrock in us-west-2; haiku -> {HAIKU}, titan -> {TITAN}; at most 8 in flight)"
    )


def test_without_a_region_the_process_region_is_used_and_none_at_all_fails_at_start() -> None:
    clients = StubbedClients()
    make_upstream_factory(Settings(upstreams_json=bedrock_upstreams()), bedrock=lambda: clients)(
        model="haiku"
    )
    assert clients.asked == [("eu-west-1", 8)]

    with pytest.raises(ValueError, match="upstream 'bedrock': no AWS region"):
        make_upstream_factory(
            Settings(upstreams_json=bedrock_upstreams()), bedrock=lambda: StubbedClients(None)
        )


def test_a_listed_model_is_its_own_bedrock_id() -> None:
    (spec, _) = load_specs(Settings(upstreams_json=bedrock_upstreams(models=[TITAN])))
    assert spec.model_ids == {TITAN: TITAN}


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"models": ["*"]}, "names its models"),
        ({"models": "discover"}, "names its models"),
        ({"base_url": "https://bedrock.example/v1"}, "takes no base_url"),
        ({"api_key_env": "KEY"}, "takes no api_key_env"),
        (
            {"models": {"haiku": "not a model id"}},
            "model 'haiku': 'not a model id' is not a Bedrock model id",
        ),
        (
            {"models": {"x": "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc"}},
            "application inference profiles",
        ),
        ({"region": "Frankfurt"}, "region"),
    ],
)
def test_bad_bedrock_entries_are_refused_at_start(spec: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as caught:
        load_specs(Settings(upstreams_json=bedrock_upstreams(**spec)))
    assert "BATCH_API_UPSTREAMS_JSON is not valid" in str(caught.value)


def test_a_model_map_and_a_region_are_for_bedrock_only() -> None:
    for extra in ({"models": {"a": "b.c"}}, {"region": "us-east-1"}):
        upstreams = json.dumps([{"name": "vllm", "base_url": "http://gpu:8000/v1", **extra}])
        with pytest.raises(ValueError, match="for kind 'bedrock'"):
            load_specs(Settings(upstreams_json=upstreams))


def test_a_bedrock_upstream_needs_a_bedrock_client() -> None:
    with pytest.raises(ValueError, match="no Bedrock client"):
        UpstreamPool(load_specs(Settings(upstreams_json=bedrock_upstreams())), Settings())


# ---------------------------------------------------------------- a whole batch


@pytest.fixture
def clients() -> Iterator[StubbedClients]:
    clients = StubbedClients()
    with clients.stubber:
        yield clients
        clients.stubber.assert_no_pending_responses()


def converse_answer(text: str, usage: tuple[int, int], request_id: str) -> dict[str, Any]:
    return {
        "output": {"message": {"role": "assistant", "content": [{"text": text}]}},
        "stopReason": "end_turn",
        "usage": {"inputTokens": usage[0], "outputTokens": usage[1], "totalTokens": sum(usage)},
        "metrics": {"latencyMs": 300},
        "ResponseMetadata": {"RequestId": request_id, "HTTPStatusCode": 200, "HTTPHeaders": {}},
    }


def run_batch(clients: StubbedClients, lines: list[dict[str, Any]], endpoint: str) -> Any:
    # one request at a time, so the stubbed answers meet the lines in order; no backoff to wait out
    deps = make_deps(chunk_concurrency=1, requests_per_chunk=1, upstream_backoff_base_seconds=0)
    pool = make_upstream_factory(
        Settings(upstreams_json=bedrock_upstreams(), upstream_backoff_base_seconds=0), bedrock=lambda: clients
    )
    deps.upstream_factory, deps.route = pool, pool.route
    add_batch(deps, jsonl(lines), endpoint=endpoint)
    workflow = LocalWorkflow(step_backoff_seconds=0)
    workflow.bind(deps)
    deps.workflow = workflow
    try:
        workflow.start(PROJECT, "batch_test")
        assert workflow.wait_idle(30)
    finally:
        workflow.stop()
    return deps


def test_a_chat_batch_routed_to_bedrock_completes_with_its_lines_and_usage(clients: StubbedClients) -> None:
    stubber = clients.stubber
    stubber.add_response(
        "converse",
        converse_answer("Paris.", (14, 2), "r-a"),
        {"modelId": HAIKU, "messages": [{"role": "user", "content": [{"text": "Capital of France?"}]}]},
    )
    stubber.add_client_error(
        "converse", "ValidationException", "messages: text content blocks must be non-empty", 400
    )
    stubber.add_client_error("converse", "ThrottlingException", "Too many requests", 429)
    stubber.add_response(
        "converse",
        converse_answer("Oslo.", (15, 3), "r-c"),
        {"modelId": HAIKU, "messages": [{"role": "user", "content": [{"text": "Capital of Norway?"}]}]},
    )

    deps = run_batch(
        clients,
        [
            request("a", model="haiku", content="Capital of France?"),
            request("b", model="haiku", content=" "),
            request("c", model="haiku", content="Capital of Norway?"),
        ],
        "/v1/chat/completions",
    )

    batch = get_batch(deps)
    assert batch.status == "completed"
    assert batch.model == "haiku"
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert batch.usage is not None
    assert (batch.usage.input_tokens, batch.usage.output_tokens, batch.usage.total_tokens) == (29, 5, 34)
    output = {line["custom_id"]: line for line in file_lines(deps, batch.output_file_id)}
    assert sorted(output) == ["a", "c"]
    answer = output["a"]["response"]
    assert (answer["status_code"], answer["request_id"]) == (200, "r-a")
    assert answer["body"]["choices"][0]["message"]["content"] == "Paris."
    assert answer["body"]["model"] == "haiku"
    assert output["c"]["response"]["body"]["usage"]["total_tokens"] == 18
    (error,) = file_lines(deps, batch.error_file_id)
    assert error["custom_id"] == "b" and error["error"] is None
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "ValidationException"
    assert pool_gate_idle(deps)


def pool_gate_idle(deps: Any) -> bool:
    return all(gate.in_flight == 0 for gate in deps.upstream_factory.gates.values())


def test_an_embeddings_batch_routed_to_bedrock_completes_with_its_vectors_and_usage(
    clients: StubbedClients,
) -> None:
    for text, vector, tokens in (("alpha", [0.1, 0.2], 2), ("beta", [0.3, 0.4], 1)):
        raw = orjson.dumps({"embedding": vector, "inputTextTokenCount": tokens})
        clients.stubber.add_response(
            "invoke_model",
            {
                "body": StreamingBody(io.BytesIO(raw), len(raw)),
                "contentType": "application/json",
                "ResponseMetadata": {"RequestId": f"e-{text}", "HTTPStatusCode": 200, "HTTPHeaders": {}},
            },
            {
                "modelId": TITAN,
                "body": orjson.dumps({"inputText": text}),
                "contentType": "application/json",
                "accept": "application/json",
            },
        )

    deps = run_batch(
        clients,
        [
            request("x", "/v1/embeddings", model="titan", content="alpha"),
            request("y", "/v1/embeddings", model="titan", content="beta"),
        ],
        "/v1/embeddings",
    )

    batch = get_batch(deps)
    assert batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 2, "completed": 2, "failed": 0}
    assert batch.usage is not None and (batch.usage.input_tokens, batch.usage.total_tokens) == (3, 3)
    output = {line["custom_id"]: line["response"]["body"] for line in file_lines(deps, batch.output_file_id)}
    assert output["y"]["data"] == [{"object": "embedding", "index": 0, "embedding": [0.3, 0.4]}]
    assert output["x"]["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
