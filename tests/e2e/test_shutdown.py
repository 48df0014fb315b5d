"""Shutdown of the real `batch-api serve` process: SIGTERM stops promptly even mid-chunk."""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import pytest

from tests.e2e.conftest import request_line, upload, wait_for

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"


def test_sigterm_stops_promptly_while_a_chunk_is_running(start_server: Any) -> None:
    """LocalWorkflow.stop() cancels only queued chunk futures; a chunk already running never looks at
    the stopping flag and keeps sending requests upstream, and the interpreter joins the (non-daemon)
    ThreadPoolExecutor workers at exit. So SIGTERM waits for the whole running chunk to finish
    (here ~60 s; a real 1,000-line chunk against a slow model: many minutes) before the process exits,
    and a supervisor's SIGKILL usually ends it instead."""
    server = start_server(
        "--mock-latency",
        "1.0",
        "--chunk-max-lines",
        "1000",
        "--chunk-concurrency",
        "1",
        "--requests-per-chunk",
        "1",
        env={"BATCH_API_PROGRESS_INTERVAL_SECONDS": "0.1"},
    )
    client = server.client()
    lines = [request_line(CHAT, i) for i in range(60)]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
    )
    wait_for(client, batch.id, {"in_progress"}, timeout=20)
    deadline = time.monotonic() + 20
    while client.batches.retrieve(batch.id).request_counts.completed < 1:  # type: ignore[union-attr]
        assert time.monotonic() < deadline, "the chunk never got going"
        time.sleep(0.05)  # the chunk is running: a request finished, the next is in flight

    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)
    began = time.monotonic()
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"batch-api serve still running {time.monotonic() - began:.0f} s after SIGTERM")
