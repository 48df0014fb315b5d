"""End-to-end: `batch-api serve` as a subprocess, driven only through the official openai SDK."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

TERMINAL = {"completed", "failed", "expired", "cancelled"}

BODIES: dict[str, Callable[[int], dict[str, Any]]] = {
    "/v1/chat/completions": lambda i: {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": f"Say the number {i}"}],
    },
    "/v1/completions": lambda i: {
        "model": "gpt-3.5-turbo-instruct",
        "prompt": f"Count to {i}",
        "max_tokens": 5,
    },
    "/v1/embeddings": lambda i: {"model": "text-embedding-3-small", "input": [f"text {i}", f"more {i}"]},
    "/v1/responses": lambda i: {"model": "gpt-4o-mini", "input": f"Write a haiku about {i}"},
    "/v1/moderations": lambda i: {"model": "omni-moderation-latest", "input": f"harmless text {i}"},
}


def request_line(
    endpoint: str, i: int, body: dict[str, Any] | None = None, custom_id: str | None = None
) -> dict[str, Any]:
    return {
        "custom_id": custom_id or f"req-{i}",
        "method": "POST",
        "url": endpoint,
        "body": body if body is not None else BODIES[endpoint](i),
    }


def jsonl(lines: list[Any]) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def upload(client: Any, lines: list[Any], name: str = "input.jsonl") -> Any:
    return client.files.create(file=(name, io.BytesIO(jsonl(lines))), purpose="batch")


def wait_for(client: Any, batch_id: str, statuses: set[str] = TERMINAL, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        if time.monotonic() > deadline:
            raise AssertionError(f"batch {batch_id} still {batch.status} after {timeout}s: {batch}")
        time.sleep(0.1)


def read_lines(client: Any, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).content.splitlines() if line.strip()]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """One moto server for the session, standing in for S3, DynamoDB and EventBridge."""
    from tests.support.moto_server import AtomicMotoServer
    from tests.support.server import free_port

    port = free_port()
    server = AtomicMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture(params=["local", "aws"])
def backend(request: pytest.FixtureRequest) -> str:
    """Every end-to-end scenario runs against the local adapters and the AWS adapters (under moto)."""
    return str(request.param)


def _aws_resources(endpoint: str, name: str) -> dict[str, str]:
    """A fresh table, bucket and bus on the moto server; the env that points the server at them."""
    import boto3

    from batch_api.adapters.aws.schema import create_table_kwargs, time_to_live_kwargs

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    session = boto3.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    dynamodb = session.client("dynamodb", endpoint_url=endpoint)
    dynamodb.create_table(**create_table_kwargs(name))
    dynamodb.update_time_to_live(**time_to_live_kwargs(name))
    session.client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    session.client("events", endpoint_url=endpoint).create_event_bus(Name=name)
    return {
        **env,
        "BATCH_API_BACKEND": "aws",
        "BATCH_API_AWS_ENDPOINT_URL": endpoint,
        "BATCH_API_AWS_REGION": "us-east-1",
        "BATCH_API_TABLE_NAME": name,
        "BATCH_API_BUCKET_NAME": name,
        "BATCH_API_EVENT_BUS_NAME": name,
    }


@pytest.fixture
def start_server(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., ServerProcess]]:
    """Start `batch-api serve` with extra flags/env on the test's backend; every server started is
    stopped at the end. Servers started on the same data_dir share their AWS resources too."""
    started: list[ServerProcess] = []
    resources: dict[Path, dict[str, str]] = {}

    def start(*args: str, env: dict[str, str] | None = None, data_dir: Path | None = None) -> ServerProcess:
        data_dir = data_dir or tmp_path / f"data{len(started)}"
        full_env = dict(env or {})
        if backend == "aws":
            if data_dir not in resources:
                endpoint = request.getfixturevalue("moto_server")
                resources[data_dir] = _aws_resources(endpoint, f"batch-api-{uuid.uuid4().hex[:12]}")
            full_env.update(resources[data_dir])
        server = ServerProcess(data_dir, *args, env=full_env)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    """The server on its embedded defaults (the built-in mock upstream)."""
    return start_server()


@pytest.fixture
def client(server: ServerProcess) -> Any:
    return server.client()
