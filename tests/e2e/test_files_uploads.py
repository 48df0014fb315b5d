"""Files and Uploads through the openai SDK: every answer parses into the SDK's own types."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import openai
import pytest
from openai.types import FileDeleted, FileObject, Upload

from tests.e2e.conftest import jsonl, request_line, upload, wait_for

pytestmark = pytest.mark.e2e


def test_files_create_list_retrieve_content_delete(client: openai.OpenAI) -> None:
    created = [
        client.files.create(file=(f"f{i}.jsonl", io.BytesIO(f'{{"n": {i}}}\n'.encode())), purpose="batch")
        for i in range(5)
    ]
    notes = client.files.create(file=("notes.txt", io.BytesIO(b"hello")), purpose="user_data")
    assert all(isinstance(f, FileObject) for f in created)
    assert created[0].bytes == len(b'{"n": 0}\n') and created[0].filename == "f0.jsonl"
    assert created[0].expires_at == created[0].created_at + 30 * 86400  # batch input files expire in 30 days

    batch_ids = [f.id for f in client.files.list(purpose="batch")]
    assert set(batch_ids) == {f.id for f in created} and notes.id not in batch_ids

    desc = client.files.list(purpose="batch", order="desc", limit=2)
    assert len(desc.data) == 2 and desc.has_more
    asc = [f.id for f in client.files.list(purpose="batch", order="asc", limit=2)]
    assert asc == [f.id for f in created]  # paging with `after` across three pages, oldest first
    assert [f.id for f in client.files.list(purpose="batch", order="desc")] == asc[::-1]

    assert client.files.retrieve(created[2].id).id == created[2].id
    assert client.files.content(created[3].id).content == b'{"n": 3}\n'

    deleted = client.files.delete(created[1].id)
    assert isinstance(deleted, FileDeleted) and deleted.deleted and deleted.id == created[1].id
    with pytest.raises(openai.NotFoundError) as caught:
        client.files.retrieve(created[1].id)
    assert set(caught.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        client.files.content(created[1].id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(created[1].id)


def test_file_expires_after_makes_it_404_once_expired(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.files.create(
            file=("x.jsonl", io.BytesIO(b"{}\n")),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 10},
        )
    kept = client.files.create(
        file=("x.jsonl", io.BytesIO(b"{}\n")),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 3600},
    )
    assert kept.expires_at == kept.created_at + 3600


def test_uploads_parts_complete_and_cancel(client: openai.OpenAI) -> None:
    body = jsonl([request_line("/v1/chat/completions", i) for i in range(300)])
    pieces = [body[i : i + 4096] for i in range(0, len(body), 4096)]
    created = client.uploads.create(
        bytes=len(body), filename="big.jsonl", mime_type="application/jsonl", purpose="batch"
    )
    assert isinstance(created, Upload) and created.status == "pending"
    parts = [client.uploads.parts.create(created.id, data=piece) for piece in pieces]
    assert all(p.upload_id == created.id for p in parts)
    # complete takes the part order from part_ids, not the order parts arrived in
    done = client.uploads.complete(
        created.id, part_ids=[p.id for p in parts], md5=hashlib.md5(body).hexdigest()
    )
    assert done.status == "completed" and done.file is not None
    assert done.file.bytes == len(body) and done.file.purpose == "batch"
    assert client.files.content(done.file.id).content == body

    with pytest.raises(openai.BadRequestError):  # size mismatch is the caller's mistake, a 400
        short = client.uploads.create(
            bytes=10, filename="s.jsonl", mime_type="application/jsonl", purpose="batch"
        )
        part = client.uploads.parts.create(short.id, data=b"12345")
        client.uploads.complete(short.id, part_ids=[part.id])

    cancelled = client.uploads.create(
        bytes=5, filename="c.jsonl", mime_type="application/jsonl", purpose="batch"
    )
    client.uploads.parts.create(cancelled.id, data=b"12345")
    assert client.uploads.cancel(cancelled.id).status == "cancelled"
    with pytest.raises(openai.APIStatusError):
        client.uploads.parts.create(cancelled.id, data=b"more")


def test_upload_file_chunked_then_batch(client: openai.OpenAI, tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_bytes(jsonl([request_line("/v1/embeddings", i) for i in range(500)]))
    upload_obj = client.uploads.upload_file_chunked(
        file=path, mime_type="application/jsonl", purpose="batch", part_size=16 * 1024
    )
    assert upload_obj.status == "completed" and upload_obj.file is not None
    assert upload_obj.file.bytes == path.stat().st_size
    batch = client.batches.create(
        input_file_id=upload_obj.file.id, endpoint="/v1/embeddings", completion_window="24h"
    )
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.completed == 500


def test_large_download_follows_a_signed_redirect(start_server: Any) -> None:
    server = start_server(env={"BATCH_API_MAX_INLINE_DOWNLOAD_BYTES": "1024"})
    client = server.client()
    data = b"".join(json.dumps({"i": i, "pad": "x" * 50}).encode() + b"\n" for i in range(200))
    created = client.files.create(file=("big.jsonl", io.BytesIO(data)), purpose="batch")
    raw = client.files.with_raw_response.content(created.id)
    assert raw.http_response.history and raw.http_response.history[0].status_code == 302
    assert raw.http_response.content == data
    assert client.files.content(created.id).content == data


def test_batches_list_auto_paginates_past_100(client: openai.OpenAI) -> None:
    input_file = upload(client, [request_line("/v1/chat/completions", 0)])
    created = [
        client.batches.create(
            input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h"
        ).id
        for _ in range(105)
    ]
    first = client.batches.list(limit=100)
    assert len(first.data) == 100 and first.has_more
    listed = [b.id for b in client.batches.list(limit=100)]
    assert listed == created[::-1]  # newest first, every batch once
    assert [b.id for b in client.batches.list()] == listed  # default page size 20


def test_errors_are_openai_envelopes(server: Any, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.batches.retrieve("batch_nope")
    assert set(missing.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]

    input_file = upload(client, [request_line("/v1/chat/completions", 0)])
    batch = client.batches.create(
        input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert wait_for(client, batch.id).status == "completed"
    with pytest.raises(openai.ConflictError) as conflict:
        client.with_options(max_retries=2).batches.cancel(batch.id)
    assert conflict.value.response.headers["x-should-retry"] == "false"
    assert conflict.value.request_id  # x-request-id, as OpenAI sends it
    assert client.batches.with_raw_response.retrieve(batch.id).headers["x-request-id"]
    assert set(conflict.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


def test_idempotency_key_returns_the_same_batch(client: openai.OpenAI) -> None:
    input_file = upload(client, [request_line("/v1/chat/completions", 0)])
    headers = {"Idempotency-Key": "create-once-123"}
    first = client.batches.create(
        input_file_id=input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers=headers,
    )
    again = client.batches.create(
        input_file_id=input_file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        extra_headers=headers,
    )
    assert again.id == first.id
    assert [b.id for b in client.batches.list()] == [first.id]

    with pytest.raises(openai.ConflictError) as reused:  # the same key, other parameters
        client.batches.create(
            input_file_id=input_file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": "second"},
            extra_headers=headers,
        )
    assert reused.value.body["code"] == "idempotency_key_reused"  # type: ignore[index]
    assert reused.value.response.headers["x-should-retry"] == "false"
    assert [b.id for b in client.batches.list()] == [first.id]


def test_api_keys_isolate_projects(start_server: Any) -> None:
    server = start_server("--api-key", "key-a", "--api-key", "key-b")
    a, b = server.client(api_key="key-a"), server.client(api_key="key-b")
    created = a.files.create(file=("a.jsonl", io.BytesIO(b"{}\n")), purpose="batch")
    with pytest.raises(openai.NotFoundError):
        b.files.retrieve(created.id)
    assert [f.id for f in b.files.list()] == []
    with pytest.raises(openai.AuthenticationError) as denied:
        server.client(api_key="wrong").files.list()
    assert set(denied.value.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]
