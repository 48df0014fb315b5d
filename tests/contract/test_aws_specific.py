"""AWS adapters: behaviour the shared contract cannot see (moto in-process, one server test).

Item layout and sparse indexes, listings that span many DynamoDB pages, multipart streaming,
lifecycle tags, presigned downloads, idempotent Step Functions starts, EventBridge delivery.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from batch_api.adapters.aws import s3 as s3_adapter
from batch_api.adapters.aws.dynamodb import (
    STATE_SHARDS,
    DynamoMetadataStore,
    shard_of,
    shard_partition,
    sharded,
)
from batch_api.adapters.aws.eventbridge import EventBridgeSink, EventPublishFailed
from batch_api.adapters.aws.s3 import (
    EXPIRE_DAYS_TAG,
    S3BlobStore,
    S3Journal,
    content_disposition,
    expire_days,
)
from batch_api.adapters.aws.schema import PARTITION_KEY, SORT_KEY, TTL_ATTRIBUTE
from batch_api.adapters.aws.stepfunctions import StepFunctionsWorkflow
from batch_api.adapters.memory import MemoryMetadataStore
from batch_api.contract import ids
from batch_api.contract.errors import AlreadyExists
from batch_api.contract.models import IDEMPOTENCY_KEY_TTL, BatchRecord, FileRecord, UploadRecord
from tests.contract.aws_backend import BUCKET, REGION, MotoAccount, shared_session, start_account
from tests.support.moto_server import AtomicMotoServer

pytestmark = pytest.mark.contract

NOW = 1_700_000_000
MiB = 1024 * 1024


@pytest.fixture
def account() -> Iterator[MotoAccount]:
    with ExitStack() as stack:
        yield start_account(stack)


def make_file(file_id: str, **fields: Any) -> FileRecord:
    values: dict[str, Any] = {
        "id": file_id,
        "project_id": "proj-a",
        "bytes": 1,
        "created_at": NOW,
        "filename": "f.jsonl",
        "purpose": "batch",
        "blob_key": f"files/{file_id}",
    }
    values.update(fields)
    return FileRecord.model_validate(values)


def make_batch(batch_id: str, **fields: Any) -> BatchRecord:
    values: dict[str, Any] = {
        "id": batch_id,
        "project_id": "proj-a",
        "endpoint": "/v1/chat/completions",
        "input_file_id": "file-in",
        "created_at": NOW,
        "expires_at": NOW + 86400,
    }
    values.update(fields)
    return BatchRecord.model_validate(values)


def make_upload(upload_id: str, **fields: Any) -> UploadRecord:
    values: dict[str, Any] = {
        "id": upload_id,
        "project_id": "proj-a",
        "bytes": 1,
        "created_at": NOW,
        "expires_at": NOW + 3600,
        "filename": "f.jsonl",
        "purpose": "batch",
        "mime_type": "application/jsonl",
    }
    values.update(fields)
    return UploadRecord.model_validate(values)


def raw_item(account: MotoAccount, pk: str, sk: str) -> dict[str, Any]:
    item: dict[str, Any] = account.table().get_item(Key={PARTITION_KEY: pk, SORT_KEY: sk})["Item"]
    return item


# ---------------------------------------------------------------- DynamoDB


def test_file_leaves_the_expiry_index_when_deleted(account: MotoAccount) -> None:
    store = DynamoMetadataStore(account.table())
    store.create_file(make_file("file-1", expires_at=NOW + 5))

    item = raw_item(account, "FILE#file-1", "FILE")
    assert (item["gsi1pk"], item["gsi1sk"]) == ("proj-a#FILE", f"{NOW:012d}#file-1")
    assert (item["gsi2pk"], item["gsi2sk"]) == ("EXPIRES#13", f"{NOW + 5:012d}#file-1")  # shard_of("file-1")

    assert store.mark_file_deleted("proj-a", "file-1")
    item = raw_item(account, "FILE#file-1", "FILE")
    assert "gsi2pk" not in item and "gsi2sk" not in item and item["deleted"] is True


def test_batch_is_on_the_active_index_only_while_not_terminal(account: MotoAccount) -> None:
    store = DynamoMetadataStore(account.table())
    store.create_batch(make_batch("batch_1"))
    store.create_batch(make_batch("batch_done", status="completed"))
    assert "gsi2pk" not in raw_item(account, "BATCH#batch_done", "BATCH")
    item = raw_item(account, "BATCH#batch_1", "BATCH")
    assert (item["gsi2pk"], item["gsi2sk"]) == ("ACTIVE#06", f"{NOW:012d}#batch_1")  # shard_of("batch_1")

    store.update_batch(
        "proj-a", "batch_1", {"status": "failed", "failed_at": NOW}, expected_status=["validating"]
    )
    assert "gsi2pk" not in raw_item(account, "BATCH#batch_1", "BATCH")
    assert store.list_active_batches() == []

    # a (hypothetical) move back to a live status puts it back, with the same sort key
    store.update_batch("proj-a", "batch_1", {"status": "in_progress"}, expected_status=["failed"])
    item = raw_item(account, "BATCH#batch_1", "BATCH")
    assert (item["gsi2pk"], item["gsi2sk"]) == ("ACTIVE#06", f"{NOW:012d}#batch_1")


def test_upload_is_on_the_expiry_index_only_while_pending(account: MotoAccount) -> None:
    store = DynamoMetadataStore(account.table())
    store.create_upload(make_upload("upload_1"))
    store.create_upload(make_upload("upload_done", status="completed"))
    item = raw_item(account, "UPLOAD#upload_1", "UPLOAD")
    assert (item["gsi2pk"], item["gsi2sk"]) == ("UPLOAD_EXPIRES#00", f"{NOW + 3600:012d}#upload_1")
    assert "gsi2pk" not in raw_item(account, "UPLOAD#upload_done", "UPLOAD")

    store.update_upload("proj-a", "upload_1", {"status": "expired"}, expected_status=["pending"])
    item = raw_item(account, "UPLOAD#upload_1", "UPLOAD")
    assert "gsi2pk" not in item  # off the index; the sort key stays, ready should it be pending again
    assert item["gsi2sk"] == f"{NOW + 3600:012d}#upload_1"
    assert store.get_upload("proj-a", "upload_1") == make_upload("upload_1", status="expired")


def test_idempotency_item_carries_a_numeric_ttl(account: MotoAccount) -> None:
    store = DynamoMetadataStore(account.table())
    store.claim_idempotency_key("proj-a", "key-1", "batch_1", NOW)
    item = raw_item(account, "IDEMP#proj-a", "KEY#key-1")
    assert item[TTL_ATTRIBUTE] == NOW + IDEMPOTENCY_KEY_TTL  # a Number: DynamoDB TTL ignores anything else
    assert isinstance(item[TTL_ATTRIBUTE], Decimal)


def test_idempotency_item_written_before_keys_expired_is_judged_by_its_age(account: MotoAccount) -> None:
    for key in ("key-old", "key-young"):
        account.table().put_item(
            Item={
                PARTITION_KEY: "IDEMP#proj-a",
                SORT_KEY: f"KEY#{key}",
                "project_id": "proj-a",
                "resource_id": f"batch_{key}",
                "created_at": NOW if key == "key-old" else NOW + 10,
            }
        )
    store = DynamoMetadataStore(account.table())
    later = NOW + IDEMPOTENCY_KEY_TTL
    assert store.claim_idempotency_key("proj-a", "key-young", "batch_new", later) == "batch_key-young"
    assert store.claim_idempotency_key("proj-a", "key-old", "batch_new", later) == "batch_new"
    assert raw_item(account, "IDEMP#proj-a", "KEY#key-old")[TTL_ATTRIBUTE] == later + IDEMPOTENCY_KEY_TTL


def test_update_with_an_invalid_value_raises_and_changes_nothing(account: MotoAccount) -> None:
    store = DynamoMetadataStore(account.table())
    store.create_batch(make_batch("batch_1"))
    with pytest.raises(ValueError):
        store.update_batch("proj-a", "batch_1", {"status": "bogus"}, expected_status=["validating"])
    with pytest.raises(ValueError):
        store.update_batch("proj-a", "batch_1", {"no_such_field": 1}, expected_status=["validating"])
    assert store.get_batch("proj-a", "batch_1") == make_batch("batch_1")


def test_listings_page_through_many_dynamodb_pages_like_the_reference(account: MotoAccount) -> None:
    """page_size=2 with most items filtered out: every answer must still match the in-memory store."""
    dynamo = DynamoMetadataStore(account.table(), page_size=2)
    memory = MemoryMetadataStore()
    for i in range(18):
        record = make_file(
            f"file-{i:02d}",
            created_at=NOW + i // 3,  # ties on created_at: the id decides
            purpose="batch_output" if i % 4 == 0 else "batch",
            expires_at=NOW - 1 if i % 5 == 0 else (NOW + 100 if i % 2 else None),
            deleted=i % 7 == 0,
        )
        dynamo.create_file(record)
        memory.create_file(record)
        batch = make_batch(
            f"batch_{i:02d}", created_at=NOW + i // 4, status="completed" if i % 3 else "in_progress"
        )
        dynamo.create_batch(batch)
        memory.create_batch(batch)
        upload = make_upload(
            f"upload_{i:02d}",
            project_id=f"proj-{i % 2}",
            expires_at=NOW - i // 3,  # ties on expires_at: the id decides
            status="pending" if i % 3 == 0 else "completed",
        )
        dynamo.create_upload(upload)
        memory.create_upload(upload)

    for purpose in (None, "batch", "batch_output"):
        for order in ("asc", "desc"):
            for limit in (2, 50):
                after: str | None = None
                while True:
                    args: dict[str, Any] = {
                        "purpose": purpose,
                        "order": order,
                        "after": after,
                        "limit": limit,
                    }
                    got = dynamo.list_files("proj-a", now=NOW, **args)
                    assert got == memory.list_files("proj-a", now=NOW, **args), args
                    if not got:
                        break
                    after = got[-1].id
    for limit in (3, 50):
        after = None
        while page := dynamo.list_batches("proj-a", after=after, limit=limit):
            assert page == memory.list_batches("proj-a", after=after, limit=limit)
            after = page[-1].id
    assert dynamo.list_expired_files(NOW, 2) == memory.list_expired_files(NOW, 2)
    assert dynamo.list_expired_files(NOW, 100) == memory.list_expired_files(NOW, 100)
    assert dynamo.list_active_batches() == memory.list_active_batches()
    for limit in (1, 2, 100):
        assert dynamo.list_expired_uploads(NOW - 2, limit) == memory.list_expired_uploads(NOW - 2, limit)
    assert len(dynamo.list_expired_uploads(NOW, 100)) == 6


def test_the_shard_of_an_id_is_stable_across_processes_and_spread_evenly() -> None:
    """Readers of another process (or release) must find an item where its writer put it: not `hash()`."""
    assert [shard_of(i) for i in ("file-1", "batch_1", "upload_1", "batch_abc", "upload_abc", "x")] == [
        13,
        6,
        0,
        13,
        1,
        3,
    ]
    assert sharded("ACTIVE", "batch_1") == "ACTIVE#06" and shard_partition("EXPIRES", 3) == "EXPIRES#03"
    sample = [ids.new_batch_id() for _ in range(8)] + [f"file-{i}" for i in range(8)]
    script = (
        "import json, sys; from batch_api.adapters.aws.dynamodb import shard_of;"
        " print(json.dumps([shard_of(i) for i in json.loads(sys.argv[1])]))"
    )
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script, json.dumps(sample)],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        assert json.loads(out) == [shard_of(i) for i in sample]

    counts = Counter(shard_of(f"batch_{i}") for i in range(1600))
    assert sorted(counts) == list(range(STATE_SHARDS)) == list(range(16))
    assert all(80 <= n <= 120 for n in counts.values()), counts  # 100 each when even


def _ids_on_every_shard(prefix: str, per_shard: int) -> list[str]:
    """Ids of the form `{prefix}{n:03d}`, `per_shard` of them on each shard."""
    by_shard: dict[int, list[str]] = {}
    n = 0
    while any(len(by_shard.get(shard, [])) < per_shard for shard in range(STATE_SHARDS)):
        record_id = f"{prefix}{n:03d}"
        bucket = by_shard.setdefault(shard_of(record_id), [])
        if len(bucket) < per_shard:
            bucket.append(record_id)
        n += 1
    return sorted(i for bucket in by_shard.values() for i in bucket)


def test_the_state_listings_merge_every_shard_in_sort_key_order(account: MotoAccount) -> None:
    """Items on all 16 shards (3 each: two Query pages a shard), times interleaved across them: every
    listing must hold every item, in the (time, id) order one partition gave, and stop at its limit."""
    store = DynamoMetadataStore(account.table(), page_size=2)
    batch_ids = _ids_on_every_shard("batch_", 3)
    file_ids = _ids_on_every_shard("file-", 3)
    upload_ids = _ids_on_every_shard("upload_", 3)
    # ties on the time (the id decides), and times that do not follow the ids or the shards
    batch_times = {batch_id: NOW + (i * 7) % 11 for i, batch_id in enumerate(batch_ids)}
    for i, batch_id in enumerate(batch_ids):
        project = f"proj-{i % 3}"
        store.create_batch(
            make_batch(batch_id, project_id=project, created_at=batch_times[batch_id], status="in_progress")
        )
        if i % 4 == 0:  # ended; half of them with the event still to announce
            changes = {"status": "completed", "event_pending": i % 8 == 0}
            store.update_batch(project, batch_id, changes, expected_status={"in_progress"})
    file_times = {file_id: NOW - (i * 5) % 13 for i, file_id in enumerate(file_ids)}
    for file_id in file_ids:
        store.create_file(make_file(file_id, expires_at=file_times[file_id]))
    for i, upload_id in enumerate(upload_ids):
        store.create_upload(make_upload(upload_id, project_id=f"proj-{i % 2}", expires_at=NOW - (i * 3) % 7))

    partitions = {item["gsi2pk"] for item in account.table().scan()["Items"] if "gsi2pk" in item}
    assert partitions == {
        f"{kind}#{shard:02d}" for kind in ("ACTIVE", "EXPIRES", "UPLOAD_EXPIRES") for shard in range(16)
    }

    def in_order(times: dict[str, int], chosen: list[str]) -> list[str]:
        return sorted(chosen, key=lambda record_id: (times[record_id], record_id))

    active = [b for i, b in enumerate(batch_ids) if i % 4 != 0]
    unannounced = [b for i, b in enumerate(batch_ids) if i % 8 == 0]
    assert [b.id for b in store.list_active_batches()] == in_order(batch_times, active)
    assert [b.id for b in store.list_unannounced_batches()] == in_order(batch_times, unannounced)
    expired = in_order(file_times, file_ids)
    for limit in (1, 5, 17, 48, 100):
        assert [f.id for f in store.list_expired_files(NOW, limit)] == expired[:limit]
    assert [f.id for f in store.list_expired_files(NOW - 6, 100)] == [
        f for f in expired if file_times[f] <= NOW - 6
    ]
    upload_times = {u: NOW - (i * 3) % 7 for i, u in enumerate(upload_ids)}
    uploads = in_order(upload_times, upload_ids)
    for limit in (1, 16, 100):
        assert [u.id for u in store.list_expired_uploads(NOW, limit)] == uploads[:limit]


def test_a_shard_holding_the_first_items_pages_on_under_a_limit(account: MotoAccount) -> None:
    """A shard that holds every one of the earliest items is read page after page (a page is sized by
    the limit's even share per shard), not cut at its first page."""
    store = DynamoMetadataStore(account.table())
    same_shard = [i for i in _ids_on_every_shard("file-", 6) if shard_of(i) == 3]
    others = [i for i in _ids_on_every_shard("file-", 1) if shard_of(i) != 3]
    for n, file_id in enumerate(same_shard):
        store.create_file(make_file(file_id, expires_at=NOW - 100 + n))
    for file_id in others:
        store.create_file(make_file(file_id, expires_at=NOW))

    assert [f.id for f in store.list_expired_files(NOW, 6)] == same_shard
    assert [f.id for f in store.list_expired_files(NOW, 8)] == same_shard + sorted(others)[:2]


def has_item(account: MotoAccount, pk: str, sk: str) -> bool:
    return "Item" in account.table().get_item(Key={PARTITION_KEY: pk, SORT_KEY: sk})


def test_a_batch_holds_its_input_with_an_item_beside_the_file_until_it_ends(account: MotoAccount) -> None:
    store = DynamoMetadataStore(account.table())
    store.create_file(make_file("file-in", expires_at=NOW + 5))
    store.create_batch(make_batch("batch_1", input_file_id="file-in"))
    store.create_batch(make_batch("batch_done", input_file_id="file-in", status="completed"))

    hold = raw_item(account, "FILE#file-in", "HOLD#batch_1")
    expires_at = store.get_batch("proj-a", "batch_1").expires_at  # type: ignore[union-attr]
    assert hold == {
        "pk": "FILE#file-in",
        "sk": "HOLD#batch_1",
        "project_id": "proj-a",
        "batch_id": "batch_1",
        "ttl": expires_at + 7 * 86400,  # DynamoDB removes one a crash left behind, a week after
    }
    assert not has_item(account, "FILE#file-in", "HOLD#batch_done")  # created ended: no hold
    assert store.get_file("proj-a", "file-in") == make_file("file-in", expires_at=NOW + 5)
    assert [
        f.id for f in store.list_files("proj-a", purpose=None, order="asc", after=None, limit=9, now=NOW)
    ] == ["file-in"]

    store.update_batch(
        "proj-a", "batch_1", {"status": "completed", "event_pending": True}, expected_status={"validating"}
    )
    assert not has_item(account, "FILE#file-in", "HOLD#batch_1")


class CrashingTable:
    """The table, except that write number `crash_at` (0-based) raises instead of reaching DynamoDB,
    as if the process died there; `writes` records each write as (operation, sort key)."""

    def __init__(self, table: Any, crash_at: int | None = None) -> None:
        self._table = table
        self.crash_at = crash_at
        self.writes: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._table, name)

    def _write(self, operation: str, sort_key: str, **kwargs: Any) -> Any:
        if len(self.writes) == self.crash_at:
            self.writes.append((operation, sort_key))
            raise RuntimeError("kill -9")
        self.writes.append((operation, sort_key))
        return getattr(self._table, operation)(**kwargs)

    def put_item(self, **kwargs: Any) -> Any:
        return self._write("put_item", kwargs["Item"][SORT_KEY], **kwargs)

    def update_item(self, **kwargs: Any) -> Any:
        return self._write("update_item", kwargs["Key"][SORT_KEY], **kwargs)

    def delete_item(self, **kwargs: Any) -> Any:
        return self._write("delete_item", kwargs["Key"][SORT_KEY], **kwargs)


def _create(store: DynamoMetadataStore) -> None:
    store.create_batch(make_batch("batch_1", input_file_id="file-in"))


def _end(store: DynamoMetadataStore) -> None:
    store.update_batch(
        "proj-a", "batch_1", {"status": "expired", "event_pending": True}, expected_status={"validating"}
    )


def _revive(store: DynamoMetadataStore) -> None:
    store.update_batch("proj-a", "batch_1", {"status": "in_progress"}, expected_status={"expired"})


HOLD_STEPS = {  # each with what must have run before it, and its writes in order
    "create": ([], _create, [("put_item", "HOLD#batch_1"), ("put_item", "BATCH")]),
    "end": ([_create], _end, [("update_item", "BATCH"), ("delete_item", "HOLD#batch_1")]),
    "revive": ([_create, _end], _revive, [("put_item", "HOLD#batch_1"), ("update_item", "BATCH")]),
}


@pytest.mark.parametrize("crash_at", [0, 1])
@pytest.mark.parametrize("step", list(HOLD_STEPS))
def test_a_crash_between_a_batch_and_its_hold_never_leaves_a_running_batch_unheld_nor_an_ended_one_held(
    account: MotoAccount, step: str, crash_at: int
) -> None:
    """Two items, two writes: a crash after either must leave the holders as the batch says, i.e. the
    batch if it exists and has not ended, else none (a hold left behind is not counted)."""
    before, run, writes = HOLD_STEPS[step]
    store = DynamoMetadataStore(account.table())
    for setup in before:
        setup(store)
    recorder = CrashingTable(account.table())
    run(DynamoMetadataStore(recorder))  # the writes in order, no crash
    assert recorder.writes == writes
    account.table().delete_item(Key={PARTITION_KEY: "BATCH#batch_1", SORT_KEY: "BATCH"})
    account.table().delete_item(Key={PARTITION_KEY: "FILE#file-in", SORT_KEY: "HOLD#batch_1"})
    for setup in before:
        setup(store)

    crashing = CrashingTable(account.table(), crash_at=crash_at)
    with pytest.raises(RuntimeError, match="kill -9"):
        run(DynamoMetadataStore(crashing))

    batch = store.get_batch("proj-a", "batch_1")
    running = batch is not None and not batch.is_terminal
    assert store.input_holders("proj-a", "file-in") == (["batch_1"] if running else [])
    assert store.list_active_batches() == ([batch] if running else [])


def test_a_hold_left_by_a_crash_after_the_end_goes_with_the_announce(account: MotoAccount) -> None:
    store = DynamoMetadataStore(account.table())
    _create(store)
    with pytest.raises(RuntimeError):
        _end(DynamoMetadataStore(CrashingTable(account.table(), crash_at=1)))  # the hold's delete dies
    assert has_item(account, "FILE#file-in", "HOLD#batch_1")
    assert store.input_holders("proj-a", "file-in") == []  # left behind, not counted

    # the outbox: the end's event is announced, and the update clearing the mark deletes the hold
    store.update_batch("proj-a", "batch_1", {"event_pending": False}, expected_status={"expired"})
    assert not has_item(account, "FILE#file-in", "HOLD#batch_1")


def test_input_holders_reads_the_files_holds_and_their_batches_only(account: MotoAccount) -> None:
    """A key lookup: one Query of the file's own partition and a GetItem per hold of the project,
    however many batches run on other files, and no index."""
    store = DynamoMetadataStore(account.table())
    for i in range(30):
        store.create_batch(make_batch(f"batch_{i:02d}", input_file_id=f"file-{i % 10}"))
    store.create_batch(make_batch("batch_theirs", project_id="proj-b", input_file_id="file-3"))
    calls: list[tuple[str, str | None]] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        calls.append((model.name, params.get("IndexName")))

    store.table.meta.client.meta.events.register("before-call.dynamodb.*", record)
    assert store.input_holders("proj-a", "file-3") == ["batch_03", "batch_13", "batch_23"]
    assert calls == [("Query", None)] + [("GetItem", None)] * 3


def test_upload_part_counter_is_not_an_upload(account: MotoAccount) -> None:
    from batch_api.contract.models import UploadPartRecord, UploadRecord

    store = DynamoMetadataStore(account.table())
    store.add_upload_part(
        UploadPartRecord(id="part_1", upload_id="upload_1", created_at=NOW, bytes=1, blob_key="k")
    )
    assert store.get_upload("proj-a", "upload_1") is None
    upload = UploadRecord(
        id="upload_1",
        project_id="proj-a",
        bytes=1,
        created_at=NOW,
        expires_at=NOW + 60,
        filename="f",
        purpose="batch",
        mime_type="text/plain",
    )
    store.create_upload(upload)  # the counter item does not make the upload "exist"
    assert store.get_upload("proj-a", "upload_1") == upload
    assert [p.id for p in store.get_upload_parts("upload_1")] == ["part_1"]


def test_unexpected_dynamodb_errors_propagate(account: MotoAccount) -> None:
    missing = DynamoMetadataStore(
        shared_session().resource("dynamodb", region_name=REGION).Table("no-such-table")
    )
    with pytest.raises(ClientError) as caught:
        missing.create_file(make_file("file-1"))
    assert not isinstance(caught.value, AlreadyExists)
    assert caught.value.response["Error"]["Code"] == "ResourceNotFoundException"


# ---------------------------------------------------------------- S3 blobs


class CallCounter:
    def __init__(self, client: Any) -> None:
        self.calls: list[str] = []
        client.meta.events.register("before-call.s3.*", self._record)

    def _record(self, model: Any, **_: Any) -> None:
        self.calls.append(model.name)

    def count(self, name: str) -> int:
        return self.calls.count(name)


def test_large_stream_goes_up_as_multipart_while_it_streams(account: MotoAccount) -> None:
    client = account.client("s3")
    counter = CallCounter(client)
    store = S3BlobStore(client, BUCKET)
    parts_sent_before_the_end: list[int] = []

    def stream() -> Iterator[bytes]:
        for i in range(17):
            yield bytes([i]) * MiB
        parts_sent_before_the_end.append(counter.count("UploadPart"))
        yield b"tail"

    assert store.write_stream("files/big", stream()) == 17 * MiB + 4
    assert parts_sent_before_the_end == [2]  # parts left as the stream arrived: not buffered whole
    assert counter.count("UploadPart") == 3 and counter.count("PutObject") == 0
    assert store.get("files/big") == b"".join(bytes([i]) * MiB for i in range(17)) + b"tail"
    assert "Uploads" not in client.list_multipart_uploads(Bucket=BUCKET)


def test_small_stream_is_one_put(account: MotoAccount) -> None:
    client = account.client("s3")
    counter = CallCounter(client)
    S3BlobStore(client, BUCKET).write_stream("files/small", iter([b"a", b"b"]))
    assert counter.count("PutObject") == 1 and counter.count("CreateMultipartUpload") == 0


def test_failing_large_stream_aborts_the_multipart_upload(account: MotoAccount) -> None:
    client = account.client("s3")
    counter = CallCounter(client)
    store = S3BlobStore(client, BUCKET)
    store.put("files/kept", b"old")

    def stream() -> Iterator[bytes]:
        for _ in range(9):
            yield b"x" * MiB
        raise RuntimeError("source broke")

    for key in ("files/new", "files/kept"):
        with pytest.raises(RuntimeError):
            store.write_stream(key, stream())
    assert counter.count("UploadPart") == 2 and counter.count("AbortMultipartUpload") == 2
    assert not store.exists("files/new")
    assert store.get("files/kept") == b"old"
    assert "Uploads" not in client.list_multipart_uploads(Bucket=BUCKET)


def _parts(store: S3BlobStore, sizes: list[int]) -> tuple[list[tuple[str, int]], bytes]:
    """Upload parts of these sizes (each of its own byte) and what they make together."""
    sources = []
    for index, size in enumerate(sizes):
        key = f"uploads/u/parts/p{index}"
        store.put(key, bytes([65 + index]) * size)
        sources.append((key, size))
    return sources, b"".join(bytes([65 + index]) * size for index, size in enumerate(sizes))


def test_concatenate_copies_server_side_when_the_sources_can_be_parts(account: MotoAccount) -> None:
    client = account.client("s3")
    store = S3BlobStore(client, BUCKET)
    sources, expected = _parts(store, [5 * MiB, 5 * MiB, 100])
    counter = CallCounter(client)

    assert store.concatenate("files/f", sources) == 10 * MiB + 100

    assert counter.count("UploadPartCopy") == 3  # no byte of the sources through this process
    assert counter.count("GetObject") == 0 and counter.count("UploadPart") == 0
    assert store.get("files/f") == expected
    assert "Uploads" not in client.list_multipart_uploads(Bucket=BUCKET)


@pytest.mark.parametrize(
    ("sizes", "observed"),
    [
        ([5 * MiB, 5 * MiB, 100], True),  # could be copied, but the md5 needs the bytes
        ([3 * MiB] * 5, False),  # parts under S3's 5 MiB minimum: as they come through API Gateway
        ([5 * MiB, MiB, 5 * MiB], False),  # one small part in the middle
        ([MiB, 2 * MiB], False),  # all of it under one part: one PUT
    ],
)
def test_concatenate_reads_and_recuts_the_sources_when_it_must(
    account: MotoAccount, sizes: list[int], observed: bool
) -> None:
    client = account.client("s3")
    store = S3BlobStore(client, BUCKET)
    sources, expected = _parts(store, sizes)
    counter = CallCounter(client)
    seen = bytearray()

    size = store.concatenate("files/f", sources, on_bytes=seen.extend if observed else None)

    assert size == len(expected)
    assert counter.count("UploadPartCopy") == 0 and counter.count("GetObject") == len(sizes)
    if size < store.part_size:
        assert counter.count("PutObject") == 1 and counter.count("CreateMultipartUpload") == 0
    else:  # re-cut into part_size parts, the last one shorter
        assert counter.count("UploadPart") == math.ceil(size / store.part_size)
    assert store.get("files/f") == expected
    assert bytes(seen) == (expected if observed else b"")
    assert "Uploads" not in client.list_multipart_uploads(Bucket=BUCKET)


def test_concatenate_reads_and_writes_several_at_once(account: MotoAccount) -> None:
    """Each GET and each part upload waits until another is under way: done one at a time, they would
    wait forever (the barrier breaks after 10 s and the concatenation fails)."""
    client = account.client("s3")
    store = S3BlobStore(client, BUCKET, part_size=5 * MiB)
    sources, expected = _parts(store, [3 * MiB] * 6)  # 18 MiB: parts of 5, 5, 5 and 3 MiB
    together = {"GetObject": threading.Barrier(2, timeout=10), "UploadPart": threading.Barrier(2, timeout=10)}

    def wait_for_another(model: Any, **_: Any) -> None:
        if model.name in together:
            together[model.name].wait()

    client.meta.events.register("before-call.s3.*", wait_for_another, unique_id="together")
    try:
        assert store.concatenate("files/f", sources) == 18 * MiB
    finally:
        client.meta.events.unregister("before-call.s3.*", unique_id="together")
    assert store.get("files/f") == expected


@pytest.mark.parametrize("sizes", [[5 * MiB, 5 * MiB], [3 * MiB, 3 * MiB, 3 * MiB]])
def test_concatenate_with_a_source_gone_aborts_and_leaves_nothing(
    account: MotoAccount, sizes: list[int]
) -> None:
    client = account.client("s3")
    store = S3BlobStore(client, BUCKET)
    sources, _expected = _parts(store, sizes)
    store.delete(sources[-1][0])  # a concurrent complete or cancel dropped it

    with pytest.raises(KeyError):
        store.concatenate("files/f", sources)

    assert not store.exists("files/f")
    assert "Uploads" not in client.list_multipart_uploads(Bucket=BUCKET)


@pytest.mark.parametrize(
    ("seconds_left", "days"),
    [
        (-100, 1),
        (0, 1),
        (1, 1),
        (86400, 1),
        (86401, 2),
        (7 * 86400 + 5, 8),
        (30 * 86400, 30),
        (90 * 86400, 30),
    ],
)
def test_set_expiry_tags_whole_days_rounded_up_within_1_to_30(
    account: MotoAccount, seconds_left: int, days: int
) -> None:
    client = account.client("s3")
    store = S3BlobStore(client, BUCKET, clock=lambda: NOW + 0.5)
    store.put("files/f", b"x")
    store.set_expiry("files/f", NOW + seconds_left)
    tags = client.get_object_tagging(Bucket=BUCKET, Key="files/f")["TagSet"]
    assert tags == [{"Key": EXPIRE_DAYS_TAG, "Value": str(days)}]
    assert expire_days(NOW + seconds_left, NOW) == days


def test_set_expiry_on_a_missing_object_is_quiet(account: MotoAccount) -> None:
    """As the local stores: the hint has nothing to act on (a sweep may have deleted the object)."""
    store = S3BlobStore(account.client("s3"), BUCKET)
    store.set_expiry("files/none", NOW)
    assert not store.exists("files/none")
    with pytest.raises(ClientError):  # other errors still surface
        S3BlobStore(account.client("s3"), "no-such-bucket").set_expiry("files/none", NOW)


def test_clear_expiry_drops_the_tag_the_lifecycle_rules_filter_on(account: MotoAccount) -> None:
    client = account.client("s3")
    store = S3BlobStore(client, BUCKET, clock=lambda: NOW)
    store.put("files/f", b"x")
    store.set_expiry("files/f", NOW + 86400)
    store.clear_expiry("files/f")
    assert client.get_object_tagging(Bucket=BUCKET, Key="files/f")["TagSet"] == [
        {"Key": EXPIRE_DAYS_TAG, "Value": "held"}
    ]
    assert "held" not in {str(days) for days in range(1, 31)}  # the values the bucket's rules match
    assert store.get("files/f") == b"x"
    store.clear_expiry("files/none")  # a missing object: nothing to keep
    with pytest.raises(ClientError):  # other errors still surface
        S3BlobStore(client, "no-such-bucket").clear_expiry("files/f")


def test_delete_prefix_handles_more_than_one_delete_batch(
    account: MotoAccount, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(s3_adapter, "_DELETE_BATCH", 10)  # 1000 in production; fewer objects here
    client = account.client("s3")
    counter = CallCounter(client)
    store = S3BlobStore(client, BUCKET)
    for i in range(23):
        store.put(f"uploads/u1/parts/{i:04d}", b"")
    store.put("uploads/u2/parts/0", b"")
    store.delete_prefix("uploads/u1/")
    assert store.list_keys("uploads/") == ["uploads/u2/parts/0"]
    assert counter.count("DeleteObjects") == 3


def test_content_disposition_keeps_odd_names_safe() -> None:
    assert (
        content_disposition("out.jsonl") == "attachment; filename=\"out.jsonl\"; filename*=UTF-8''out.jsonl"
    )
    value = content_disposition('rés "q".jsonl')
    assert value.startswith('attachment; filename="r_s _q_.jsonl"; ')
    assert value.endswith("filename*=UTF-8''r%C3%A9s%20%22q%22.jsonl")


@pytest.fixture
def moto_server() -> Iterator[str]:
    server = AtomicMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_presigned_download_works_over_http(moto_server: str) -> None:
    """Read with one endpoint, presign with another (as clients would reach S3), then GET the URL."""

    def s3(endpoint: str) -> Any:
        return shared_session().client(
            "s3",
            region_name=REGION,
            endpoint_url=endpoint,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    public = moto_server.replace("127.0.0.1", "localhost")
    reader = s3(moto_server)
    reader.create_bucket(Bucket="presign-test")
    store = S3BlobStore(reader, "presign-test", presign_client=s3(public))
    store.put("files/file-1", b'{"ok": true}\n')

    url = store.download_url("files/file-1", filename="batch output.jsonl", expires_in=3600)
    assert url is not None and url.startswith(f"{public}/presign-test/files/file-1?")
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["3600"]
    with urllib.request.urlopen(url, timeout=10) as answer:
        assert answer.read() == b'{"ok": true}\n'
        assert answer.headers["Content-Disposition"] == content_disposition("batch output.jsonl")

    long = store.download_url("files/file-1", filename="a", expires_in=30 * 86400)
    assert long is not None and parse_qs(urlsplit(long).query)["X-Amz-Expires"] == ["604800"]  # SigV4 max


def test_links_are_signed_with_the_signer_roles_credentials_that_outlive_them(account: MotoAccount) -> None:
    from batch_api.adapters.aws.links import ASSUME_SECONDS, MARGIN_SECONDS, AssumedRoleSigner

    sts = account.client("sts")
    assumed: list[str] = []
    now = {"t": time.time()}

    def s3_with(credentials: dict[str, Any]) -> Any:
        assumed.append(credentials["AccessKeyId"])
        return shared_session().client(
            "s3",
            region_name=REGION,
            aws_access_key_id=credentials["AccessKeyId"],
            aws_secret_access_key=credentials["SecretAccessKey"],
            aws_session_token=credentials["SessionToken"],
            config=Config(signature_version="s3v4"),
        )

    role = "arn:aws:iam::123456789012:role/download-links"
    signer = AssumedRoleSigner(sts, role, s3_with, clock=lambda: now["t"])
    store = S3BlobStore(account.client("s3"), BUCKET, link_signer=signer)
    store.put("files/f", b"x")

    first = store.download_url("files/f", filename="f", expires_in=1800)
    assert first is not None and len(assumed) == 1
    expires = signer.expires_at  # as STS stated it
    assert expires > now["t"] + ASSUME_SECONDS - 60
    credential = parse_qs(urlsplit(first).query)["X-Amz-Credential"][0]
    assert credential.startswith(assumed[0] + "/")  # signed with the role's credentials
    assert parse_qs(urlsplit(first).query)["X-Amz-Expires"] == ["1800"]

    now["t"] = expires - 1800 - MARGIN_SECONDS  # still exactly long enough for a 30-minute link
    assert signer.expires_at == expires
    store.download_url("files/f", filename="f", expires_in=1800)
    assert len(assumed) == 1
    now["t"] += 1  # no longer: the role is assumed again for the next link
    store.download_url("files/f", filename="f", expires_in=1800)
    assert len(assumed) == 2


# ---------------------------------------------------------------- S3 journal


def test_journal_writes_one_segment_per_append(account: MotoAccount) -> None:
    client = account.client("s3")
    journal = S3Journal(client, BUCKET)
    journal.append("batch_1", 3, [b'{"a": 1}\n', b'{"a": "x\\r\\n"}\n'])
    journal.append("batch_1", 3, [b'{"a": "\r"}\n'])  # a raw CR inside a line is not a line break
    keys = S3BlobStore(client, BUCKET).list_keys("batches/batch_1/")
    assert len(keys) == 2 and all(k.startswith("batches/batch_1/journal/00003/") for k in keys)
    assert list(journal.read("batch_1", 3)) == [b'{"a": 1}\n', b'{"a": "x\\r\\n"}\n', b'{"a": "\r"}\n']


def test_journal_reads_many_segments_in_order(account: MotoAccount) -> None:
    journal = S3Journal(account.client("s3"), BUCKET, read_ahead=4)
    lines = [b'{"n": %d}\n' % i for i in range(40)]
    for line in lines:
        journal.append("batch_1", 0, [line])
    assert list(journal.read("batch_1", 0)) == lines


@pytest.mark.parametrize("batch_id", ["", "a/b", "..", "."])
def test_journal_rejects_batch_ids_that_would_change_the_key_layout(
    account: MotoAccount, batch_id: str
) -> None:
    journal = S3Journal(account.client("s3"), BUCKET)
    with pytest.raises(ValueError):
        journal.append(batch_id, 0, [b"{}\n"])


@pytest.mark.parametrize("bad", [b"no newline", b"two\nlines\n", b""])
def test_journal_rejects_lines_that_would_not_read_back_as_one(account: MotoAccount, bad: bytes) -> None:
    journal = S3Journal(account.client("s3"), BUCKET)
    with pytest.raises(ValueError):
        journal.append("batch_1", 0, [b"{}\n", bad])
    assert list(journal.read("batch_1", 0)) == []


# ---------------------------------------------------------------- Step Functions


def test_starting_a_batch_twice_is_harmless(account: MotoAccount) -> None:
    client = account.client("stepfunctions")
    arn = client.create_state_machine(
        name="batch-api-test",
        definition=json.dumps({"StartAt": "Wait", "States": {"Wait": {"Type": "Pass", "End": True}}}),
        roleArn="arn:aws:iam::123456789012:role/states",
    )["stateMachineArn"]
    workflow = StepFunctionsWorkflow(client, arn)

    workflow.start("proj-a", "batch_1")
    workflow.start("proj-a", "batch_1")  # same name and input: Step Functions returns the running one
    workflow.start("proj-b", "batch_1")  # same name, other input: ExecutionAlreadyExists, still fine

    [execution] = client.list_executions(stateMachineArn=arn)["executions"]
    assert execution["name"] == "batch_1"
    described = client.describe_execution(executionArn=execution["executionArn"])
    assert json.loads(described["input"]) == {"project_id": "proj-a", "batch_id": "batch_1"}


def test_other_step_functions_errors_propagate(account: MotoAccount) -> None:
    client = account.client("stepfunctions")
    workflow = StepFunctionsWorkflow(client, "arn:aws:states:us-east-1:123456789012:stateMachine:none")
    with pytest.raises(ClientError) as caught:
        workflow.start("proj-a", "batch_1")
    assert caught.value.response["Error"]["Code"] == "StateMachineDoesNotExist"


# ---------------------------------------------------------------- EventBridge


def test_terminal_event_reaches_an_sqs_target_through_a_rule(account: MotoAccount) -> None:
    events, sqs = account.client("events"), account.client("sqs")
    events.create_event_bus(Name="batch-api-dev")
    queue_url = sqs.create_queue(QueueName="batch-events")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    events.put_rule(
        Name="completed",
        EventBusName="batch-api-dev",
        EventPattern=json.dumps({"source": ["batch-api"], "detail-type": ["batch.completed"]}),
    )
    events.put_targets(
        Rule="completed", EventBusName="batch-api-dev", Targets=[{"Id": "q", "Arn": queue_arn}]
    )

    sink = EventBridgeSink(events, "batch-api-dev")
    batch = make_batch("batch_1", status="completed", completed_at=NOW)
    sink.publish("batch.failed", make_batch("batch_2", status="failed").event_detail())
    sink.publish("batch.completed", batch.event_detail())

    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0)["Messages"]
    assert len(messages) == 1  # the rule matched the completed event only
    event = json.loads(messages[0]["Body"])
    assert (event["source"], event["detail-type"]) == ("batch-api", "batch.completed")
    assert event["detail"] == batch.event_detail()


def test_a_rejected_entry_raises(account: MotoAccount) -> None:
    client = account.client("events")
    sink = EventBridgeSink(client, "bus", source="batch-api-test")
    with Stubber(client) as stub:
        stub.add_response(
            "put_events",
            {
                "FailedEntryCount": 1,
                "Entries": [{"ErrorCode": "InternalFailure", "ErrorMessage": "try again"}],
            },
            {
                "Entries": [
                    {
                        "Source": "batch-api-test",
                        "DetailType": "batch.expired",
                        "Detail": '{"id":"batch_1"}',
                        "EventBusName": "bus",
                    }
                ]
            },
        )
        with pytest.raises(EventPublishFailed, match="InternalFailure"):
            sink.publish("batch.expired", {"id": "batch_1"})
        stub.assert_no_pending_responses()


def test_a_failed_batch_with_the_most_validation_errors_fits_in_one_item(account: MotoAccount) -> None:
    """Batch.errors lives on the batch item: at the cap, with messages at their longest, it must stay
    under DynamoDB's 400 KB item limit (moto enforces it, like DynamoDB)."""
    from batch_api.config import Settings
    from batch_api.contract.models import BatchErrorEntry

    store = DynamoMetadataStore(account.table())
    store.create_batch(make_batch("batch_many_errors"))
    cap = Settings().max_batch_errors
    longest = (
        "Line 49999 uses model '"
        + "m" * 76
        + "...', but line 1 uses '"
        + "n" * 76
        + "...'; a batch file must use one model."
    )
    errors = [
        BatchErrorEntry(code="mismatched_model", message=longest, param="body.model", line=49_999)
    ] * cap

    failed = store.update_batch(
        "proj-a",
        "batch_many_errors",
        {"status": "failed", "failed_at": NOW, "errors": errors},
        expected_status={"validating"},
    )

    assert failed.status == "failed" and len(failed.errors) == cap
    assert store.get_batch("proj-a", "batch_many_errors").errors[-1].message == longest  # type: ignore[union-attr]
