"""AWS under moto, in-process, for the Lambda handlers: a table from the shared key schema, a bucket, an
EventBridge bus whose events land in an SQS queue, an upstream API key in Secrets Manager, and a
scriptable upstream HTTP server. The handlers read their settings from BATCH_API_* variables, as in
Lambda; `lambda_env` sets them for one test (monkeypatch restores them).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from aws_lambda_powertools.utilities.typing import LambdaContext as PowertoolsLambdaContext
from moto import mock_aws

from batch_api import object_keys
from batch_api.adapters.aws import secrets
from batch_api.adapters.aws.schema import create_table_kwargs, time_to_live_kwargs
from batch_api.contract.models import BatchRecord, FileRecord
from batch_api.deps import Deps
from tests.support.fake_upstream import FakeUpstreamServer
from tests.unit.api_events import BATCH_ID, INPUT_FILE_ID

REGION = "us-east-1"
TABLE = "batch-api-test"
BUCKET = "batch-api-test-bucket"
BUS = "batch-api-test"
QUEUE = "batch-events"
SECRET = "batch-api/test/upstream"
UPSTREAM_KEY = "sk-upstream-from-secrets-manager"
PROJECT = "local"  # the project the workflow samples in events/ name
CLIENT_KEY = "sk-test"  # the key the API samples in events/ present
EVENTS_DIR = Path(__file__).resolve().parents[2] / "events"

# Three chat requests; the second asks the fake upstream for a 500. With chunk_max_lines=2 the
# plan is two chunks, and events/workflow/process.json is chunk 0 of it.
INPUT_LINES = b"".join(
    json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "gpt-4o-mini",
                "messages": [{"role": "user", "content": content}],
                **({"user": user} if user else {}),
            },
        },
        separators=(",", ":"),
    ).encode()
    + b"\n"
    for custom_id, content, user in (
        ("req-1", "Say hello", None),
        ("req-2", "Fail please", "status=500"),
        ("req-3", "Say goodbye", None),
    )
)
CHUNK_MAX_LINES = 2


def load_event(relative: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS_DIR / relative).read_text())
    return event


@dataclass
class AwsWorld:
    """The moto resources one test runs against."""

    s3: Any
    sqs: Any
    queue_url: str

    def events_delivered(self, expected: int = 1, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The EventBridge events the rule delivered to the queue (waits for `expected` of them)."""
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            answer = self.sqs.receive_message(QueueUrl=self.queue_url, MaxNumberOfMessages=10)
            for message in answer.get("Messages", []):
                found.append(json.loads(message["Body"]))
                self.sqs.delete_message(QueueUrl=self.queue_url, ReceiptHandle=message["ReceiptHandle"])
        return found

    def keys(self, prefix: str) -> list[str]:
        listed = self.s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix)
        return sorted(item["Key"] for item in listed.get("Contents", []))


MOTO_CONFIG: Any = {"stepfunctions": {"execute_state_machine": True}, "lambda": {"use_docker": False}}


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[AwsWorld]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    with mock_aws(config=MOTO_CONFIG):
        dynamodb = boto3.client("dynamodb", region_name=REGION)
        dynamodb.create_table(**create_table_kwargs(TABLE))
        dynamodb.update_time_to_live(**time_to_live_kwargs(TABLE))
        s3 = boto3.client("s3", region_name=REGION)
        s3.create_bucket(Bucket=BUCKET)
        sqs = boto3.client("sqs", region_name=REGION)
        queue_url = sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
            "QueueArn"
        ]
        events = boto3.client("events", region_name=REGION)
        events.create_event_bus(Name=BUS)
        events.put_rule(
            Name="batch-terminal-status",
            EventBusName=BUS,
            EventPattern=json.dumps({"source": ["batch-api"], "detail-type": [{"prefix": "batch."}]}),
        )
        events.put_targets(
            Rule="batch-terminal-status", EventBusName=BUS, Targets=[{"Id": "queue", "Arn": queue_arn}]
        )
        boto3.client("secretsmanager", region_name=REGION).create_secret(
            Name=SECRET, SecretString=json.dumps({"api_key": UPSTREAM_KEY})
        )
        try:
            yield AwsWorld(s3=s3, sqs=sqs, queue_url=queue_url)
        finally:
            secrets.clear_cache()


@pytest.fixture
def upstream() -> Iterator[FakeUpstreamServer]:
    with FakeUpstreamServer() as server:
        yield server


@pytest.fixture
def lambda_env(
    aws: AwsWorld, upstream: FakeUpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    """The environment the stack gives every function (the API's state machine ARN comes later)."""
    env = {
        "BATCH_API_BACKEND": "aws",
        "BATCH_API_TABLE_NAME": TABLE,
        "BATCH_API_BUCKET_NAME": BUCKET,
        "BATCH_API_EVENT_BUS_NAME": BUS,
        "BATCH_API_UPSTREAM_URL": upstream.base_url,
        "BATCH_API_UPSTREAM_SECRET_NAME": SECRET,
        "BATCH_API_UPSTREAM_MAX_RETRIES": "1",
        "BATCH_API_UPSTREAM_BACKOFF_BASE_SECONDS": "0",
        "BATCH_API_CHUNK_MAX_LINES": str(CHUNK_MAX_LINES),
        "BATCH_API_REQUESTS_PER_CHUNK": "4",
        "BATCH_API_MAX_REQUEST_BYTES": str(4_500_000),
        "BATCH_API_API_KEYS": CLIENT_KEY,  # the API function's keys (test_lambda_handlers swaps in the secret)
        "POWERTOOLS_SERVICE_NAME": "batch-api",
        "POWERTOOLS_METRICS_NAMESPACE": "BatchApi",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (
        "BATCH_API_STATE_MACHINE_ARN",
        "BATCH_API_API_KEYS_SECRET_NAME",
        "BATCH_API_UPSTREAM_API_KEY",
    ):
        monkeypatch.delenv(name, raising=False)
    return env


class LambdaContext(PowertoolsLambdaContext):
    """A Lambda context as the runtime passes it: what Powertools and the handlers read of it, and a
    remaining time a test can set."""

    def __init__(
        self,
        *,
        function_name: str = "batch-api-test",
        invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:batch-api-test",
        aws_request_id: str = "00000000-0000-0000-0000-000000000000",
        memory_limit_in_mb: int = 512,
        remaining_millis: int = 900_000,
    ) -> None:
        self._function_name = function_name
        self._function_version = "$LATEST"
        self._invoked_function_arn = invoked_function_arn
        self._memory_limit_in_mb = memory_limit_in_mb
        self._aws_request_id = aws_request_id
        self._log_group_name = f"/aws/lambda/{function_name}"
        self._log_stream_name = "2026/01/01/[$LATEST]0123456789abcdef"
        self.remaining_millis = remaining_millis

    def get_remaining_time_in_millis(self) -> int:  # type: ignore[override]
        return self.remaining_millis


@pytest.fixture
def lambda_context() -> LambdaContext:
    return LambdaContext()


def seed_input_file(
    deps: Deps, data: bytes = INPUT_LINES, file_id: str = INPUT_FILE_ID, project_id: str = PROJECT
) -> FileRecord:
    now = deps.now()
    record = FileRecord(
        id=file_id,
        project_id=project_id,
        bytes=len(data),
        created_at=now - 10,
        expires_at=now + 30 * 86400,
        filename="requests.jsonl",
        purpose="batch",
        blob_key=object_keys.file_key(file_id),
    )
    deps.blobs.put(record.blob_key, data)
    deps.metadata.create_file(record)
    return record


def seed_batch(
    deps: Deps, batch_id: str = BATCH_ID, input_file_id: str = INPUT_FILE_ID, project_id: str = PROJECT
) -> BatchRecord:
    now = deps.now()
    record = BatchRecord(
        id=batch_id,
        project_id=project_id,
        endpoint="/v1/chat/completions",
        input_file_id=input_file_id,
        created_at=now - 5,
        expires_at=now + 86400,
    )
    deps.metadata.create_batch(record)
    return record
