"""`make smoke` (infra/smoke.py) against a stand-in for a deployed stack.

The real service runs on its AWS adapters (`batch-api serve --backend aws`, the e2e harness) against
a moto server, which also holds what `cdk deploy` would leave: a CloudFormation stack named as the
CDK app names it, with the outputs the script reads (by the keys the real stack has, asserted in
tests/infra/test_stack.py), the API keys secret, and the bus the service publishes its events on.
The script gets no test hook: it finds everything through boto3's default chain (AWS_ENDPOINT_URL
sends it to moto) and the stack's outputs, and drives the service with the openai SDK.

moto delivers events from a rule to an SQS target, matching patterns on detail fields; it never
evaluates the queue's policy (nor any IAM), so one test reads the policy the script sets instead.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import openai
import pytest

from batch_api.adapters.aws.eventbridge import EventBridgeSink
from infra import outputs, smoke
from tests.support.fake_upstream import FakeUpstreamServer
from tests.support.server import ServerProcess

pytestmark = pytest.mark.e2e

REGION = "us-east-1"
FAST = ["--timeout", "60", "--event-timeout", "30"]


@pytest.fixture
def backend() -> str:
    """The AWS adapters only: a smoke test checks a deployment, which the local backend is not."""
    return "aws"


@pytest.fixture
def aws(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The caller's AWS configuration as boto3's default chain reads it: the moto server."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    return boto3.Session(region_name=REGION)


def stack_template(base_url: str, bus: str, secret_name: str) -> dict[str, Any]:
    return {
        "Resources": {"AlarmTopic": {"Type": "AWS::SNS::Topic"}},  # a stack needs a resource
        "Outputs": {
            outputs.BASE_URL: {"Value": base_url},
            outputs.EVENT_BUS_NAME: {"Value": bus},
            outputs.API_KEYS_SECRET_NAME: {"Value": secret_name},
        },
    }


@dataclass
class Deployment:
    server: ServerProcess
    api_key: str
    bus: str  # the bus the service publishes on

    def client(self) -> openai.OpenAI:
        return self.server.client(api_key=self.api_key)


@pytest.fixture
def deploy(start_server: Callable[..., ServerProcess], aws: Any) -> Iterator[Callable[..., Deployment]]:
    """Make a stand-in of the dev stack: the service (accepting one fresh client key; more flags of
    `batch-api serve` in `server_args`), the API keys
    secret holding `secret_keys` (default: that key), and stack BatchApi-dev whose outputs name them
    and `announced_bus` (default: the service's bus)."""
    made: list[str] = []

    def make(
        *server_args: str, announced_bus: str | None = None, secret_keys: list[str] | None = None
    ) -> Deployment:
        api_key = f"sk-smoke-{uuid.uuid4().hex}"
        server = start_server("--api-key", api_key, *server_args)
        bus = server.env["BATCH_API_EVENT_BUS_NAME"]
        secret_name = f"batch-api/dev/api-keys-{uuid.uuid4().hex[:8]}"
        aws.client("secretsmanager").create_secret(
            Name=secret_name, SecretString=json.dumps({"api_keys": secret_keys or [api_key]})
        )
        made.append(secret_name)
        template = stack_template(server.base_url, announced_bus or bus, secret_name)
        aws.client("cloudformation").create_stack(StackName="BatchApi-dev", TemplateBody=json.dumps(template))
        return Deployment(server, api_key, bus)

    yield make
    for secret_name in made:
        aws.client("cloudformation").delete_stack(StackName="BatchApi-dev")
        aws.client("secretsmanager").delete_secret(SecretId=secret_name, ForceDeleteWithoutRecovery=True)


@pytest.fixture
def other_bus(aws: Any) -> Iterator[str]:
    name = f"batch-api-elsewhere-{uuid.uuid4().hex[:8]}"
    aws.client("events").create_event_bus(Name=name)
    yield name
    aws.client("events").delete_event_bus(Name=name)


def smoke_queues(aws: Any) -> list[str]:
    return list(aws.client("sqs").list_queues(QueueNamePrefix=smoke.NAME_PREFIX).get("QueueUrls", []))


def smoke_rules(aws: Any, bus: str) -> list[str]:
    rules = aws.client("events").list_rules(EventBusName=bus, NamePrefix=smoke.NAME_PREFIX)["Rules"]
    return [rule["Name"] for rule in rules]


def one_line(text: str) -> str:
    [line] = text.strip().splitlines()
    return line


def test_smoke_passes_on_a_working_deployment_and_leaves_nothing_behind(
    deploy: Callable[..., Deployment], aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = deploy()

    assert smoke.main(["--env", "dev", *FAST]) == 0

    printed = capsys.readouterr()
    assert printed.err == ""
    client = deployment.client()
    [batch] = client.batches.list().data  # the one batch the script ran, to the end
    assert batch.status == "completed" and batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 0)
    assert batch.metadata is not None and list(batch.metadata) == [smoke.RUN_TOKEN_KEY]
    run_token = batch.metadata[smoke.RUN_TOKEN_KEY]
    for step in (
        f"stack BatchApi-dev (CREATE_COMPLETE) in {REGION}: {deployment.server.base_url}",
        "/health: ok",
        f"queue {smoke.NAME_PREFIX}-dev-{run_token} subscribed to bus {deployment.bus}",
        f"output file {batch.output_file_id}: all 2 custom_id(s) answered 200",
        f"batch.completed event for {batch.id} arrived",
        f"batch {batch.id} is completed: nothing to cancel",
        "smoke test of dev passed",
    ):
        assert step in printed.out, step
    # everything it made is gone: its files, the rule's target and the rule, the queue
    assert client.files.list().data == []
    assert smoke_rules(aws, deployment.bus) == []
    assert smoke_queues(aws) == []


def test_smoke_fails_when_the_event_never_reaches_the_bus_the_stack_names(
    deploy: Callable[..., Deployment], other_bus: str, aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stack's EventBusName names a bus the service does not publish on: the batch completes, its
    event goes elsewhere, and the check says so once its timeout has passed."""
    deployment = deploy(announced_bus=other_bus)

    assert smoke.main(["--env", "dev", "--timeout", "60", "--event-timeout", "2"]) == 1

    reason = one_line(capsys.readouterr().err)
    [batch] = deployment.client().batches.list().data
    assert batch.status == "completed"  # so it is the event check that failed
    assert reason.startswith(f"smoke test of dev FAILED: no batch.completed event for {batch.id} reached ")
    assert f"within 2s (rule {smoke.NAME_PREFIX}-dev-" in reason and f"on bus {other_bus})" in reason
    assert deployment.client().files.list().data == []
    assert smoke_rules(aws, other_bus) == []
    assert smoke_queues(aws) == []


def test_smoke_fails_when_the_requests_come_back_without_a_200(
    deploy: Callable[..., Deployment], aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The batch completes, but the upstream turned every request down (a model it does not serve, a
    key it refuses): the output check names the first request and its answer."""
    with FakeUpstreamServer(default_directive="status=400") as upstream:
        deployment = deploy("--upstream-url", upstream.base_url)

        assert smoke.main(["--env", "dev", *FAST]) == 1

    reason = one_line(capsys.readouterr().err)
    [batch] = deployment.client().batches.list().data
    assert batch.status == "completed" and batch.request_counts is not None
    assert batch.request_counts.failed == 2
    assert reason.startswith(f"smoke test of dev FAILED: batch {batch.id}: smoke-1 answered 400: ")
    assert deployment.client().files.list().data == []  # the error file too
    assert smoke_queues(aws) == []


def test_smoke_fails_when_the_secret_holds_no_key_the_api_accepts(
    deploy: Callable[..., Deployment], aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    deployment = deploy(secret_keys=["sk-revoked"])

    assert smoke.main(["--env", "dev", *FAST]) == 1

    reason = one_line(capsys.readouterr().err)
    assert reason.startswith(
        f"smoke test of dev FAILED: POST {deployment.server.base_url}/files answered 401: "
    )
    assert smoke_rules(aws, deployment.bus) == []
    assert smoke_queues(aws) == []  # made before the upload, removed after it failed


def test_smoke_fails_when_the_environments_stack_is_not_deployed(
    aws: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    assert smoke.main(["--env", "prod", *FAST]) == 1  # prod is in cdk.json; BatchApi-prod is not in moto

    assert one_line(capsys.readouterr().err) == (
        f"smoke test of prod FAILED: stack BatchApi-prod not found in {REGION}: deploy it first, "
        "or check AWS_PROFILE/AWS_REGION"
    )
    assert smoke_queues(aws) == []


def test_smoke_fails_for_an_environment_cdk_json_does_not_define(capsys: pytest.CaptureFixture[str]) -> None:
    assert smoke.main(["--env", "staging"]) == 1

    assert one_line(capsys.readouterr().err) == (
        "smoke test of staging FAILED: no environment 'staging' in cdk.json (it defines dev, prod)"
    )


def test_the_event_watch_takes_only_its_batchs_completion_from_only_its_rule(
    aws: Any, other_bus: str, capsys: pytest.CaptureFixture[str]
) -> None:
    events, sqs = aws.client("events"), aws.client("sqs")
    name = f"{smoke.NAME_PREFIX}-test-{uuid.uuid4().hex[:8]}"
    cleanup = smoke.Cleanup(smoke.Timeline())
    watch = smoke.EventWatch(events, sqs, other_bus, name, run_token="run-1")
    try:
        watch.open(cleanup)
        attributes = sqs.get_queue_attributes(QueueUrl=watch.queue_url, AttributeNames=["All"])["Attributes"]
        [rule] = events.list_rules(EventBusName=other_bus, NamePrefix=name)["Rules"]
        [target] = events.list_targets_by_rule(Rule=name, EventBusName=other_bus)["Targets"]
        assert target["Arn"] == attributes["QueueArn"]
        # moto does not evaluate it: EventBridge may send to the queue for this rule only
        [statement] = json.loads(attributes["Policy"])["Statement"]
        assert statement["Effect"] == "Allow" and statement["Action"] == "sqs:SendMessage"
        assert statement["Principal"] == {"Service": "events.amazonaws.com"}
        assert statement["Resource"] == attributes["QueueArn"]
        assert statement["Condition"] == {"ArnEquals": {"aws:SourceArn": rule["Arn"]}}

        sink = EventBridgeSink(events, other_bus)  # as the service publishes

        def publish(status: str, batch_id: str, run_token: str) -> None:
            sink.publish(
                f"batch.{status}",
                {"id": batch_id, "status": status, "metadata": {smoke.RUN_TOKEN_KEY: run_token}},
            )

        publish("completed", "batch_of_another_run", "run-2")
        publish("failed", "batch_that_failed", "run-1")
        publish("completed", "batch_before", "run-1")  # this run's token, not its batch
        # what the rule let through (read without hiding it from the watch)
        queued = sqs.receive_message(QueueUrl=watch.queue_url, MaxNumberOfMessages=10, VisibilityTimeout=0)
        assert [json.loads(m["Body"])["detail"]["id"] for m in queued["Messages"]] == ["batch_before"]
        with pytest.raises(smoke.SmokeFailed, match=r"^no batch\.completed event for batch_mine reached "):
            watch.wait_for("batch_mine", timeout=1)
        publish("completed", "batch_mine", "run-1")
        assert watch.wait_for("batch_mine", timeout=5)["detail"]["id"] == "batch_mine"
    finally:
        assert cleanup.run() == []
    assert smoke_rules(aws, other_bus) == []
    assert smoke_queues(aws) == []
    assert f"removed target of rule {name}" in capsys.readouterr().out
