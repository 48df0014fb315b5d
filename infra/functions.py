"""One helper that builds a Python Lambda with its own role, log group and tracing.

Five functions share the code asset, runtime, architecture and base environment; each gets an
explicit role with nothing on it but its log group (grants are added by the construct that owns
the resource), so no AWS managed policy is attached.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from aws_cdk import Duration, RemovalPolicy
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from constructs import Construct

from infra.nag import XRAY_REASON, acknowledge, wildcard

# the newest Python runtime this aws-cdk-lib offers (cdk-nag AwsSolutions-L1 asks for the latest)
RUNTIME = lambda_.Runtime.PYTHON_3_14


@dataclass(frozen=True)
class FunctionFactory:
    code: lambda_.Code
    architecture: lambda_.Architecture
    log_retention: logs.RetentionDays
    removal_policy: RemovalPolicy
    environment: Mapping[str, str] = field(default_factory=dict)
    runtime: lambda_.Runtime = RUNTIME

    def create(
        self,
        scope: Construct,
        id: str,
        *,
        handler: str,
        description: str,
        timeout: Duration,
        memory_mb: int,
        environment: Mapping[str, str] | None = None,
        reserved_concurrency: int | None = None,
    ) -> lambda_.Function:
        log_group = logs.LogGroup(
            scope,
            f"{id}Logs",
            retention=self.log_retention,
            removal_policy=self.removal_policy,
        )
        role = iam.Role(
            scope,
            f"{id}Role",
            assumed_by=iam.ServicePrincipal("lambda.amazonaws.com"),
            description=f"batch-api {id} function",
        )
        log_group.grant_write(role)
        acknowledge(role, {wildcard("*"): XRAY_REASON})
        return lambda_.Function(
            scope,
            id,
            description=description,
            code=self.code,
            handler=handler,
            runtime=self.runtime,
            architecture=self.architecture,
            memory_size=memory_mb,
            timeout=timeout,
            role=role,
            log_group=log_group,
            tracing=lambda_.Tracing.ACTIVE,
            environment={**self.environment, **(environment or {})},
            reserved_concurrent_executions=reserved_concurrency,
        )
