"""The batch-api stack: thin, composing one construct per concern with resources passed explicitly."""

from __future__ import annotations

from typing import Any

from aws_cdk import CfnOutput, RemovalPolicy, Stack
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_secretsmanager as secretsmanager
from constructs import Construct

from batch_api.config import Settings
from infra import outputs
from infra.bundling import function_code
from infra.config import EnvConfig
from infra.constructs.api import Api
from infra.constructs.events import Events
from infra.constructs.housekeeping import Housekeeping
from infra.constructs.monitoring import METRICS_NAMESPACE, SERVICE_NAME, Monitoring
from infra.constructs.storage import Storage
from infra.constructs.webhooks import Webhooks
from infra.constructs.workflow import Workflow
from infra.functions import RUNTIME, FunctionFactory


class BatchApiStack(Stack):
    def __init__(self, scope: Construct, id: str, *, env_config: EnvConfig, **kwargs: Any) -> None:
        super().__init__(scope, id, **kwargs)
        config = env_config
        removal_policy = RemovalPolicy.DESTROY if config.removal_policy == "destroy" else RemovalPolicy.RETAIN
        log_retention = getattr(logs.RetentionDays, config.log_retention_name)
        architecture = (
            lambda_.Architecture.ARM_64 if config.architecture == "arm64" else lambda_.Architecture.X86_64
        )

        storage = Storage(self, "Storage", config=config, removal_policy=removal_policy)
        events = Events(self, "Events", config=config, removal_policy=removal_policy)
        # one existing secret per upstream that has a key, by upstream name
        upstream_secrets = {
            spec.name: secretsmanager.Secret.from_secret_name_v2(
                self, f"UpstreamSecret-{spec.name}", spec.api_key_secret
            )
            for spec in config.upstream_specs
            if spec.api_key_secret
        }
        functions = FunctionFactory(
            code=function_code(RUNTIME, architecture),
            architecture=architecture,
            log_retention=log_retention,
            removal_policy=removal_policy,
            environment={
                "BATCH_API_BACKEND": "aws",
                "BATCH_API_TABLE_NAME": storage.table.table_name,
                "BATCH_API_BUCKET_NAME": storage.bucket.bucket_name,
                "BATCH_API_EVENT_BUS_NAME": events.bus.event_bus_name,
                "BATCH_API_CHUNK_MAX_LINES": str(config.chunk_max_lines),
                "POWERTOOLS_SERVICE_NAME": SERVICE_NAME,
                "POWERTOOLS_METRICS_NAMESPACE": METRICS_NAMESPACE,
            },
        )
        workflow = Workflow(
            self,
            "Workflow",
            config=config,
            functions=functions,
            storage=storage,
            bus=events.bus,
            upstream_secrets=upstream_secrets,
            log_retention=log_retention,
            removal_policy=removal_policy,
        )
        api = Api(
            self,
            "Api",
            config=config,
            functions=functions,
            storage=storage,
            api_keys_secret=secretsmanager.Secret.from_secret_name_v2(
                self, "ApiKeysSecret", config.api_keys_secret
            ),
            state_machine=workflow.state_machine,
            log_retention=log_retention,
            removal_policy=removal_policy,
        )
        housekeeping = Housekeeping(
            self, "Housekeeping", config=config, functions=functions, storage=storage, bus=events.bus
        )
        webhooks = Webhooks(
            self,
            "Webhooks",
            config=config,
            functions=functions,
            bus=events.bus,
            event_source=Settings.model_fields["event_source"].default,
            removal_policy=removal_policy,
        )
        monitoring = Monitoring(
            self,
            "Monitoring",
            config=config,
            state_machine=workflow.state_machine,
            worker=workflow.process_function,
            functions={
                "api": api.function,
                "validate": workflow.validate_function,
                "process": workflow.process_function,
                "finalize": workflow.finalize_function,
                "fail": workflow.fail_function,
                "housekeeping": housekeeping.function,
                "webhooks": webhooks.function,
            },
            rest_api=api.rest_api,
            other_alarms=[housekeeping.errors_alarm, webhooks.dead_letters_alarm, webhooks.gave_up_alarm],
        )
        CfnOutput(
            self, outputs.ALARM_TOPIC_ARN, value=monitoring.topic.topic_arn, description="Where alarms go"
        )
        self.storage, self.events, self.workflow, self.api = storage, events, workflow, api
        self.housekeeping, self.monitoring, self.webhooks = housekeeping, monitoring, webhooks
