"""A successful batch for every endpoint, on the embedded defaults (the built-in mock upstream)."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
from openai.types import Batch, CreateEmbeddingResponse, ModerationCreateResponse
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from openai.types.responses import Response

from tests.e2e.conftest import BODIES, read_lines, request_line, upload, wait_for

pytestmark = pytest.mark.e2e

RESPONSE_TYPES: dict[str, Any] = {
    "/v1/chat/completions": ChatCompletion,
    "/v1/completions": Completion,
    "/v1/embeddings": CreateEmbeddingResponse,
    "/v1/responses": Response,
    "/v1/moderations": ModerationCreateResponse,
}


@pytest.mark.parametrize("endpoint", list(BODIES))
def test_batch_completes_for_every_endpoint(client: openai.OpenAI, endpoint: str) -> None:
    count = 25
    input_file = upload(client, [request_line(endpoint, i) for i in range(count)])
    assert input_file.purpose == "batch" and input_file.status == "processed"

    created = client.batches.create(
        input_file_id=input_file.id,
        endpoint=endpoint,  # type: ignore[arg-type]
        completion_window="24h",
        metadata={"suite": "e2e", "endpoint": endpoint},
        output_expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert isinstance(created, Batch) and created.status == "validating"
    assert created.expires_at == created.created_at + 86400

    batch = wait_for(client, created.id)
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        count,
        count,
        0,
    )
    assert batch.model == BODIES[endpoint](0)["model"]
    assert batch.metadata == {"suite": "e2e", "endpoint": endpoint}
    assert batch.error_file_id is None and batch.errors is None
    for stamp in ("in_progress_at", "finalizing_at", "completed_at"):
        assert getattr(batch, stamp) is not None, stamp
    assert batch.created_at <= batch.in_progress_at <= batch.finalizing_at <= batch.completed_at  # type: ignore[operator]

    lines = read_lines(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(count))
    input_tokens = output_tokens = 0
    for line in lines:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = RESPONSE_TYPES[endpoint].model_validate(line["response"]["body"])
        usage = getattr(body, "usage", None)
        if usage is not None:
            input_tokens += getattr(usage, "input_tokens", None) or getattr(usage, "prompt_tokens", 0)
            output_tokens += (
                getattr(usage, "output_tokens", None) or getattr(usage, "completion_tokens", 0) or 0
            )
    assert batch.usage is not None
    assert batch.usage.input_tokens == input_tokens
    assert batch.usage.output_tokens == output_tokens
    assert batch.usage.total_tokens == input_tokens + output_tokens

    output = client.files.retrieve(batch.output_file_id)  # type: ignore[arg-type]
    assert output.purpose == "batch_output"
    assert output.expires_at is not None and abs(output.expires_at - (output.created_at + 7200)) <= 1


def test_request_counts_move_while_the_batch_runs(start_server: Any) -> None:
    # 40 requests, 2 at a time, 0.1 s each: about two seconds of visible progress
    server = start_server(
        "--mock-latency",
        "0.1",
        "--chunk-max-lines",
        "10",
        "--chunk-concurrency",
        "1",
        "--requests-per-chunk",
        "2",
    )
    client = server.client()
    endpoint = "/v1/chat/completions"
    input_file = upload(client, [request_line(endpoint, i) for i in range(40)])
    batch = client.batches.create(input_file_id=input_file.id, endpoint=endpoint, completion_window="24h")
    seen: set[int] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = client.batches.retrieve(batch.id)
        assert current.request_counts is not None
        if current.status == "in_progress":
            seen.add(current.request_counts.completed)
        if current.status == "completed":
            break
        time.sleep(0.05)
    assert current.status == "completed"
    assert any(0 < count < 40 for count in seen), seen
    assert current.request_counts is not None and current.request_counts.completed == 40
