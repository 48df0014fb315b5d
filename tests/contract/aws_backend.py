"""The AWS adapters under moto (`mock_aws`, in-process): the "aws" contract backend.

One moto account per test place: the first open starts `mock_aws` and creates the table (from the
shared key-schema constants) and the bucket; every later open over the same place builds fresh
adapters over the same table and bucket, which is how the durability tests "restart" a store.

moto is not thread-safe where AWS is atomic: it applies a conditional UpdateItem as read, check,
write with no lock (two of eight racing writers can both win), sets an updated item's attributes one
at a time (a concurrent Query saw a new item without the attribute being set), and replaces an S3
object in steps (a concurrent PUT of the same key crashes). DynamoDB and S3 make each request atomic,
so the backend serializes those moto handlers, reads included: the concurrency contract tests then
judge the adapters (one conditional request per transition, whole-object PUTs), not moto's locking.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
from moto import mock_aws
from moto.dynamodb.models import DynamoDBBackend
from moto.s3.responses import S3Response

from batch_api.adapters.aws.dynamodb import DynamoMetadataStore
from batch_api.adapters.aws.s3 import S3BlobStore, S3Journal
from batch_api.adapters.aws.schema import create_table_kwargs, time_to_live_kwargs

REGION = "us-east-1"
TABLE = "batch-api-test"
BUCKET = "batch-api-test"


@dataclass
class MotoAccount:
    session: Any

    def client(self, service: str) -> Any:
        return self.session.client(service, region_name=REGION)

    def table(self) -> Any:
        return self.session.resource("dynamodb", region_name=REGION).Table(TABLE)


@cache
def shared_session() -> Any:
    """One session for every test: it loads each service model once (a fresh one costs ~0.3 s a test)."""
    return boto3.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)


_ONE_REQUEST_AT_A_TIME = threading.RLock()
_ATOMIC_IN_AWS = (
    (DynamoDBBackend, "put_item"),
    (DynamoDBBackend, "update_item"),
    (DynamoDBBackend, "delete_item"),
    (DynamoDBBackend, "transact_write_items"),
    (DynamoDBBackend, "get_item"),
    (DynamoDBBackend, "query"),
    (DynamoDBBackend, "scan"),
    (DynamoDBBackend, "batch_get_item"),
    (S3Response, "put_object"),
    (S3Response, "get_object"),
)


def _serialized(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        with _ONE_REQUEST_AT_A_TIME:
            return method(*args, **kwargs)

    return call


def start_account(stack: ExitStack) -> MotoAccount:
    """Enter `mock_aws` on the stack (with the requests AWS makes atomic serialized), and create the
    table and bucket."""
    for owner, name in _ATOMIC_IN_AWS:
        stack.enter_context(mock.patch.object(owner, name, _serialized(getattr(owner, name))))
    stack.enter_context(mock_aws())
    account = MotoAccount(shared_session())
    account.client("dynamodb").create_table(**create_table_kwargs(TABLE))
    account.client("dynamodb").update_time_to_live(**time_to_live_kwargs(TABLE))
    account.client("s3").create_bucket(Bucket=BUCKET)
    return account


_accounts: dict[Path, MotoAccount] = {}


def _account(place: Path, stack: ExitStack) -> MotoAccount:
    if place not in _accounts:
        _accounts[place] = start_account(stack)
        stack.callback(_accounts.pop, place)
    return _accounts[place]


def _opener(build: Callable[[MotoAccount], Any]) -> Callable[[Path, ExitStack], Any]:
    return lambda place, stack: build(_account(place, stack))


aws_metadata_store = _opener(lambda account: DynamoMetadataStore(account.table()))
aws_blob_store = _opener(lambda account: S3BlobStore(account.client("s3"), BUCKET))
aws_journal = _opener(lambda account: S3Journal(account.client("s3"), BUCKET))
