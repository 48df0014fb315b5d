"""Names of resources a stack can leave behind.

A resource kept on `cdk destroy` (removal policy RETAIN) keeps its name in the account. If the stack
gave it a fixed name, the next `cdk deploy` of that environment fails on it ("already exists"). Such
resources are named for the stack's creation instead: the fixed name plus the unique id CloudFormation
gives each stack it creates (the last part of `AWS::StackId`). A resource destroyed with its stack
keeps the plain name.
"""

from __future__ import annotations

from aws_cdk import Aws, Fn, RemovalPolicy


def kept_name(name: str, removal_policy: RemovalPolicy) -> str:
    """`name` for a resource destroyed with the stack; `name-<stack creation id>` for one kept."""
    if removal_policy == RemovalPolicy.DESTROY:
        return name
    return Fn.join("-", [name, Fn.select(2, Fn.split("/", Aws.STACK_ID))])
