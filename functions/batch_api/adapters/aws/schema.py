"""The DynamoDB key schema, shared by the adapter, the CDK stack and the tests (so they cannot drift).

One table. Base key (pk, sk). GSI1 lists a project's files or batches in creation order. GSI2 is
sparse: only live files with an expiry and pending uploads (for the sweeps), and non-terminal batches
(for resume and monitoring) carry its keys, each kind spread over sharded partition keys (the values
and the shard count are the adapter's: `dynamodb.py`), so the index definition names no shard.

Items that are dropped by DynamoDB TTL (idempotency keys) hold their expiry, in epoch seconds, in
`TTL_ATTRIBUTE`. TTL deletion is lazy (it can take days), so readers treat an item past it as absent.
"""

from __future__ import annotations

PARTITION_KEY = "pk"
SORT_KEY = "sk"

GSI1_NAME = "by-project"
GSI1_PARTITION_KEY = "gsi1pk"
GSI1_SORT_KEY = "gsi1sk"

GSI2_NAME = "by-state"
GSI2_PARTITION_KEY = "gsi2pk"
GSI2_SORT_KEY = "gsi2sk"

TTL_ATTRIBUTE = "ttl"

# (attribute name, DynamoDB type) for every key attribute, in the shape CreateTable wants.
KEY_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    (PARTITION_KEY, "S"),
    (SORT_KEY, "S"),
    (GSI1_PARTITION_KEY, "S"),
    (GSI1_SORT_KEY, "S"),
    (GSI2_PARTITION_KEY, "S"),
    (GSI2_SORT_KEY, "S"),
)

GLOBAL_SECONDARY_INDEXES: tuple[tuple[str, str, str], ...] = (
    (GSI1_NAME, GSI1_PARTITION_KEY, GSI1_SORT_KEY),
    (GSI2_NAME, GSI2_PARTITION_KEY, GSI2_SORT_KEY),
)


def create_table_kwargs(table_name: str) -> dict[str, object]:
    """boto3 `create_table` arguments for tests and tools; the CDK stack builds the same table."""
    return {
        "TableName": table_name,
        "BillingMode": "PAY_PER_REQUEST",
        "AttributeDefinitions": [{"AttributeName": n, "AttributeType": t} for n, t in KEY_ATTRIBUTES],
        "KeySchema": [
            {"AttributeName": PARTITION_KEY, "KeyType": "HASH"},
            {"AttributeName": SORT_KEY, "KeyType": "RANGE"},
        ],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": name,
                "KeySchema": [
                    {"AttributeName": pk, "KeyType": "HASH"},
                    {"AttributeName": sk, "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
            for name, pk, sk in GLOBAL_SECONDARY_INDEXES
        ],
    }


def time_to_live_kwargs(table_name: str) -> dict[str, object]:
    """boto3 `update_time_to_live` arguments (CreateTable cannot enable TTL); the CDK stack sets the same."""
    return {
        "TableName": table_name,
        "TimeToLiveSpecification": {"Enabled": True, "AttributeName": TTL_ATTRIBUTE},
    }
