"""The Lambda handlers end to end on the AWS adapters under moto: every sample in events/ goes through
its handler, and a batch driven handler by handler (validate -> process each chunk -> finalize)
completes with the right files, counts, metrics and an EventBridge event delivered to SQS."""

from __future__ import annotations

import base64
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import boto3
import orjson
import pytest
from openai.types import Batch, FileDeleted, FileObject, Upload
from openai.types.uploads import UploadPart

import batch_api.handlers.workflow as steps
from batch_api import object_keys
from batch_api.contract.ids import output_file_id
from batch_api.contract.models import BatchRecord, UploadPartRecord, UploadRecord
from batch_api.deps import Deps
from batch_api.handlers.auth import project_id_for_key
from batch_api.upstreams import loops
from batch_api.upstreams.metered import REQUESTS_FAILED, REQUESTS_SUCCEEDED, UPSTREAM_LATENCY
from tests.integration.conftest import (
    BUS,
    CLIENT_KEY,
    EVENTS_DIR,
    PROJECT,
    REGION,
    UPSTREAM_KEY,
    AwsWorld,
    LambdaContext,
    load_event,
    seed_batch,
    seed_input_file,
)
from tests.support.fake_upstream import FakeUpstreamServer
from tests.unit.api_events import BATCH_ID, INPUT_FILE_ID, PART_IDS, UPLOAD_ID

pytestmark = [pytest.mark.integration, pytest.mark.filterwarnings("ignore:No application metrics to publish")]

API_PROJECT = project_id_for_key(CLIENT_KEY)  # the project of the API samples' key
API_SAMPLES = sorted(path.name for path in (EVENTS_DIR / "api").glob("*.json"))
WORKFLOW_SAMPLES = sorted(path.name for path in (EVENTS_DIR / "workflow").glob("*.json"))


@pytest.fixture
def step_deps(lambda_env: dict[str, str]) -> Iterator[Deps]:
    """The workflow handlers' container Deps, built from this test's environment."""
    steps.get_deps.cache_clear()
    yield steps.get_deps()
    steps.get_deps.cache_clear()


def emf_metrics(output: str, upstream: str | None = None) -> dict[str, list[float]]:
    """Values per metric name in the EMF blobs Powertools printed: those of the invocation, or those
    with the `Upstream` dimension `upstream`."""
    values: dict[str, list[float]] = {}
    for line in output.splitlines():
        if not line.startswith("{") or '"_aws"' not in line:
            continue
        blob = json.loads(line)
        if blob.get("Upstream") != upstream:
            continue
        for directive in blob["_aws"]["CloudWatchMetrics"]:
            assert directive["Namespace"] == "BatchApi"
            for metric in directive["Metrics"]:
                value = blob[metric["Name"]]
                values.setdefault(metric["Name"], []).extend(value if isinstance(value, list) else [value])
    return values


def jsonl(deps: Deps, file_id: str) -> list[dict[str, Any]]:
    record = deps.metadata.get_file(PROJECT, file_id)
    assert record is not None and record.purpose == "batch_output"
    return [orjson.loads(line) for line in deps.blobs.get(record.blob_key).splitlines()]


# ---------------------------------------------------------------- the workflow handlers


def test_workflow_samples_cover_every_step() -> None:
    assert WORKFLOW_SAMPLES == [
        "fail.json",
        "fail_from_catch.json",
        "finalize.json",
        "housekeeping.json",
        "process.json",
        "validate.json",
    ]


def test_a_batch_driven_handler_by_handler_completes(
    step_deps: Deps,
    aws: AwsWorld,
    upstream: FakeUpstreamServer,
    lambda_context: LambdaContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_input_file(step_deps)
    seed_batch(step_deps)

    validated = steps.validate_handler(load_event("workflow/validate.json"), lambda_context)
    assert validated == {
        "project_id": PROJECT,
        "batch_id": BATCH_ID,
        "next": "process",
        "manifest_key": object_keys.manifest_key(BATCH_ID),
        "chunk_count": 2,
    }
    manifest = orjson.loads(step_deps.blobs.get(validated["manifest_key"]))
    sample = load_event("workflow/process.json")
    assert manifest[0] == sample["chunk"], "events/workflow/process.json must be chunk 0 of the sample plan"
    assert step_deps.metadata.get_batch(PROJECT, BATCH_ID).status == "in_progress"  # type: ignore[union-attr]

    # what the Distributed Map's ItemSelector builds for every manifest item
    for item in manifest:
        event = {"project_id": PROJECT, "batch_id": BATCH_ID, "chunk": item}
        result = steps.process_handler(event, lambda_context)
        assert result == {
            "project_id": PROJECT,
            "batch_id": BATCH_ID,
            "index": item["index"],
            "done": True,
            "stopped": None,
            "wait_seconds": 0,
        }

    finalize_event = load_event("workflow/finalize.json")
    assert {k: finalize_event[k] for k in validated} == validated  # the sample is the state after the Map
    assert steps.finalize_handler(finalize_event, lambda_context) == {
        "project_id": PROJECT,
        "batch_id": BATCH_ID,
        "status": "completed",
    }

    batch = step_deps.metadata.get_batch(PROJECT, BATCH_ID)
    assert batch is not None and batch.status == "completed"
    assert batch.request_counts.model_dump() == {"total": 3, "completed": 2, "failed": 1}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert batch.output_file_id == output_file_id(BATCH_ID, "output")
    output = jsonl(step_deps, batch.output_file_id)
    assert sorted(line["custom_id"] for line in output) == ["req-1", "req-3"]
    assert all(line["response"]["status_code"] == 200 and line["error"] is None for line in output)
    assert batch.error_file_id is not None
    [failed] = jsonl(step_deps, batch.error_file_id)
    assert failed["custom_id"] == "req-2"
    assert failed["response"]["status_code"] == 500 and failed["error"] is None
    # output objects carry the lifecycle tag S3 expires them by
    tags = aws.s3.get_object_tagging(
        Bucket=os.environ["BATCH_API_BUCKET_NAME"], Key=object_keys.file_key(batch.output_file_id)
    )
    assert tags["TagSet"] == [{"Key": "expire-days", "Value": "30"}]
    assert aws.keys(f"batches/{BATCH_ID}/journal/") == []  # journals go once the files hold the results

    # the key came from Secrets Manager; req-2 was retried once (BATCH_API_UPSTREAM_MAX_RETRIES=1)
    assert {r.headers.get("authorization") for r in upstream.requests} == {f"Bearer {UPSTREAM_KEY}"}
    assert len(upstream.requests) == 4

    [event] = aws.events_delivered()
    assert event["source"] == "batch-api"
    assert event["detail-type"] == "batch.completed"
    assert event["detail"]["id"] == BATCH_ID
    assert event["detail"]["project_id"] == PROJECT
    assert event["detail"]["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    Batch.model_validate({k: v for k, v in event["detail"].items() if k != "project_id"})

    out = capsys.readouterr().out
    metrics = emf_metrics(out)
    assert sum(metrics[REQUESTS_SUCCEEDED]) == 2
    assert sum(metrics[REQUESTS_FAILED]) == 1
    assert len(metrics[UPSTREAM_LATENCY]) == 3 and all(value >= 0 for value in metrics[UPSTREAM_LATENCY])
    # the same latencies again under the upstream the batch was routed to
    assert sorted(emf_metrics(out, "default")[UPSTREAM_LATENCY]) == sorted(metrics[UPSTREAM_LATENCY])


def validated_process_event(deps: Deps, lambda_context: LambdaContext) -> dict[str, Any]:
    """Seed the sample batch, run its validate step, and return the sample process event."""
    seed_input_file(deps)
    seed_batch(deps)
    steps.validate_handler(load_event("workflow/validate.json"), lambda_context)
    return load_event("workflow/process.json")


def test_process_returns_a_cursor_when_time_runs_low_and_the_loop_finishes_the_chunk(
    step_deps: Deps, upstream: FakeUpstreamServer, lambda_context: LambdaContext
) -> None:
    sample = validated_process_event(step_deps, lambda_context)

    lambda_context.remaining_millis = 10_000  # below the worker's safety margin: one request, then a cursor
    first = steps.process_handler(sample, lambda_context)
    assert first["done"] is False and first["stopped"] is None
    assert len(upstream.requests) == 1

    lambda_context.remaining_millis = 900_000  # the state machine's Choice sends it round again
    second = steps.process_handler(sample, lambda_context)
    assert second["done"] is True
    # the journal is the cursor: nothing that finished was sent again (req-2's retry is its client's)
    sent = [r.body["messages"][0]["content"] for r in upstream.requests]
    assert sorted(set(sent)) == ["Fail please", "Say hello"]
    assert sent.count("Say hello") == 1
    progress = step_deps.metadata.list_chunk_progress(BATCH_ID)
    assert [(p.index, p.completed, p.failed, p.done) for p in progress] == [(0, 1, 1, True)]


def test_a_warm_lambda_worker_reuses_its_upstream_connections_across_invocations(
    step_deps: Deps,
    upstream: FakeUpstreamServer,
    lambda_context: LambdaContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The runtime names the function: the worker keeps its event loop, so the second invocation
    sends on the connection the first opened (no new connect or TLS handshake per chunk)."""
    monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "batch-api-test-process")
    sample = validated_process_event(step_deps, lambda_context)
    try:
        lambda_context.remaining_millis = 10_000  # one request, then a cursor
        assert steps.process_handler(sample, lambda_context)["done"] is False
        [first] = upstream.requests
        lambda_context.remaining_millis = 900_000
        assert steps.process_handler(sample, lambda_context)["done"] is True
        assert upstream.requests[1].peer_port == first.peer_port
    finally:
        loops.close_loop(loops.keep_loop())


def test_outside_lambda_each_invocation_has_its_own_connections(
    step_deps: Deps, upstream: FakeUpstreamServer, lambda_context: LambdaContext
) -> None:
    sample = validated_process_event(step_deps, lambda_context)
    lambda_context.remaining_millis = 10_000
    steps.process_handler(sample, lambda_context)
    lambda_context.remaining_millis = 900_000
    steps.process_handler(sample, lambda_context)
    first, second = upstream.requests[:2]
    assert first.peer_port != second.peer_port
    assert getattr(loops._local, "runner", None) is None


@pytest.mark.parametrize("sample", ["fail.json", "fail_from_catch.json"])
def test_fail_samples_end_the_batch_failed_with_a_readable_error(
    sample: str, step_deps: Deps, aws: AwsWorld, lambda_context: LambdaContext
) -> None:
    seed_input_file(step_deps)
    seed_batch(step_deps)
    assert steps.fail_handler(load_event(f"workflow/{sample}"), lambda_context) == {
        "project_id": PROJECT,
        "batch_id": BATCH_ID,
        "status": "failed",
    }
    batch = step_deps.metadata.get_batch(PROJECT, BATCH_ID)
    assert batch is not None and batch.status == "failed" and batch.failed_at
    [error] = batch.errors
    assert error.code == "internal_error"
    assert error.message.startswith("The batch failed because a workflow step failed (")
    if sample == "fail.json":  # what MarkFailed sends: the Cause of a timed-out Lambda as the message
        assert error.message.endswith(
            "(Sandbox.Timedout: RequestId: 5f3e1c2a-8a8e-4c1b-9d0e-0123456789ab Error: Task timed out after 900.00 seconds)."
        )
    else:  # the Catch's own shape
        assert "FinalizeError: batch batch_0123456789abcdef01234567 cannot be finalized" in error.message
        assert "stackTrace" not in error.message and "/var/task" not in error.message
    [event] = aws.events_delivered()
    assert event["detail-type"] == "batch.failed"
    assert event["detail"]["errors"]["data"][0]["message"] == error.message
    # a second failure report (a retried fail task) changes nothing
    assert steps.fail_handler(load_event(f"workflow/{sample}"), lambda_context)["status"] == "failed"
    assert aws.events_delivered(expected=1, timeout=0.2) == []


def test_the_scheduled_housekeeping_removes_expired_files(
    step_deps: Deps, aws: AwsWorld, lambda_context: LambdaContext
) -> None:
    expired = seed_input_file(step_deps, file_id="file-expired")
    kept = seed_input_file(step_deps, file_id="file-kept")
    step_deps.metadata.mark_file_deleted(PROJECT, expired.id)  # record gone from the API ...
    now = step_deps.now()
    step_deps.metadata.create_file(  # ... and one that expired an hour ago
        expired.model_copy(
            update={"id": "file-old", "blob_key": object_keys.file_key("file-old"), "expires_at": now - 3600}
        )
    )
    step_deps.blobs.put(object_keys.file_key("file-old"), b"{}\n")

    result = steps.housekeeping_handler(load_event("workflow/housekeeping.json"), lambda_context)

    assert result["removed"]["files"] == 1
    assert step_deps.metadata.get_file(PROJECT, "file-old").deleted  # type: ignore[union-attr]
    assert aws.keys("files/") == sorted([object_keys.file_key(expired.id), object_keys.file_key(kept.id)])


def test_steps_do_not_start_batches(step_deps: Deps) -> None:
    with pytest.raises(RuntimeError, match="do not start batches"):
        step_deps.workflow.start(PROJECT, BATCH_ID)


# ---------------------------------------------------------------- the API handler


@pytest.fixture
def state_machine_arn(aws: AwsWorld, monkeypatch: pytest.MonkeyPatch) -> str:
    """A trivial state machine for the API to start (the real one runs in test_state_machine_moto)."""
    sfn = boto3.client("stepfunctions", region_name=REGION)
    arn: str = sfn.create_state_machine(
        name="batch-api-test",
        definition=json.dumps({"StartAt": "Done", "States": {"Done": {"Type": "Succeed"}}}),
        roleArn="arn:aws:iam::123456789012:role/batch-api-test",
    )["stateMachineArn"]
    monkeypatch.setenv("BATCH_API_STATE_MACHINE_ARN", arn)
    return arn


def load_api_module() -> ModuleType:
    """Import (or re-import) the API Lambda module, so its module scope reads this test's environment."""
    name = "batch_api.handlers.lambda_api"
    if name in sys.modules:
        return importlib.reload(sys.modules[name])
    return importlib.import_module(name)


@pytest.fixture
def api(lambda_env: dict[str, str], state_machine_arn: str) -> ModuleType:
    module = load_api_module()
    seed_api_objects(module.deps)
    return module


def seed_api_objects(deps: Deps) -> None:
    """The objects the events/api samples name, timed from now (the samples' ids)."""
    seed_input_file(deps, b'{"custom_id": "r1"}\n{"custom_id": "r2"}\n', project_id=API_PROJECT)
    seed_batch(deps, project_id=API_PROJECT)
    now = deps.now()
    parts = (b'{"a": ', b'"bc"}\n')  # 12 bytes, as the sample events say
    deps.metadata.create_upload(
        UploadRecord(
            id=UPLOAD_ID,
            project_id=API_PROJECT,
            bytes=sum(map(len, parts)),
            created_at=now,
            expires_at=now + 3600,
            filename="big.jsonl",
            purpose="batch",
            mime_type="application/jsonl",
        )
    )
    for part_id, data in zip(PART_IDS, parts, strict=True):
        key = object_keys.upload_part_key(UPLOAD_ID, part_id)
        deps.blobs.put(key, data)
        deps.metadata.add_upload_part(
            UploadPartRecord(id=part_id, upload_id=UPLOAD_ID, created_at=now, bytes=len(data), blob_key=key)
        )


def _json(result: dict[str, Any]) -> Any:
    assert result["statusCode"] == 200, result
    return orjson.loads(result["body"])


Check = Callable[[ModuleType, dict[str, Any]], None]


def _created_batch(api: ModuleType, result: dict[str, Any]) -> None:
    batch = Batch.model_validate(_json(result))
    assert batch.status == "validating" and batch.metadata == {"team": "search"}
    # the API started the state machine with the batch id as the execution name
    sfn = boto3.client("stepfunctions", region_name=REGION)
    names = [
        e["name"]
        for e in sfn.list_executions(stateMachineArn=os.environ["BATCH_API_STATE_MACHINE_ARN"])["executions"]
    ]
    assert names == [batch.id]
    stored = api.deps.metadata.get_batch(API_PROJECT, batch.id)
    assert isinstance(stored, BatchRecord)


def _file_content(api: ModuleType, result: dict[str, Any]) -> None:
    assert result["statusCode"] == 200
    assert base64.b64decode(result["body"]) == b'{"custom_id": "r1"}\n{"custom_id": "r2"}\n'


API_CHECKS: dict[str, Check] = {
    "batches_cancel.json": lambda api, r: _assert(Batch.model_validate(_json(r)).status == "cancelling"),
    "batches_create.json": _created_batch,
    "batches_list.json": lambda api, r: _assert([b["id"] for b in _json(r)["data"]] == [BATCH_ID]),
    "batches_retrieve.json": lambda api, r: _assert(Batch.model_validate(_json(r)).id == BATCH_ID),
    "files_content.json": _file_content,
    "files_create.json": lambda api, r: _assert(FileObject.model_validate(_json(r)).purpose == "batch"),
    "files_delete.json": lambda api, r: _assert(FileDeleted.model_validate(_json(r)).deleted),
    "files_list.json": lambda api, r: _assert([f["id"] for f in _json(r)["data"]] == [INPUT_FILE_ID]),
    "files_retrieve.json": lambda api, r: _assert(FileObject.model_validate(_json(r)).id == INPUT_FILE_ID),
    "health.json": lambda api, r: _assert(_json(r) == {"status": "ok"}),
    "uploads_add_part.json": lambda api, r: _assert(
        UploadPart.model_validate(_json(r)).upload_id == UPLOAD_ID
    ),
    "uploads_cancel.json": lambda api, r: _assert(Upload.model_validate(_json(r)).status == "cancelled"),
    "uploads_complete.json": lambda api, r: _assert(Upload.model_validate(_json(r)).status == "completed"),
    "uploads_create.json": lambda api, r: _assert(Upload.model_validate(_json(r)).status == "pending"),
}


def _assert(condition: bool) -> None:
    assert condition


def test_every_api_sample_has_a_check() -> None:
    assert sorted(API_CHECKS) == API_SAMPLES


@pytest.mark.parametrize("sample", API_SAMPLES)
def test_api_samples_through_the_lambda_handler(
    sample: str, api: ModuleType, lambda_context: LambdaContext
) -> None:
    result = api.handler(load_event(f"api/{sample}"), lambda_context)
    API_CHECKS[sample](api, result)


def test_api_errors_keep_the_openai_envelope(api: ModuleType, lambda_context: LambdaContext) -> None:
    event = load_event("api/batches_retrieve.json")
    event["path"] = "/v1/batches/batch_nope"
    event["pathParameters"] = {"proxy": "v1/batches/batch_nope"}
    result = api.handler(event, lambda_context)
    assert result["statusCode"] == 404
    assert set(orjson.loads(result["body"])["error"]) == {"message", "type", "param", "code"}


def test_api_cold_start_makes_no_aws_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Module scope builds clients but calls nothing: pointed at a port where nobody listens, it loads."""
    from tests.support.fake_upstream import free_port

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "BATCH_API_BACKEND": "aws",
        "BATCH_API_AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "BATCH_API_STATE_MACHINE_ARN": "arn:aws:states:us-east-1:123456789012:stateMachine:nowhere",
        "BATCH_API_TABLE_NAME": "batch-api-test",
        "BATCH_API_BUCKET_NAME": "batch-api-test-bucket",
        "BATCH_API_EVENT_BUS_NAME": BUS,
        "BATCH_API_API_KEYS_SECRET_NAME": "batch-api/test/api-keys",
    }.items():
        monkeypatch.setenv(name, value)
    module = load_api_module()
    assert module.settings.aws_endpoint_url == os.environ["BATCH_API_AWS_ENDPOINT_URL"]
    health = module.handler(load_event("api/health.json"), LambdaContext())
    assert health["statusCode"] == 200


def test_the_api_needs_a_state_machine(lambda_env: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="BATCH_API_STATE_MACHINE_ARN"):
        load_api_module()


@pytest.mark.parametrize(
    "variable", ["BATCH_API_TABLE_NAME", "BATCH_API_BUCKET_NAME", "BATCH_API_EVENT_BUS_NAME"]
)
def test_a_missing_resource_name_fails_the_cold_start_naming_it(
    lambda_env: dict[str, str], state_machine_arn: str, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """No defaults on AWS: a function whose table, bucket or bus variable is missing must not quietly
    use some other one."""
    monkeypatch.delenv(variable)
    with pytest.raises(ValueError, match=variable):
        load_api_module()
    steps.get_deps.cache_clear()
    with pytest.raises(ValueError, match=variable):
        steps.get_deps()


def test_the_api_will_not_start_without_client_keys(
    lambda_env: dict[str, str], state_machine_arn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BATCH_API_API_KEYS")
    with pytest.raises(ValueError, match="BATCH_API_API_KEYS_SECRET_NAME"):
        load_api_module()


API_KEYS_SECRET = "batch-api/test/api-keys"


def with_authorization(event: dict[str, Any], value: str | None) -> dict[str, Any]:
    for key in ("headers", "multiValueHeaders"):
        event[key] = {k: v for k, v in event[key].items() if k.lower() != "authorization"}
        if value is not None:
            event[key]["authorization"] = value if key == "headers" else [value]
    return event


def test_the_api_requires_a_key_from_the_api_keys_secret(
    lambda_env: dict[str, str],
    state_machine_arn: str,
    monkeypatch: pytest.MonkeyPatch,
    lambda_context: LambdaContext,
) -> None:
    """The stack names a secret of client keys; without it every caller would be one open project."""
    from batch_api.adapters.aws import secrets
    from batch_api.handlers.auth import project_id_for_key

    client = boto3.client("secretsmanager", region_name=REGION)
    client.create_secret(Name=API_KEYS_SECRET, SecretString="sk-test, sk-other")
    monkeypatch.setenv("BATCH_API_API_KEYS_SECRET_NAME", API_KEYS_SECRET)
    api = load_api_module()

    def status(authorization: str | None) -> int:
        event = with_authorization(load_event("api/batches_list.json"), authorization)
        result: dict[str, Any] = api.handler(event, lambda_context)
        return int(result["statusCode"])

    assert status(None) == 401
    assert status("Bearer sk-wrong") == 401
    assert status("Bearer sk-test") == 200
    assert status("Bearer sk-other") == 200
    # each key is its own project: a batch of sk-other's project is not listed for sk-test
    seed_batch(api.deps, project_id=project_id_for_key("sk-other"))
    listed = api.handler(
        with_authorization(load_event("api/batches_list.json"), "Bearer sk-test"), lambda_context
    )
    assert _json(listed)["data"] == []
    # a revoked key stops working once the cached secret is refreshed, without a deployment
    client.put_secret_value(SecretId=API_KEYS_SECRET, SecretString='{"api_keys": ["sk-other"]}')
    secrets.clear_cache()
    assert status("Bearer sk-test") == 401
    assert status("Bearer sk-other") == 200


def test_the_api_fails_closed_when_the_api_keys_secret_is_unreadable(
    lambda_env: dict[str, str],
    state_machine_arn: str,
    monkeypatch: pytest.MonkeyPatch,
    lambda_context: LambdaContext,
) -> None:
    """An unreadable secret is a 500 for every request (in the envelope), never an open API."""
    monkeypatch.setenv("BATCH_API_API_KEYS_SECRET_NAME", "batch-api/test/no-such-secret")
    api = load_api_module()
    result = api.handler(load_event("api/batches_list.json"), lambda_context)
    assert result["statusCode"] == 500
    assert orjson.loads(result["body"])["error"]["type"] == "server_error"
    assert api.handler(load_event("api/health.json"), lambda_context)["statusCode"] == 200  # public
