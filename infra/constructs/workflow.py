"""The batch state machine and its four step functions (docs/architecture.md#flows).

Validate -> Route -> ProcessChunks (Distributed Map over the S3 JSON manifest, STANDARD children
that loop ProcessChunk until the chunk is done: the journal is the cursor) -> Finalize -> Done.
Every task retries Lambda service errors and throttling, then any task failure a few times (the
steps are idempotent, as the local runner assumes); whatever still fails is caught, MarkFailed
ends the batch `failed` with an error entry, and the execution fails: a batch is never left stuck.
"""

from __future__ import annotations

from collections.abc import Mapping

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_events as events
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import aws_stepfunctions as sfn
from aws_cdk import aws_stepfunctions_tasks as tasks
from constructs import Construct

from batch_api.upstreams.routing import DISCOVER
from infra.bedrock import grant_invoke as grant_bedrock_invoke
from infra.config import EnvConfig
from infra.constructs.storage import (
    DELETE_PROGRESS,
    END_HOLDS,
    LEASE_ITEMS,
    PUT_ITEMS,
    READ_ITEMS,
    UPDATE_ITEMS,
    Storage,
)
from infra.functions import FunctionFactory
from infra.nag import XRAY_REASON, acknowledge, logical_id, wildcard
from infra.naming import kept_name

HANDLERS = "batch_api.handlers.workflow"
STEP_TIMEOUT = Duration.minutes(15)  # the Lambda maximum; process returns a cursor well before it
FAIL_TIMEOUT = Duration.minutes(1)

LAMBDA_SERVICE_ERRORS = [
    "Lambda.ServiceException",
    "Lambda.AWSLambdaException",
    "Lambda.SdkClientException",
    "Lambda.ClientExecutionTimeoutException",
]
# Throttling means "wait for a slot" (the workers' reserved concurrency is the fleet's ceiling), never
# "fail": retried every minute at most for a whole completion window; the batch's expiry ends it.
THROTTLED = "Lambda.TooManyRequestsException"
THROTTLE_MAX_ATTEMPTS = 24 * 60


def add_retries(task: sfn.TaskStateBase) -> None:
    """Throttling and Lambda service errors retry patiently; a failing step a few times, like the
    local runner (STEP_ATTEMPTS, STEP_BACKOFF_SECONDS), before the catch marks the batch failed."""
    task.add_retry(
        errors=[THROTTLED],
        interval=Duration.seconds(2),
        max_attempts=THROTTLE_MAX_ATTEMPTS,
        backoff_rate=2,
        max_delay=Duration.seconds(60),
        jitter_strategy=sfn.JitterType.FULL,
    )
    task.add_retry(
        errors=LAMBDA_SERVICE_ERRORS,
        interval=Duration.seconds(2),
        max_attempts=8,
        backoff_rate=2,
        max_delay=Duration.seconds(60),
        jitter_strategy=sfn.JitterType.FULL,
    )
    task.add_retry(
        errors=[sfn.Errors.TASKS_FAILED],
        interval=Duration.seconds(1),
        max_attempts=3,
        backoff_rate=2,
    )


class Workflow(Construct):
    def __init__(
        self,
        scope: Construct,
        id: str,
        *,
        config: EnvConfig,
        functions: FunctionFactory,
        storage: Storage,
        bus: events.IEventBus,
        upstream_secrets: Mapping[str, secretsmanager.ISecret],
        log_retention: logs.RetentionDays,
        removal_policy: RemovalPolicy,
    ) -> None:
        super().__init__(scope, id)
        memory = config.step_memory_mb
        steps = Construct(self, "Functions")  # the states take the plain names (Validate, Finalize, ...)
        # the upstreams, routed by model: validation refuses a model none serves (model_not_found), the
        # workers send to the one serving theirs, within its limit across every worker (leases)
        routes = {"BATCH_API_UPSTREAMS_JSON": config.upstreams_json}
        self.validate_function = functions.create(
            steps,
            "Validate",
            handler=f"{HANDLERS}.validate_handler",
            description="batch-api: validate a batch's input file and write its chunk manifest",
            timeout=STEP_TIMEOUT,
            memory_mb=memory,
            environment=routes,
        )
        upstream_env = {
            **routes,
            "BATCH_API_REQUESTS_PER_CHUNK": str(config.requests_per_chunk),
            # each journal append is an S3 PUT: batch a second of results per PUT
            "BATCH_API_JOURNAL_FLUSH_INTERVAL_SECONDS": "1",
        }
        self.process_function = functions.create(
            steps,
            "Process",
            handler=f"{HANDLERS}.process_handler",
            description="batch-api: send one chunk's requests upstream (returns a cursor when time runs low)",
            timeout=STEP_TIMEOUT,
            memory_mb=config.worker_memory_mb,
            environment=upstream_env,
            reserved_concurrency=config.worker_reserved_concurrency,
        )
        self.finalize_function = functions.create(
            steps,
            "Finalize",
            handler=f"{HANDLERS}.finalize_handler",
            description="batch-api: write a batch's output and error files and set its final status",
            timeout=STEP_TIMEOUT,
            memory_mb=memory,
        )
        self.fail_function = functions.create(
            steps,
            "Fail",
            handler=f"{HANDLERS}.fail_handler",
            description="batch-api: mark a batch failed after a step failed",
            timeout=FAIL_TIMEOUT,
            memory_mb=memory,
        )

        # Every step reads the batch; validate, finalize and fail end batches (status, the input's hold,
        # then the batch's chunk progress); process and finalize write records (progress, output files).
        ends = READ_ITEMS | UPDATE_ITEMS | END_HOLDS | DELETE_PROGRESS
        storage.grant_table(self.validate_function, ends)
        # capacity leases: read the upstream's partition, grant in a transaction (Update, Put, Delete),
        # renew (Update), release (Delete)
        storage.grant_table(self.process_function, READ_ITEMS | PUT_ITEMS | UPDATE_ITEMS | LEASE_ITEMS)
        storage.grant_table(self.finalize_function, ends | PUT_ITEMS)
        storage.grant_table(self.fail_function, ends)
        # Every step that can end a batch (validate, finalize, fail) releases its input file: the body of
        # an input file deleted or expired while the batch ran is kept for it, and removed when it ends;
        # a live one gets its expiry tag back (service.files.release_input_file), so those steps delete
        # and tag under files/ too.
        # validate: reads the input file, writes the manifest
        storage.grant_objects(
            self.validate_function,
            read=("files/", "batches/"),
            write=("batches/",),
            delete=("files/",),
            tag=("files/",),
        )
        # process: reads its chunk of the input, appends to the journal
        storage.grant_objects(self.process_function, read=("files/", "batches/"), write=("batches/",))
        # finalize: reads the journal and input, writes output/error files (tagged), drops the journal
        storage.grant_objects(
            self.finalize_function,
            read=("files/", "batches/"),
            write=("files/", "batches/"),
            delete=("files/", "batches/"),
        )
        # the journal, the input (deleted, or its expiry given back)
        storage.grant_objects(self.fail_function, delete=("files/", "batches/"), tag=("files/",))
        for publisher in (self.validate_function, self.finalize_function, self.fail_function):
            bus.grant_put_events_to(publisher)
        # the workers read every upstream's key; validation only those of upstreams asked for their models
        discovered = {spec.name for spec in config.upstream_specs if spec.models == DISCOVER}
        for name, secret in upstream_secrets.items():
            secret.grant_read(self.process_function)
            if name in discovered:
                secret.grant_read(self.validate_function)
        # the workers call the models of Bedrock upstreams (the AWS credentials of their role), only those
        grant_bedrock_invoke(self.process_function, config.upstream_specs)

        self.log_group = logs.LogGroup(
            self,
            "Logs",
            # the vendedlogs prefix keeps the Logs resource policy small (Step Functions' advice)
            log_group_name=kept_name(f"/aws/vendedlogs/states/{config.stack_name}-workflow", removal_policy),
            retention=log_retention,
            removal_policy=removal_policy,
        )
        self.state_machine = sfn.StateMachine(
            self,
            "StateMachine",
            state_machine_type=sfn.StateMachineType.STANDARD,
            definition_body=sfn.DefinitionBody.from_chainable(self._definition(config, storage)),
            logs=sfn.LogOptions(
                destination=self.log_group, level=sfn.LogLevel.ALL, include_execution_data=True
            ),
            tracing_enabled=True,
            comment=f"batch-api {config.name}: validate -> process chunks -> finalize",
        )
        self._acknowledge_state_machine_policies(storage)

    def _acknowledge_state_machine_policies(self, storage: Storage) -> None:
        machine = logical_id(self.state_machine)
        own_executions = (
            "arn:<AWS::Partition>:states:<AWS::Region>:<AWS::AccountId>:execution:"
            f'{{"Fn::Select":[6,{{"Fn::Split":[":",{{"Ref":"{machine}"}}]}}]}}'
        )
        reasons = {
            wildcard("*"): XRAY_REASON
            + " Likewise the CloudWatch Logs delivery actions Step Functions logging "
            "needs (logs:CreateLogDelivery, logs:DescribeResourcePolicies, ...).",
            wildcard(f"arn:<AWS::Partition>:s3:::<{logical_id(storage.bucket)}>/*"): "The Distributed Map "
            "ItemReader reads the chunk manifest at a key taken from the state (batches/<id>/manifest.json); CDK "
            "grants s3:GetObject on the bucket's objects for it.",
            wildcard(
                f"{own_executions}:*"
            ): "The Distributed Map describes and stops its own child executions, "
            "whose names Step Functions generates.",
            wildcard(
                f"{own_executions}/*:*"
            ): "The Distributed Map's map runs and their child executions have generated names.",
        }
        for function in self.functions:
            reasons[wildcard(f"<{logical_id(function)}.Arn>:*")] = (
                "LambdaInvoke grants this one function's versions and aliases (its ARN plus ':*')."
            )
        acknowledge(self.state_machine, reasons)

    @property
    def functions(self) -> tuple[lambda_.Function, ...]:
        return (self.validate_function, self.process_function, self.finalize_function, self.fail_function)

    def _task(self, id: str, function: lambda_.IFunction, **kwargs: object) -> tasks.LambdaInvoke:
        task = tasks.LambdaInvoke(
            self,
            id,
            lambda_function=function,
            payload_response_only=True,
            retry_on_service_exceptions=False,  # add_retries covers them, plus throttling
            **kwargs,  # type: ignore[arg-type]
        )
        add_retries(task)
        return task

    def _definition(self, config: EnvConfig, storage: Storage) -> sfn.IChainable:
        mark_failed = self._task(
            "MarkFailed",
            self.fail_function,
            # the whole error output: a reference to $.failure.Cause would itself fail (States.Runtime,
            # uncaught, batch stuck) on an error output without a Cause; fail_handler reads both fields
            payload=sfn.TaskInput.from_object(
                {
                    "project_id": sfn.JsonPath.string_at("$.project_id"),
                    "batch_id": sfn.JsonPath.string_at("$.batch_id"),
                    "failure": sfn.JsonPath.object_at("$.failure"),
                }
            ),
            result_path=sfn.JsonPath.DISCARD,
        ).next(
            sfn.Fail(self, "Failed", error="BatchFailed", cause="A step failed; the batch was marked failed.")
        )

        def catch(state: sfn.TaskStateBase | sfn.DistributedMap) -> None:
            state.add_catch(mark_failed, errors=[sfn.Errors.ALL], result_path="$.failure")

        done = sfn.Succeed(self, "Done")
        validate = self._task("Validate", self.validate_function)
        finalize = self._task("Finalize", self.finalize_function)
        catch(validate)
        catch(finalize)

        # one chunk: call Process until it says done. Its answer goes to $.result so the chunk
        # stays in the state for the next call.
        process = self._task("ProcessChunk", self.process_function, result_path="$.result")
        # no capacity on the upstream for now: wait as long as the worker says, without a Lambda running
        wait_for_capacity = sfn.Wait(
            self, "WaitForCapacity", time=sfn.WaitTime.seconds_path("$.result.wait_seconds")
        ).next(process)
        chunk_done = (
            sfn.Choice(self, "ChunkDone")
            .when(
                sfn.Condition.boolean_equals("$.result.done", True),
                # each chunk's output is {}: without a ResultWriter the Map gathers every child's output
                # into one array, which must stay under Step Functions' 256 KiB; {} keeps a batch of the
                # most chunks there can be (one line each, MAX_REQUESTS_PER_BATCH) at 3 bytes a chunk
                sfn.Succeed(self, "ChunkFinished", output_path=sfn.JsonPath.DISCARD),
            )
            .when(sfn.Condition.number_greater_than("$.result.wait_seconds", 0), wait_for_capacity)
            .otherwise(process)
        )
        process_chunks = sfn.DistributedMap(
            self,
            "ProcessChunks",
            item_reader=sfn.S3JsonItemReader(
                bucket=storage.bucket, key=sfn.JsonPath.string_at("$.manifest_key")
            ),
            item_selector={
                "project_id": sfn.JsonPath.string_at("$.project_id"),
                "batch_id": sfn.JsonPath.string_at("$.batch_id"),
                "chunk": sfn.JsonPath.object_at("$$.Map.Item.Value"),
            },
            map_execution_type=sfn.StateMachineType.STANDARD,
            max_concurrency=config.map_max_concurrency,
            result_path=sfn.JsonPath.DISCARD,
        )
        process_chunks.item_processor(process.next(chunk_done))
        catch(process_chunks)

        unknown_route = sfn.Pass(
            self,
            "UnknownRoute",
            result=sfn.Result.from_object(
                {"Error": "UnknownRoute", "Cause": "Validate answered an unknown next step."}
            ),
            result_path="$.failure",
        ).next(mark_failed)
        route = (
            sfn.Choice(self, "Route")
            .when(sfn.Condition.string_equals("$.next", "process"), process_chunks.next(finalize))
            .when(sfn.Condition.string_equals("$.next", "finalize"), finalize)
            .when(sfn.Condition.string_equals("$.next", "done"), done)
            .otherwise(unknown_route)
        )
        finalize.next(done)
        return validate.next(route)
