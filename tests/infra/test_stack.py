"""CDK Template assertions on the stack for every environment in cdk.json, with cdk-nag on."""

from __future__ import annotations

import json
import typing
from typing import Any

import httpx2 as httpx
import openai
import orjson
import pytest

from batch_api.adapters.aws import schema
from batch_api.config import Settings
from batch_api.contract import limits
from batch_api.contract.steps import FailInput, ProcessInput, ProcessOutput, ValidateOutput
from batch_api.service.uploads import MAX_PART_BYTES
from batch_api.upstreams.routing import UpstreamSpec, load_specs
from infra import outputs
from tests.infra.helpers import (
    Synthesized,
    actions_of,
    cdk_context,
    function_logical_ids,
    only,
    render_definition,
    resources,
    role_statements,
    synth_stack,
)

pytestmark = pytest.mark.infra

ENVIRONMENTS = sorted(cdk_context("dev")["environments"])
WORKFLOW = "batch_api.handlers.workflow"
API_HANDLER = "batch_api.handlers.lambda_api.handler"
WEBHOOKS_HANDLER = "batch_api.handlers.webhooks.handler"
LAMBDA_RETRY_ERRORS = {
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.TooManyRequestsException",
}


@pytest.fixture(scope="module", params=ENVIRONMENTS)
def synthesized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Synthesized:
    return synth_stack(request.param, tmp_path_factory.mktemp(f"cdk-{request.param}"))


@pytest.fixture
def template(synthesized: Synthesized) -> dict[str, Any]:
    return synthesized.template


@pytest.fixture
def env_settings(synthesized: Synthesized) -> dict[str, Any]:
    return cdk_context(synthesized.env)["environments"][synthesized.env]


@pytest.fixture
def functions(template: dict[str, Any]) -> dict[str, str]:
    return function_logical_ids(template)


def test_both_environments_are_checked() -> None:
    assert {"dev", "prod"} <= set(ENVIRONMENTS)


def test_stack_name_carries_the_environment(synthesized: Synthesized) -> None:
    assert synthesized.stack_name == f"BatchApi-{synthesized.env}"


# ------------------------------------------------------------------ cdk-nag


def test_cdk_nag_ran_and_left_no_unacknowledged_findings(synthesized: Synthesized) -> None:
    # synth raises on any unacknowledged AwsSolutions finding; the report lists anything left
    violations = [
        v
        for report in synthesized.validation_report.get("pluginReports", [])
        for v in report.get("violations", [])
    ]
    assert violations == []


def test_cdk_nag_fails_the_synth_on_an_unacknowledged_finding(tmp_path: Any) -> None:
    from aws_cdk import App, Stack
    from aws_cdk import aws_s3 as s3
    from infra.nag import add_nag_checks

    app = App(outdir=str(tmp_path))
    s3.Bucket(Stack(app, "Bare"), "NoLogsNoTls")
    add_nag_checks(app)
    with pytest.raises(Exception, match="AwsSolutions-S1"):
        app.synth()


# ------------------------------------------------------------------ storage


def data_bucket(template: dict[str, Any]) -> dict[str, Any]:
    buckets = [
        b
        for b in resources(template, "AWS::S3::Bucket").values()
        if "LoggingConfiguration" in b["Properties"]
    ]
    assert len(buckets) == 1
    return buckets[0]


def test_buckets_are_encrypted_private_and_tls_only(template: dict[str, Any]) -> None:
    buckets = resources(template, "AWS::S3::Bucket")
    assert len(buckets) == 2  # data and its access logs
    for logical_id, bucket in buckets.items():
        props = bucket["Properties"]
        sse = props["BucketEncryption"]["ServerSideEncryptionConfiguration"][0]
        assert sse["ServerSideEncryptionByDefault"]["SSEAlgorithm"] in {"AES256", "aws:kms"}
        assert props["PublicAccessBlockConfiguration"] == {
            "BlockPublicAcls": True,
            "BlockPublicPolicy": True,
            "IgnorePublicAcls": True,
            "RestrictPublicBuckets": True,
        }
        policies = [
            p
            for p in resources(template, "AWS::S3::BucketPolicy").values()
            if p["Properties"]["Bucket"] == {"Ref": logical_id}
        ]
        denies_plain_http = [
            s
            for p in policies
            for s in p["Properties"]["PolicyDocument"]["Statement"]
            if s["Effect"] == "Deny" and s.get("Condition") == {"Bool": {"aws:SecureTransport": "false"}}
        ]
        assert denies_plain_http, f"{logical_id} does not enforce TLS"


def test_data_bucket_logs_access_and_has_one_expiry_rule_per_day_count(template: dict[str, Any]) -> None:
    props = data_bucket(template)["Properties"]
    assert "DestinationBucketName" in props["LoggingConfiguration"]
    rules = props["LifecycleConfiguration"]["Rules"]
    tagged = {
        rule["TagFilters"][0]["Value"]: rule
        for rule in rules
        if [f["Key"] for f in rule.get("TagFilters", [])] == ["expire-days"]
    }
    assert sorted(tagged, key=int) == [str(n) for n in range(1, 31)]
    for days, rule in tagged.items():
        assert rule["ExpirationInDays"] == int(days)
        assert rule["Status"] == "Enabled"
        assert "Prefix" not in rule
    abort = [r for r in rules if "AbortIncompleteMultipartUpload" in r]
    assert len(abort) == 1
    assert abort[0]["AbortIncompleteMultipartUpload"] == {"DaysAfterInitiation": 1}
    assert "TagFilters" not in abort[0] and "Prefix" not in abort[0]  # applies to every upload
    by_prefix = {r["Prefix"]: r["ExpirationInDays"] for r in rules if "Prefix" in r}
    assert set(by_prefix) == {"batches/", "uploads/"}
    assert all(days >= 2 for days in by_prefix.values())  # never while a batch or an upload is live


def test_table_is_built_from_the_shared_key_schema(template: dict[str, Any]) -> None:
    _, table = only(template, "AWS::DynamoDB::Table")
    props = table["Properties"]
    expected = schema.create_table_kwargs("unused")
    assert props["KeySchema"] == expected["KeySchema"]
    assert sorted(props["AttributeDefinitions"], key=lambda a: a["AttributeName"]) == sorted(
        expected["AttributeDefinitions"], key=lambda a: a["AttributeName"]
    )
    assert sorted(props["GlobalSecondaryIndexes"], key=lambda i: i["IndexName"]) == sorted(
        expected["GlobalSecondaryIndexes"], key=lambda i: i["IndexName"]
    )
    # GSI2's would-be hot keys are sharded by value (ACTIVE#00..ACTIVE#15, `dynamodb.STATE_SHARDS`), which
    # a template cannot show: it shows one by-state index still, on a string partition key the shard
    # suffix goes into, with every attribute projected (the shards' merge reads whole records from it)
    [by_state] = [i for i in props["GlobalSecondaryIndexes"] if i["IndexName"] == schema.GSI2_NAME]
    assert by_state["KeySchema"][0] == {"AttributeName": schema.GSI2_PARTITION_KEY, "KeyType": "HASH"}
    assert by_state["Projection"] == {"ProjectionType": "ALL"}
    assert {"AttributeName": schema.GSI2_PARTITION_KEY, "AttributeType": "S"} in props["AttributeDefinitions"]
    assert len(props["GlobalSecondaryIndexes"]) == 2
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    assert props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"] is True
    assert props["SSESpecification"]["SSEEnabled"] is True
    # idempotency keys carry their expiry in this attribute; DynamoDB deletes them after it
    assert props["TimeToLiveSpecification"] == {"AttributeName": schema.TTL_ATTRIBUTE, "Enabled": True}


def test_removal_policy_follows_the_environment(
    template: dict[str, Any], env_settings: dict[str, Any]
) -> None:
    expected = {"destroy": "Delete", "retain": "Retain"}[env_settings["removal_policy"]]
    stateful = [
        *resources(template, "AWS::DynamoDB::Table").values(),
        *resources(template, "AWS::S3::Bucket").values(),
        *resources(template, "AWS::Events::EventBus").values(),
    ]
    assert {r["DeletionPolicy"] for r in stateful} == {expected}
    assert {r["UpdateReplacePolicy"] for r in stateful} == {expected}
    _, table = only(template, "AWS::DynamoDB::Table")
    assert table["Properties"]["DeletionProtectionEnabled"] is (expected == "Retain")


# ------------------------------------------------------------------ functions


def test_seven_functions_on_the_newest_python_arm64_traced(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    from aws_cdk import aws_lambda

    newest = max(
        (getattr(aws_lambda.Runtime, n).name for n in dir(aws_lambda.Runtime) if n.startswith("PYTHON_3_")),
        key=lambda name: tuple(int(p) for p in name.removeprefix("python").split(".")),
    )
    assert set(functions) == {
        API_HANDLER,
        f"{WORKFLOW}.validate_handler",
        f"{WORKFLOW}.process_handler",
        f"{WORKFLOW}.finalize_handler",
        f"{WORKFLOW}.fail_handler",
        f"{WORKFLOW}.housekeeping_handler",
        WEBHOOKS_HANDLER,
    }
    codes = set()
    for logical_id in functions.values():
        props = template["Resources"][logical_id]["Properties"]
        assert props["Runtime"] == newest
        assert props["Architectures"] == ["arm64"]
        assert props["TracingConfig"] == {"Mode": "Active"}
        assert "LoggingConfig" in props  # its own log group, with retention
        codes.add(json.dumps(props["Code"], sort_keys=True))
    assert len(codes) == 1  # one code asset for all


def test_function_timeouts_memory_and_log_retention(
    template: dict[str, Any], functions: dict[str, str], env_settings: dict[str, Any]
) -> None:
    expected = {
        API_HANDLER: (28, env_settings["api_memory_mb"]),  # under the gateway's 29 s
        f"{WORKFLOW}.validate_handler": (900, env_settings["step_memory_mb"]),
        f"{WORKFLOW}.process_handler": (900, env_settings["worker_memory_mb"]),
        f"{WORKFLOW}.finalize_handler": (900, env_settings["step_memory_mb"]),
        f"{WORKFLOW}.fail_handler": (60, env_settings["step_memory_mb"]),
    }
    for handler, (timeout, memory) in expected.items():
        props = template["Resources"][functions[handler]]["Properties"]
        assert (props["Timeout"], props["MemorySize"]) == (timeout, memory), handler
    proxies = [
        method["Properties"]["Integration"]
        for method in resources(template, "AWS::ApiGateway::Method").values()
        if method["Properties"].get("Integration", {}).get("Type") == "AWS_PROXY"
    ]
    assert proxies
    for integration in proxies:  # the gateway waits 29 s unless told otherwise
        assert integration.get("TimeoutInMillis", 29_000) > 28 * 1000
        log_group = props["LoggingConfig"]["LogGroup"]["Ref"]
        assert (
            template["Resources"][log_group]["Properties"]["RetentionInDays"]
            == env_settings["log_retention_days"]
        )


def env_of(template: dict[str, Any], logical_id: str) -> dict[str, Any]:
    return template["Resources"][logical_id]["Properties"]["Environment"]["Variables"]


def test_function_environment(
    template: dict[str, Any], functions: dict[str, str], env_settings: dict[str, Any]
) -> None:
    table_id, _ = only(template, "AWS::DynamoDB::Table")
    bus_id, _ = only(template, "AWS::Events::EventBus")
    machine_id, _ = only(template, "AWS::StepFunctions::StateMachine")
    for handler, logical_id in functions.items():
        env = env_of(template, logical_id)
        assert env["BATCH_API_BACKEND"] == "aws"
        assert env["BATCH_API_TABLE_NAME"] == {"Ref": table_id}
        assert env["BATCH_API_BUCKET_NAME"]["Ref"] in resources(template, "AWS::S3::Bucket")
        assert env["BATCH_API_EVENT_BUS_NAME"] == {"Ref": bus_id}
        assert env["BATCH_API_CHUNK_MAX_LINES"] == str(env_settings["chunk_max_lines"])
        assert env["POWERTOOLS_SERVICE_NAME"] == "batch-api"
        assert env["POWERTOOLS_METRICS_NAMESPACE"] == "BatchApi"
        assert ("BATCH_API_STATE_MACHINE_ARN" in env) is (handler == API_HANDLER), handler
        routed = handler.endswith(("process_handler", "validate_handler"))  # validation checks the model
        assert ("BATCH_API_UPSTREAMS_JSON" in env) is routed, handler
        assert not any(name.startswith("BATCH_API_UPSTREAM_") for name in env), handler  # one way: the list
        assert ("BATCH_API_API_KEYS_SECRET_NAME" in env) is (handler == API_HANDLER), handler
    api = env_of(template, functions[API_HANDLER])
    assert api["BATCH_API_STATE_MACHINE_ARN"] == {"Ref": machine_id}
    # what fits a Lambda invoke after base64 (contract/limits.py; tests/unit/test_api_handler.py builds
    # the events), and a 4 MiB inline download
    assert int(api["BATCH_API_MAX_REQUEST_BYTES"]) == limits.proxy_max_request_bytes() == 4_638_720
    assert int(api["BATCH_API_MAX_INLINE_DOWNLOAD_BYTES"]) == 4 * 1024 * 1024
    # the largest Upload: what completes within the API's time at the assumed 25 MiB/s (infra/constructs/api.py)
    assert int(api["BATCH_API_MAX_UPLOAD_BYTES"]) == 500 * 1024 * 1024
    assert (
        Settings(max_upload_bytes=api["BATCH_API_MAX_UPLOAD_BYTES"]).max_upload_bytes > 200 * 1000**2
    )  # a batch file
    answer = limits.base64_length(int(api["BATCH_API_MAX_INLINE_DOWNLOAD_BYTES"])) + 64 * 1024
    assert answer <= limits.LAMBDA_SYNC_RESPONSE_BYTES
    process = env_of(template, functions[f"{WORKFLOW}.process_handler"])
    # what the worker reads is cdk.json's list
    read = load_specs(Settings(upstreams_json=process["BATCH_API_UPSTREAMS_JSON"]))
    assert read == [UpstreamSpec.model_validate(raw) for raw in env_settings["upstreams"]]
    assert process["BATCH_API_REQUESTS_PER_CHUNK"] == str(env_settings["requests_per_chunk"])
    assert float(process["BATCH_API_JOURNAL_FLUSH_INTERVAL_SECONDS"]) > 0  # one S3 PUT per interval


# ------------------------------------------------------------------ least privilege


def test_only_the_publishing_steps_may_put_events(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    # the steps that end batches, and the sweep that announces ends a crash left unannounced
    publishers = {
        f"{WORKFLOW}.validate_handler",
        f"{WORKFLOW}.finalize_handler",
        f"{WORKFLOW}.fail_handler",
        f"{WORKFLOW}.housekeeping_handler",
    }
    bus_id, _ = only(template, "AWS::Events::EventBus")
    for handler, logical_id in functions.items():
        statements = role_statements(template, logical_id)
        puts = [s for s in statements if "events:PutEvents" in actions_of([s])]
        assert bool(puts) is (handler in publishers), handler
        for statement in puts:
            assert statement["Resource"] == {"Fn::GetAtt": [bus_id, "Arn"]}


def test_only_the_worker_reads_the_upstream_secret_and_only_the_api_the_api_keys(
    template: dict[str, Any], functions: dict[str, str], env_settings: dict[str, Any]
) -> None:
    [upstream] = env_settings["upstreams"]  # its models are listed: validation reads no key
    readers = {
        f"{WORKFLOW}.process_handler": upstream["api_key_secret"],
        API_HANDLER: env_settings["api_keys_secret_name"],
    }
    for handler, logical_id in functions.items():
        statements = role_statements(template, logical_id)
        secret = [s for s in statements if any(a.startswith("secretsmanager:") for a in actions_of([s]))]
        if handler not in readers:
            assert secret == [], handler
            continue
        assert len(secret) == 1, handler
        assert "secretsmanager:GetSecretValue" in actions_of(secret)
        resource = json.dumps(secret[0]["Resource"])
        assert f":secret:{readers[handler]}-??????" in resource  # that secret only


def test_the_api_authenticates_with_the_api_keys_secret(
    template: dict[str, Any], functions: dict[str, str], env_settings: dict[str, Any]
) -> None:
    """Without keys the handler serves every caller as one project: the API must always get the secret."""
    api = env_of(template, functions[API_HANDLER])
    assert api["BATCH_API_API_KEYS_SECRET_NAME"] == env_settings["api_keys_secret_name"]
    assert "BATCH_API_API_KEYS" not in api  # keys never sit in the function's configuration


def test_only_the_api_starts_executions(template: dict[str, Any], functions: dict[str, str]) -> None:
    machine_id, _ = only(template, "AWS::StepFunctions::StateMachine")
    for handler, logical_id in functions.items():
        statements = role_statements(template, logical_id)
        starts = [s for s in statements if "states:StartExecution" in actions_of([s])]
        assert bool(starts) is (handler == API_HANDLER), handler
        for statement in starts:
            assert statement["Resource"] == {"Ref": machine_id}


def test_no_function_has_wildcard_actions_or_unscoped_data_access(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    for handler, logical_id in functions.items():
        for statement in role_statements(template, logical_id):
            actions = actions_of([statement])
            assert not any("*" in a for a in actions), (handler, actions)
            if statement["Resource"] == "*":
                assert actions <= {"xray:PutTraceSegments", "xray:PutTelemetryRecords"}, handler
        roles = template["Resources"][logical_id]["Properties"]["Role"]["Fn::GetAtt"][0]
        assert "ManagedPolicyArns" not in template["Resources"][roles]["Properties"], handler


def s3_prefixes(template: dict[str, Any], logical_id: str, action: str) -> set[str]:
    prefixes: set[str] = set()
    for statement in role_statements(template, logical_id):
        if action not in actions_of([statement]):
            continue
        resources_ = (
            statement["Resource"] if isinstance(statement["Resource"], list) else [statement["Resource"]]
        )
        for resource in resources_:
            prefixes.add(resource["Fn::Join"][1][1].strip("/").removesuffix("*"))
    return prefixes


def test_object_access_is_scoped_by_key_prefix(template: dict[str, Any], functions: dict[str, str]) -> None:
    api = functions[API_HANDLER]
    assert s3_prefixes(template, api, "s3:GetObject") == {"files/", "uploads/"}
    assert s3_prefixes(template, api, "s3:PutObject") == {"files/", "uploads/"}
    process = functions[f"{WORKFLOW}.process_handler"]
    assert s3_prefixes(template, process, "s3:PutObject") == {"batches/"}
    assert s3_prefixes(template, process, "s3:DeleteObject") == set()
    finalize = functions[f"{WORKFLOW}.finalize_handler"]
    assert s3_prefixes(template, finalize, "s3:PutObject") == {"files/", "batches/"}
    assert "s3:PutObjectTagging" in actions_of(role_statements(template, finalize))  # expire-days tags
    fail = functions[f"{WORKFLOW}.fail_handler"]
    assert s3_prefixes(template, fail, "s3:GetObject") == set()
    assert s3_prefixes(template, fail, "s3:PutObject") == set()


def test_steps_that_end_a_batch_may_release_its_input_and_journal(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    """validate (on failure), finalize and fail end batches, and then delete the input body kept for a
    batch whose input file was deleted or expired meanwhile (release_input_file), and the journals.
    Without s3:DeleteObject on files/ the terminal step fails with AccessDenied, after the status was set."""
    validate = functions[f"{WORKFLOW}.validate_handler"]
    assert s3_prefixes(template, validate, "s3:DeleteObject") == {"files/"}
    for step in ("finalize_handler", "fail_handler"):
        assert s3_prefixes(template, functions[f"{WORKFLOW}.{step}"], "s3:DeleteObject") == {
            "files/",
            "batches/",
        }, step
    process = functions[f"{WORKFLOW}.process_handler"]
    assert s3_prefixes(template, process, "s3:DeleteObject") == set()  # never ends a batch


# ------------------------------------------------------------------ workflow


def test_state_machine_is_standard_logged_at_all_and_traced(template: dict[str, Any]) -> None:
    _, machine = only(template, "AWS::StepFunctions::StateMachine")
    props = machine["Properties"]
    assert props["StateMachineType"] == "STANDARD"
    assert props["LoggingConfiguration"]["Level"] == "ALL"
    assert props["LoggingConfiguration"]["IncludeExecutionData"] is True
    assert props["TracingConfiguration"] == {"Enabled": True}


def test_definition_follows_the_contract(
    template: dict[str, Any], functions: dict[str, str], env_settings: dict[str, Any]
) -> None:
    definition = render_definition(template)
    states = definition["States"]
    assert definition["StartAt"] == "Validate"
    assert states["Validate"]["Resource"].endswith(functions[f"{WORKFLOW}.validate_handler"])
    assert "Parameters" not in states["Validate"]  # payload response only: the input as is
    assert states["Validate"]["Next"] == "Route"

    route = {c["StringEquals"]: c["Next"] for c in states["Route"]["Choices"] if c["Variable"] == "$.next"}
    assert route == {"process": "ProcessChunks", "finalize": "Finalize", "done": "Done"}
    assert states[states["Route"]["Default"]]["Next"] == "MarkFailed"  # never stuck on an unknown answer

    chunks = states["ProcessChunks"]
    assert chunks["Type"] == "Map"
    assert chunks["ItemReader"]["Resource"] == "arn:aws:states:::s3:getObject"
    assert chunks["ItemReader"]["ReaderConfig"] == {"InputType": "JSON"}
    assert chunks["ItemReader"]["Parameters"]["Key.$"] == "$.manifest_key"
    assert chunks["ItemSelector"] == {
        "project_id.$": "$.project_id",
        "batch_id.$": "$.batch_id",
        "chunk.$": "$$.Map.Item.Value",
    }
    # the payloads are the step models' (contract/steps.py): what the states read and build
    assert {key.removesuffix(".$") for key in chunks["ItemSelector"]} == set(ProcessInput.model_fields)
    assert set(route) == set(typing.get_args(ValidateOutput.model_fields["next"].annotation))
    assert chunks["ItemReader"]["Parameters"]["Key.$"].removeprefix("$.") in ValidateOutput.model_fields
    loop, wait = chunks["ItemProcessor"]["States"]["ChunkDone"]["Choices"]
    assert loop["Variable"] == "$.result.done" and "done" in ProcessOutput.model_fields
    assert wait["Variable"] == "$.result.wait_seconds" and "wait_seconds" in ProcessOutput.model_fields
    failed = {key.removesuffix(".$") for key in states["MarkFailed"]["Parameters"]}
    assert failed <= set(FailInput.model_fields)
    assert chunks["ItemProcessor"]["ProcessorConfig"] == {"Mode": "DISTRIBUTED", "ExecutionType": "STANDARD"}
    assert chunks["MaxConcurrency"] == env_settings["map_max_concurrency"]
    assert chunks["ResultPath"] is None
    assert "ResultWriter" not in chunks and "ItemBatcher" not in chunks
    assert chunks["Next"] == "Finalize"
    assert states["Finalize"]["Next"] == "Done"
    assert states["Done"]["Type"] == "Succeed"


def test_the_gathered_output_of_the_most_chunks_a_batch_can_have_fits_step_functions(
    template: dict[str, Any],
) -> None:
    """No ResultWriter: the Map gathers every child's output into one array, which Step Functions
    caps at 256 KiB (States.DataLimitExceeded). Each child ends with an empty output, so even a batch
    of MAX_REQUESTS_PER_BATCH one-line chunks stays well under it."""
    from batch_api.contract.models import MAX_REQUESTS_PER_BATCH

    child = render_definition(template)["States"]["ProcessChunks"]["ItemProcessor"]["States"]
    finished = [name for name, state in child.items() if state["Type"] == "Succeed"]
    assert finished == ["ChunkFinished"] and child["ChunkFinished"]["OutputPath"] is None
    assert not [name for name, state in child.items() if state.get("End")]  # no other way out
    gathered = len(orjson.dumps([{}] * MAX_REQUESTS_PER_BATCH))
    assert gathered <= 0.6 * 256 * 1024  # with a margin of 40%


def test_each_chunk_loops_until_the_worker_says_done(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    child = render_definition(template)["States"]["ProcessChunks"]["ItemProcessor"]
    assert child["StartAt"] == "ProcessChunk"
    process = child["States"]["ProcessChunk"]
    assert process["Resource"].endswith(functions[f"{WORKFLOW}.process_handler"])
    assert process["ResultPath"] == "$.result"  # the chunk stays in the state for the next call
    assert process["Next"] == "ChunkDone"
    done = child["States"]["ChunkDone"]
    assert done["Choices"] == [
        {"Variable": "$.result.done", "BooleanEquals": True, "Next": "ChunkFinished"},
        # no capacity on the upstream: wait in the state machine, not in a running Lambda
        {"Variable": "$.result.wait_seconds", "NumericGreaterThan": 0, "Next": "WaitForCapacity"},
    ]
    assert done["Default"] == "ProcessChunk"
    assert child["States"]["WaitForCapacity"] == {
        "Type": "Wait",
        "SecondsPath": "$.result.wait_seconds",
        "Next": "ProcessChunk",
    }
    assert child["States"]["ChunkFinished"]["Type"] == "Succeed"


def all_tasks(definition: dict[str, Any]) -> dict[str, dict[str, Any]]:
    tasks = {name: s for name, s in definition["States"].items() if s["Type"] == "Task"}
    for state in definition["States"].values():
        if state["Type"] == "Map":
            tasks.update(all_tasks(state["ItemProcessor"]))
    return tasks


def test_every_task_retries_lambda_errors_and_throttling(template: dict[str, Any]) -> None:
    tasks = all_tasks(render_definition(template))
    assert set(tasks) == {"Validate", "ProcessChunk", "Finalize", "MarkFailed"}
    for name, task in tasks.items():
        retried = {e for retry in task["Retry"] for e in retry["ErrorEquals"]}
        assert retried >= LAMBDA_RETRY_ERRORS, name
        for retry in task["Retry"]:
            assert retry["BackoffRate"] >= 2 and retry["MaxAttempts"] >= 2, name
        [throttled] = [r for r in task["Retry"] if "Lambda.TooManyRequestsException" in r["ErrorEquals"]]
        # throttling waits for a slot for a whole completion window (at most a minute apart), never fails
        assert throttled["ErrorEquals"] == ["Lambda.TooManyRequestsException"], name
        assert throttled["MaxAttempts"] * throttled["MaxDelaySeconds"] >= 24 * 3600, name


def test_reserved_concurrency_keeps_the_api_served_and_bounds_the_workers(
    template: dict[str, Any], functions: dict[str, str], env_settings: dict[str, Any]
) -> None:
    reserved = {
        handler: template["Resources"][logical_id]["Properties"].get("ReservedConcurrentExecutions")
        for handler, logical_id in functions.items()
    }
    assert reserved[API_HANDLER] == env_settings["api_reserved_concurrency"]
    assert reserved[f"{WORKFLOW}.process_handler"] == env_settings["worker_reserved_concurrency"]
    others = {h: r for h, r in reserved.items() if h not in (API_HANDLER, f"{WORKFLOW}.process_handler")}
    assert set(others.values()) == {None}  # the short steps share the account's unreserved pool


def test_every_failure_ends_the_batch_failed(template: dict[str, Any], functions: dict[str, str]) -> None:
    states = render_definition(template)["States"]
    for name in ("Validate", "ProcessChunks", "Finalize"):
        assert states[name]["Catch"] == [
            {"ErrorEquals": ["States.ALL"], "ResultPath": "$.failure", "Next": "MarkFailed"}
        ]
    mark = states["MarkFailed"]
    assert mark["Resource"].endswith(functions[f"{WORKFLOW}.fail_handler"])
    assert mark["Parameters"] == {
        "project_id.$": "$.project_id",
        "batch_id.$": "$.batch_id",
        "failure.$": "$.failure",  # never "$.failure.Cause": an error output may have no Cause
    }
    assert mark["ResultPath"] is None
    assert states[mark["Next"]]["Type"] == "Fail"


def test_render_definition_substitutes_given_references(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    bucket_id = data_bucket_id(template)
    validate_id = functions[f"{WORKFLOW}.validate_handler"]
    definition = render_definition(template, refs={validate_id: "arn:validate", bucket_id: "the-bucket"})
    assert definition["States"]["Validate"]["Resource"] == "arn:validate"
    assert definition["States"]["ProcessChunks"]["ItemReader"]["Parameters"]["Bucket"] == "the-bucket"


def data_bucket_id(template: dict[str, Any]) -> str:
    return next(
        lid
        for lid, b in resources(template, "AWS::S3::Bucket").items()
        if "LoggingConfiguration" in b["Properties"]
    )


# ------------------------------------------------------------------ events, API, monitoring


STACK_CREATION_ID = {"Fn::Select": [2, {"Fn::Split": ["/", {"Ref": "AWS::StackId"}]}]}


def test_one_custom_bus_per_environment(synthesized: Synthesized, template: dict[str, Any]) -> None:
    bus_id, bus = only(template, "AWS::Events::EventBus")
    kept = synthesized.env == "prod"
    assert bus.get("DeletionPolicy") == ("Retain" if kept else "Delete")
    # kept on destroy: named for the stack's creation, so deploy -> destroy -> deploy never meets it
    expected = {"Fn::Join": ["-", ["batch-api-prod", STACK_CREATION_ID]]} if kept else "batch-api-dev"
    assert bus["Properties"]["Name"] == expected
    outputs = [o for o in template["Outputs"].values() if o["Value"] == {"Ref": bus_id}]
    assert outputs


def test_every_kept_resource_with_a_name_is_named_for_the_stacks_creation(
    synthesized: Synthesized, template: dict[str, Any]
) -> None:
    name_keys = ("Name", "LogGroupName", "TableName", "BucketName", "TopicName", "FunctionName", "RoleName")
    kept_named = {
        lid: (key, resource["Properties"][key])
        for lid, resource in template["Resources"].items()
        if resource.get("DeletionPolicy") == "Retain"
        for key in name_keys
        if key in resource.get("Properties", {})
    }
    if synthesized.env == "prod":  # the bus and the workflow's log group
        types = {template["Resources"][lid]["Type"] for lid in kept_named}
        assert types == {"AWS::Events::EventBus", "AWS::Logs::LogGroup"}
    for key, value in kept_named.values():
        assert isinstance(value, dict) and STACK_CREATION_ID in value["Fn::Join"][1], (key, value)


def test_download_links_are_signed_by_a_read_only_role_the_api_assumes(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    api = template["Resources"][functions[API_HANDLER]]
    api_role = api["Properties"]["Role"]["Fn::GetAtt"][0]
    signer_ref = api["Properties"]["Environment"]["Variables"]["BATCH_API_DOWNLOAD_SIGNER_ROLE_ARN"]
    signer_id = signer_ref["Fn::GetAtt"][0]
    signer = template["Resources"][signer_id]
    assert signer["Type"] == "AWS::IAM::Role"
    assert signer["Properties"]["MaxSessionDuration"] == 3600  # what the API assumes it for
    [trust] = signer["Properties"]["AssumeRolePolicyDocument"]["Statement"]
    assert trust["Action"] == "sts:AssumeRole"
    assert trust["Principal"] == {"AWS": {"Fn::GetAtt": [api_role, "Arn"]}}  # the API function only
    signer_statements = [
        statement
        for policy in resources(template, "AWS::IAM::Policy").values()
        if {"Ref": signer_id} in policy["Properties"]["Roles"]
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]
    assert [statement["Action"] for statement in signer_statements] == ["s3:GetObject"]
    [resource] = [statement["Resource"] for statement in signer_statements]
    assert resource["Fn::Join"][1][-1] == "/files/*"  # read files, nothing else
    assumes = [
        statement
        for statement in role_statements(template, functions[API_HANDLER])
        if statement["Action"] == "sts:AssumeRole"
    ]
    assert [statement["Resource"] for statement in assumes] == [{"Fn::GetAtt": [signer_id, "Arn"]}]


def test_rest_api_proxies_everything_to_the_api_function(
    synthesized: Synthesized, template: dict[str, Any], functions: dict[str, str]
) -> None:
    _, api = only(template, "AWS::ApiGateway::RestApi")
    assert api["Properties"]["BinaryMediaTypes"] == ["*/*"]
    paths = {r["Properties"]["PathPart"] for r in resources(template, "AWS::ApiGateway::Resource").values()}
    assert paths == {"{proxy+}"}
    methods = resources(template, "AWS::ApiGateway::Method").values()
    assert {m["Properties"]["HttpMethod"] for m in methods} == {"ANY"}
    for method in methods:
        uri = json.dumps(method["Properties"]["Integration"]["Uri"])
        assert functions[API_HANDLER] in uri
    _, stage = only(template, "AWS::ApiGateway::Stage")
    props = stage["Properties"]
    assert props["StageName"] == synthesized.env
    assert props["TracingEnabled"] is True
    assert "DestinationArn" in props["AccessLogSetting"]
    settings = props["MethodSettings"][0]
    assert settings["LoggingLevel"] in {"ERROR", "INFO"}
    assert settings["ThrottlingRateLimit"] > 0 and settings["ThrottlingBurstLimit"] > 0
    base_urls = [o for o in template["Outputs"].values() if o.get("Description") == "openai SDK base_url"]
    assert len(base_urls) == 1
    assert base_urls[0]["Value"]["Fn::Join"][1][-1].endswith("/v1")


def test_a_body_too_large_for_the_function_is_a_final_413_naming_a_part_size_that_fits(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    """API Gateway answers a body the invoke cannot carry (or one over its 10 MB) itself: the same
    envelope, message and no-retry header as the handler's own 413, with numbers from this template."""
    limit = int(env_of(template, functions[API_HANDLER])["BATCH_API_MAX_REQUEST_BYTES"])
    (props,) = [
        r["Properties"]
        for r in resources(template, "AWS::ApiGateway::GatewayResponse").values()
        if r["Properties"]["ResponseType"] == "REQUEST_TOO_LARGE"
    ]
    assert props["StatusCode"] == "413"
    assert props["ResponseParameters"]["gatewayresponse.header.x-should-retry"] == "'false'"
    body = props["ResponseTemplates"]["application/json"]
    assert "$" not in body and "#" not in body  # a static body: nothing for API Gateway's VTL to expand
    error = json.loads(body)["error"]
    part_size = int(error["message"].rsplit("part_size=", 1)[1].rstrip(")."))
    assert error == {
        "message": limits.too_large_message(limit, part_size),
        "type": "invalid_request_error",
        "param": None,
        "code": "request_too_large",
    }
    # the part size named fits: its multipart request stays under the API's limit
    assert part_size == limits.part_size_for(limit, MAX_PART_BYTES) == 4 * 1024 * 1024
    assert part_size + limits.MULTIPART_OVERHEAD_BYTES <= limit

    # and the openai SDK gives up at once on this answer, with the message in hand
    calls: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        headers = {"content-type": "application/json", "x-should-retry": "false"}
        return httpx.Response(413, headers=headers, content=body.encode())

    sdk = openai.OpenAI(
        api_key="sk-x",
        base_url="https://api.example/v1",
        http_client=openai.DefaultHttpxClient(transport=httpx.MockTransport(gateway)),
    )
    with pytest.raises(openai.APIStatusError) as raised:
        sdk.uploads.parts.create(upload_id="upload_x", data=b"x" * 16)
    assert raised.value.status_code == 413 and len(calls) == 1
    assert f"part_size={part_size}" in raised.value.message


def test_the_outputs_a_reader_needs_have_plain_keys(
    template: dict[str, Any], functions: dict[str, str], env_settings: dict[str, Any]
) -> None:
    """`infra/smoke.py` (and anyone with describe-stacks) finds them by these keys, not by hashed ids."""
    found = template["Outputs"]
    base_url = found[outputs.BASE_URL]["Value"]["Fn::Join"][1]
    stage_id, _ = only(template, "AWS::ApiGateway::Stage")
    assert {"Ref": stage_id} in base_url
    assert base_url[-1].endswith("/v1")
    bus_id, _ = only(template, "AWS::Events::EventBus")
    assert found[outputs.EVENT_BUS_NAME]["Value"] == {"Ref": bus_id}
    # the very secret the API function reads its keys from
    secret_name = found[outputs.API_KEYS_SECRET_NAME]["Value"]
    assert secret_name == env_settings["api_keys_secret_name"]
    assert secret_name == env_of(template, functions[API_HANDLER])["BATCH_API_API_KEYS_SECRET_NAME"]
    topics = resources(template, "AWS::SNS::Topic")
    expected_topic = (
        {"Ref": only(template, "AWS::SNS::Topic")[0]} if topics else env_settings["alarm_topic_arn"]
    )
    assert found[outputs.ALARM_TOPIC_ARN]["Value"] == expected_topic


def test_api_gateway_errors_keep_the_openai_envelope(template: dict[str, Any]) -> None:
    """Throttling, a body over 10 MB, a Lambda error or timeout are answered by API Gateway itself."""
    found = {
        r["Properties"]["ResponseType"]: r["Properties"]
        for r in resources(template, "AWS::ApiGateway::GatewayResponse").values()
    }
    assert {"THROTTLED", "DEFAULT_4XX", "DEFAULT_5XX", "REQUEST_TOO_LARGE"} <= set(found)
    for response_type, props in found.items():
        if response_type == "REQUEST_TOO_LARGE":
            continue  # its own message (the test above)
        body = props["ResponseTemplates"]["application/json"]
        # API Gateway puts the message in as a JSON string literal
        error = json.loads(body.replace("$context.error.messageString", '"Too Many Requests"'))["error"]
        assert set(error) == {"message", "type", "param", "code"}, response_type
        assert error["message"] == "Too Many Requests"
    assert (
        json.loads(
            found["THROTTLED"]["ResponseTemplates"]["application/json"].replace(
                "$context.error.messageString", '""'
            )
        )["error"]["type"]
        == "rate_limit_exceeded"
    )


def test_alarms_on_failed_executions_and_worker_errors(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    alarms = list(resources(template, "AWS::CloudWatch::Alarm").values())
    by_metric = {
        (a["Properties"]["Namespace"], a["Properties"]["MetricName"]): a["Properties"] for a in alarms
    }
    failed = by_metric[("AWS/States", "ExecutionsFailed")]
    assert failed["Threshold"] == 1
    assert failed["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    errors = by_metric[("AWS/Lambda", "Errors")]
    assert errors["Dimensions"] == [
        {"Name": "FunctionName", "Value": {"Ref": functions[f"{WORKFLOW}.process_handler"]}}
    ]


def test_dashboard_graphs_batches_requests_upstream_and_api(template: dict[str, Any]) -> None:
    _, dashboard = only(template, "AWS::CloudWatch::Dashboard")
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for metric in (
        "ExecutionsStarted",
        "ExecutionsSucceeded",
        "ExecutionsFailed",
        "RequestsSucceeded",
        "RequestsFailed",
        "UpstreamLatency",
        "UpstreamLimit",  # batch_api.upstreams.metered's names
        "UpstreamThrottled",
        "CapacityHeld",
        "CapacityWaitingBatches",
        "BatchApi",
        "4XXError",
        "5XXError",
        "Latency",
        "Errors",
    ):
        assert metric in body, metric


def test_housekeeping_runs_every_hour_and_may_only_delete_expired_bodies(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    housekeeping = functions[f"{WORKFLOW}.housekeeping_handler"]
    rules = [
        r["Properties"]
        for r in template["Resources"].values()
        if r["Type"] == "AWS::Events::Rule" and "ScheduleExpression" in r["Properties"]
    ]
    assert [r["ScheduleExpression"] for r in rules] == ["rate(1 hour)"]
    assert rules[0]["Targets"][0]["Arn"] == {"Fn::GetAtt": [housekeeping, "Arn"]}
    s3_actions = {
        action
        for statement in role_statements(template, housekeeping)
        for action in ([statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"])
        if action.startswith("s3:")
    }
    assert "s3:DeleteObject" in s3_actions
    # deletes (by prefix), never reads or writes
    assert s3_actions <= {"s3:DeleteObject", "s3:ListBucket"}, s3_actions
    assert s3_prefixes(template, housekeeping, "s3:DeleteObject") == {"files/", "uploads/", "batches/"}


def test_every_function_has_only_the_table_actions_its_code_calls(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    """Not grant_read_write_data: each function gets the DynamoDB actions the adapter calls for it
    (the moto state machine test records the calls and compares them with these policies). Every
    function that ends batches or announces their end deletes the input file's hold (DeleteItem); the
    API only puts holds (creates) and reads them (deletes), so it may not delete one."""
    expected = {
        API_HANDLER: {"dynamodb:GetItem", "dynamodb:Query", "dynamodb:PutItem", "dynamodb:UpdateItem"},
        f"{WORKFLOW}.validate_handler": {
            "dynamodb:GetItem",
            "dynamodb:Query",
            "dynamodb:UpdateItem",
            "dynamodb:DeleteItem",
            "dynamodb:BatchWriteItem",
        },
        f"{WORKFLOW}.process_handler": {  # its own work, and the capacity leases
            "dynamodb:GetItem",
            "dynamodb:Query",
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:DeleteItem",
        },
        f"{WORKFLOW}.finalize_handler": {
            "dynamodb:GetItem",
            "dynamodb:Query",
            "dynamodb:PutItem",
            "dynamodb:UpdateItem",
            "dynamodb:DeleteItem",
            "dynamodb:BatchWriteItem",
        },
        f"{WORKFLOW}.fail_handler": {
            "dynamodb:GetItem",
            "dynamodb:Query",
            "dynamodb:UpdateItem",
            "dynamodb:DeleteItem",
            "dynamodb:BatchWriteItem",
        },
        f"{WORKFLOW}.housekeeping_handler": {
            "dynamodb:GetItem",
            "dynamodb:Query",
            "dynamodb:UpdateItem",
            "dynamodb:DeleteItem",
            "dynamodb:BatchWriteItem",
        },
        WEBHOOKS_HANDLER: set(),  # the event carries what it sends
    }
    for handler, logical_id in functions.items():
        granted = {a for a in actions_of(role_statements(template, logical_id)) if a.startswith("dynamodb:")}
        assert granted == expected[handler], handler


def test_every_alarm_notifies_the_environments_topic(template: dict[str, Any]) -> None:
    topic_id, topic = only(template, "AWS::SNS::Topic")
    assert topic["Properties"]["KmsMasterKeyId"]  # encrypted at rest
    alarms = resources(template, "AWS::CloudWatch::Alarm")
    # failed executions, worker errors, housekeeping errors, webhook dead letters, webhooks given up
    assert len(alarms) == 5
    for alarm in alarms.values():
        assert alarm["Properties"]["AlarmActions"] == [{"Ref": topic_id}]


# ------------------------------------------------------------------ several upstreams


FLEET = [
    {
        "name": "vllm",
        "base_url": "http://vllm.internal:8000/v1",
        "api_key_secret": "batch-api/fleet/vllm",
        "models": "discover",
        "max_in_flight": 64,
        "tokens_per_minute": 2_000_000,
    },
    {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key_secret": "batch-api/fleet/openai"},
    {"name": "open", "base_url": "http://open.internal/v1", "models": ["small-model"]},
]


@pytest.fixture(scope="module")
def fleet_template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """dev with three upstreams: one whose models are discovered, one catch-all, one without a key."""
    from infra.app import build_app

    context = cdk_context("dev")
    dev = {k: v for k, v in context["environments"]["dev"].items() if k != "upstreams"}
    context["environments"] = {"fleet": {**dev, "upstreams": FLEET}}
    app, stack = build_app({**context, "env": "fleet"}, outdir=str(tmp_path_factory.mktemp("cdk-fleet")))
    return typing.cast(dict[str, Any], app.synth().get_stack_by_name(stack.stack_name).template)


def test_each_upstreams_secret_is_read_by_the_workers_and_for_discovery_by_validation(
    fleet_template: dict[str, Any],
) -> None:
    functions = function_logical_ids(fleet_template)

    def secrets_read(handler: str) -> list[str]:
        statements = role_statements(fleet_template, functions[handler])
        readable = [s for s in statements if "secretsmanager:GetSecretValue" in actions_of([s])]
        return sorted(
            name
            for statement in readable
            for name in ("batch-api/fleet/vllm", "batch-api/fleet/openai")
            if f":secret:{name}-??????" in json.dumps(statement["Resource"])
        )

    assert secrets_read(f"{WORKFLOW}.process_handler") == ["batch-api/fleet/openai", "batch-api/fleet/vllm"]
    assert secrets_read(f"{WORKFLOW}.validate_handler") == ["batch-api/fleet/vllm"]  # it lists its models
    assert secrets_read(f"{WORKFLOW}.finalize_handler") == []
    for handler in (f"{WORKFLOW}.process_handler", f"{WORKFLOW}.validate_handler"):
        specs = load_specs(
            Settings(upstreams_json=env_of(fleet_template, functions[handler])["BATCH_API_UPSTREAMS_JSON"])
        )
        assert [(spec.name, spec.max_in_flight, spec.api_key_secret) for spec in specs] == [
            ("vllm", 64, "batch-api/fleet/vllm"),
            ("openai", 128, "batch-api/fleet/openai"),
            ("open", 128, None),
        ]
        assert specs[0].tokens_per_minute == 2_000_000 and specs[0].models == "discover"


def test_the_dashboard_graphs_each_upstream_by_its_dimension(fleet_template: dict[str, Any]) -> None:
    _, dashboard = only(fleet_template, "AWS::CloudWatch::Dashboard")
    body = json.dumps(dashboard["Properties"]["DashboardBody"])
    for name, limit in (("vllm", 64), ("openai", 128), ("open", 128)):
        assert f"Upstream {name} (limit {limit} in flight)" in body
        assert f"Upstream {name} latency (ms)" in body
        for metric in (
            "CapacityHeld",
            "CapacityWaitingBatches",
            "UpstreamThrottled",
            "UpstreamLimit",
            "UpstreamLatency",
        ):
            assert f'\\"{metric}\\",\\"Upstream\\",\\"{name}\\",\\"service\\",\\"batch-api\\"' in body, (
                metric,
                name,
            )


# ------------------------------------------------------------------ webhooks


HOOKS = [
    {"name": "orders", "url": "https://hooks.example.com/batch", "project": "proj_0123456789abcdef"},
    {"name": "all", "url": "https://audit.example.com/in"},
]


@pytest.fixture(scope="module")
def hooks_template(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """dev with two webhook endpoints (cdk.json's environments have none)."""
    from infra.app import build_app

    context = cdk_context("dev")
    context["environments"] = {"hooks": {**context["environments"]["dev"], "webhooks": HOOKS}}
    app, stack = build_app({**context, "env": "hooks"}, outdir=str(tmp_path_factory.mktemp("cdk-hooks")))
    return typing.cast(dict[str, Any], app.synth().get_stack_by_name(stack.stack_name).template)


def _webhook_queues(template: dict[str, Any]) -> tuple[str, dict[str, Any], str, dict[str, Any]]:
    queues = resources(template, "AWS::SQS::Queue")
    [(queue_id, queue)] = [(k, q) for k, q in queues.items() if "RedrivePolicy" in q["Properties"]]
    [(dlq_id, dlq)] = [(k, q) for k, q in queues.items() if k != queue_id]
    return queue_id, queue, dlq_id, dlq


def test_terminal_events_go_from_the_bus_to_an_encrypted_tls_only_queue_with_a_dead_letter_queue(
    template: dict[str, Any],
) -> None:
    from infra.constructs.webhooks import MAX_RECEIVE_COUNT

    from batch_api.webhooks.events import BATCH_EVENT_TYPES

    queue_id, queue, dlq_id, dlq = _webhook_queues(template)
    bus_id, _ = only(template, "AWS::Events::EventBus")
    rules = [
        r
        for r in resources(template, "AWS::Events::Rule").values()
        if r["Properties"].get("EventBusName") == {"Ref": bus_id}
    ]
    [rule] = rules
    assert rule["Properties"]["EventPattern"] == {
        "source": ["batch-api"],
        "detail-type": list(BATCH_EVENT_TYPES),
    }
    assert rule["Properties"]["Targets"][0]["Arn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert queue["Properties"]["RedrivePolicy"] == {
        "deadLetterTargetArn": {"Fn::GetAtt": [dlq_id, "Arn"]},
        "maxReceiveCount": MAX_RECEIVE_COUNT,
    }
    # retention outlives the 72-hour window; the visibility timeout outlives the function
    assert queue["Properties"]["MessageRetentionPeriod"] > 72 * 3600
    assert queue["Properties"]["VisibilityTimeout"] >= 180
    for q in (queue, dlq):
        assert q["Properties"]["SqsManagedSseEnabled"] is True
    policies = resources(template, "AWS::SQS::QueuePolicy")
    for q_id in (queue_id, dlq_id):
        [document] = [
            p["Properties"]["PolicyDocument"]
            for p in policies.values()
            if {"Ref": q_id} in p["Properties"]["Queues"]
        ]
        denies = [s for s in document["Statement"] if s["Effect"] == "Deny"]
        assert any(s["Condition"] == {"Bool": {"aws:SecureTransport": "false"}} for s in denies)
    [sender] = [
        s
        for p in policies.values()
        if {"Ref": queue_id} in p["Properties"]["Queues"]
        for s in p["Properties"]["PolicyDocument"]["Statement"]
        if s["Effect"] == "Allow"
    ]
    assert sender["Principal"] == {"Service": "events.amazonaws.com"}
    assert sender["Condition"]["ArnEquals"]["aws:SourceArn"]  # only the rule may send


def test_the_delivery_function_reads_the_queue_with_partial_failures_and_may_only_use_it(
    template: dict[str, Any], functions: dict[str, str]
) -> None:
    queue_id, _, _, _ = _webhook_queues(template)
    function_id = functions[WEBHOOKS_HANDLER]
    [mapping] = [
        m
        for m in resources(template, "AWS::Lambda::EventSourceMapping").values()
        if m["Properties"]["FunctionName"] == {"Ref": function_id}
    ]
    assert mapping["Properties"]["EventSourceArn"] == {"Fn::GetAtt": [queue_id, "Arn"]}
    assert mapping["Properties"]["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    env = env_of(template, function_id)
    assert env["BATCH_API_WEBHOOK_QUEUE_URL"] == {"Ref": queue_id}
    assert json.loads(env["BATCH_API_WEBHOOKS"]) == []
    assert "BATCH_API_WEBHOOK_SECRETS_SECRET_NAME" not in env  # no endpoints, no secret to read
    statements = role_statements(template, function_id)
    sqs = [s for s in statements if any(a.startswith("sqs:") for a in actions_of([s]))]
    assert all(s["Resource"] == {"Fn::GetAtt": [queue_id, "Arn"]} for s in sqs)
    assert actions_of(sqs) >= {
        "sqs:ReceiveMessage",
        "sqs:DeleteMessage",
        "sqs:ChangeMessageVisibility",
        "sqs:SendMessage",
    }
    others = actions_of(statements) - actions_of(sqs)
    assert others <= {
        "logs:CreateLogStream",
        "logs:PutLogEvents",
        "xray:PutTraceSegments",
        "xray:PutTelemetryRecords",
    }
    for handler, logical_id in functions.items():  # nobody else touches the queue
        if handler != WEBHOOKS_HANDLER:
            assert not any(a.startswith("sqs:") for a in actions_of(role_statements(template, logical_id))), (
                handler
            )


def test_configured_webhooks_reach_the_function_without_secrets_and_it_reads_only_their_secret(
    hooks_template: dict[str, Any],
) -> None:
    function_id = function_logical_ids(hooks_template)[WEBHOOKS_HANDLER]
    env = env_of(hooks_template, function_id)
    assert json.loads(env["BATCH_API_WEBHOOKS"]) == HOOKS
    assert env["BATCH_API_WEBHOOK_SECRETS_SECRET_NAME"] == "batch-api/hooks/webhook-secrets"
    read = Settings(webhooks=env["BATCH_API_WEBHOOKS"]).webhooks  # what the function parses
    assert [(e.key, e.project) for e in read] == [("orders", "proj_0123456789abcdef"), ("all", None)]
    statements = role_statements(hooks_template, function_id)
    secret = [s for s in statements if any(a.startswith("secretsmanager:") for a in actions_of([s]))]
    assert len(secret) == 1
    assert ":secret:batch-api/hooks/webhook-secrets-??????" in json.dumps(secret[0]["Resource"])
