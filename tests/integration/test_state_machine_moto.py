"""The state machine CDK synthesizes, executed by moto's Step Functions with the real handlers in-process.

The definition is the one in the dev stack's template (`tests/infra/helpers.render_definition`),
unchanged except that CloudFormation references become the moto resources' names and ARNs. Each
Lambda function named in it is created in moto's Lambda, and moto's invoke (which with
`use_docker: False` never runs code) is routed to the handler the template names, called with the
environment the template gives that function, with four test values: the upstream URL and secret
name point at the test doubles, upstream retries are off, and chunks hold two lines (so three requests
fan out over two chunks). The API Lambda starts the execution, as in production: create file -> create batch ->
StartExecution (name = batch id) -> moto runs Validate, the Distributed Map of ProcessChunk loops and
Finalize, or MarkFailed when a step keeps failing.

moto seams used (private API; moto is pinned <5.3 in pyproject):
- `moto.awslambda_simple.models.LambdaSimpleBackend.invoke`: the Lambda backend moto uses with
  `use_docker: False`; replaced so an invoke runs our handler and, when it raises, answers like the
  Lambda runtime (X-Amz-Function-Error: Unhandled and an errorType/errorMessage payload).
- `moto.stepfunctions.parser.asl.component.common.retry.retrier_decl.time`: its `sleep` between
  retries is recorded instead of slept, so the retry policy is checked without waiting for it.
"""

from __future__ import annotations

import base64
import contextvars
import importlib
import io
import json
import os
import sys
import threading
import time
import traceback
import typing
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

import boto3
import openai
import orjson
import pytest
from botocore.client import BaseClient
from moto.awslambda_simple.models import LambdaSimpleBackend
from moto.stepfunctions.parser.asl.component.common.retry import retrier_decl
from openai.types import Batch
from openai.types.webhooks import BatchCompletedWebhookEvent

import batch_api.handlers.webhooks as webhook_handler
import batch_api.handlers.workflow as steps
from batch_api.adapters.aws.dynamodb import DynamoMetadataStore
from batch_api.adapters.aws.leases import DynamoCapacityLeases
from batch_api.bootstrap_aws import build_webhook_delivery
from batch_api.config import Settings
from batch_api.contract.steps import BatchRef
from batch_api.deps import Deps
from batch_api.handlers.auth import project_id_for_key
from batch_api.ports import Grant
from batch_api.upstreams.metered import MeteredLeases
from batch_api.webhooks.events import event_id, new_secret
from batch_api.webhooks.sender import AddressGuard, WebhookSender
from batch_api.workflow import process
from batch_api.workflow.finalize import FinalizeError
from tests.infra.helpers import (
    actions_of,
    cdk_context,
    function_logical_ids,
    render_definition,
    resources,
    role_statements,
)
from tests.integration.conftest import (
    BUCKET,
    BUS,
    INPUT_LINES,
    REGION,
    SECRET,
    TABLE,
    UPSTREAM_KEY,
    AwsWorld,
    LambdaContext,
)
from tests.support.fake_upstream import FakeUpstreamServer
from tests.support.sqs_source import invoke_with_messages
from tests.support.webhook_receiver import WebhookReceiver
from tests.unit.api_events import proxy_event

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:No application metrics to publish"),
]

API_HANDLER = "batch_api.handlers.lambda_api.handler"
WEBHOOKS_HANDLER = "batch_api.handlers.webhooks.handler"
CLIENT_KEY = "sk-state-machine-test-key"
PROJECT = project_id_for_key(CLIENT_KEY)
ROLE_ARN = "arn:aws:iam::123456789012:role/batch-api-test-states"
EXECUTION_TIMEOUT_SECONDS = 60


# one webhook endpoint for the test's project (cdk.json's environments have none); its URL is pointed at
# a local receiver and its secret is in the secret the stack names
WEBHOOK = {"name": "receiver", "url": "https://hooks.example.com/batch", "project": PROJECT}
WEBHOOK_SECRET = new_secret()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The dev stack with a webhook endpoint, synthesized once for this module (cdk-nag on, bundling
    skipped)."""
    from infra.app import build_app

    context = cdk_context("dev")
    context["environments"]["dev"] = {**context["environments"]["dev"], "webhooks": [WEBHOOK]}
    app, stack = build_app(context, outdir=str(tmp_path_factory.mktemp("cdk.out")))
    return typing.cast(dict[str, Any], app.synth().get_stack_by_name(stack.stack_name).template)


def resolve_environment(template: dict[str, Any], logical_id: str, refs: dict[str, str]) -> dict[str, str]:
    """The function's environment from the template, each Ref (or a GetAtt of an Arn) replaced by the
    moto resource it names."""
    variables = template["Resources"][logical_id]["Properties"].get("Environment", {}).get("Variables", {})
    resolved: dict[str, str] = {}
    for name, value in variables.items():
        if isinstance(value, dict) and "Fn::GetAtt" in value and value["Fn::GetAtt"][1] == "Arn":
            resolved[name] = refs[value["Fn::GetAtt"][0]]
        elif isinstance(value, dict):
            assert set(value) == {"Ref"}, f"{logical_id}: cannot resolve {name}={value}"
            resolved[name] = refs[value["Ref"]]
        else:
            resolved[name] = str(value)
    return resolved


@dataclass
class Invocations:
    """What moto's Step Functions asked our Lambdas to do."""

    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)
    retry_sleeps: list[float] = field(default_factory=list)
    remaining_millis: int = 900_000  # what each invocation's context reports

    def of(self, handler: str) -> list[dict[str, Any]]:
        return [event for name, event in self.calls if name.endswith(handler)]


@dataclass
class Deployment:
    """The synthesized stack on moto: functions, state machine, and the API module wired like Lambda."""

    api: ModuleType
    state_machine_arn: str
    invocations: Invocations
    statuses: dict[str, list[str]]
    sfn: Any
    aws_calls: AwsCalls
    functions: dict[str, tuple[str, Deps]]  # logical id -> (handler path, its Deps)
    template: dict[str, Any]
    handlers: dict[str, str]  # handler path -> logical id
    webhook_environment: dict[str, str]  # the delivery function's, as the template sets it
    webhook_queue_url: str
    sqs: Any

    def deliver_webhooks(
        self, receiver: WebhookReceiver, until: Callable[[], bool], monkeypatch: pytest.MonkeyPatch
    ) -> list[dict[str, Any]]:
        """Lambda's SQS event source on the webhook queue, until `until()`: receive what is visible,
        invoke the delivery handler, delete what it did not report failed. moto routes bus -> queue;
        this hop is driven here. The function's environment is the template's, with the endpoint's URL
        pointed at `receiver` and a sender that may call it (http on 127.0.0.1, which the function's
        own guard refuses: tests/unit/test_webhooks.py)."""
        with monkeypatch.context() as scoped:
            for name in [n for n in os.environ if n.startswith("BATCH_API_")]:
                scoped.delenv(name)
            for name, value in self.webhook_environment.items():
                scoped.setenv(name, value)
            endpoints = [
                {**e, "url": receiver.url} for e in json.loads(self.webhook_environment["BATCH_API_WEBHOOKS"])
            ]
            scoped.setenv("BATCH_API_WEBHOOKS", json.dumps(endpoints))
            scoped.setenv("BATCH_API_WEBHOOK_BACKOFF_BASE_SECONDS", "0.01")  # retries due within a second
            delivery = build_webhook_delivery(
                Settings(backend="aws"), post=WebhookSender(AddressGuard.local(), timeout_seconds=5).post
            )
        monkeypatch.setattr(webhook_handler, "get_delivery", lambda: delivery)
        answers: list[dict[str, Any]] = []
        deadline = time.monotonic() + EXECUTION_TIMEOUT_SECONDS
        while not until():
            assert time.monotonic() < deadline, f"webhooks not delivered: {receiver.received}"
            messages = self.sqs.receive_message(
                QueueUrl=self.webhook_queue_url,
                MaxNumberOfMessages=5,
                WaitTimeSeconds=1,
                AttributeNames=["All"],
            ).get("Messages", [])
            if not messages:
                continue
            answer = invoke_with_messages(
                self.sqs, self.webhook_queue_url, messages, self._as_webhook_function
            )
            answers.append(answer)
        return answers

    def _as_webhook_function(self, event: dict[str, Any]) -> Any:
        """The delivery function's invocation, its AWS calls counted as its own (not the event source's
        deletes)."""
        with self.aws_calls.as_function(WEBHOOKS_HANDLER):
            return webhook_handler.handler(event, LambdaContext())

    def call_api(
        self, method: str, path: str, *, body: bytes = b"", content_type: str | None = None, status: int = 200
    ) -> Any:
        headers = [("authorization", f"Bearer {CLIENT_KEY}")]
        headers += [("content-type", content_type)] if content_type else []
        with self.aws_calls.as_function(API_HANDLER):
            result = self.api.handler(proxy_event(method, path, headers=headers, body=body), LambdaContext())
        assert result["statusCode"] == status, result
        return orjson.loads(result["body"]) if result.get("body") else None

    def run_function(self, handler_path: str, event: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
        """Invoke one of the workflow functions directly (as its schedule or a test would)."""
        _, deps = self.functions[self.handlers[handler_path]]
        monkeypatch.setattr(steps, "get_deps", lambda: deps)
        with self.aws_calls.as_function(handler_path):
            return _resolve_handler(handler_path)(event, LambdaContext())

    def upload(self, data: bytes) -> str:
        boundary = "batchapitestboundary"
        body = (
            (
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="requests.jsonl"\r\n'
                "Content-Type: application/jsonl\r\n\r\n"
            ).encode()
            + data
            + f"\r\n--{boundary}--\r\n".encode()
        )
        created = self.call_api(
            "POST", "/v1/files", body=body, content_type=f"multipart/form-data; boundary={boundary}"
        )
        return str(created["id"])

    def create_batch(self, file_id: str) -> Batch:
        body = {"input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        created = self.call_api(
            "POST", "/v1/batches", body=orjson.dumps(body), content_type="application/json"
        )
        return Batch.model_validate(created)

    def wait_for_execution(self, batch_id: str) -> dict[str, Any]:
        arn = self.state_machine_arn.replace(":stateMachine:", ":execution:") + f":{batch_id}"
        deadline = time.monotonic() + EXECUTION_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            described: dict[str, Any] = self.sfn.describe_execution(executionArn=arn)
            if described["status"] != "RUNNING":
                return described
            time.sleep(0.05)
        raise AssertionError(f"execution {batch_id} still running after {EXECUTION_TIMEOUT_SECONDS}s")

    def content(self, file_id: str) -> list[dict[str, Any]]:
        auth = [("authorization", f"Bearer {CLIENT_KEY}")]
        result = self.api.handler(
            proxy_event("GET", f"/v1/files/{file_id}/content", headers=auth), LambdaContext()
        )
        assert result["statusCode"] == 200, result
        raw = base64.b64decode(result["body"]) if result.get("isBase64Encoded") else result["body"].encode()
        return [orjson.loads(line) for line in raw.splitlines()]


def _resolve_handler(path: str) -> Callable[[dict[str, Any], Any], Any]:
    module_name, _, attribute = path.rpartition(".")
    handler: Callable[[dict[str, Any], Any], Any] = getattr(importlib.import_module(module_name), attribute)
    return handler


CURRENT_FUNCTION: contextvars.ContextVar[str | None] = contextvars.ContextVar("function", default=None)


class AwsCalls:
    """Every AWS API call the functions make, by handler path (the test's own calls are not counted)."""

    def __init__(self) -> None:
        self.by_function: dict[str, set[tuple[str, str]]] = {}
        self.lock = threading.Lock()

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        real = BaseClient._make_api_call

        def recording(client: BaseClient, operation: str, params: Any) -> Any:
            function = CURRENT_FUNCTION.get()
            if function is not None:
                with self.lock:
                    service = client.meta.service_model.service_name
                    self.by_function.setdefault(function, set()).add((service, operation))
            return real(client, operation, params)

        monkeypatch.setattr(BaseClient, "_make_api_call", recording)

    @contextmanager
    def as_function(self, handler_path: str) -> Iterator[None]:
        token = CURRENT_FUNCTION.set(handler_path)
        try:
            yield
        finally:
            CURRENT_FUNCTION.reset(token)


@contextmanager
def lambdas_run_in_process(
    monkeypatch: pytest.MonkeyPatch,
    functions: dict[str, tuple[str, Deps]],
    invocations: Invocations,
    aws_calls: AwsCalls,
) -> Iterator[None]:
    """Route moto Lambda invokes of `functions` (name -> (handler path, that function's Deps)) to the
    handlers. One invocation at a time: the step handlers keep their Deps in one module global, which
    each invocation points at its own function's Deps."""
    lock = threading.Lock()

    def invoke(
        backend: LambdaSimpleBackend,
        function_name: str,
        qualifier: str | None,
        body: Any,
        headers: Any,
        response_headers: dict[str, str],
    ) -> bytes:
        name = backend.get_function(function_name, qualifier).function_name
        handler_path, deps = functions[name]
        event = json.loads(body or b"{}")
        context = LambdaContext(
            function_name=name,
            invoked_function_arn=f"arn:aws:lambda:{REGION}:123456789012:function:{name}",
            aws_request_id=str(uuid.uuid4()),
            remaining_millis=invocations.remaining_millis,
        )
        with lock, aws_calls.as_function(handler_path):
            invocations.calls.append((handler_path, event))
            monkeypatch.setattr(steps, "get_deps", lambda: deps)
            try:
                result = _resolve_handler(handler_path)(event, context)
            except Exception as exc:
                invocations.errors.append((handler_path, repr(exc)))
                response_headers["x-amz-function-error"] = "Unhandled"
                return orjson.dumps(
                    {
                        "errorMessage": str(exc),
                        "errorType": type(exc).__name__,
                        "requestId": context.aws_request_id,
                        "stackTrace": traceback.format_exception(exc),
                    }
                )
        return orjson.dumps(result)

    monkeypatch.setattr(LambdaSimpleBackend, "invoke", invoke)
    monkeypatch.setattr(retrier_decl, "time", SimpleNamespace(sleep=invocations.retry_sleeps.append))
    yield


def _load_api_module() -> ModuleType:
    name = "batch_api.handlers.lambda_api"
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


Fleet = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]


@pytest.fixture
def fleet(upstream: FakeUpstreamServer) -> Fleet:
    """The template's upstreams as the functions get them: each pointed at the test double, keyed
    from the test secret (a test may override this fixture to deploy several upstreams)."""

    def point(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        assert all(spec["api_key_secret"] for spec in specs), "each upstream's key is a secret"
        return [{**spec, "base_url": upstream.base_url, "api_key_secret": SECRET} for spec in specs]

    return point


@pytest.fixture
def deployment(
    template: dict[str, Any],
    aws: AwsWorld,
    fleet: Fleet,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Deployment]:
    lambda_client = boto3.client("lambda", region_name=REGION)
    sfn = boto3.client("stepfunctions", region_name=REGION)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr("index.py", "def handler(event, context):\n    raise NotImplementedError\n")
    role = boto3.client("iam", region_name=REGION).create_role(
        RoleName="batch-api-test-lambda", AssumeRolePolicyDocument="{}"
    )["Role"]["Arn"]

    handlers = function_logical_ids(template)  # handler path -> logical id
    refs: dict[str, str] = {}
    for logical_id in resources(template, "AWS::DynamoDB::Table"):
        refs[logical_id] = TABLE
    for logical_id in resources(template, "AWS::S3::Bucket"):
        refs[logical_id] = BUCKET  # the functions and the ItemReader name only the data bucket
    for logical_id in resources(template, "AWS::Events::EventBus"):
        refs[logical_id] = BUS
    for logical_id in resources(template, "AWS::SQS::Queue"):  # the webhook queue and its dead letters
        refs[logical_id] = aws.sqs.create_queue(QueueName=logical_id)["QueueUrl"]
    # the template's rule on the bus -> the webhook queue, as moto can route it
    [(rule_id, rule)] = [
        (lid, r)
        for lid, r in resources(template, "AWS::Events::Rule").items()
        if "EventBusName" in r["Properties"]
    ]
    [target] = rule["Properties"]["Targets"]
    webhook_queue_url = refs[target["Arn"]["Fn::GetAtt"][0]]
    events_client = boto3.client("events", region_name=REGION)
    events_client.put_rule(
        Name=rule_id, EventBusName=BUS, EventPattern=json.dumps(rule["Properties"]["EventPattern"])
    )
    queue_arn = aws.sqs.get_queue_attributes(QueueUrl=webhook_queue_url, AttributeNames=["QueueArn"])
    events_client.put_targets(
        Rule=rule_id,
        EventBusName=BUS,
        Targets=[{"Id": "queue", "Arn": queue_arn["Attributes"]["QueueArn"]}],
    )
    for logical_id in resources(template, "AWS::IAM::Role"):  # the download links' signer
        refs[logical_id] = f"arn:aws:iam::123456789012:role/{logical_id}"
    for logical_id in handlers.values():
        refs[logical_id] = lambda_client.create_function(
            FunctionName=logical_id,
            Runtime="python3.12",
            Role=role,
            Handler="index.handler",
            Code={"ZipFile": archive.getvalue()},
        )["FunctionArn"]

    definition = render_definition(template, refs)
    state_machine_arn: str = sfn.create_state_machine(
        name="batch-api-dev", definition=json.dumps(definition), roleArn=ROLE_ARN, type="STANDARD"
    )["stateMachineArn"]
    [machine_id] = resources(template, "AWS::StepFunctions::StateMachine")
    refs[machine_id] = state_machine_arn

    def environment(logical_id: str) -> dict[str, str]:
        """What the template sets; the upstream (outside AWS) pointed at the test doubles."""
        env = resolve_environment(template, logical_id, refs)
        if "BATCH_API_UPSTREAMS_JSON" in env:
            env["BATCH_API_UPSTREAMS_JSON"] = json.dumps(fleet(json.loads(env["BATCH_API_UPSTREAMS_JSON"])))
            env["BATCH_API_UPSTREAM_MAX_RETRIES"] = "0"
        if "BATCH_API_CHUNK_MAX_LINES" in env:
            env["BATCH_API_CHUNK_MAX_LINES"] = "2"  # three requests: two chunks, so the Map fans out
        return env

    def use_environment(env: dict[str, str], patch: pytest.MonkeyPatch) -> None:
        for name in [n for n in os.environ if n.startswith("BATCH_API_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)

    def deps_for(logical_id: str) -> Deps:
        with monkeypatch.context() as scoped:
            use_environment(environment(logical_id), scoped)
            steps.get_deps.cache_clear()
            try:
                return steps.get_deps()
            finally:
                steps.get_deps.cache_clear()

    functions = {
        logical_id: (handler_path, deps_for(logical_id))
        for handler_path, logical_id in handlers.items()
        if handler_path not in (API_HANDLER, WEBHOOKS_HANDLER)
    }
    webhook_environment = environment(handlers[WEBHOOKS_HANDLER])
    boto3.client("secretsmanager", region_name=REGION).create_secret(
        Name=webhook_environment["BATCH_API_WEBHOOK_SECRETS_SECRET_NAME"],
        SecretString=json.dumps({WEBHOOK["name"]: WEBHOOK_SECRET}),
    )
    # the API module reads its environment at import, as a Lambda cold start does. The keys' secret
    # is swapped for one key given directly (test_lambda_handlers covers the secret).
    api_environment = environment(handlers[API_HANDLER])
    assert api_environment.pop("BATCH_API_API_KEYS_SECRET_NAME")
    api_environment["BATCH_API_API_KEYS"] = CLIENT_KEY
    use_environment(api_environment, monkeypatch)
    api = _load_api_module()

    # every status a batch is stored in, in order: created, then each conditional update
    statuses: dict[str, list[str]] = {}
    real_create, real_update = DynamoMetadataStore.create_batch, DynamoMetadataStore.update_batch

    def recording_create(self: DynamoMetadataStore, record: Any) -> None:
        real_create(self, record)
        statuses.setdefault(record.id, []).append(record.status)

    def recording_update(
        self: DynamoMetadataStore, project_id: str, batch_id: str, changes: Any, **kw: Any
    ) -> Any:
        updated = real_update(self, project_id, batch_id, changes, **kw)
        if "status" in changes:
            statuses.setdefault(batch_id, []).append(updated.status)
        return updated

    monkeypatch.setattr(DynamoMetadataStore, "create_batch", recording_create)
    monkeypatch.setattr(DynamoMetadataStore, "update_batch", recording_update)
    invocations = Invocations()
    aws_calls = AwsCalls()
    aws_calls.install(monkeypatch)
    with lambdas_run_in_process(monkeypatch, functions, invocations, aws_calls):
        yield Deployment(
            api,
            state_machine_arn,
            invocations,
            statuses,
            sfn,
            aws_calls,
            functions,
            template,
            handlers,
            webhook_environment,
            webhook_queue_url,
            aws.sqs,
        )


def test_a_batch_runs_through_the_synthesized_state_machine(
    deployment: Deployment, aws: AwsWorld, upstream: FakeUpstreamServer
) -> None:
    file_id = deployment.upload(INPUT_LINES)
    batch = deployment.create_batch(file_id)
    execution = deployment.wait_for_execution(batch.id)
    assert execution["status"] == "SUCCEEDED", (execution, deployment.invocations.errors)
    assert json.loads(execution["input"]) == {"project_id": PROJECT, "batch_id": batch.id}

    assert deployment.statuses[batch.id] == ["validating", "in_progress", "finalizing", "completed"]
    done = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    assert done.output_file_id and done.error_file_id

    output = deployment.content(done.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["req-1", "req-3"]
    assert all(line["response"]["status_code"] == 200 for line in output)
    [failed] = deployment.content(done.error_file_id)
    assert failed["custom_id"] == "req-2" and failed["response"]["status_code"] == 500

    # the Distributed Map ran one ProcessChunk per manifest item, with the ItemSelector's shape
    calls = deployment.invocations
    assert [e["batch_id"] for e in calls.of(".validate_handler")] == [batch.id]
    chunks = sorted(e["chunk"]["index"] for e in calls.of(".process_handler"))
    assert chunks == [0, 1]
    assert all(set(e) == {"project_id", "batch_id", "chunk"} for e in calls.of(".process_handler"))
    assert len(calls.of(".finalize_handler")) == 1 and calls.of(".fail_handler") == []
    assert calls.errors == [] and calls.retry_sleeps == []

    assert {r.headers.get("authorization") for r in upstream.requests} == {f"Bearer {UPSTREAM_KEY}"}
    [event] = aws.events_delivered()
    assert event["detail-type"] == "batch.completed"
    assert event["detail"]["id"] == batch.id and event["detail"]["project_id"] == PROJECT
    assert event["detail"]["status"] == "completed"


def test_a_batch_end_reaches_its_projects_webhook_through_bus_queue_and_delivery_function(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state machine ends the batch; the finalize step publishes on the bus; the template's rule
    puts the event on the webhook queue; the delivery function signs and POSTs it."""
    receiver = WebhookReceiver()
    try:
        batch = deployment.create_batch(deployment.upload(INPUT_LINES))
        assert deployment.wait_for_execution(batch.id)["status"] == "SUCCEEDED"
        answers = deployment.deliver_webhooks(receiver, lambda: bool(receiver.delivered()), monkeypatch)
        assert answers == [{"batchItemFailures": []}] * 2  # the event fanned out, then its delivery
        (got,) = receiver.wait_for(1)
    finally:
        receiver.close()
    sdk = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1", webhook_secret=WEBHOOK_SECRET)
    event = sdk.webhooks.unwrap(got.body, got.headers)
    assert isinstance(event, BatchCompletedWebhookEvent)
    assert event.id == event_id(batch.id, "completed") and event.data.id == batch.id
    done = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
    assert event.created_at == done.completed_at


def test_a_chunk_that_runs_out_of_time_loops_until_done(
    deployment: Deployment, upstream: FakeUpstreamServer
) -> None:
    """The child's Choice sends ProcessChunk round again while it answers done=false."""
    deployment.invocations.remaining_millis = 10_000  # under the worker's safety margin
    file_id = deployment.upload(INPUT_LINES)
    batch = deployment.create_batch(file_id)
    execution = deployment.wait_for_execution(batch.id)
    assert execution["status"] == "SUCCEEDED", (execution, deployment.invocations.errors)

    by_chunk: dict[int, list[dict[str, Any]]] = {}
    for event in deployment.invocations.of(".process_handler"):
        by_chunk.setdefault(event["chunk"]["index"], []).append(event)
    # chunk 0 (two requests) needs a second call, which carries the first call's answer in $.result
    assert len(by_chunk[0]) == 2 and len(by_chunk[1]) == 1
    assert by_chunk[0][1]["result"]["done"] is False
    done = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert len(upstream.requests) == 3  # nothing sent twice


def test_a_worker_without_capacity_waits_in_the_state_machine_and_runs_when_slots_free(
    deployment: Deployment, upstream: FakeUpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another batch's workers hold the upstream's whole limit: this batch's workers get no lease,
    answer wait_seconds, and the child's Wait state calls them again (no Lambda waits); once the
    slots come back the batch completes, and every lease is given back."""
    monkeypatch.setattr(process, "WAIT_SECONDS", 1)
    [(_, deps)] = [f for f in deployment.functions.values() if f[0].endswith(".process_handler")]
    assert isinstance(deps.leases, MeteredLeases)  # the grants are reported as metrics
    leases = deps.leases.inner
    assert isinstance(leases, DynamoCapacityLeases)
    route = deps.upstream_for("gpt-4o-mini")
    assert route is not None and route.name == "openai"  # cdk.json's upstream
    limit = route.max_in_flight
    assert leases.acquire("openai", "squatter", "batch_other", limit, limit).slots == limit
    real_acquire = DynamoCapacityLeases.acquire
    refused: list[str] = []

    def acquire(
        self: DynamoCapacityLeases, upstream: str, holder: str, batch_id: str, want: int, cap: int
    ) -> Grant:
        granted = real_acquire(self, upstream, holder, batch_id, want, cap)
        if granted.slots == 0 and holder != "squatter":
            refused.append(holder)
            self.release(upstream, "squatter")  # the other batch finishes
        return granted

    monkeypatch.setattr(DynamoCapacityLeases, "acquire", acquire)
    batch = deployment.create_batch(deployment.upload(INPUT_LINES))
    execution = deployment.wait_for_execution(batch.id)
    assert execution["status"] == "SUCCEEDED", (execution, deployment.invocations.errors)
    assert refused  # at least one worker was told to wait
    waited = [
        e for e in deployment.invocations.of(".process_handler") if e.get("result", {}).get("wait_seconds")
    ]
    assert waited and all(e["result"]["wait_seconds"] == 1 and e["result"]["done"] is False for e in waited)
    done = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    assert len(upstream.requests) == 3  # the refused calls sent nothing
    _version, live, _waiting = leases._read("openai", time.time())
    assert live == []  # every worker gave its lease back


class TestSeveralUpstreams:
    """cdk.json's upstreams list as the functions get it: a self-hosted fleet serving one model with
    its own key and limit, and a catch-all for the rest."""

    FLEET_SECRET = "batch-api/test/fleet"
    FLEET_LIMIT = 3

    @pytest.fixture
    def fleet_server(self) -> Iterator[FakeUpstreamServer]:
        with FakeUpstreamServer() as server:
            yield server

    @pytest.fixture
    def fleet(self, upstream: FakeUpstreamServer, fleet_server: FakeUpstreamServer, aws: AwsWorld) -> Fleet:
        boto3.client("secretsmanager", region_name=REGION).create_secret(
            Name=self.FLEET_SECRET, SecretString="sk-fleet"
        )

        def point(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            [catch_all] = specs  # cdk.json's dev environment
            return [
                {
                    "name": "fleet",
                    "base_url": fleet_server.base_url,
                    "api_key_secret": self.FLEET_SECRET,
                    "models": ["llama-test"],
                    "max_in_flight": self.FLEET_LIMIT,
                },
                {
                    **catch_all,
                    "base_url": upstream.base_url,
                    "api_key_secret": SECRET,
                    "models": ["gpt-4o-mini"],
                },
            ]

        return point

    @staticmethod
    def lines(model: str) -> bytes:
        return INPUT_LINES.replace(b'"model":"gpt-4o-mini"', f'"model":"{model}"'.encode())

    def test_each_batch_goes_to_its_models_upstream_within_that_upstreams_limit(
        self,
        deployment: Deployment,
        upstream: FakeUpstreamServer,
        fleet_server: FakeUpstreamServer,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        real_acquire = DynamoCapacityLeases.acquire
        asked: list[tuple[str, int]] = []

        def acquire(
            self: DynamoCapacityLeases, name: str, holder: str, batch_id: str, want: int, limit: int
        ) -> Grant:
            asked.append((name, limit))
            return real_acquire(self, name, holder, batch_id, want, limit)

        monkeypatch.setattr(DynamoCapacityLeases, "acquire", acquire)
        llama = deployment.create_batch(deployment.upload(self.lines("llama-test")))
        assert deployment.wait_for_execution(llama.id)["status"] == "SUCCEEDED", deployment.invocations.errors
        assert len(fleet_server.requests) == 3 and upstream.requests == []
        assert {r.headers.get("authorization") for r in fleet_server.requests} == {"Bearer sk-fleet"}
        assert asked and set(asked) == {("fleet", self.FLEET_LIMIT)}

        asked.clear()
        gpt = deployment.create_batch(deployment.upload(INPUT_LINES))
        assert deployment.wait_for_execution(gpt.id)["status"] == "SUCCEEDED", deployment.invocations.errors
        assert len(upstream.requests) == 3 and len(fleet_server.requests) == 3
        assert {r.headers.get("authorization") for r in upstream.requests} == {f"Bearer {UPSTREAM_KEY}"}
        assert asked and {name for name, _limit in asked} == {"openai"}

    def test_a_model_no_upstream_serves_fails_at_validation(
        self, deployment: Deployment, upstream: FakeUpstreamServer, fleet_server: FakeUpstreamServer
    ) -> None:
        batch = deployment.create_batch(deployment.upload(self.lines("gpt-unknown")))
        deployment.wait_for_execution(batch.id)
        failed = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
        assert failed.status == "failed" and failed.errors is not None and failed.errors.data
        [error] = failed.errors.data
        assert (error.code, error.param, error.line) == ("model_not_found", "body.model", 1)
        assert error.message == "The provided model 'gpt-unknown' is not supported by the Batch API."
        assert upstream.requests == [] and fleet_server.requests == []


def test_a_step_that_keeps_failing_ends_the_batch_failed(
    deployment: Deployment, aws: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_finalize(event: BatchRef, deps: Deps) -> dict[str, Any]:
        raise FinalizeError(f"batch {event.batch_id}: deliberately broken for the test")

    monkeypatch.setattr(steps, "finalize_batch", broken_finalize)
    file_id = deployment.upload(INPUT_LINES)
    batch = deployment.create_batch(file_id)
    execution = deployment.wait_for_execution(batch.id)
    assert execution["status"] == "FAILED"

    calls = deployment.invocations
    # States.TaskFailed is retried three times with backoff (1 s, 2 s, 4 s), then caught
    assert len(calls.of(".finalize_handler")) == 4
    assert calls.retry_sleeps == [1, 2, 4]
    [mark_failed] = calls.of(".fail_handler")
    assert mark_failed["failure"]["Error"] == "FinalizeError"  # the Catch's whole error output
    assert json.loads(mark_failed["failure"]["Cause"])["errorType"] == "FinalizeError"  # the raw Cause

    assert deployment.statuses[batch.id] == ["validating", "in_progress", "failed"]
    failed = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
    assert failed.status == "failed" and failed.failed_at
    assert failed.errors is not None and failed.errors.data is not None
    [error] = failed.errors.data
    assert error.code == "internal_error"
    assert error.message == (
        "The batch failed because a workflow step failed "
        f"(FinalizeError: batch {batch.id}: deliberately broken for the test)."
    )
    [event] = aws.events_delivered()
    assert event["detail-type"] == "batch.failed" and event["detail"]["id"] == batch.id
    assert aws.keys(f"batches/{batch.id}/journal/") == []


def test_validation_failures_end_the_execution_without_the_map(deployment: Deployment, aws: AwsWorld) -> None:
    file_id = deployment.upload(b'{"custom_id": "only", "method": "GET"}\n')
    batch = deployment.create_batch(file_id)
    assert deployment.wait_for_execution(batch.id)["status"] == "SUCCEEDED"  # Route -> Done
    assert deployment.invocations.of(".process_handler") == []
    assert deployment.invocations.of(".finalize_handler") == []
    failed = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
    assert failed.status == "failed" and failed.errors is not None and failed.errors.data
    assert {e.code for e in failed.errors.data} >= {"missing_required_parameter"}
    [event] = aws.events_delivered()
    assert event["detail-type"] == "batch.failed"


# ---------------------------------------------------------------- least privilege, proven by the calls

# the IAM action each API operation the adapters use needs
IAM_ACTION = {
    ("dynamodb", "GetItem"): "dynamodb:GetItem",
    ("dynamodb", "PutItem"): "dynamodb:PutItem",
    ("dynamodb", "UpdateItem"): "dynamodb:UpdateItem",
    ("dynamodb", "Query"): "dynamodb:Query",
    ("dynamodb", "BatchWriteItem"): "dynamodb:BatchWriteItem",
    ("dynamodb", "DeleteItem"): "dynamodb:DeleteItem",
    ("s3", "GetObject"): "s3:GetObject",
    ("s3", "HeadObject"): "s3:GetObject",
    ("s3", "ListObjectsV2"): "s3:ListBucket",
    ("s3", "PutObject"): "s3:PutObject",
    ("s3", "CreateMultipartUpload"): "s3:PutObject",
    ("s3", "UploadPart"): "s3:PutObject",
    ("s3", "CompleteMultipartUpload"): "s3:PutObject",
    ("s3", "AbortMultipartUpload"): "s3:AbortMultipartUpload",
    ("s3", "PutObjectTagging"): "s3:PutObjectTagging",
    ("s3", "DeleteObject"): "s3:DeleteObject",
    ("s3", "DeleteObjects"): "s3:DeleteObject",
    ("events", "PutEvents"): "events:PutEvents",
    ("stepfunctions", "StartExecution"): "states:StartExecution",
    ("secretsmanager", "GetSecretValue"): "secretsmanager:GetSecretValue",
    ("sqs", "SendMessage"): "sqs:SendMessage",
    ("sqs", "ChangeMessageVisibility"): "sqs:ChangeMessageVisibility",
}
# what Lambda's SQS event source does with the delivery function's role
EVENT_SOURCE_ACTIONS = {"sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"}
# a transaction needs the action of each item it writes (IAM has no action of its own for it)
TRANSACTION_ACTIONS = {
    ("dynamodb", "TransactWriteItems"): ("dynamodb:UpdateItem", "dynamodb:PutItem", "dynamodb:DeleteItem"),
}
# DynamoDB actions granted for a path these scenarios do not take, and why it is needed anyway
GRANTED_FOR_PATHS_NOT_RUN = {
    ("validate_handler", "dynamodb:BatchWriteItem"): "validate re-run on a batch that had ended cleans up "
    "its chunk progress (after a crash between the terminal commit and the clean-up)",
    ("fail_handler", "dynamodb:BatchWriteItem"): "a batch failed after chunks ran has chunk progress to drop",
    ("housekeeping_handler", "dynamodb:BatchWriteItem"): "announcing an end a crash left unannounced drops "
    "that batch's chunk progress",
}


def test_every_call_of_every_function_is_allowed_by_its_role_and_nothing_more_on_the_table(
    deployment: Deployment, aws: AwsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    """moto never evaluates IAM: here every AWS call each function makes, over a batch run, the API's
    routes, a failing batch and the sweep, is compared with the function's policy in the template.
    A call outside it would be AccessDenied in a real account; a DynamoDB action granted and never
    called must say why."""
    # a batch, start to end (the API starts it; validate, process and finalize run it)
    file_id = deployment.upload(INPUT_LINES)
    batch = deployment.create_batch(file_id)
    assert deployment.wait_for_execution(batch.id)["status"] == "SUCCEEDED"
    done = Batch.model_validate(deployment.call_api("GET", f"/v1/batches/{batch.id}"))
    assert done.output_file_id is not None
    deployment.content(done.output_file_id)
    # the API's other routes: lists, cancel, idempotency, uploads, delete
    deployment.call_api("GET", "/v1/files")
    deployment.call_api("GET", "/v1/batches")
    deployment.call_api("GET", f"/v1/files/{file_id}")
    second = deployment.create_batch(deployment.upload(INPUT_LINES))
    deployment.call_api("POST", f"/v1/batches/{second.id}/cancel")
    assert deployment.wait_for_execution(second.id)["status"] == "SUCCEEDED"
    upload = deployment.call_api(
        "POST",
        "/v1/uploads",
        body=orjson.dumps(
            {
                "bytes": len(INPUT_LINES),
                "filename": "u.jsonl",
                "mime_type": "application/jsonl",
                "purpose": "batch",
            }
        ),
        content_type="application/json",
    )
    boundary = "partboundary"
    part_body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="data"; filename="blob"\r\n\r\n'.encode()
        + INPUT_LINES
        + f"\r\n--{boundary}--\r\n".encode()
    )
    part = deployment.call_api(
        "POST",
        f"/v1/uploads/{upload['id']}/parts",
        body=part_body,
        content_type=f"multipart/form-data; boundary={boundary}",
    )
    deployment.call_api(
        "POST",
        f"/v1/uploads/{upload['id']}/complete",
        body=orjson.dumps({"part_ids": [part["id"]]}),
        content_type="application/json",
    )
    deployment.call_api("DELETE", f"/v1/files/{file_id}")
    # a file that fails validation (validate ends the batch itself)
    invalid = deployment.create_batch(deployment.upload(INPUT_LINES + b"{not json\n"))
    assert deployment.wait_for_execution(invalid.id)["status"] == "SUCCEEDED"  # Route -> Done
    # a step that keeps failing ends in MarkFailed, then the hourly sweep
    with pytest.MonkeyPatch.context() as broken:
        broken.setattr(steps, "finalize_batch", _always_broken)
        third = deployment.create_batch(deployment.upload(INPUT_LINES))
        assert deployment.wait_for_execution(third.id)["status"] == "FAILED"
    # the sweep, with work to do: an end a crash left unannounced
    store = deployment.api.deps.metadata
    store.update_batch(  # as the terminal commit leaves it when the publish after it never happened
        PROJECT, batch.id, {"status": "completed", "event_pending": True}, expected_status={"completed"}
    )
    swept = deployment.run_function(f"{WORKFLOW_HANDLERS}.housekeeping_handler", {}, monkeypatch)
    assert swept["removed"]["unannounced_events"] == 1
    # every batch above ended (completed, cancelled, failed validation, MarkFailed): none holds its input
    items = store.table.scan()["Items"]  # type: ignore[attr-defined]
    assert [i["sk"] for i in items if str(i["sk"]).startswith("BATCH")] == ["BATCH"] * 4
    assert [i for i in items if str(i["sk"]).startswith("HOLD#")] == []
    # every end above reaches the webhook receiver (the first batch's twice: announced again by the
    # sweep), the first six attempts failing: each event from the bus is queued again as a delivery,
    # and a delivery that fails again is retried by its visibility timeout
    receiver = WebhookReceiver(answers=[500] * 6)
    try:
        deployment.deliver_webhooks(receiver, lambda: len(receiver.delivered()) >= 5, monkeypatch)
    finally:
        receiver.close()
    delivery_calls = deployment.aws_calls.by_function[WEBHOOKS_HANDLER]
    assert {("sqs", "SendMessage"), ("sqs", "ChangeMessageVisibility")} <= delivery_calls

    template = deployment.template
    checked = []
    for handler_path, logical_id in deployment.handlers.items():
        calls = deployment.aws_calls.by_function.get(handler_path, set())
        assert calls, f"{handler_path} made no AWS call: the scenario above misses it"
        unknown = {call for call in calls if call not in IAM_ACTION and call not in TRANSACTION_ACTIONS}
        assert not unknown, f"map these operations to IAM actions: {unknown}"
        needed = {IAM_ACTION[call] for call in calls if call in IAM_ACTION} | {
            action for call in calls for action in TRANSACTION_ACTIONS.get(call, ())
        }
        if handler_path == WEBHOOKS_HANDLER:
            needed |= EVENT_SOURCE_ACTIONS
        granted = actions_of(role_statements(template, logical_id))
        assert needed <= granted, (handler_path, needed - granted)
        name = handler_path.rpartition(".")[2]
        unused = {
            action
            for action in granted
            if action.startswith("dynamodb:")
            and action not in needed
            and (name, action) not in GRANTED_FOR_PATHS_NOT_RUN
        }
        assert not unused, (handler_path, unused)
        checked.append(name)
    assert sorted(checked) == [
        "fail_handler",
        "finalize_handler",
        "handler",
        "handler",  # the API's and the webhook delivery's
        "housekeeping_handler",
        "process_handler",
        "validate_handler",
    ]


WORKFLOW_HANDLERS = "batch_api.handlers.workflow"


def _always_broken(event: BatchRef, deps: Deps) -> Any:
    raise FinalizeError(f"batch {event.batch_id}: deliberately broken for the test")
