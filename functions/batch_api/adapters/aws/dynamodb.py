"""MetadataStore on one DynamoDB table (key schema in `schema.py`, shared with the CDK stack).

Items (record fields are stored as native attributes beside the keys):

    file            pk FILE#{id}             sk FILE      gsi1 {project}#FILE / {created_at:012d}#{id}
                                                          gsi2 EXPIRES#{shard} / {expires_at:012d}#{id}
                                                               (live, with expiry)
    upload          pk UPLOAD#{id}           sk UPLOAD    gsi2 UPLOAD_EXPIRES#{shard} / {expires_at:012d}#{id}
                                                               (pending)
    upload part     pk UPLOAD#{id}           sk PART#{seq:010d}#{part_id}   (seq: arrival order)
    part counter    pk UPLOAD#{id}           sk PARTSEQ                     (atomic ADD hands out seq)
    batch           pk BATCH#{id}            sk BATCH     gsi1 {project}#BATCH / {created_at:012d}#{id}
                                                          gsi2 ACTIVE#{shard} / {created_at:012d}#{id}
                                                               (non-terminal, or terminal with its event pending)
    chunk progress  pk BATCH#{id}            sk CHUNK#{index:05d}           (PutItem overwrite)
    input hold      pk FILE#{file_id}        sk HOLD#{batch_id}             project_id, batch_id, ttl (batch expiry + 7 d)
    idempotency     pk IDEMP#{project}       sk KEY#{key}                   ttl created_at + 24 h (DynamoDB TTL)
    capacity lease  pk LEASES#{upstream}     sk VERSION | LEASE#{holder} | WAIT#{batch}  (adapters/aws/leases.py)

GSI2 partitions are sharded, so no one partition key takes every write of a kind (DynamoDB serves one
partition key from one partition, about 1,000 writes a second, and an index that cannot keep up throttles
the table's writes): {shard} is `shard_of(id)`, the CRC-32 of the item's id modulo `STATE_SHARDS` (16),
two digits. Every reader of those partitions queries all shards, each paging on its own, and merges
them in gsi2sk order, the order one partition gave. (Pre-release: no deployed table holds items under
the old unsharded keys ACTIVE, EXPIRES and UPLOAD_EXPIRES, so nothing migrates them.)

"Does a running batch read this file?" is one strongly consistent Query of the file's HOLD# items (a
few at most) and a GetItem of each one's batch, never a read of every active batch. (Base-table reads:
a lagging GSI could show two batches ending together each other's hold, and neither would drop the
body.) A plain write changes one item (a transaction returns no record and collides with a concurrent
cancel's update), so the hold is written around the batch's own writes in the order that a crash
cannot turn into harm: put before the batch item is created (a batch is never running without
it), deleted after the update that ends the batch. A crash between the two leaves a hold whose batch
is absent or ended, so the batch item decides: a hold counts only while its batch exists in the
hold's project, reads that file and has not ended. A hold left behind therefore never keeps a body.
Every update that leaves a batch ended deletes its hold, and the outbox makes one more follow the end
(`event_pending` cleared), so only a crash between a hold and its batch's creation leaves a small item
behind, which DynamoDB's TTL removes a week after the batch would have expired.

An upload keeps its gsi2sk whatever its status; only gsi2pk comes and goes (a GSI holds an item only
when both its keys are present), so the sort key is always at hand should an upload become pending
again. DynamoDB deletes idempotency items some time after their `ttl` (up to days later), so a claim
treats an item past its ttl as absent.

Native attributes (not one JSON blob) let a status transition be one conditional UpdateItem that
SETs only the changed fields: atomic, no read-modify-write race between two writers. Base-table
reads are strongly consistent; GSI queries (listings, the expiry sweep, resume) are eventually
consistent, as GSIs always are, so a record written a moment ago may be missing from a listing.
"""

from __future__ import annotations

import heapq
import zlib
from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from functools import cache
from typing import Any, TypeVar

from boto3.dynamodb.conditions import Attr, Key
from botocore.exceptions import ClientError
from pydantic import BaseModel, TypeAdapter

from batch_api.adapters.aws.schema import (
    GSI1_NAME,
    GSI1_PARTITION_KEY,
    GSI1_SORT_KEY,
    GSI2_NAME,
    GSI2_PARTITION_KEY,
    GSI2_SORT_KEY,
    PARTITION_KEY,
    SORT_KEY,
    TTL_ATTRIBUTE,
)
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

RecordT = TypeVar("RecordT", bound=BaseModel)

EXPIRES_PARTITION = "EXPIRES"
ACTIVE_PARTITION = "ACTIVE"
UPLOAD_EXPIRES_PARTITION = "UPLOAD_EXPIRES"
# Shards of each GSI2 partition (module docstring). Fixed: readers of another count would miss items
# already written. 16 keys may sit on 16 partitions, 16x one key's write rate, while a reader's fan-out
# stays 16 small Queries.
STATE_SHARDS = 16
# A hold's TTL: this long after its batch's own expiry, when the batch has ended for days (an expiring
# batch ends within minutes); only a hold a crash left behind is still there to be removed. Readers
# never look at it: the batch item decides whether a hold counts.
HOLD_TTL_AFTER_BATCH_EXPIRY = 7 * 86400
_CLAIM_ATTEMPTS = 5  # a claim re-tries only when the item it lost to vanished (TTL) before it could read it
_CONDITION_FAILED = "ConditionalCheckFailedException"


def _is_condition_failure(exc: ClientError) -> bool:
    return exc.response.get("Error", {}).get("Code") == _CONDITION_FAILED


def _plain(value: Any) -> Any:
    """DynamoDB numbers come back as Decimal; our records hold only ints (no floats are stored)."""
    if isinstance(value, Decimal):
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _record(model: type[RecordT], item: Mapping[str, Any]) -> RecordT:
    """The record an item holds (key attributes and bookkeeping dropped)."""
    return model.model_validate({k: _plain(v) for k, v in item.items() if k in model.model_fields})


def _attributes(record: BaseModel) -> dict[str, Any]:
    return record.model_dump(mode="python")


@cache
def _field_adapter(model: type[BaseModel], name: str) -> TypeAdapter[Any]:
    annotation = model.model_fields[name].annotation
    return TypeAdapter(annotation if annotation is not None else Any)


def _validated_changes(model: type[BaseModel], changes: Mapping[str, Any]) -> dict[str, Any]:
    """Each change checked against its field's type and dumped to plain values; unknown fields and bad
    values raise (pydantic ValidationError, a ValueError), as applying them to the record would."""
    result: dict[str, Any] = {}
    for name, value in changes.items():
        if name not in model.model_fields:
            raise ValueError(f"{model.__name__} has no field {name!r}")
        raw = value.model_dump() if isinstance(value, BaseModel) else value
        adapter = _field_adapter(model, name)
        result[name] = adapter.dump_python(adapter.validate_python(raw), mode="python")
    return result


def shard_of(record_id: str) -> int:
    """The GSI2 shard of an item: stable across processes and releases (not `hash()`, which is salted
    per process) and spread evenly over `STATE_SHARDS`."""
    return zlib.crc32(record_id.encode()) % STATE_SHARDS


def shard_partition(partition: str, shard: int) -> str:
    """The GSI2 partition key of one shard of `partition` (e.g. ACTIVE#07)."""
    return f"{partition}#{shard:02d}"


def sharded(partition: str, record_id: str) -> str:
    """The GSI2 partition key `record_id` goes to on `partition`."""
    return shard_partition(partition, shard_of(record_id))


def _sort_key(created_at: int, record_id: str) -> str:
    # fixed width: string order == (created_at, id) order
    return f"{created_at:012d}#{record_id}"


def _file_pk(file_id: str) -> str:
    return f"FILE#{file_id}"


def _upload_pk(upload_id: str) -> str:
    return f"UPLOAD#{upload_id}"


def _batch_pk(batch_id: str) -> str:
    return f"BATCH#{batch_id}"


def _hold_key(file_id: str, batch_id: str) -> dict[str, str]:
    return {PARTITION_KEY: _file_pk(file_id), SORT_KEY: f"HOLD#{batch_id}"}


class DynamoMetadataStore:
    """ports.MetadataStore on a DynamoDB table; behaves as `MemoryMetadataStore` (the contract suite checks it).

    `table` is a boto3 `Table` resource (`session.resource("dynamodb").Table(name)`). `page_size` bounds
    each Query page of the filtered listings (DynamoDB applies Limit before filters, so they page on)
    and of each GSI2 shard.
    """

    def __init__(self, table: Any, *, page_size: int = 1000) -> None:
        self.table = table
        self.page_size = page_size

    # ------------------------------------------------------------ helpers

    def _put_new(self, item: dict[str, Any], record_id: str) -> None:
        try:
            self.table.put_item(Item=item, ConditionExpression=Attr(PARTITION_KEY).not_exists())
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise AlreadyExists(record_id) from exc
            raise

    def _get(self, pk: str, sk: str) -> dict[str, Any] | None:
        item: dict[str, Any] | None = self.table.get_item(
            Key={PARTITION_KEY: pk, SORT_KEY: sk}, ConsistentRead=True
        ).get("Item")
        return item

    def _get_scoped(self, pk: str, sk: str, project_id: str) -> dict[str, Any] | None:
        item = self._get(pk, sk)
        return item if item is not None and item.get("project_id") == project_id else None

    def _query(self, *, limit: int | None = None, **kwargs: Any) -> Iterator[dict[str, Any]]:
        """Every item a Query matches, following LastEvaluatedKey page by page."""
        if limit is not None:
            kwargs["Limit"] = limit
        while True:
            page = self.table.query(**kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _on_shards(
        self, partition: str, *, below: str | None = None, wanted: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Every item on the GSI2 shards of `partition` (with gsi2sk < `below`) in gsi2sk order, as one
        partition gave them. Each shard's Query pages on its own and is read only as far as the merge
        needs; with `wanted` (the caller stops after about that many) a page holds twice a shard's even
        share of it, at most `page_size`. Shards are queried one after another: few, and the table
        resource is not thread-safe."""
        page = self.page_size if wanted is None else min(self.page_size, 2 * -(-wanted // STATE_SHARDS))
        shards = []
        for shard in range(STATE_SHARDS):
            key = Key(GSI2_PARTITION_KEY).eq(shard_partition(partition, shard))
            if below is not None:
                key = key & Key(GSI2_SORT_KEY).lt(below)
            shards.append(self._query(IndexName=GSI2_NAME, KeyConditionExpression=key, limit=page))
        return heapq.merge(*shards, key=lambda item: str(item[GSI2_SORT_KEY]))

    def _conditional_update(
        self,
        model: type[RecordT],
        pk: str,
        sk: str,
        project_id: str,
        record_id: str,
        changes: Mapping[str, Any],
        expected_status: Iterable[str],
        *,
        set_extra: Mapping[str, Any] | None = None,
        remove: Iterable[str] = (),
        copy: Mapping[str, str] | None = None,
    ) -> RecordT:
        """One UpdateItem: SET the changed fields if the item exists in the project with an expected
        status; `ConditionFailed` otherwise. Returns the record as stored after the update."""
        values = _validated_changes(model, changes)
        names: dict[str, str] = {"#pk": PARTITION_KEY, "#project": "project_id", "#status": "status"}
        expression_values: dict[str, Any] = {":project": project_id}
        assignments: list[str] = []
        for i, (name, value) in enumerate({**values, **(set_extra or {})}.items()):
            names[f"#f{i}"] = name
            expression_values[f":v{i}"] = value
            assignments.append(f"#f{i} = :v{i}")
        for i, (target, source) in enumerate((copy or {}).items()):
            names[f"#c{i}"] = target
            names[f"#s{i}"] = source
            assignments.append(f"#c{i} = #s{i}")
        statuses = sorted(set(expected_status))
        if not statuses:
            raise ConditionFailed(record_id)
        status_placeholders = []
        for i, status in enumerate(statuses):
            expression_values[f":s{i}"] = status
            status_placeholders.append(f":s{i}")
        removals = []
        for i, name in enumerate(remove):
            names[f"#r{i}"] = name
            removals.append(f"#r{i}")
        update = ""
        if assignments:
            update += "SET " + ", ".join(assignments)
        if removals:
            update += " REMOVE " + ", ".join(removals)
        condition = (
            f"attribute_exists(#pk) AND #project = :project AND #status IN ({', '.join(status_placeholders)})"
        )
        kwargs: dict[str, Any] = {
            "Key": {PARTITION_KEY: pk, SORT_KEY: sk},
            "ConditionExpression": condition,
            "ExpressionAttributeNames": names,
            "ExpressionAttributeValues": expression_values,
            "ReturnValues": "ALL_NEW",
        }
        if not update:
            # nothing to change: still check the condition, and return the record
            names["#any"] = "status"
            kwargs["UpdateExpression"] = "SET #any = #any"
        else:
            kwargs["UpdateExpression"] = update.strip()
        try:
            response = self.table.update_item(**kwargs)
        except ClientError as exc:
            if _is_condition_failure(exc):
                raise ConditionFailed(record_id) from exc
            raise
        return _record(model, response["Attributes"])

    # ------------------------------------------------------------ files

    def create_file(self, record: FileRecord) -> None:
        item = {
            **_attributes(record),
            PARTITION_KEY: _file_pk(record.id),
            SORT_KEY: "FILE",
            GSI1_PARTITION_KEY: f"{record.project_id}#FILE",
            GSI1_SORT_KEY: _sort_key(record.created_at, record.id),
        }
        if not record.deleted and record.expires_at is not None:
            item[GSI2_PARTITION_KEY] = sharded(EXPIRES_PARTITION, record.id)
            item[GSI2_SORT_KEY] = _sort_key(record.expires_at, record.id)
        self._put_new(item, record.id)

    def get_file(self, project_id: str, file_id: str) -> FileRecord | None:
        item = self._get_scoped(_file_pk(file_id), "FILE", project_id)
        return _record(FileRecord, item) if item is not None else None

    def list_files(
        self, project_id: str, *, purpose: str | None, order: str, after: str | None, limit: int, now: int
    ) -> list[FileRecord]:
        if limit <= 0:
            return []

        def listed(record: FileRecord) -> bool:
            return record.is_live(now) and (purpose is None or record.purpose == purpose)

        descending = order == "desc"
        key = Key(GSI1_PARTITION_KEY).eq(f"{project_id}#FILE")
        if after is not None:
            # The cursor must itself be in the listing (same filter); otherwise nothing follows it.
            cursor = self.get_file(project_id, after)
            if cursor is None or not listed(cursor):
                return []
            bound = _sort_key(cursor.created_at, cursor.id)
            key = key & (Key(GSI1_SORT_KEY).lt(bound) if descending else Key(GSI1_SORT_KEY).gt(bound))
        no_expiry = Attr("expires_at").not_exists() | Attr("expires_at").attribute_type("NULL")
        live = Attr("deleted").eq(False) & (no_expiry | Attr("expires_at").gt(now))
        if purpose is not None:
            live = live & Attr("purpose").eq(purpose)
        records: list[FileRecord] = []
        for item in self._query(
            IndexName=GSI1_NAME,
            KeyConditionExpression=key,
            FilterExpression=live,
            ScanIndexForward=not descending,
            limit=min(self.page_size, limit),
        ):
            record = _record(FileRecord, item)
            if listed(record):  # the filter already did this; kept as the one definition of "listed"
                records.append(record)
                if len(records) >= limit:
                    break
        return records

    def mark_file_deleted(self, project_id: str, file_id: str) -> bool:
        try:
            self.table.update_item(
                Key={PARTITION_KEY: _file_pk(file_id), SORT_KEY: "FILE"},
                UpdateExpression="SET deleted = :true REMOVE #g2pk, #g2sk",
                ConditionExpression="attribute_exists(#pk) AND project_id = :project AND deleted = :false",
                ExpressionAttributeNames={
                    "#pk": PARTITION_KEY,
                    "#g2pk": GSI2_PARTITION_KEY,
                    "#g2sk": GSI2_SORT_KEY,
                },
                ExpressionAttributeValues={":true": True, ":false": False, ":project": project_id},
            )
        except ClientError as exc:
            if _is_condition_failure(exc):
                return False
            raise
        return True

    def list_expired_files(self, now: int, limit: int) -> list[FileRecord]:
        if limit <= 0:
            return []
        records: list[FileRecord] = []
        # gsi2sk is "{expires_at:012d}#{id}": below "{now+1:012d}" means expires_at <= now
        for item in self._on_shards(EXPIRES_PARTITION, below=f"{now + 1:012d}", wanted=limit):
            record = _record(FileRecord, item)
            if not record.deleted:  # a GSI can lag the base table by a moment
                records.append(record)
                if len(records) >= limit:
                    break
        return records

    # ------------------------------------------------------------ uploads

    def create_upload(self, record: UploadRecord) -> None:
        item = {
            **_attributes(record),
            PARTITION_KEY: _upload_pk(record.id),
            SORT_KEY: "UPLOAD",
            GSI2_SORT_KEY: _sort_key(record.expires_at, record.id),
        }
        if record.status == "pending":
            item[GSI2_PARTITION_KEY] = sharded(UPLOAD_EXPIRES_PARTITION, record.id)
        self._put_new(item, record.id)

    def get_upload(self, project_id: str, upload_id: str) -> UploadRecord | None:
        item = self._get_scoped(_upload_pk(upload_id), "UPLOAD", project_id)
        return _record(UploadRecord, item) if item is not None else None

    def update_upload(
        self, project_id: str, upload_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> UploadRecord:
        set_extra: dict[str, Any] = {}
        remove: list[str] = []
        if "expires_at" in changes:
            expires_at = _validated_changes(UploadRecord, {"expires_at": changes["expires_at"]})["expires_at"]
            set_extra[GSI2_SORT_KEY] = _sort_key(expires_at, upload_id)
        new_status = changes.get("status")
        if new_status == "pending":
            set_extra[GSI2_PARTITION_KEY] = sharded(UPLOAD_EXPIRES_PARTITION, upload_id)
        elif new_status is not None:
            remove = [GSI2_PARTITION_KEY]  # off the expiry index; gsi2sk stays (see the module docstring)
        return self._conditional_update(
            UploadRecord,
            _upload_pk(upload_id),
            "UPLOAD",
            project_id,
            upload_id,
            changes,
            expected_status,
            set_extra=set_extra,
            remove=remove,
        )

    def add_upload_part(self, part: UploadPartRecord) -> None:
        # An atomic counter gives parts their arrival order, even across concurrent Lambdas.
        counter = self.table.update_item(
            Key={PARTITION_KEY: _upload_pk(part.upload_id), SORT_KEY: "PARTSEQ"},
            UpdateExpression="ADD seq :one",
            ExpressionAttributeValues={":one": 1},
            ReturnValues="UPDATED_NEW",
        )
        seq = int(counter["Attributes"]["seq"])
        self.table.put_item(
            Item={
                **_attributes(part),
                PARTITION_KEY: _upload_pk(part.upload_id),
                SORT_KEY: f"PART#{seq:010d}#{part.id}",
            }
        )

    def get_upload_parts(self, upload_id: str) -> list[UploadPartRecord]:
        return [
            _record(UploadPartRecord, item)
            for item in self._query(
                KeyConditionExpression=Key(PARTITION_KEY).eq(_upload_pk(upload_id))
                & Key(SORT_KEY).begins_with("PART#"),
                ConsistentRead=True,
            )
        ]

    def list_expired_uploads(self, now: int, limit: int) -> list[UploadRecord]:
        if limit <= 0:
            return []
        records: list[UploadRecord] = []
        # gsi2sk is "{expires_at:012d}#{id}": below "{now+1:012d}" means expires_at <= now
        for item in self._on_shards(UPLOAD_EXPIRES_PARTITION, below=f"{now + 1:012d}", wanted=limit):
            record = _record(UploadRecord, item)
            if record.status == "pending":  # a GSI can lag the base table by a moment
                records.append(record)
                if len(records) >= limit:
                    break
        return records

    # ------------------------------------------------------------ batches

    def create_batch(self, record: BatchRecord) -> None:
        sort_key = _sort_key(record.created_at, record.id)
        item = {
            **_attributes(record),
            PARTITION_KEY: _batch_pk(record.id),
            SORT_KEY: "BATCH",
            GSI1_PARTITION_KEY: f"{record.project_id}#BATCH",
            GSI1_SORT_KEY: sort_key,
        }
        if record.status not in TERMINAL_STATUSES:
            item[GSI2_PARTITION_KEY] = sharded(ACTIVE_PARTITION, record.id)
            item[GSI2_SORT_KEY] = sort_key
            # the hold first: a crash before the batch is written leaves a hold no reader counts
            self._put_hold(record.project_id, record.input_file_id, record.id, record.expires_at)
        self._put_new(item, record.id)

    def _put_hold(self, project_id: str, file_id: str, batch_id: str, expires_at: int | None) -> None:
        item: dict[str, Any] = {
            **_hold_key(file_id, batch_id),
            "project_id": project_id,
            "batch_id": batch_id,
        }
        if expires_at is not None:  # DynamoDB removes a hold a crash left behind, long after its batch
            item[TTL_ATTRIBUTE] = expires_at + HOLD_TTL_AFTER_BATCH_EXPIRY
        self.table.put_item(Item=item)

    def get_batch(self, project_id: str, batch_id: str) -> BatchRecord | None:
        item = self._get_scoped(_batch_pk(batch_id), "BATCH", project_id)
        return _record(BatchRecord, item) if item is not None else None

    def list_batches(self, project_id: str, *, after: str | None, limit: int) -> list[BatchRecord]:
        if limit <= 0:
            return []
        key = Key(GSI1_PARTITION_KEY).eq(f"{project_id}#BATCH")
        if after is not None:
            cursor = self.get_batch(project_id, after)
            if cursor is None:
                return []
            key = key & Key(GSI1_SORT_KEY).lt(_sort_key(cursor.created_at, cursor.id))
        records: list[BatchRecord] = []
        for item in self._query(
            IndexName=GSI1_NAME, KeyConditionExpression=key, ScanIndexForward=False, limit=limit
        ):
            records.append(_record(BatchRecord, item))
            if len(records) >= limit:
                break
        return records

    def update_batch(
        self, project_id: str, batch_id: str, changes: Mapping[str, Any], *, expected_status: Iterable[str]
    ) -> BatchRecord:
        set_extra: dict[str, Any] = {}
        remove: list[str] = []
        copy: dict[str, str] = {}
        expected = set(expected_status)
        # On the ACTIVE index: every batch that is not terminal, and a terminal one until its event is
        # published (`event_pending`, only ever set with the terminal status and cleared after it).
        new_status = changes.get("status")
        pending = changes.get("event_pending")
        if (new_status in TERMINAL_STATUSES and not pending) or (new_status is None and pending is False):
            remove = [GSI2_PARTITION_KEY, GSI2_SORT_KEY]
        elif new_status is not None:
            set_extra[GSI2_PARTITION_KEY] = sharded(ACTIVE_PARTITION, batch_id)
            copy[GSI2_SORT_KEY] = GSI1_SORT_KEY  # the same "{created_at:012d}#{id}"
        if new_status is not None and new_status not in TERMINAL_STATUSES and expected & TERMINAL_STATUSES:
            # an ended batch running again (no code path does this yet) holds its input before it runs
            current = self.get_batch(project_id, batch_id)
            if current is None:
                raise ConditionFailed(batch_id)
            self._put_hold(project_id, current.input_file_id, batch_id, current.expires_at)
        updated = self._conditional_update(
            BatchRecord,
            _batch_pk(batch_id),
            "BATCH",
            project_id,
            batch_id,
            changes,
            expected,
            set_extra=set_extra,
            remove=remove,
            copy=copy,
        )
        if updated.status in TERMINAL_STATUSES:
            # After the end is stored. A crash before this leaves a hold of an ended batch, not counted,
            # and the update that clears `event_pending` (the outbox sees to it) deletes it again.
            self.table.delete_item(Key=_hold_key(updated.input_file_id, batch_id))
        return updated

    def input_holders(self, project_id: str, file_id: str) -> list[str]:
        holds = self._query(
            KeyConditionExpression=Key(PARTITION_KEY).eq(_file_pk(file_id))
            & Key(SORT_KEY).begins_with("HOLD#"),
            ConsistentRead=True,
        )
        holders = []
        for hold in holds:
            if hold.get("project_id") != project_id:
                continue
            batch = self.table.get_item(
                Key={PARTITION_KEY: _batch_pk(str(hold["batch_id"])), SORT_KEY: "BATCH"},
                ConsistentRead=True,
                ProjectionExpression="project_id, input_file_id, #status",
                ExpressionAttributeNames={"#status": "status"},
            ).get("Item")
            # the batch decides (module docstring): a crash can leave a hold of an absent or ended batch
            if (
                batch is not None
                and batch.get("project_id") == project_id
                and batch.get("input_file_id") == file_id
                and batch.get("status") not in TERMINAL_STATUSES
            ):
                holders.append(str(hold["batch_id"]))
        return holders

    def list_active_batches(self) -> list[BatchRecord]:
        return [r for r in self._on_active_index() if r.status not in TERMINAL_STATUSES]

    def list_unannounced_batches(self) -> list[BatchRecord]:
        # a GSI can lag a moment: the record on it says whether the event is still pending
        return [r for r in self._on_active_index() if r.status in TERMINAL_STATUSES and r.event_pending]

    def _on_active_index(self) -> list[BatchRecord]:
        return [_record(BatchRecord, item) for item in self._on_shards(ACTIVE_PARTITION)]

    def put_chunk_progress(self, batch_id: str, progress: ChunkProgress) -> None:
        self.table.put_item(
            Item={
                **_attributes(progress),
                PARTITION_KEY: _batch_pk(batch_id),
                SORT_KEY: f"CHUNK#{progress.index:05d}",
            }
        )

    def list_chunk_progress(self, batch_id: str) -> list[ChunkProgress]:
        items = self._query(
            KeyConditionExpression=Key(PARTITION_KEY).eq(_batch_pk(batch_id))
            & Key(SORT_KEY).begins_with("CHUNK#"),
            ConsistentRead=True,
        )
        return sorted((_record(ChunkProgress, item) for item in items), key=lambda p: p.index)

    def delete_chunk_progress(self, batch_id: str) -> None:
        keys = self._query(
            KeyConditionExpression=Key(PARTITION_KEY).eq(_batch_pk(batch_id))
            & Key(SORT_KEY).begins_with("CHUNK#"),
            ProjectionExpression="#pk, #sk",
            ExpressionAttributeNames={"#pk": PARTITION_KEY, "#sk": SORT_KEY},
            ConsistentRead=True,
        )
        with self.table.batch_writer() as batch:
            for item in keys:
                batch.delete_item(Key={PARTITION_KEY: item[PARTITION_KEY], SORT_KEY: item[SORT_KEY]})

    # ------------------------------------------------------------ idempotency keys

    def claim_idempotency_key(self, project_id: str, key: str, resource_id: str, created_at: int) -> str:
        pk, sk = f"IDEMP#{project_id}", f"KEY#{key}"
        expires_at = created_at + IDEMPOTENCY_KEY_TTL
        for _ in range(_CLAIM_ATTEMPTS):
            try:
                # absent, or expired by now though TTL has not deleted it yet: the claim takes the key
                self.table.put_item(
                    Item={
                        PARTITION_KEY: pk,
                        SORT_KEY: sk,
                        "project_id": project_id,
                        "resource_id": resource_id,
                        "created_at": created_at,
                        TTL_ATTRIBUTE: expires_at,
                    },
                    ConditionExpression="attribute_not_exists(#pk) OR #ttl <= :now"
                    # written before keys expired: it has no ttl, so its age decides
                    " OR (attribute_not_exists(#ttl) AND created_at <= :created_before)",
                    ExpressionAttributeNames={"#pk": PARTITION_KEY, "#ttl": TTL_ATTRIBUTE},
                    ExpressionAttributeValues={
                        ":now": created_at,
                        ":created_before": created_at - IDEMPOTENCY_KEY_TTL,
                    },
                )
            except ClientError as exc:
                if not _is_condition_failure(exc):
                    raise
                stored = self._get(pk, sk)
                if stored is None:  # TTL deleted it between our put and our read: claim again
                    continue
                return str(stored["resource_id"])
            return resource_id
        raise ConditionFailed(key)

    def purge_expired_idempotency_keys(self, now: int) -> int:
        """DynamoDB TTL deletes expired key items (`TTL_ATTRIBUTE`); claims treat them as absent till then."""
        return 0
