"""Fixtures that run every contract test against each adapter of a port.

A backend says how to open each port's adapter over storage rooted at a test's `tmp_path`.
Opening twice over the same place must reach the same data: that is how the durability tests
"restart" a store. Cleanups (closing connections, leaving a moto mock) go on the ExitStack.

To add a backend, define its openers in their own module (as `aws_backend.py` does for the AWS
adapters under moto) and add one line to `BACKENDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batch_api.adapters.local.filesystem import FilesystemBlobStore, FilesystemJournal
from batch_api.adapters.local.sqlite import SqliteMetadataStore
from batch_api.adapters.memory import MemoryBlobStore, MemoryJournal, MemoryMetadataStore
from batch_api.ports import BlobStore, MetadataStore, ResultJournal
from tests.contract.aws_backend import aws_blob_store, aws_journal, aws_metadata_store

Opener = Callable[[Path, ExitStack], Any]


@dataclass(frozen=True)
class Backend:
    metadata_store: Callable[[Path, ExitStack], MetadataStore]
    blob_store: Callable[[Path, ExitStack], BlobStore]
    journal: Callable[[Path, ExitStack], ResultJournal]


def _shared_per_place(factory: Callable[[], Any]) -> Opener:
    """In-memory stores have no storage to reopen: every open over one place returns one instance."""
    instances: dict[Path, Any] = {}

    def open_(place: Path, stack: ExitStack) -> Any:
        if place not in instances:
            instances[place] = factory()
            stack.callback(instances.pop, place)
        return instances[place]

    return open_


def _sqlite(place: Path, stack: ExitStack) -> MetadataStore:
    return stack.enter_context(SqliteMetadataStore(place / "metadata.sqlite3"))


MEMORY = Backend(
    metadata_store=_shared_per_place(MemoryMetadataStore),
    blob_store=_shared_per_place(MemoryBlobStore),
    journal=_shared_per_place(MemoryJournal),
)
LOCAL = Backend(
    metadata_store=_sqlite,
    blob_store=lambda place, stack: FilesystemBlobStore(place / "data"),
    journal=lambda place, stack: FilesystemJournal(place / "data"),
)

AWS = Backend(metadata_store=aws_metadata_store, blob_store=aws_blob_store, journal=aws_journal)

BACKENDS: dict[str, Backend] = {
    "memory": MEMORY,
    "local": LOCAL,
    "aws": AWS,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]


@pytest.fixture
def adapter_stack() -> Iterator[ExitStack]:
    with ExitStack() as stack:
        yield stack


@pytest.fixture
def open_metadata_store(
    backend: Backend, tmp_path: Path, adapter_stack: ExitStack
) -> Callable[[], MetadataStore]:
    """Open (or reopen) the metadata store over this test's storage."""
    return lambda: backend.metadata_store(tmp_path, adapter_stack)


@pytest.fixture
def open_blob_store(backend: Backend, tmp_path: Path, adapter_stack: ExitStack) -> Callable[[], BlobStore]:
    return lambda: backend.blob_store(tmp_path, adapter_stack)


@pytest.fixture
def open_journal(backend: Backend, tmp_path: Path, adapter_stack: ExitStack) -> Callable[[], ResultJournal]:
    return lambda: backend.journal(tmp_path, adapter_stack)


@pytest.fixture
def metadata_store(open_metadata_store: Callable[[], MetadataStore]) -> MetadataStore:
    return open_metadata_store()


@pytest.fixture
def blob_store(open_blob_store: Callable[[], BlobStore]) -> BlobStore:
    return open_blob_store()


@pytest.fixture
def journal(open_journal: Callable[[], ResultJournal]) -> ResultJournal:
    return open_journal()
