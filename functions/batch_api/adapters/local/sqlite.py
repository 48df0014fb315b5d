"""MetadataStore on one SQLite file: the local twin of the DynamoDB table.

Each record kind has its own table: the columns the queries filter and sort on, plus `doc`, the
whole pydantic record as JSON, so a record can grow fields without a migration.

Concurrency: one connection shared by every thread, guarded by a lock. The local server's worker
threads, the workflow's batch and chunk threads and the sweeper all use it; SQLite runs one writer at
a time anyway, while a WAL commit with synchronous=NORMAL costs microseconds, so the lock is never the
bottleneck.
WAL and busy_timeout are still set for other processes reading the file (a CLI, an inspector).

Durability: WAL with synchronous=NORMAL keeps every committed transaction through a kill -9 (the
WAL is written before COMMIT returns; only a power loss can drop the last commits).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from batch_api.contract.errors import AlreadyExists, ConditionFailed
from batch_api.contract.models import (
    IDEMPOTENCY_KEY_TTL,
    TERMINAL_STATUSES,
    BatchRecord,
    ChunkProgress,
    FileRecord,
    UploadPartRecord,
    UploadRecord,
)

SCHEMA_VERSION = 2  # 2: idempotency_keys.expires_at

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    purpose TEXT NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS files_by_project ON files (project_id, created_at, id);
CREATE INDEX IF NOT EXISTS files_by_expiry ON files (deleted, expires_at, id);

CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    status TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_expiry ON uploads (status, expires_at, id);

CREATE TABLE IF NOT EXISTS upload_parts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    upload_id TEXT NOT NULL,
    id TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS upload_parts_by_upload ON upload_parts (upload_id, seq);

CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY,
    project_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    status TEXT NOT NULL,
    doc TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS batches_by_project ON batches (project_id, created_at, id);
CREATE INDEX IF NOT EXISTS batches_by_status ON batches (status, created_at, id);

CREATE TABLE IF NOT EXISTS chunk_progress (
    batch_id TEXT NOT NULL,
    chunk_index INTEGER NOT NULL,
    doc TEXT NOT NULL,
    PRIMARY KEY (batch_id, chunk_index)
);

CREATE TABLE IF NOT EXISTS idempotency_keys (
    project_id TEXT NOT NULL,
    key TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (project_id, key)
);
"""

_TERMINAL = tuple(sorted(TERMINAL_STATUSES))
_TERMINAL_PLACEHOLDERS = ", ".join("?" for _ in _TERMINAL)

# Run after _SCHEMA; each index needs the columns the migrations before it add.
_UNANNOUNCED = "json_extract(doc, '$.event_pending') = 1"  # terminal batches whose event is not out yet
_INPUT = "json_extract(doc, '$.input_file_id')"
# Batches that hold their input file; literals, not parameters: a query uses a partial index only
# when its WHERE repeats the index's.
_HOLDING = "status NOT IN ({})".format(", ".join(f"'{status}'" for status in _TERMINAL))
_INDEXES = f"""
CREATE INDEX IF NOT EXISTS idempotency_keys_by_expiry ON idempotency_keys (expires_at);
CREATE INDEX IF NOT EXISTS batches_unannounced ON batches (created_at, id) WHERE {_UNANNOUNCED};
CREATE INDEX IF NOT EXISTS batches_holding ON batches (project_id, {_INPUT}, id) WHERE {_HOLDING};
"""

RecordT = TypeVar("RecordT", bound=BaseModel)


def _apply(record: RecordT, changes: Mapping[str, Any]) -> RecordT:
    """The record with `changes` applied, validated again (an unknown field or bad value raises)."""
    data = record.model_dump()
    for key, value in changes.items():
        data[key] = value.model_dump() if isinstance(value, BaseModel) else value
    return type(record).model_validate(data)


def open_database(path: Path) -> sqlite3.Connection:
    """A connection shared by the process's threads (each store serialises its use with a lock of its
    own): no implicit transactions (writes open their own BEGIN IMMEDIATE), WAL with synchronous=NORMAL
    (every commit survives a kill -9), and 30 s of waiting on a busy database."""
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30.0)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    connection.execute("PRAGMA busy_timeout=30000")
    return connection


class SqliteMetadataStore:
    """ports.MetadataStore on SQLite; behaves as `MemoryMetadataStore` (the contract suite checks it)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn = open_database(self.path)
        with self._lock:
            self._migrate()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, newer than this code ({SCHEMA_VERSION})"
            )
        with self._write() as conn:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            idempotency_columns = {row[1] for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
            if "expires_at" not in idempotency_columns:
                # version 1 kept keys forever: they expire IDEMPOTENCY_KEY_TTL after creation from now on
                conn.execute("ALTER TABLE idempotency_keys ADD COLUMN expires_at INTEGER NOT NULL DEFAULT 0")
                conn.execute(
                    "UPDATE idempotency_keys SET expires_at = created_at + ?", (IDEMPOTENCY_KEY_TTL,)
                )
            for statement in _INDEXES.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> SqliteMetadataStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One atomic write transaction; BEGIN IMMEDIATE takes the write lock up front, so a
        read-check-write inside it cannot interleave with another process either."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) can leave the transaction open on the shared
                # connection, and every later BEGIN would fail: end it, then report the failure.
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._conn.execute(sql, tuple(params)).fetchall()

    # ------------------------------------------------------------ files

    def create_file(self, record: FileRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO files (id, project_id, created_at, expires_at, purpose, deleted, doc)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.project_id,
                        record.created_at,
                        record.expires_at,
                        record.purpose,
                        int(record.deleted),
                        record.model_dump_json(),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(record.id) from exc

    def get_file(self, project_id: str, file_id: str) -> FileRecord | None:
        rows = self._query("SELECT doc FROM files WHERE id = ? AND project_id = ?", (file_id, project_id))
        return FileRecord.model_validate_json(rows[0][0]) if rows else None

    def list_files(
        self, project_id: str, *, purpose: str | None, order: str, after: str | None, limit: int, now: int
    ) -> list[FileRecord]:
        live = "project_id = ? AND deleted = 0 AND (expires_at IS NULL OR expires_at > ?)"
        params: list[Any] = [project_id, now]
        if purpose is not None:
            live += " AND purpose = ?"
            params.append(purpose)
        descending = order == "desc"
        with self._lock:
            where = live
            where_params = list(params)
            if after is not None:
                # The cursor must itself be in the listing (same filter); otherwise nothing follows it.
                cursor = self._conn.execute(
                    f"SELECT created_at, id FROM files WHERE {live} AND id = ?", (*params, after)
                ).fetchone()
                if cursor is None:
                    return []
                where += f" AND (created_at, id) {'<' if descending else '>'} (?, ?)"
                where_params.extend(cursor)
            direction = "DESC" if descending else "ASC"
            rows = self._conn.execute(
                f"SELECT doc FROM files WHERE {where} ORDER BY created_at {direction}, id {direction} LIMIT ?",
                (*where_params, max(limit, 0)),
            ).fetchall()
        return [FileRecord.model_validate_json(doc) for (doc,) in rows]

    def mark_file_deleted(self, project_id: str, file_id: str) -> bool:
        with self._write() as conn:
            row = conn.execute(
                "SELECT doc FROM files WHERE id = ? AND project_id = ? AND deleted = 0", (file_id, project_id)
            ).fetchone()
            if row is None:
                return False
            record = _apply(FileRecord.model_validate_json(row[0]), {"deleted": True})
            conn.execute(
                "UPDATE files SET deleted = 1, doc = ? WHERE id = ?", (record.model_dump_json(), file_id)
            )
            return True

    def list_expired_files(self, now: int, limit: int) -> list[FileRecord]:
        rows = self._query(
            "SELECT doc FROM files WHERE deleted = 0 AND expires_at IS NOT NULL AND expires_at <= ?"
            " ORDER BY expires_at, id LIMIT ?",
            (now, max(limit, 0)),
        )
        return [FileRecord.model_validate_json(doc) for (doc,) in rows]

    # ------------------------------------------------------------ uploads

    def create_upload(self, record: UploadRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO uploads (id, project_id, status, expires_at, doc) VALUES (?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.project_id,
                        record.status,
                        record.expires_at,
                        record.model_dump_json(),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(record.id) from exc

    def get_upload(self, project_id: str, upload_id: str) -> UploadRecord | None:
        rows = self._query("SELECT doc FROM uploads WHERE id = ? AND project_id = ?", (upload_id, project_id))
        return UploadRecord.model_validate_json(rows[0][0]) if rows else None

    def update_upload(
        self, project_id: str, upload_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> UploadRecord:
        expected = set(expected_status)
        with self._write() as conn:
            row = conn.execute(
                "SELECT doc FROM uploads WHERE id = ? AND project_id = ?", (upload_id, project_id)
            ).fetchone()
            if row is None:
                raise ConditionFailed(upload_id)
            record = UploadRecord.model_validate_json(row[0])
            if record.status not in expected:
                raise ConditionFailed(upload_id)
            updated = _apply(record, changes)
            conn.execute(
                "UPDATE uploads SET status = ?, expires_at = ?, doc = ? WHERE id = ?",
                (updated.status, updated.expires_at, updated.model_dump_json(), upload_id),
            )
        return updated

    def add_upload_part(self, part: UploadPartRecord) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO upload_parts (upload_id, id, doc) VALUES (?, ?, ?)",
                (part.upload_id, part.id, part.model_dump_json()),
            )

    def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        rows = self._query("SELECT doc FROM upload_parts WHERE upload_id = ? ORDER BY seq", (upload_id,))
        return [UploadPartRecord.model_validate_json(doc) for (doc,) in rows]

    def list_expired_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        rows = self._query(
            "SELECT doc FROM uploads WHERE status = 'pending' AND expires_at <= ?"
            " ORDER BY expires_at, id LIMIT ?",
            (now, max(limit, 0)),
        )
        return [UploadRecord.model_validate_json(doc) for (doc,) in rows]

    # ------------------------------------------------------------ batches

    def create_batch(self, record: BatchRecord) -> None:
        try:
            with self._write() as conn:
                conn.execute(
                    "INSERT INTO batches (id, project_id, created_at, status, doc) VALUES (?, ?, ?, ?, ?)",
                    (
                        record.id,
                        record.project_id,
                        record.created_at,
                        record.status,
                        record.model_dump_json(),
                    ),
                )
        except sqlite3.IntegrityError as exc:
            raise AlreadyExists(record.id) from exc

    def get_batch(self, project_id: str, batch_id: str) -> BatchRecord | None:
        rows = self._query("SELECT doc FROM batches WHERE id = ? AND project_id = ?", (batch_id, project_id))
        return BatchRecord.model_validate_json(rows[0][0]) if rows else None

    def list_batches(self, project_id: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        with self._lock:
            where = "project_id = ?"
            params: list[Any] = [project_id]
            if after is not None:
                cursor = self._conn.execute(
                    "SELECT created_at, id FROM batches WHERE project_id = ? AND id = ?", (project_id, after)
                ).fetchone()
                if cursor is None:
                    return []
                where += " AND (created_at, id) < (?, ?)"
                params.extend(cursor)
            rows = self._conn.execute(
                f"SELECT doc FROM batches WHERE {where} ORDER BY created_at DESC, id DESC LIMIT ?",
                (*params, max(limit, 0)),
            ).fetchall()
        return [BatchRecord.model_validate_json(doc) for (doc,) in rows]

    def update_batch(
        self, project_id: str, batch_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> BatchRecord:
        expected = set(expected_status)
        with self._write() as conn:
            row = conn.execute(
                "SELECT doc FROM batches WHERE id = ? AND project_id = ?", (batch_id, project_id)
            ).fetchone()
            if row is None:
                raise ConditionFailed(batch_id)
            record = BatchRecord.model_validate_json(row[0])
            if record.status not in expected:
                raise ConditionFailed(batch_id)
            updated = _apply(record, changes)
            conn.execute(
                "UPDATE batches SET status = ?, doc = ? WHERE id = ?",
                (updated.status, updated.model_dump_json(), batch_id),
            )
        return updated

    def input_holders(self, project_id: str, file_id: str) -> list[str]:
        # the partial index `batches_holding` holds exactly the batches that hold their input; the
        # status lives in the same row, so a batch stops holding in the very write that ends it
        rows = self._query(
            f"SELECT id FROM batches WHERE project_id = ? AND {_INPUT} = ? AND {_HOLDING} ORDER BY id",
            (project_id, file_id),
        )
        return [batch_id for (batch_id,) in rows]

    def list_active_batches(self) -> list[BatchRecord]:
        rows = self._query(
            f"SELECT doc FROM batches WHERE status NOT IN ({_TERMINAL_PLACEHOLDERS}) ORDER BY created_at, id",
            _TERMINAL,
        )
        return [BatchRecord.model_validate_json(doc) for (doc,) in rows]

    def list_unannounced_batches(self) -> list[BatchRecord]:
        # the partial index `batches_unannounced` holds exactly these rows
        rows = self._query(f"SELECT doc FROM batches WHERE {_UNANNOUNCED} ORDER BY created_at, id", ())
        return [BatchRecord.model_validate_json(doc) for (doc,) in rows]

    def put_chunk_progress(self, batch_id: str, progress: ChunkProgress) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO chunk_progress (batch_id, chunk_index, doc) VALUES (?, ?, ?)"
                " ON CONFLICT (batch_id, chunk_index) DO UPDATE SET doc = excluded.doc",
                (batch_id, progress.index, progress.model_dump_json()),
            )

    def list_chunk_progress(self, batch_id: str) -> list[ChunkProgress]:
        rows = self._query(
            "SELECT doc FROM chunk_progress WHERE batch_id = ? ORDER BY chunk_index", (batch_id,)
        )
        return [ChunkProgress.model_validate_json(doc) for (doc,) in rows]

    def delete_chunk_progress(self, batch_id: str) -> None:
        with self._write() as conn:
            conn.execute("DELETE FROM chunk_progress WHERE batch_id = ?", (batch_id,))

    # ------------------------------------------------------------ idempotency keys

    def claim_idempotency_key(self, project_id: str, key: str, resource_id: str, created_at: int) -> str:
        with self._write() as conn:
            # a record that expired by the time of this claim is replaced, as if it were absent
            conn.execute(
                "INSERT INTO idempotency_keys (project_id, key, resource_id, created_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (project_id, key) DO UPDATE SET resource_id = excluded.resource_id,"
                " created_at = excluded.created_at, expires_at = excluded.expires_at"
                " WHERE idempotency_keys.expires_at <= excluded.created_at",
                (project_id, key, resource_id, created_at, created_at + IDEMPOTENCY_KEY_TTL),
            )
            row = conn.execute(
                "SELECT resource_id FROM idempotency_keys WHERE project_id = ? AND key = ?", (project_id, key)
            ).fetchone()
        return str(row[0])

    def purge_expired_idempotency_keys(self, now: int) -> int:
        with self._write() as conn:
            return conn.execute("DELETE FROM idempotency_keys WHERE expires_at <= ?", (now,)).rowcount
