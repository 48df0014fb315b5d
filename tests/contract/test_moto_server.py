"""The moto server the end-to-end suite runs on shows each UpdateItem whole, as DynamoDB does."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import boto3
import pytest

from tests.support.moto_server import AtomicMotoServer

FIELDS = [f"f{i}" for i in range(20)]


@pytest.fixture
def table_client() -> Iterator[tuple[object, str]]:
    table = f"atomic-{uuid.uuid4().hex[:8]}"  # moto's state is shared by the whole process
    server = AtomicMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        client = boto3.client(
            "dynamodb",
            endpoint_url=f"http://{host}:{port}",
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        client.create_table(
            TableName=table,
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        yield client, table
    finally:
        server.stop()


def test_a_read_never_sees_half_an_update(table_client: tuple[object, str]) -> None:
    """Twenty attributes set in one UpdateItem are read all old or all new, never mixed."""
    client, table = table_client
    key = {"pk": {"S": "item"}}
    client.put_item(TableName=table, Item={**key, **{f: {"N": "0"} for f in FIELDS}})  # type: ignore[attr-defined]
    writes = 100
    done = threading.Event()
    mixed: list[set[str]] = []
    reads = 0

    def read() -> None:
        nonlocal reads
        while not done.is_set():
            item = client.get_item(TableName=table, Key=key)["Item"]  # type: ignore[attr-defined]
            values = {item[f]["N"] for f in FIELDS}
            reads += 1
            if len(values) > 1:
                mixed.append(values)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for i in range(1, writes + 1):
            client.update_item(  # type: ignore[attr-defined]
                TableName=table,
                Key=key,
                UpdateExpression="SET " + ", ".join(f"#{f} = :v" for f in FIELDS),
                ExpressionAttributeNames={f"#{f}": f for f in FIELDS},
                ExpressionAttributeValues={":v": {"N": str(i)}},
            )
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert reads > 0
    assert mixed == []
    final = client.get_item(TableName=table, Key=key)["Item"]  # type: ignore[attr-defined]
    assert {final[f]["N"] for f in FIELDS} == {str(writes)}
