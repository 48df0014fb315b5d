"""Upstream answers 400, 429 and 500, and an upstream that is down: the right lines in the right
files, retries as configured, and a batch that always ends."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.conftest import read_lines, request_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstreamServer
from tests.support.server import free_port

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def line(custom_id: str, directive: str) -> dict[str, Any]:
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": custom_id}],
        "user": f"id={custom_id};{directive}",
    }
    return request_line(CHAT, 0, body=body, custom_id=custom_id)


@pytest.fixture
def upstream() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer() as server:
        yield server


def test_400_429_500_land_where_openai_puts_them(start_server: Any, upstream: FakeUpstreamServer) -> None:
    server = start_server(
        "--upstream-url",
        upstream.base_url,
        "--upstream-api-key",
        "sk-upstream-secret",
        "--upstream-max-retries",
        "2",
        "--upstream-backoff-base",
        "0.01",
    )
    client = server.client()
    lines = [line(f"ok-{i}", "") for i in range(5)] + [
        line("bad-request", "status=400"),
        line("rate-limited-twice", "status=429;times=2"),
        line("server-error", "status=500"),
    ]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
    )
    batch = wait_for(client, batch.id)

    assert batch.status == "completed"
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (
        8,
        6,
        2,
    )
    output = {r["custom_id"]: r for r in read_lines(client, batch.output_file_id)}
    errors = {r["custom_id"]: r for r in read_lines(client, batch.error_file_id)}
    assert set(output) == {f"ok-{i}" for i in range(5)} | {"rate-limited-twice"}
    assert set(errors) == {"bad-request", "server-error"}
    assert errors["bad-request"]["response"]["status_code"] == 400 and errors["bad-request"]["error"] is None
    assert errors["bad-request"]["response"]["body"]["error"]["message"]
    assert errors["server-error"]["response"]["status_code"] == 500

    assert upstream.attempts("bad-request") == 1  # a 400 is final
    assert upstream.attempts("rate-limited-twice") == 3  # two 429s, then success
    assert upstream.attempts("server-error") == 3  # first try + 2 retries
    assert all(r.headers.get("authorization") == "Bearer sk-upstream-secret" for r in upstream.requests)
    assert "sk-upstream-secret" not in server.log()  # never logged


def test_an_upstream_that_is_down_ends_every_request_with_an_error(start_server: Any) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    server = start_server(
        "--upstream-url", dead, "--upstream-max-retries", "1", "--upstream-backoff-base", "0.01"
    )
    client = server.client()
    lines = [request_line(CHAT, i) for i in range(6)]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
    )
    batch = wait_for(client, batch.id, timeout=60)

    assert batch.status == "completed" and batch.output_file_id is None
    assert batch.request_counts is not None and batch.request_counts.failed == 6
    errors = read_lines(client, batch.error_file_id)
    assert sorted(e["custom_id"] for e in errors) == sorted(f"req-{i}" for i in range(6))
    for error in errors:
        assert error["response"] is None
        assert error["error"]["code"] == "upstream_connection_error" and error["error"]["message"]


def test_a_timeout_is_an_error_line_not_a_hang(start_server: Any, upstream: FakeUpstreamServer) -> None:
    server = start_server(
        "--upstream-url",
        upstream.base_url,
        "--upstream-timeout",
        "0.5",
        "--upstream-max-retries",
        "1",
        "--upstream-backoff-base",
        "0.01",
    )
    client = server.client()
    lines = [line("fast", ""), line("stuck", "hang")]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
    )
    batch = wait_for(client, batch.id, timeout=30)
    assert batch.status == "completed"
    errors = read_lines(client, batch.error_file_id)
    assert [e["custom_id"] for e in errors] == ["stuck"]
    assert errors[0]["response"] is None and errors[0]["error"]["code"] == "upstream_timeout"
    assert [o["custom_id"] for o in read_lines(client, batch.output_file_id)] == ["fast"]


def test_credentials_in_the_upstream_url_are_basic_auth_and_never_logged(
    start_server: Any, upstream: FakeUpstreamServer
) -> None:
    """`--upstream-url http://user:secret@host/v1`: the requests carry Basic auth, and neither the
    startup log nor any line of the batch shows the password."""
    host_part = upstream.base_url.split("://", 1)[1]
    server = start_server("--upstream-url", f"http://batch-user:s3cr3t-pw@{host_part}")
    client = server.client()
    batch = client.batches.create(
        input_file_id=upload(client, [request_line(CHAT, 0)]).id, endpoint=CHAT, completion_window="24h"
    )
    assert wait_for(client, batch.id).status == "completed"

    [received] = upstream.requests
    headers = {name.lower(): value for name, value in received.headers.items()}
    assert headers["authorization"] == "Basic YmF0Y2gtdXNlcjpzM2NyM3QtcHc="  # batch-user:s3cr3t-pw
    log = server.log()
    assert "upstream: http://***@" in log
    assert "s3cr3t-pw" not in log


def test_url_credentials_with_an_api_key_are_refused_at_start(tmp_path: Any) -> None:
    from tests.support.server import ServerProcess

    server = ServerProcess(
        tmp_path / "data",
        "--upstream-url",
        "http://batch-user:s3cr3t-pw@127.0.0.1:9/v1",
        "--upstream-api-key",
        "sk-also",
    )
    with pytest.raises(RuntimeError, match="server exited with 2") as raised:
        server.start(timeout=20)
    assert "give one of them" in str(raised.value)
    assert "s3cr3t-pw" not in str(raised.value)
