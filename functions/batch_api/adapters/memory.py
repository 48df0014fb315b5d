"""In-memory adapters of every storage port: the fakes for logic tests, and the reference the
contract suite holds the local and AWS adapters to."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from batch_api.adapters.concat import streamed
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
from batch_api.ports import Grant
from batch_api.upstreams.leases import LEASE_SECONDS, WAITING_SECONDS, Lease, grant


def _apply(record: Any, changes: Mapping[str, Any]) -> Any:
    data = record.model_dump()
    for key, value in changes.items():
        data[key] = value.model_dump() if hasattr(value, "model_dump") else value
    return type(record).model_validate(data)


def _after(items: list[Any], after: str | None) -> list[Any]:
    if after is None:
        return items
    for i, item in enumerate(items):
        if item.id == after:
            return items[i + 1 :]
    return []


class MemoryMetadataStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.files: dict[str, FileRecord] = {}
        self.uploads: dict[str, UploadRecord] = {}
        self.parts: dict[str, list[UploadPartRecord]] = {}
        self.batches: dict[str, BatchRecord] = {}
        self.progress: dict[str, dict[int, ChunkProgress]] = {}
        # (project, key) -> (resource id, expires_at)
        self.idempotency: dict[tuple[str, str], tuple[str, int]] = {}

    # files
    def create_file(self, record: FileRecord) -> None:
        with self._lock:
            if record.id in self.files:
                raise AlreadyExists(record.id)
            self.files[record.id] = record.model_copy(deep=True)

    def get_file(self, project_id: str, file_id: str) -> FileRecord | None:
        record = self.files.get(file_id)
        return record.model_copy(deep=True) if record and record.project_id == project_id else None

    def list_files(
        self, project_id: str, *, purpose: str | None, order: str, after: str | None, limit: int, now: int
    ) -> list[FileRecord]:
        with self._lock:
            items = [
                f
                for f in self.files.values()
                if f.project_id == project_id and f.is_live(now) and (purpose is None or f.purpose == purpose)
            ]
        items.sort(key=lambda f: (f.created_at, f.id), reverse=(order == "desc"))
        return [f.model_copy(deep=True) for f in _after(items, after)[:limit]]

    def mark_file_deleted(self, project_id: str, file_id: str) -> bool:
        with self._lock:
            record = self.files.get(file_id)
            if record is None or record.project_id != project_id or record.deleted:
                return False
            self.files[file_id] = _apply(record, {"deleted": True})
            return True

    def list_expired_files(self, now: int, limit: int) -> list[FileRecord]:
        with self._lock:
            items = [
                f
                for f in self.files.values()
                if not f.deleted and f.expires_at is not None and f.expires_at <= now
            ]
        items.sort(key=lambda f: (f.expires_at or 0, f.id))
        return [f.model_copy(deep=True) for f in items[:limit]]

    # uploads
    def create_upload(self, record: UploadRecord) -> None:
        with self._lock:
            if record.id in self.uploads:
                raise AlreadyExists(record.id)
            self.uploads[record.id] = record.model_copy(deep=True)

    def get_upload(self, project_id: str, upload_id: str) -> UploadRecord | None:
        record = self.uploads.get(upload_id)
        return record.model_copy(deep=True) if record and record.project_id == project_id else None

    def update_upload(
        self, project_id: str, upload_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> UploadRecord:
        with self._lock:
            record = self.uploads.get(upload_id)
            if record is None or record.project_id != project_id or record.status not in set(expected_status):
                raise ConditionFailed(upload_id)
            self.uploads[upload_id] = _apply(record, changes)
            return self.uploads[upload_id].model_copy(deep=True)

    def add_upload_part(self, part: UploadPartRecord) -> None:
        with self._lock:
            self.parts.setdefault(part.upload_id, []).append(part.model_copy(deep=True))

    def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        with self._lock:
            return [p.model_copy(deep=True) for p in self.parts.get(upload_id, [])]

    def list_expired_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        with self._lock:
            items = [u for u in self.uploads.values() if u.status == "pending" and u.expires_at <= now]
        items.sort(key=lambda u: (u.expires_at, u.id))
        return [u.model_copy(deep=True) for u in items[: max(limit, 0)]]

    # batches
    def create_batch(self, record: BatchRecord) -> None:
        with self._lock:
            if record.id in self.batches:
                raise AlreadyExists(record.id)
            self.batches[record.id] = record.model_copy(deep=True)

    def get_batch(self, project_id: str, batch_id: str) -> BatchRecord | None:
        record = self.batches.get(batch_id)
        return record.model_copy(deep=True) if record and record.project_id == project_id else None

    def list_batches(self, project_id: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        with self._lock:
            items = [b for b in self.batches.values() if b.project_id == project_id]
        items.sort(key=lambda b: (b.created_at, b.id), reverse=True)
        return [b.model_copy(deep=True) for b in _after(items, after)[:limit]]

    def update_batch(
        self, project_id: str, batch_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> BatchRecord:
        with self._lock:
            record = self.batches.get(batch_id)
            if record is None or record.project_id != project_id or record.status not in set(expected_status):
                raise ConditionFailed(batch_id)
            self.batches[batch_id] = _apply(record, changes)
            return self.batches[batch_id].model_copy(deep=True)

    def input_holders(self, project_id: str, file_id: str) -> list[str]:
        with self._lock:
            return sorted(
                b.id
                for b in self.batches.values()
                if b.project_id == project_id
                and b.input_file_id == file_id
                and b.status not in TERMINAL_STATUSES
            )

    def list_active_batches(self) -> list[BatchRecord]:
        with self._lock:
            items = [b for b in self.batches.values() if b.status not in TERMINAL_STATUSES]
        items.sort(key=lambda b: (b.created_at, b.id))
        return [b.model_copy(deep=True) for b in items]

    def list_unannounced_batches(self) -> list[BatchRecord]:
        with self._lock:
            items = [b for b in self.batches.values() if b.status in TERMINAL_STATUSES and b.event_pending]
        items.sort(key=lambda b: (b.created_at, b.id))
        return [b.model_copy(deep=True) for b in items]

    def put_chunk_progress(self, batch_id: str, progress: ChunkProgress) -> None:
        with self._lock:
            self.progress.setdefault(batch_id, {})[progress.index] = progress.model_copy(deep=True)

    def list_chunk_progress(self, batch_id: str) -> list[ChunkProgress]:
        with self._lock:
            chunks = self.progress.get(batch_id, {})
            return [chunks[i].model_copy(deep=True) for i in sorted(chunks)]

    def delete_chunk_progress(self, batch_id: str) -> None:
        with self._lock:
            self.progress.pop(batch_id, None)

    def claim_idempotency_key(self, project_id: str, key: str, resource_id: str, created_at: int) -> str:
        with self._lock:
            stored = self.idempotency.get((project_id, key))
            if stored is not None and stored[1] > created_at:
                return stored[0]
            self.idempotency[(project_id, key)] = (resource_id, created_at + IDEMPOTENCY_KEY_TTL)
            return resource_id

    def purge_expired_idempotency_keys(self, now: int) -> int:
        with self._lock:
            expired = [k for k, (_, expires_at) in self.idempotency.items() if expires_at <= now]
            for k in expired:
                del self.idempotency[k]
            return len(expired)


class MemoryBlobStore:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.objects: dict[str, bytes] = {}
        self.expiry: dict[str, int] = {}

    def put(self, key: str, data: bytes) -> None:
        with self._lock:
            self.objects[key] = bytes(data)

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        data = b"".join(chunks)
        self.put(key, data)
        return len(data)

    def concatenate(
        self,
        key: str,
        sources: Sequence[tuple[str, int]],
        *,
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> int:
        return self.write_stream(key, streamed(self, sources, on_bytes))

    def get(self, key: str) -> bytes:
        with self._lock:
            return self.objects[key]

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        data = self.get(key)
        stop = len(data) if end is None else min(end, len(data))
        for offset in range(start, stop, chunk_size):
            yield data[offset : min(offset + chunk_size, stop)]

    def size(self, key: str) -> int:
        return len(self.get(key))

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete(self, key: str) -> None:
        with self._lock:
            self.objects.pop(key, None)

    def delete_prefix(self, prefix: str) -> None:
        with self._lock:
            for key in [k for k in self.objects if k.startswith(prefix)]:
                del self.objects[key]

    def list_keys(self, prefix: str) -> list[str]:
        with self._lock:
            return sorted(k for k in self.objects if k.startswith(prefix))

    def set_expiry(self, key: str, expires_at: int) -> None:
        self.expiry[key] = expires_at

    def clear_expiry(self, key: str) -> None:
        self.expiry.pop(key, None)

    def download_url(self, key: str, *, filename: str, expires_in: int) -> str | None:
        return None


class MemoryJournal:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.lines: dict[tuple[str, int], list[bytes]] = {}

    def append(self, batch_id: str, chunk_index: int, lines: list[bytes]) -> None:
        with self._lock:
            self.lines.setdefault((batch_id, chunk_index), []).extend(lines)

    def read(self, batch_id: str, chunk_index: int) -> Iterator[bytes]:
        with self._lock:
            lines = list(self.lines.get((batch_id, chunk_index), []))
        yield from lines

    def batch_ids(self) -> list[str]:
        """Batches with journal lines, like `FilesystemJournal.batch_ids` (not a port method)."""
        with self._lock:
            return sorted({batch_id for batch_id, _ in self.lines})

    def delete_batch(self, batch_id: str) -> None:
        with self._lock:
            for key in [k for k in self.lines if k[0] == batch_id]:
                del self.lines[key]


class RecordingEventSink:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def publish(self, detail_type: str, detail: Mapping[str, Any]) -> None:
        self.events.append((detail_type, dict(detail)))


class RecordingWorkflow:
    """Remembers which batches were started; tests drive the steps themselves."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []

    def start(self, project_id: str, batch_id: str) -> None:
        if (project_id, batch_id) not in self.started:
            self.started.append((project_id, batch_id))


class MemoryCapacityLeases:
    """`ports.CapacityLeases` in one process (tests; the local server shares one gate instead)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.leases: dict[str, dict[str, Lease]] = {}  # upstream -> holder -> lease
        self.waiting: dict[str, dict[str, float]] = {}  # upstream -> batch id -> until
        self._lock = threading.Lock()

    def acquire(self, upstream: str, holder: str, batch_id: str, want: int, limit: int) -> Grant:
        with self._lock:
            now = self.clock()
            leases = self.leases.setdefault(upstream, {})
            for name in [n for n, lease in leases.items() if lease.expires_at <= now]:
                del leases[name]
            waiting = self.waiting.setdefault(upstream, {})
            live_waiting = [b for b, until in waiting.items() if until > now and b != batch_id]
            others = [lease for name, lease in leases.items() if name != holder]
            held = sum(lease.slots for lease in others)
            slots = grant(want, limit, batch_id, others, live_waiting)
            if slots == 0:
                waiting[batch_id] = now + WAITING_SECONDS
                leases.pop(holder, None)
                return Grant(0, held, len(live_waiting) + 1)
            waiting.pop(batch_id, None)
            leases[holder] = Lease(holder, batch_id, slots, now + LEASE_SECONDS)
            return Grant(slots, held + slots, len(live_waiting))

    def renew(self, upstream: str, holder: str) -> None:
        with self._lock:
            lease = self.leases.get(upstream, {}).get(holder)
            if lease is not None:
                self.leases[upstream][holder] = replace(lease, expires_at=self.clock() + LEASE_SECONDS)

    def release(self, upstream: str, holder: str) -> None:
        with self._lock:
            self.leases.get(upstream, {}).pop(holder, None)

    def held(self, upstream: str) -> int:
        """Slots held by live leases (for tests)."""
        with self._lock:
            now = self.clock()
            return sum(
                lease.slots for lease in self.leases.get(upstream, {}).values() if lease.expires_at > now
            )
