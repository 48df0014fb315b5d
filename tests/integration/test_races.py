"""Concurrent calls on one object, through the local server (SQLite, data directory, real threads):
every pair has a defined answer, never a 500 and never a torn or crossed body."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest

from batch_api.config import Settings
from batch_api.local.bootstrap import LocalApp, build_local_app
from tests.support.asgi_server import asgi_app, serving
from tests.support.server import free_port

pytestmark = pytest.mark.integration

TERMINAL = {"completed", "failed", "expired", "cancelled"}


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LocalApp, openai.OpenAI]]:
    settings = Settings(
        port=free_port(),
        data_dir=tmp_path / "data",
        http_concurrency=16,
        max_inline_download_bytes=1 << 30,  # downloads inline: the race is in the API, not the link
        mock_latency_seconds=0.02,
        chunk_max_lines=5,
        requests_per_chunk=2,
        progress_interval_seconds=0.05,
    )
    local = build_local_app(settings)
    try:
        with serving(asgi_app(local, settings), settings.port) as address:
            client = openai.OpenAI(
                base_url=f"http://{address[0]}:{address[1]}/v1", api_key="sk-any", max_retries=0
            )
            yield local, client
    finally:
        local.close()


def at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls on their own threads, released together; each result or the exception raised."""
    gate = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        gate.wait()
        try:
            results[index] = calls[index]()
        except Exception as exc:  # collected for the assertions
            results[index] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def status_of(error: Any) -> tuple[int, str | None]:
    assert isinstance(error, openai.APIStatusError), error
    return error.status_code, (error.body or {}).get("code")  # type: ignore[union-attr]


def jsonl(n: int, start: int = 0) -> bytes:
    return b"".join(b'{"n": %d}\n' % i for i in range(start, start + n))


def _upload_in_parts(client: openai.OpenAI, data: bytes, part: int) -> tuple[str, list[str]]:
    upload = client.uploads.create(
        bytes=len(data), filename="in.jsonl", mime_type="application/jsonl", purpose="batch"
    )
    ids = [
        client.uploads.parts.create(upload.id, data=data[i : i + part]).id for i in range(0, len(data), part)
    ]
    return upload.id, ids


def test_eight_completes_of_one_upload_one_wins_the_rest_are_400(
    served: tuple[LocalApp, openai.OpenAI],
) -> None:
    _, client = served
    data = jsonl(20_000)
    upload_id, part_ids = _upload_in_parts(client, data, 100_000)

    results = at_once([lambda: client.uploads.complete(upload_id, part_ids=part_ids)] * 8)

    won = [r for r in results if not isinstance(r, Exception)]
    assert len(won) == 1 and won[0].status == "completed" and won[0].file is not None
    assert [status_of(r) for r in results if isinstance(r, Exception)] == [(400, "invalid_upload_status")] * 7
    assert client.files.content(won[0].file.id).read() == data


def test_completes_naming_different_orders_never_mix_bodies(served: tuple[LocalApp, openai.OpenAI]) -> None:
    _, client = served
    data = jsonl(3000)
    upload_id, part_ids = _upload_in_parts(client, data, len(data) // 3 + 1)
    orders = [part_ids, part_ids[::-1], [part_ids[1], part_ids[0], part_ids[2]]] * 2

    results = at_once(
        [lambda order=order: client.uploads.complete(upload_id, part_ids=order) for order in orders]
    )

    won = [(order, r) for order, r in zip(orders, results, strict=True) if not isinstance(r, Exception)]
    assert len(won) == 1
    order, upload = won[0]
    parts = {
        pid: data[i * (len(data) // 3 + 1) : (i + 1) * (len(data) // 3 + 1)] for i, pid in enumerate(part_ids)
    }
    assert client.files.content(upload.file.id).read() == b"".join(parts[pid] for pid in order)
    assert all(status_of(r)[0] == 400 for r in results if isinstance(r, Exception))


def test_cancel_and_complete_of_one_upload_exactly_one_wins(served: tuple[LocalApp, openai.OpenAI]) -> None:
    _, client = served
    for _ in range(5):
        upload_id, part_ids = _upload_in_parts(client, jsonl(2000), 10_000)
        completed, cancelled = at_once(
            [
                partial(client.uploads.complete, upload_id, part_ids=part_ids),
                partial(client.uploads.cancel, upload_id),
            ]
        )
        outcomes = [not isinstance(completed, Exception), not isinstance(cancelled, Exception)]
        assert outcomes in ([True, False], [False, True]), (completed, cancelled)
        if outcomes[0]:
            assert status_of(cancelled) == (400, "invalid_upload_status")
            assert client.files.retrieve(completed.file.id).bytes == completed.bytes
        else:
            assert status_of(completed) == (400, "invalid_upload_status")
            assert client.uploads.cancel(upload_id).status == "cancelled"
    # no file of a cancelled upload is left registered
    listed = client.files.list(purpose="batch").data
    assert all(f.filename == "in.jsonl" for f in listed)


def test_downloads_racing_a_delete_get_the_whole_body_or_404(served: tuple[LocalApp, openai.OpenAI]) -> None:
    _, client = served
    data = jsonl(40_000)  # ~400 KB
    for _ in range(3):
        file_id = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
        calls: list[Callable[[], Any]] = [lambda file_id=file_id: client.files.content(file_id).read()] * 8
        calls.append(partial(client.files.delete, file_id))
        results = at_once(calls)
        assert results[-1].deleted is True
        for result in results[:-1]:
            if isinstance(result, Exception):
                assert status_of(result) == (404, None)
            else:
                assert result == data


def test_two_cancels_of_one_batch_both_answer_and_it_ends_cancelled(
    served: tuple[LocalApp, openai.OpenAI],
) -> None:
    _, client = served
    lines = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "m", "input": "x"},
        }
        for i in range(200)
    ]
    data = b"".join(orjson_dumps(line) + b"\n" for line in lines)
    input_file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    batch = client.batches.create(
        input_file_id=input_file.id, endpoint="/v1/embeddings", completion_window="24h"
    )

    first, second = at_once([lambda: client.batches.cancel(batch.id)] * 2)

    assert {first.status, second.status} <= {"cancelling", "cancelled"}
    assert wait_terminal(client, batch.id).status == "cancelled"


def test_a_batch_that_answered_cancelling_always_ends_cancelled(
    served: tuple[LocalApp, openai.OpenAI],
) -> None:
    """Cancels land at every point of small batches' lives, the end included: each one answered
    `cancelling` ends `cancelled`; each refused (409) had already ended `completed`."""
    _, client = served
    answered: dict[str, str] = {}
    for i in range(12):
        lines = [
            {
                "custom_id": f"r{j}",
                "method": "POST",
                "url": "/v1/embeddings",
                "body": {"model": "m", "input": "x"},
            }
            for j in range(40)
        ]
        data = b"".join(orjson_dumps(line) + b"\n" for line in lines)
        input_file = client.files.create(file=(f"in{i}.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=input_file.id, endpoint="/v1/embeddings", completion_window="24h"
        )
        target = ["validating", "in_progress", "finalizing", "completed"][i % 4]
        while client.batches.retrieve(batch.id).status not in {target, *TERMINAL}:
            pass
        try:
            answered[batch.id] = client.batches.cancel(batch.id).status
        except openai.ConflictError:
            answered[batch.id] = "refused"

    for batch_id, answer in answered.items():
        final = wait_terminal(client, batch_id)
        if answer == "refused":
            assert final.status == "completed"
        else:
            assert answer in ("cancelling", "cancelled")
            assert final.status == "cancelled", batch_id
            counts = final.request_counts
            assert counts is not None and counts.completed + counts.failed == counts.total
    assert "cancelling" in answered.values()


def test_deleting_the_input_while_a_batch_is_created_never_500s(
    served: tuple[LocalApp, openai.OpenAI],
) -> None:
    """Either order is defined (docs/bad-input.md): the create is refused (the file is gone), or the
    batch keeps its input and completes, or (the delete raced the create itself) the batch fails
    validation naming `input_file_id`."""
    _, client = served
    line = {
        "custom_id": "r0",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": "m", "input": "x"},
    }
    outcomes = set()
    for _ in range(8):
        file_id = client.files.create(
            file=("in.jsonl", io.BytesIO(orjson_dumps(line) + b"\n")), purpose="batch"
        ).id
        created, deleted = at_once(
            [
                partial(
                    client.batches.create,
                    input_file_id=file_id,
                    endpoint="/v1/embeddings",
                    completion_window="24h",
                ),
                partial(client.files.delete, file_id),
            ]
        )
        assert deleted.deleted is True
        if isinstance(created, Exception):
            assert status_of(created) == (400, "invalid_request")
            outcomes.add("refused")
            continue
        final = wait_terminal(client, created.id)
        if final.status == "failed":
            assert [(e.code, e.param) for e in final.errors.data] == [("invalid_request", "input_file_id")]
        else:
            assert final.status == "completed" and final.request_counts.completed == 1
        outcomes.add(final.status)
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve(file_id)
    assert outcomes


def orjson_dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def wait_terminal(client: openai.OpenAI, batch_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        time.sleep(0.02)
    raise AssertionError(f"batch {batch_id} did not end")
