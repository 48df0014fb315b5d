"""IAM for Bedrock upstreams: `bedrock:InvokeModel` (which Converse needs too) on the configured models only.

A foundation model is granted in the upstream's region. A cross-Region inference profile is granted
itself, plus its foundation model in whichever Region the profile sends a request to (`*`, as AWS
documents for profiles), but only when called through one of the configured profiles
(`bedrock:InferenceProfileArn`), so the role cannot call that model directly anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from aws_cdk import Stack
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_

from batch_api.upstreams.bedrock import bedrock_target
from batch_api.upstreams.routing import UpstreamSpec
from infra.nag import acknowledge, wildcard

INVOKE = "bedrock:InvokeModel"
PROFILE_CONDITION = "bedrock:InferenceProfileArn"


@dataclass(frozen=True)
class InvokeGrants:
    """The ARNs a role may invoke: directly, and foundation models only through the profiles."""

    direct: list[str]
    through_profiles: list[str]
    profiles: list[str]


def invoke_grants(
    specs: Iterable[UpstreamSpec], *, partition: str, region: str, account: str
) -> InvokeGrants:
    """The ARNs of every model the bedrock upstreams among `specs` call (an upstream without a region
    calls the stack's: `region`)."""
    direct: list[str] = []
    through: list[str] = []
    profiles: list[str] = []

    def add(items: list[str], arn: str) -> None:
        if arn not in items:
            items.append(arn)

    for spec in specs:
        if spec.kind != "bedrock":
            continue
        for model_id in spec.model_ids.values():
            target = bedrock_target(model_id)
            where = target.region or spec.region or region
            if target.kind == "foundation-model":
                add(direct, f"arn:{partition}:bedrock:{where}::foundation-model/{target.resource_id}")
                continue
            profile = f"arn:{partition}:bedrock:{where}:{target.account or account}:inference-profile/{target.resource_id}"
            add(direct, profile)
            add(profiles, profile)
            add(through, f"arn:{partition}:bedrock:*::foundation-model/{target.foundation_model}")
    return InvokeGrants(direct, through, profiles)


def grant_invoke(function: lambda_.Function, specs: Iterable[UpstreamSpec]) -> InvokeGrants:
    """Let `function` invoke the models of the bedrock upstreams in `specs` (nothing when there are none)."""
    stack = Stack.of(function)
    grants = invoke_grants(specs, partition=stack.partition, region=stack.region, account=stack.account)
    if grants.direct:
        function.add_to_role_policy(iam.PolicyStatement(actions=[INVOKE], resources=grants.direct))
    if grants.through_profiles:
        function.add_to_role_policy(
            iam.PolicyStatement(
                actions=[INVOKE],
                resources=grants.through_profiles,
                conditions={"StringEquals": {PROFILE_CONDITION: grants.profiles}},
            )
        )
        # cdk-nag names a resource by its template form, the partition as <AWS::Partition>
        rendered = [arn.replace(stack.partition, "<AWS::Partition>", 1) for arn in grants.through_profiles]
        assert function.role is not None  # FunctionFactory gives every function its role
        acknowledge(
            function.role,
            {
                wildcard(
                    arn
                ): "A cross-Region inference profile sends each request to its foundation model in "
                "one of the Regions it spans, which it chooses per request; this model only, and only through the "
                "configured inference profiles (bedrock:InferenceProfileArn condition)."
                for arn in rendered
            },
        )
    return grants
