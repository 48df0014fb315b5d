"""EventSink as a JSON-lines log: the local twin of EventBridge.

Each event is one line shaped like the EventBridge envelope the AWS adapter sends
(`detail-type`, `source`, `time`, `detail`), so a script that tails `events.jsonl` sees what an
EventBridge rule would match on.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

EVENT_SOURCE = "batch-api"

logger = logging.getLogger(__name__)


class LogEventSink:
    """ports.EventSink appending one JSON line per event to `path`, and logging it."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()

    def publish(self, detail_type: str, detail: Mapping[str, Any]) -> None:
        when = datetime.fromtimestamp(self._clock(), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {"detail-type": detail_type, "source": EVENT_SOURCE, "time": when, "detail": dict(detail)}
        line = orjson.dumps(event, default=str) + b"\n"
        with self._lock:
            # One write on an O_APPEND descriptor: lines never interleave, a crash tears only the last.
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        logger.info(
            "event %s: batch %s status %s",
            detail_type,
            detail.get("id") or detail.get("batch_id"),
            detail.get("status"),
        )
