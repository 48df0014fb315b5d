"""Cancel, expiry and kill -9: partial results kept, every request accounted for exactly once."""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

import pytest

from tests.e2e.conftest import read_lines, request_line, upload, wait_for
from tests.support.fake_upstream import FakeUpstreamServer

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
SLOW = (
    "--mock-latency",
    "0.2",
    "--chunk-max-lines",
    "10",
    "--chunk-concurrency",
    "1",
    "--requests-per-chunk",
    "2",
)


def _accounted(client: Any, batch: Any, expected_ids: set[str], never_ran_code: str) -> tuple[int, int]:
    output = read_lines(client, batch.output_file_id)
    errors = read_lines(client, batch.error_file_id)
    ids = Counter(r["custom_id"] for r in output + errors)
    assert set(ids) == expected_ids and max(ids.values()) == 1  # each request exactly once
    never_ran = [e for e in errors if e["error"] and e["error"]["code"] == never_ran_code]
    assert all(e["response"] is None and e["error"]["message"] for e in never_ran)
    counts = batch.request_counts
    assert counts.total == len(expected_ids) == counts.completed + counts.failed
    assert counts.completed == len(output) and counts.failed == len(errors)
    return len(output), len(never_ran)


def test_cancel_mid_batch_keeps_partial_output(start_server: Any) -> None:
    client = start_server(*SLOW, env={"BATCH_API_PROGRESS_INTERVAL_SECONDS": "0.1"}).client()
    lines = [request_line(CHAT, i) for i in range(60)]
    batch = client.batches.create(
        input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
    )
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 5:  # type: ignore[union-attr]
        assert time.monotonic() < deadline
        time.sleep(0.05)

    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")  # cancelling again is fine

    batch = wait_for(client, batch.id, timeout=30)
    assert batch.status == "cancelled" and batch.cancelled_at is not None
    done, never_ran = _accounted(client, batch, {f"req-{i}" for i in range(60)}, "batch_cancelled")
    assert done >= 5 and never_ran > 0


def test_a_batch_past_its_window_expires_with_what_it_finished(start_server: Any) -> None:
    """The first six requests answer at once; the rest hang until the upstream timeout, so the window
    ends with exactly six done (whatever the machine's load), the requests in flight at the deadline
    run to their end (timeouts, counted failed), and every other one is `batch_expired`."""
    with FakeUpstreamServer() as upstream:
        server = start_server(
            "--upstream-url",
            upstream.base_url,
            "--upstream-timeout",
            "1",
            "--upstream-max-retries",
            "0",
            "--completion-window-seconds",
            "4",
            "--chunk-max-lines",
            "60",
            "--requests-per-chunk",
            "2",
            env={"BATCH_API_PROGRESS_INTERVAL_SECONDS": "0.1"},
        )
        client = server.client()
        lines = [
            request_line(
                CHAT,
                i,
                custom_id=f"req-{i}",
                body={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": str(i)}],
                    "user": f"id=req-{i}" + ("" if i < 6 else ";hang"),
                },
            )
            for i in range(60)
        ]
        batch = client.batches.create(
            input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
        )
        assert batch.expires_at == batch.created_at + 4
        batch = wait_for(client, batch.id, timeout=30)
    assert batch.status == "expired" and batch.expired_at is not None
    done, never_ran = _accounted(client, batch, {f"req-{i}" for i in range(60)}, "batch_expired")
    assert done == 6
    errors = read_lines(client, batch.error_file_id)
    timed_out = [e for e in errors if e["error"] and e["error"]["code"] == "upstream_timeout"]
    assert len(timed_out) + never_ran == 54 and never_ran > 0 and timed_out


def test_kill_9_mid_batch_then_restart_finishes_exactly_once(start_server: Any, tmp_path: Any) -> None:
    total, in_flight = 240, 8
    with FakeUpstreamServer(default_directive="delay=0.05") as upstream:
        flags = (
            "--upstream-url",
            upstream.base_url,
            "--chunk-max-lines",
            "40",
            "--chunk-concurrency",
            "2",
            "--requests-per-chunk",
            str(in_flight // 2),
        )
        data_dir = tmp_path / "durable"
        server = start_server(*flags, data_dir=data_dir)
        client = server.client()
        lines = [
            request_line(
                CHAT,
                i,
                custom_id=f"req-{i}",
                body={
                    "model": "gpt-4o-mini",
                    "messages": [{"role": "user", "content": str(i)}],
                    "user": f"id=req-{i};delay=0.05",
                },
            )
            for i in range(total)
        ]
        batch = client.batches.create(
            input_file_id=upload(client, lines).id, endpoint=CHAT, completion_window="24h"
        )
        deadline = time.monotonic() + 30
        while upstream.count() < total // 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.kill()
        sent_before = upstream.count()
        assert sent_before < total, "the batch finished before the kill; make it slower"

        server = start_server(*flags, data_dir=data_dir)
        client = server.client()
        batch = wait_for(client, batch.id, timeout=60)

        assert batch.status == "completed"
        assert batch.request_counts.completed == total  # type: ignore[union-attr]
        output = read_lines(client, batch.output_file_id)
        assert Counter(r["custom_id"] for r in output) == Counter(f"req-{i}" for i in range(total))
        assert batch.error_file_id is None
        # Only requests in flight at the kill may be sent again; everything that had finished is not.
        attempts = Counter(upstream.received_custom_keys())
        assert set(attempts) == {f"req-{i}" for i in range(total)}
        resent = [key for key, n in attempts.items() if n > 1]
        assert len(resent) <= in_flight and max(attempts.values()) <= 2, resent
        assert "resumed 1 unfinished batch" in server.log()
