"""`ports.CapacityLeases` on the DynamoDB table: upstream capacity shared by every chunk worker.

Items, under one partition per upstream:

    version   pk LEASES#{upstream}   sk VERSION              version (bumped by every grant)
    lease     pk LEASES#{upstream}   sk LEASE#{holder}       batch_id, slots, expires_at, ttl
    waiting   pk LEASES#{upstream}   sk WAIT#{batch_id}      until, ttl

A grant reads the partition (strongly consistent), decides with `upstreams.leases.grant`, and writes
its lease in one transaction with the version bump, conditional on the version it read: two workers
that decided from the same state cannot both commit, the loser reads again. Releases and renewals
only shrink or keep what is held, so they need no version. A lease past `expires_at` counts for
nothing (a dead worker's slots come back then); DynamoDB TTL deletes it later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from decimal import Decimal
from typing import Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from batch_api.adapters.aws.schema import PARTITION_KEY, SORT_KEY, TTL_ATTRIBUTE
from batch_api.ports import Grant
from batch_api.upstreams.leases import LEASE_SECONDS, WAITING_SECONDS, Lease, grant

GRANT_ATTEMPTS = 20  # each lost race means another worker just took slots: read again
TTL_SLACK_SECONDS = 3600  # items stay readable this long after they stop counting


def _pk(upstream: str) -> str:
    return f"LEASES#{upstream}"


class DynamoCapacityLeases:
    def __init__(self, table: Any, clock: Callable[[], float] = time.time) -> None:
        self.table = table
        self.clock = clock

    def acquire(self, upstream: str, holder: str, batch_id: str, want: int, limit: int) -> Grant:
        held, others_waiting = 0, 0
        for _ in range(GRANT_ATTEMPTS):
            now = self.clock()
            version, leases, waiting = self._read(upstream, now)
            others = [lease for lease in leases if lease.holder != holder]
            held = sum(lease.slots for lease in others)
            others_waiting = len([b for b in waiting if b != batch_id])
            slots = grant(want, limit, batch_id, others, [b for b in waiting if b != batch_id])
            if slots == 0:
                self._wait(upstream, holder, batch_id, now)
                return Grant(0, held, others_waiting + 1)
            if self._commit(upstream, holder, batch_id, slots, now, version):
                return Grant(slots, held + slots, others_waiting)
        # the table is too busy to decide: wait like a worker that got nothing
        return Grant(0, held, others_waiting + 1)

    def renew(self, upstream: str, holder: str) -> None:
        expires_at = self.clock() + LEASE_SECONDS
        try:
            self.table.update_item(
                Key={PARTITION_KEY: _pk(upstream), SORT_KEY: f"LEASE#{holder}"},
                UpdateExpression="SET expires_at = :e, #ttl = :t",
                ConditionExpression="attribute_exists(#pk)",
                ExpressionAttributeNames={"#ttl": TTL_ATTRIBUTE, "#pk": PARTITION_KEY},
                ExpressionAttributeValues={
                    ":e": _number(expires_at),
                    ":t": int(expires_at) + TTL_SLACK_SECONDS,
                },
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise  # released meanwhile: nothing to renew

    def release(self, upstream: str, holder: str) -> None:
        self.table.delete_item(Key={PARTITION_KEY: _pk(upstream), SORT_KEY: f"LEASE#{holder}"})

    # ---------------------------------------------------------------- internals

    def _read(self, upstream: str, now: float) -> tuple[int | None, list[Lease], list[str]]:
        version: int | None = None
        leases: list[Lease] = []
        waiting: list[str] = []
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key(PARTITION_KEY).eq(_pk(upstream)),
            "ConsistentRead": True,
        }
        while True:
            page = self.table.query(**kwargs)
            for item in page.get("Items", []):
                sort_key = item[SORT_KEY]
                if sort_key == "VERSION":
                    version = int(item["version"])
                elif sort_key.startswith("LEASE#") and float(item["expires_at"]) > now:
                    leases.append(
                        Lease(
                            sort_key[6:], str(item["batch_id"]), int(item["slots"]), float(item["expires_at"])
                        )
                    )
                elif sort_key.startswith("WAIT#") and float(item["until"]) > now:
                    waiting.append(sort_key[5:])
            if "LastEvaluatedKey" not in page:
                return version, leases, waiting
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def _commit(
        self, upstream: str, holder: str, batch_id: str, slots: int, now: float, version: int | None
    ) -> bool:
        expires_at = now + LEASE_SECONDS
        if version is None:
            condition = {"ConditionExpression": "attribute_not_exists(#v)"}
            values: dict[str, Any] = {":new": 1}
        else:
            condition = {"ConditionExpression": "#v = :old"}
            values = {":new": version + 1, ":old": version}
        pk = _pk(upstream)
        try:
            # the Table resource's client takes plain values (it serializes them itself)
            self.table.meta.client.transact_write_items(
                TransactItems=[
                    {
                        "Update": {
                            "TableName": self.table.name,
                            "Key": {PARTITION_KEY: pk, SORT_KEY: "VERSION"},
                            "UpdateExpression": "SET #v = :new",
                            "ExpressionAttributeNames": {"#v": "version"},  # keep clear of reserved words
                            "ExpressionAttributeValues": values,
                            **condition,
                        }
                    },
                    {
                        "Put": {
                            "TableName": self.table.name,
                            "Item": {
                                PARTITION_KEY: pk,
                                SORT_KEY: f"LEASE#{holder}",
                                "batch_id": batch_id,
                                "slots": slots,
                                "expires_at": _number(expires_at),
                                TTL_ATTRIBUTE: int(expires_at) + TTL_SLACK_SECONDS,
                            },
                        }
                    },
                    {
                        "Delete": {
                            "TableName": self.table.name,
                            "Key": {PARTITION_KEY: pk, SORT_KEY: f"WAIT#{batch_id}"},
                        }
                    },
                ]
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "TransactionCanceledException":
                return False  # another grant committed since we read: decide again
            raise
        return True

    def _wait(self, upstream: str, holder: str, batch_id: str, now: float) -> None:
        """Count the batch as waiting (so grants to others leave it a share) and drop any lease the
        holder had."""
        until = now + WAITING_SECONDS
        self.table.put_item(
            Item={
                PARTITION_KEY: _pk(upstream),
                SORT_KEY: f"WAIT#{batch_id}",
                "until": _number(until),
                TTL_ATTRIBUTE: int(until) + TTL_SLACK_SECONDS,
            }
        )
        self.release(upstream, holder)


def _number(value: float) -> Decimal:
    return Decimal(str(round(value, 3)))
