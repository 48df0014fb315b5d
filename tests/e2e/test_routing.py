"""Upstreams by model (`--upstreams-file`): a batch goes to the upstream serving its model; a model
none serves fails at validation as OpenAI words it; a bad file stops the server at start."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import read_lines, request_line, upload, wait_for
from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"

UPSTREAMS = """
[[upstreams]]
name = "small-models"
kind = "mock"
models = ["gpt-4o-mini"]
max_in_flight = 4
"""


def test_batches_are_routed_by_model(start_server: Callable[..., ServerProcess], tmp_path: Path) -> None:
    config = tmp_path / "upstreams.toml"
    config.write_text(UPSTREAMS)
    server = start_server(
        "--upstreams-file", str(config), env={"BATCH_API_CAPACITY_LOG_INTERVAL_SECONDS": "0.2"}
    )
    client: openai.OpenAI = server.client()
    assert "upstream small-models (the built-in mock; gpt-4o-mini; at most 4 in flight)" in server.log()

    served = upload(client, [request_line(CHAT, i) for i in range(6)])  # gpt-4o-mini
    batch = client.batches.create(input_file_id=served.id, endpoint=CHAT, completion_window="24h")
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 6
    assert len(read_lines(client, batch.output_file_id)) == 6
    deadline = time.monotonic() + 10
    done = re.compile(
        r"upstream small-models: 0 in flight, limit 4\.0 of 4, 0 waiting in 0 batch\(es\), "
        r"(mean latency \d+ ms over [1-6] answer\(s\)|no answer) since the last report, "
        r"6 attempts and 0 answered 429/503 since start"
    )
    while not done.search(server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)  # the load line comes within one log interval of the work
    assert done.search(server.log())
    # the answers of the reports add up to the six requests
    answered = re.findall(r"upstream small-models: .* over (\d) answer\(s\)", server.log())
    assert sum(int(n) for n in answered) == 6

    lines = [request_line(CHAT, i) for i in range(3)]
    for line in lines:
        line["body"]["model"] = "llama-3.1-8b"
    unserved = upload(client, lines)
    batch = client.batches.create(input_file_id=unserved.id, endpoint=CHAT, completion_window="24h")
    batch = wait_for(client, batch.id)
    assert batch.status == "failed" and batch.errors is not None
    assert [(e.code, e.param, e.line, e.message) for e in batch.errors.data] == [
        (
            "model_not_found",
            "body.model",
            1,
            "The provided model 'llama-3.1-8b' is not supported by the Batch API.",
        )
    ]


def test_a_bad_upstreams_file_stops_the_server_at_start(tmp_path: Path) -> None:
    config = tmp_path / "upstreams.toml"
    config.write_text("[[upstreams]]\nname = 'a'\n")  # an http upstream without base_url
    server = ServerProcess(tmp_path / "data", "--upstreams-file", str(config))
    with pytest.raises(RuntimeError, match="needs a base_url") as caught:
        server.start()
    assert "exited with 2" in str(caught.value)
    assert "Traceback" not in server.log()
