"""Contract: EventSink. The local sink writes EventBridge-shaped JSON lines and logs each event."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest

from batch_api.adapters.local.events import LogEventSink

pytestmark = pytest.mark.contract

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z


def read_events(path: Path) -> list[dict[str, object]]:
    return [json.loads(raw) for raw in path.read_text().splitlines()]


def test_event_is_one_eventbridge_shaped_line(tmp_path: Path) -> None:
    path = tmp_path / "data" / "events.jsonl"
    sink = LogEventSink(path, clock=lambda: T0 + 0.7)
    detail = {
        "id": "batch_1",
        "status": "completed",
        "request_counts": {"total": 2, "completed": 2, "failed": 0},
    }

    sink.publish("Batch Completed", detail)

    assert read_events(path) == [
        {
            "detail-type": "Batch Completed",
            "source": "batch-api",
            "time": "2023-11-14T22:13:20Z",
            "detail": detail,
        }
    ]


def test_events_append_in_order_across_sinks(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    LogEventSink(path, clock=lambda: T0).publish("Batch Failed", {"id": "batch_1", "status": "failed"})
    LogEventSink(path, clock=lambda: T0).publish("Batch Expired", {"id": "batch_2", "status": "expired"})

    assert [(e["detail-type"], e["detail"]) for e in read_events(path)] == [
        ("Batch Failed", {"id": "batch_1", "status": "failed"}),
        ("Batch Expired", {"id": "batch_2", "status": "expired"}),
    ]


def test_concurrent_publishes_never_interleave(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink = LogEventSink(path)
    padding = "p" * 5000  # long lines make interleaving visible if writes were split

    def publish(worker: int) -> None:
        for i in range(40):
            sink.publish(
                "Batch Completed", {"id": f"batch_{worker}_{i}", "status": "completed", "pad": padding}
            )

    threads = [threading.Thread(target=publish, args=(w,)) for w in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    ids = sorted(e["detail"]["id"] for e in read_events(path))  # type: ignore[index]
    assert ids == sorted(f"batch_{w}_{i}" for w in range(5) for i in range(40))


def test_values_json_cannot_encode_are_written_as_strings(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    LogEventSink(path).publish(
        "Batch Completed", {"id": "batch_1", "status": "completed", "where": Path("/x")}
    )
    assert read_events(path)[0]["detail"] == {"id": "batch_1", "status": "completed", "where": "/x"}


def test_publish_logs_the_batch_and_status(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="batch_api.adapters.local.events"):
        LogEventSink(tmp_path / "events.jsonl").publish(
            "Batch Cancelled", {"id": "batch_9", "status": "cancelled"}
        )

    [record] = caplog.records
    assert record.levelno == logging.INFO
    assert "batch_9" in record.getMessage() and "cancelled" in record.getMessage()
