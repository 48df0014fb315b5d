"""Building the unit tests' Deps (the one fake clock, the in-memory fakes), input files and batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from batch_api import object_keys
from batch_api.adapters.memory import (
    MemoryBlobStore,
    MemoryJournal,
    MemoryMetadataStore,
    RecordingEventSink,
    RecordingWorkflow,
)
from batch_api.config import Settings
from batch_api.contract.models import BatchRecord, FileRecord
from batch_api.deps import Deps
from tests.unit.fakes_upstream import FakeUpstream

PROJECT = "proj_test"
T0 = 1_750_000_000
ENDPOINT_BODY_FIELD = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/responses": "input",
    "/v1/moderations": "input",
}


class FakeClock:
    """`Deps.clock`: time stands still until a test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SmallPieceBlobStore(MemoryBlobStore):
    """Serves reads in tiny pieces, so every line crosses read boundaries."""

    def __init__(self, piece: int = 7) -> None:
        super().__init__()
        self.piece = piece
        self.writes: list[str] = []

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        return super().iter_range(key, start, end, chunk_size=min(chunk_size, self.piece))

    def write_stream(self, key: str, chunks: Any) -> int:
        self.writes.append(key)
        return super().write_stream(key, chunks)


class CountingJournal(MemoryJournal):
    def __init__(self) -> None:
        super().__init__()
        self.appends = 0

    def append(self, batch_id: str, chunk_index: int, lines: list[bytes]) -> None:
        self.appends += 1
        super().append(batch_id, chunk_index, lines)


class RecordingMetadata(MemoryMetadataStore):
    """Keeps every chunk progress write, to see counts move during a run."""

    def __init__(self) -> None:
        super().__init__()
        self.progress_writes: list[Any] = []

    def put_chunk_progress(self, batch_id: str, progress: Any) -> None:
        self.progress_writes.append(progress.model_copy(deep=True))
        super().put_chunk_progress(batch_id, progress)


@dataclass
class FakeDeps(Deps):
    """Deps whose fakes keep their recording attributes visible to the type checker."""

    metadata: RecordingMetadata
    blobs: SmallPieceBlobStore
    journal: CountingJournal
    events: RecordingEventSink


def make_deps(
    upstream: FakeUpstream | None = None, clock: FakeClock | None = None, **settings: Any
) -> FakeDeps:
    upstream = upstream or FakeUpstream()
    return FakeDeps(
        settings=Settings(**settings),
        metadata=RecordingMetadata(),
        blobs=SmallPieceBlobStore(),
        journal=CountingJournal(),
        events=RecordingEventSink(),
        workflow=RecordingWorkflow(),
        upstream_factory=upstream.factory,
        clock=clock or FakeClock(),
    )


def request(
    custom_id: str,
    endpoint: str = "/v1/chat/completions",
    *,
    model: str = "gpt-test",
    content: str | None = None,
) -> dict[str, Any]:
    """One valid input line for `endpoint`, its text content defaulting to the custom_id."""
    text = content if content is not None else custom_id
    field = ENDPOINT_BODY_FIELD[endpoint]
    value: Any = [{"role": "user", "content": text}] if field == "messages" else text
    return {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": {"model": model, field: value}}


def jsonl(lines: list[Any]) -> bytes:
    """Objects become JSON lines; bytes/str are taken as the raw line."""
    out = []
    for line in lines:
        if isinstance(line, bytes):
            out.append(line)
        elif isinstance(line, str):
            out.append(line.encode())
        else:
            out.append(orjson.dumps(line))
    return b"\n".join(out) + b"\n"


def add_batch(
    deps: Deps,
    data: bytes,
    *,
    endpoint: str = "/v1/chat/completions",
    batch_id: str = "batch_test",
    file_id: str = "file-input",
    window: int = 86400,
    output_expires_after_seconds: int = 30 * 86400,
) -> BatchRecord:
    """Store `data` as a live batch input file and create a `validating` batch over it."""
    now = deps.now()
    deps.blobs.put(object_keys.file_key(file_id), data)
    deps.metadata.create_file(
        FileRecord(
            id=file_id,
            project_id=PROJECT,
            bytes=len(data),
            created_at=now,
            expires_at=now + 30 * 86400,
            filename="input.jsonl",
            purpose="batch",
            blob_key=object_keys.file_key(file_id),
        )
    )
    batch = BatchRecord(
        id=batch_id,
        project_id=PROJECT,
        endpoint=endpoint,
        input_file_id=file_id,
        created_at=now,
        expires_at=now + window,
        output_expires_after_seconds=output_expires_after_seconds,
    )
    deps.metadata.create_batch(batch)
    return batch


def ids(batch_id: str = "batch_test") -> dict[str, str]:
    return {"project_id": PROJECT, "batch_id": batch_id}


def get_batch(deps: Deps, batch_id: str = "batch_test") -> BatchRecord:
    batch = deps.metadata.get_batch(PROJECT, batch_id)
    assert batch is not None
    return batch


def file_lines(deps: Deps, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    record = deps.metadata.get_file(PROJECT, file_id)
    assert record is not None
    data = deps.blobs.get(record.blob_key)
    assert record.bytes == len(data)
    return [orjson.loads(line) for line in data.splitlines()]
