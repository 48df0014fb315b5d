"""Tenant isolation under concurrent load, against `batch-api serve`: two projects (two API keys),
several clients each, uploading, listing, downloading and batching at once for 20 s. Nothing of one
project may be visible to, or stored in, the other; no valid request may get a 4xx or a 5xx."""

from __future__ import annotations

import io
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from batch_api.handlers.auth import project_id_for_key
from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

KEYS = ("sk-tenant-a-0123456789abcdef", "sk-tenant-b-0123456789abcdef")
SECONDS = 20


class Ledger:
    """What each project created, and every failure seen, shared by the client threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.files: dict[str, set[str]] = {key: set() for key in KEYS}
        self.batches: dict[str, set[str]] = {key: set() for key in KEYS}
        self.failures: list[str] = []
        self.calls: Counter[str] = Counter()

    def fail(self, text: str) -> None:
        with self.lock:
            self.failures.append(text)


def uploader(server: ServerProcess, key: str, worker: int, ledger: Ledger, stop: float) -> None:
    client = server.client(api_key=key)
    n = 0
    while time.monotonic() < stop:
        n += 1
        payload = (f"{key}/{worker}/{n}/".encode() * 65536)[: 2 * 1024 * 1024]  # 2 MB, tagged
        try:
            record = client.files.create(
                file=(f"w{worker}-{n}.bin", io.BytesIO(payload)), purpose="user_data"
            )
            with ledger.lock:
                ledger.files[key].add(record.id)
                ledger.calls["files.create"] += 1
            if client.files.content(record.id).read() != payload:
                ledger.fail(f"{key[:12]} downloaded another body for {record.id}")
            if client.files.retrieve(record.id).filename != f"w{worker}-{n}.bin":
                ledger.fail(f"{key[:12]} retrieved another record for {record.id}")
        except openai.APIError as exc:
            ledger.fail(f"{key[:12]} upload {n}: {exc!r}")


def batcher(server: ServerProcess, key: str, ledger: Ledger, stop: float) -> None:
    client = server.client(api_key=key)
    n = 0
    while time.monotonic() < stop:
        n += 1
        line = {
            "custom_id": f"{key[:12]}-{n}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "text-embedding-3-small", "input": f"{key} {n}"},
        }
        try:
            source = client.files.create(
                file=(f"b{n}.jsonl", io.BytesIO(orjson.dumps(line) + b"\n")), purpose="batch"
            )
            batch = client.batches.create(
                input_file_id=source.id, endpoint="/v1/embeddings", completion_window="24h"
            )
            with ledger.lock:
                ledger.files[key].add(source.id)
                ledger.batches[key].add(batch.id)
                ledger.calls["batches.create"] += 1
        except openai.APIError as exc:
            ledger.fail(f"{key[:12]} batch {n}: {exc!r}")


def lister(server: ServerProcess, key: str, ledger: Ledger, stop: float) -> None:
    client = server.client(api_key=key)
    other = KEYS[1] if key == KEYS[0] else KEYS[0]
    while time.monotonic() < stop:
        try:
            seen_batches = {b.id for b in client.batches.list(limit=1).data}
            seen_files = {f.id for f in client.files.list().data}
            with ledger.lock:
                ledger.calls["lists"] += 1
                crossed = (seen_batches & ledger.batches[other]) | (seen_files & ledger.files[other])
            if crossed:
                ledger.fail(f"{key[:12]} sees the other project's {sorted(crossed)}")
        except openai.APIError as exc:
            ledger.fail(f"{key[:12]} list: {exc!r}")


@pytest.fixture
def two_tenant_server(tmp_path: Path) -> Any:
    with ServerProcess(tmp_path / "data", "--api-key", KEYS[0], "--api-key", KEYS[1]) as server:
        yield server


def test_two_projects_under_concurrent_load_never_see_or_store_each_others_objects(
    two_tenant_server: ServerProcess,
) -> None:
    server = two_tenant_server
    ledger = Ledger()
    stop = time.monotonic() + SECONDS
    threads = [threading.Thread(target=uploader, args=(server, KEYS[0], i, ledger, stop)) for i in range(3)]
    threads += [threading.Thread(target=uploader, args=(server, KEYS[1], 9, ledger, stop))]
    threads += [threading.Thread(target=batcher, args=(server, key, ledger, stop)) for key in KEYS]
    threads += [
        threading.Thread(target=lister, args=(server, key, ledger, stop)) for key in KEYS for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 120)

    assert ledger.failures == []
    assert (
        ledger.calls["files.create"] > 20
        and ledger.calls["batches.create"] > 5
        and ledger.calls["lists"] > 50
    )

    for key, other in ((KEYS[0], KEYS[1]), (KEYS[1], KEYS[0])):
        client = server.client(api_key=key)
        listed = client.files.list().data
        assert {f.id for f in listed if f.purpose != "batch_output"} == ledger.files[key]
        assert not {f.id for f in listed} & ledger.files[other]
        batches = list(client.batches.list(limit=100))
        assert {b.id for b in batches} == ledger.batches[key]
        results = {b.output_file_id for b in batches} | {b.error_file_id for b in batches}
        assert {f.id for f in listed if f.purpose == "batch_output"} <= results
        for file_id in list(ledger.files[other])[:5]:
            with pytest.raises(openai.NotFoundError):
                client.files.retrieve(file_id)

    # stored, not only shown: every record lives under the project of the key that created it
    server.stop()
    with sqlite3.connect(server.data_dir / "metadata.sqlite3") as db:
        owners = dict(db.execute("SELECT id, project_id FROM files"))
        batch_owners = dict(db.execute("SELECT id, project_id FROM batches"))
    for key in KEYS:
        project = project_id_for_key(key)
        assert {owners[file_id] for file_id in ledger.files[key]} == {project}
        assert {batch_owners[batch_id] for batch_id in ledger.batches[key]} == {project}
