"""End-to-end: `batch-api serve` as a subprocess, driven only through the official openai SDK."""

from __future__ import annotations

import io
import json
import time
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


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """Start `batch-api serve` with extra flags/env; every server started is stopped at the end."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, data_dir: Path | None = None) -> ServerProcess:
        server = ServerProcess(data_dir or tmp_path / f"data{len(started)}", *args, env=env)
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
