"""EventSink on an EventBridge bus: one event per terminal batch status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

EVENT_SOURCE = "batch-api"


class EventPublishFailed(RuntimeError):
    """EventBridge accepted the call but not the entry (PutEvents reports failures per entry)."""


class EventBridgeSink:
    """ports.EventSink. `detail_type` is e.g. "batch.completed"; `detail` the Batch object with its
    project id. Values JSON cannot encode are sent as strings, as the local event log does."""

    def __init__(self, client: Any, bus_name: str, source: str = EVENT_SOURCE) -> None:
        self.client = client
        self.bus_name = bus_name
        self.source = source

    def publish(self, detail_type: str, detail: Mapping[str, Any]) -> None:
        answer = self.client.put_events(
            Entries=[
                {
                    "Source": self.source,
                    "DetailType": detail_type,
                    "Detail": orjson.dumps(dict(detail), default=str).decode(),
                    "EventBusName": self.bus_name,
                }
            ]
        )
        if answer.get("FailedEntryCount", 0):
            entry = (answer.get("Entries") or [{}])[0]
            raise EventPublishFailed(
                f"EventBridge rejected {detail_type} on bus {self.bus_name}: "
                f"{entry.get('ErrorCode')} {entry.get('ErrorMessage')}"
            )
