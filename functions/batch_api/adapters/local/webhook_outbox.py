"""WebhookOutbox on SQLite (`webhooks.sqlite3` in the data directory): one row per (event, endpoint).

Rows are written before the batch's `event_pending` mark is cleared and only change after an attempt,
so a kill -9 at any point leaves every delivery either done or due again (at least once). Delivered
rows are kept for a week for inspection, then removed by `purge`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from batch_api.adapters.local.sqlite import open_database
from batch_api.ports import WebhookDelivery

KEEP_FINISHED_SECONDS = 7 * 86400

_SCHEMA = """
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    event_id TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    project_id TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    first_at REAL NOT NULL,
    next_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    PRIMARY KEY (event_id, endpoint)
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_due ON webhook_deliveries (next_at) WHERE state = 'pending'
"""

_COLUMNS = "event_id, endpoint, project_id, url, body, first_at, next_at, attempts, state, last_error"


def _delivery(row: tuple[object, ...]) -> WebhookDelivery:
    event_id, endpoint, project_id, url, body, first_at, next_at, attempts, state, last_error = row
    return WebhookDelivery(
        event_id=str(event_id),
        endpoint=str(endpoint),
        project_id=str(project_id),
        url=str(url),
        body=bytes(body),  # type: ignore[call-overload]
        first_at=float(first_at),  # type: ignore[arg-type]
        next_at=float(next_at),  # type: ignore[arg-type]
        attempts=int(attempts),  # type: ignore[call-overload]
        state=str(state),
        last_error=None if last_error is None else str(last_error),
    )


class SqliteWebhookOutbox:
    """ports.WebhookOutbox (`sqlite.open_database`: every commit survives a kill -9)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = open_database(self.path)
        with self._lock:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._conn.execute(statement)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def enqueue(self, deliveries: Sequence[WebhookDelivery]) -> int:
        with self._lock:
            before = self._conn.total_changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(
                    f"INSERT OR IGNORE INTO webhook_deliveries ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    [
                        (
                            d.event_id,
                            d.endpoint,
                            d.project_id,
                            d.url,
                            d.body,
                            d.first_at,
                            d.next_at,
                            d.attempts,
                            d.state,
                            d.last_error,
                        )
                        for d in deliveries
                    ],
                )
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return self._conn.total_changes - before

    def due(self, now: float, limit: int) -> list[WebhookDelivery]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM webhook_deliveries WHERE state = 'pending' AND next_at <= ? "
                "ORDER BY next_at LIMIT ?",
                (now, limit),
            ).fetchall()
        return [_delivery(row) for row in rows]

    def next_due_at(self) -> float | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT MIN(next_at) FROM webhook_deliveries WHERE state = 'pending'"
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def record(self, delivery: WebhookDelivery) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_at = ?, last_error = ? "
                "WHERE event_id = ? AND endpoint = ?",
                (
                    delivery.state,
                    delivery.attempts,
                    delivery.next_at,
                    delivery.last_error,
                    delivery.event_id,
                    delivery.endpoint,
                ),
            )

    def list_deliveries(self, event_id: str | None = None) -> list[WebhookDelivery]:
        where, params = ("WHERE event_id = ?", (event_id,)) if event_id else ("", ())
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS} FROM webhook_deliveries {where} ORDER BY first_at, event_id, endpoint",
                params,
            ).fetchall()
        return [_delivery(row) for row in rows]

    def purge(self, now: float) -> int:
        """Remove finished deliveries older than KEEP_FINISHED_SECONDS; return how many."""
        with self._lock:
            cursor = self._conn.execute(
                "DELETE FROM webhook_deliveries WHERE state != 'pending' AND next_at < ?",
                (now - KEEP_FINISHED_SECONDS,),
            )
            return cursor.rowcount
