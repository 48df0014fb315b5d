"""Helpers for the infra tests, and for running the synthesized state machine under moto.

`synth_stack(env)` builds the app exactly as `cdk synth -c env=...` does (the real cdk.json context,
cdk-nag on), skipping asset bundling. `render_definition(template)` turns the state machine's
DefinitionString (a Fn::Join with ARNs and Refs) into the Amazon States Language dict, with
placeholders, or real values for a test that runs it, substituted for the CloudFormation references.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
CDK_JSON = REPO_ROOT / "cdk.json"
PLACEHOLDER_REGION = "us-east-1"
PLACEHOLDER_ACCOUNT = "123456789012"

os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")


def cdk_context(env: str) -> dict[str, Any]:
    """cdk.json's context (an App built in a test does not read cdk.json), for `env`, bundling off."""
    context = json.loads(CDK_JSON.read_text())["context"]
    return {**context, "env": env, "aws:cdk:bundling-stacks": []}


@dataclass
class Synthesized:
    env: str
    stack_name: str
    template: dict[str, Any]
    validation_report: dict[str, Any]


def synth_stack(env: str, outdir: Path) -> Synthesized:
    """Synthesize the app for `env` into `outdir`; raises when cdk-nag has unacknowledged findings."""
    from infra.app import build_app

    app, stack = build_app(cdk_context(env), outdir=str(outdir))
    assembly = app.synth()
    template = assembly.get_stack_by_name(stack.stack_name).template
    report_path = outdir / "validation-report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"pluginReports": []}
    return Synthesized(env, stack.stack_name, template, report)


# ------------------------------------------------------------------ template queries


def resources(template: Mapping[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {lid: r for lid, r in template["Resources"].items() if r["Type"] == type_}


def only(template: Mapping[str, Any], type_: str) -> tuple[str, dict[str, Any]]:
    found = resources(template, type_)
    assert len(found) == 1, f"expected one {type_}, found {sorted(found)}"
    return next(iter(found.items()))


def function_logical_ids(template: Mapping[str, Any]) -> dict[str, str]:
    """Handler (e.g. "batch_api.handlers.workflow.process_handler") -> the function's logical id."""
    return {
        r["Properties"]["Handler"]: lid
        for lid, r in resources(template, "AWS::Lambda::Function").items()
        if r["Properties"]["Handler"].startswith("batch_api.")
    }


def role_statements(template: Mapping[str, Any], function_logical_id: str) -> list[dict[str, Any]]:
    """Every policy statement attached to the function's role (inline and default policies)."""
    role = template["Resources"][function_logical_id]["Properties"]["Role"]["Fn::GetAtt"][0]
    statements: list[dict[str, Any]] = []
    for policy in resources(template, "AWS::IAM::Policy").values():
        if {"Ref": role} in policy["Properties"]["Roles"]:
            statements += policy["Properties"]["PolicyDocument"]["Statement"]
    return statements


def actions_of(statements: list[dict[str, Any]]) -> set[str]:
    found: set[str] = set()
    for statement in statements:
        action = statement["Action"]
        found.update([action] if isinstance(action, str) else action)
    return found


# ------------------------------------------------------------------ the state machine definition


def render_definition(template: Mapping[str, Any], refs: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The state machine's definition as a dict.

    References are replaced: `{"Fn::GetAtt": [id, "Arn"]}` by `refs[id]` or a placeholder Lambda ARN
    named after the logical id, `{"Ref": id}` by `refs[id]` or the id itself (the data bucket's Ref
    is its name: pass `refs={bucket_logical_id: "my-bucket"}`), pseudo parameters by placeholders.
    """
    _, machine = only(template, "AWS::StepFunctions::StateMachine")
    body = machine["Properties"]["DefinitionString"]
    return json.loads(_render(body, dict(refs or {})))


def _render(value: Any, refs: dict[str, str]) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(_render(part, refs) for part in parts)
    if isinstance(value, dict) and "Fn::GetAtt" in value:
        logical_id, attribute = value["Fn::GetAtt"]
        if logical_id in refs:
            return refs[logical_id]
        assert attribute == "Arn", value
        return f"arn:aws:lambda:{PLACEHOLDER_REGION}:{PLACEHOLDER_ACCOUNT}:function:{logical_id}"
    if isinstance(value, dict) and "Ref" in value:
        name = str(value["Ref"])
        pseudo = {
            "AWS::Partition": "aws",
            "AWS::Region": PLACEHOLDER_REGION,
            "AWS::AccountId": PLACEHOLDER_ACCOUNT,
            "AWS::URLSuffix": "amazonaws.com",
        }
        return refs.get(name, pseudo.get(name, name))
    raise ValueError(f"cannot render {value!r}")


def render_value(value: Any) -> str:
    """A template value (a string, or a Fn::Join of Refs and pseudo parameters) with placeholders filled."""
    return _render(value, {})
