"""The DynamoDB adapter used from many threads at once, as the local server's threads use it.

A boto3 resource shares one condition-expression builder between calls: two threads querying at
once can send each other's placeholders. `clients.PerThreadDynamoDB` gives each thread its own."""

from __future__ import annotations

import sys
import threading
from contextlib import ExitStack

import pytest

from batch_api.adapters.aws.clients import PerThreadDynamoDB
from batch_api.adapters.aws.dynamodb import DynamoMetadataStore
from batch_api.contract.models import ChunkProgress
from tests.contract.aws_backend import REGION, TABLE, shared_session, start_account

pytestmark = pytest.mark.contract


def hammer(store: DynamoMetadataStore, threads: int = 8, rounds: int = 60) -> list[BaseException]:
    """Threads writing and querying at once, switching as often as the interpreter can. With one
    shared resource this fails most runs (mixed-up placeholders: "Query condition missed key schema
    element: pk"); with the default switch interval only now and then."""
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(rounds):
                store.put_chunk_progress(f"batch_{n}", ChunkProgress(index=i % 3, completed=i, failed=0))
                listed = store.list_chunk_progress(f"batch_{n}")
                assert all(p.index < 3 for p in listed)
        except BaseException as exc:  # collected for the assertion
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(n,)) for n in range(threads)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(interval)
    return errors


def test_tables_from_per_thread_resources_survive_concurrent_queries() -> None:
    with ExitStack() as stack:
        start_account(stack)
        session = shared_session()
        dynamodb = PerThreadDynamoDB(lambda: session.resource("dynamodb", region_name=REGION))
        store = DynamoMetadataStore(dynamodb.Table(TABLE))
        assert hammer(store) == []
        assert store.table.name == TABLE
        mine = dynamodb.table(TABLE)
        assert dynamodb.table(TABLE) is mine  # made once per thread
        other: list[object] = []
        thread = threading.Thread(target=lambda: other.append(dynamodb.table(TABLE)))
        thread.start()
        thread.join()
        assert other[0] is not mine
