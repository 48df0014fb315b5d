"""cdk-nag (3.x): the AwsSolutions pack as a policy-validation plugin, and acknowledgements with reasons.

3.x replaced `NagSuppressions`/`Aspects` with CDK's own `Validations` API: a finding is acknowledged
on the narrowest construct that causes it, by its full id (`AwsSolutions-IAM5[Resource::*]`).
"""

from __future__ import annotations

from aws_cdk import Acknowledgment, CfnElement, Stack, Stage, Validations
from cdk_nag import AwsSolutionsChecks
from constructs import IConstruct


def add_nag_checks(app: Stage) -> None:
    """Run the AwsSolutions rules on every synth; any unacknowledged finding fails it."""
    Validations.of(app).add_plugins(AwsSolutionsChecks(app, verbose=True))


def acknowledge(scope: IConstruct, reasons: dict[str, str]) -> None:
    """Acknowledge each rule id in `reasons` on `scope` (and its children) with its reason."""
    Validations.of(scope).acknowledge(*(Acknowledgment(id=rule, reason=why) for rule, why in reasons.items()))


def logical_id(construct: IConstruct) -> str:
    """The CloudFormation logical id of an L2 construct's resource, as cdk-nag prints it in finding ids."""
    element = construct if isinstance(construct, CfnElement) else construct.node.default_child
    if not isinstance(element, CfnElement):
        raise TypeError(f"{construct.node.path} has no CloudFormation resource")
    return str(Stack.of(element).resolve(element.logical_id))


def wildcard(resource: str) -> str:
    """The finding id of AwsSolutions-IAM5 for a wildcard resource."""
    return f"AwsSolutions-IAM5[Resource::{resource}]"


XRAY_REASON = (
    "X-Ray tracing (xray:PutTraceSegments, xray:PutTelemetryRecords) has no resource-level permissions; "
    "AWS requires Resource '*'."
)
