"""A Bedrock-backed environment: the workers may invoke exactly the configured models, nothing more, and
cdk-nag stays clean."""

from __future__ import annotations

import json
import typing
from typing import Any

import pytest

from batch_api.config import Settings
from batch_api.upstreams.routing import load_specs
from tests.infra.helpers import (
    PLACEHOLDER_ACCOUNT,
    PLACEHOLDER_REGION,
    actions_of,
    cdk_context,
    function_logical_ids,
    render_value,
    role_statements,
)

pytestmark = pytest.mark.infra

WORKFLOW = "batch_api.handlers.workflow"
HAIKU_PROFILE = "us.anthropic.claude-3-5-haiku-20241022-v1:0"
HAIKU = "anthropic.claude-3-5-haiku-20241022-v1:0"
TITAN = "amazon.titan-embed-text-v2:0"
NOVA_PROFILE_ARN = "arn:aws:bedrock:eu-west-1:210987654321:inference-profile/eu.amazon.nova-pro-v1:0"
UPSTREAMS = [
    {
        "name": "bedrock",
        "kind": "bedrock",
        "models": {"haiku": HAIKU_PROFILE, "titan": TITAN, "nova": NOVA_PROFILE_ARN},
        "max_in_flight": 32,
    },
    {"name": "cohere", "kind": "bedrock", "region": "us-west-2", "models": ["cohere.embed-english-v3"]},
    {"name": "openai", "base_url": "https://api.openai.com/v1", "api_key_secret": "batch-api/bedrock/openai"},
]


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    """dev with Bedrock upstreams (and one OpenAI-compatible one), cdk-nag on: (template, nag report)."""
    from infra.app import build_app

    context = cdk_context("dev")
    dev = {k: v for k, v in context["environments"]["dev"].items() if k != "upstreams"}
    context["environments"] = {"bedrock": {**dev, "upstreams": UPSTREAMS}}
    outdir = tmp_path_factory.mktemp("cdk-bedrock")
    app, stack = build_app({**context, "env": "bedrock"}, outdir=str(outdir))
    template = typing.cast(dict[str, Any], app.synth().get_stack_by_name(stack.stack_name).template)
    report_path = outdir / "validation-report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {"pluginReports": []}
    return template, report


def bedrock_statements(template: dict[str, Any], handler: str) -> list[dict[str, Any]]:
    statements = role_statements(template, function_logical_ids(template)[handler])
    return [s for s in statements if any(a.startswith("bedrock:") for a in actions_of([s]))]


def resources_of(statement: dict[str, Any]) -> list[str]:
    value = statement["Resource"]
    return sorted(render_value(v) for v in (value if isinstance(value, list) else [value]))


def test_the_workers_may_invoke_exactly_the_configured_models(
    synthesized: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    template, _ = synthesized
    statements = bedrock_statements(template, f"{WORKFLOW}.process_handler")
    assert all(actions_of([s]) == {"bedrock:InvokeModel"} and s["Effect"] == "Allow" for s in statements)
    direct = [s for s in statements if "Condition" not in s]
    routed = [s for s in statements if "Condition" in s]
    haiku_profile = (
        f"arn:aws:bedrock:{PLACEHOLDER_REGION}:{PLACEHOLDER_ACCOUNT}:inference-profile/{HAIKU_PROFILE}"
    )

    assert [resources_of(s) for s in direct] == [
        sorted(
            [
                haiku_profile,  # the profile, in the stack's region and account
                f"arn:aws:bedrock:{PLACEHOLDER_REGION}::foundation-model/{TITAN}",
                NOVA_PROFILE_ARN,  # an ARN as given
                "arn:aws:bedrock:us-west-2::foundation-model/cohere.embed-english-v3",  # its upstream's region
            ]
        )
    ]
    # the models behind the profiles, in whichever Region the profile picks, but only through the profiles
    (through,) = routed
    assert resources_of(through) == sorted(
        [
            f"arn:aws:bedrock:*::foundation-model/{HAIKU}",
            "arn:aws:bedrock:*::foundation-model/amazon.nova-pro-v1:0",
        ]
    )
    condition = through["Condition"]["StringEquals"]["bedrock:InferenceProfileArn"]
    assert sorted(render_value(v) for v in condition) == sorted([haiku_profile, NOVA_PROFILE_ARN])
    every_resource = [r for s in statements for r in resources_of(s)]
    assert "*" not in every_resource
    assert not any(
        r.endswith("foundation-model/*") or r.endswith("inference-profile/*") for r in every_resource
    )


def test_no_other_function_may_invoke_bedrock(synthesized: tuple[dict[str, Any], dict[str, Any]]) -> None:
    template, _ = synthesized
    for handler in function_logical_ids(template):
        if handler != f"{WORKFLOW}.process_handler":
            assert bedrock_statements(template, handler) == [], handler


def test_cdk_nag_stays_clean(synthesized: tuple[dict[str, Any], dict[str, Any]]) -> None:
    _, report = synthesized
    violations = [v for r in report.get("pluginReports", []) for v in r.get("violations", [])]
    assert violations == []


def test_the_functions_read_the_model_maps_they_are_granted(
    synthesized: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    template, _ = synthesized
    process = function_logical_ids(template)[f"{WORKFLOW}.process_handler"]
    variables = template["Resources"][process]["Properties"]["Environment"]["Variables"]
    specs = load_specs(Settings(upstreams_json=variables["BATCH_API_UPSTREAMS_JSON"]))
    assert [(spec.name, spec.kind, spec.region, spec.model_ids) for spec in specs[:2]] == [
        ("bedrock", "bedrock", None, {"haiku": HAIKU_PROFILE, "titan": TITAN, "nova": NOVA_PROFILE_ARN}),
        ("cohere", "bedrock", "us-west-2", {"cohere.embed-english-v3": "cohere.embed-english-v3"}),
    ]


def test_a_bedrock_upstream_that_could_not_be_limited_fails_the_synth() -> None:
    from infra.config import ConfigError, load_env_config

    bad = {"name": "bedrock", "kind": "bedrock", "models": ["*"]}
    with pytest.raises(ConfigError, match="names its models"):
        load_env_config({"environments": {"dev": {"upstreams": [bad]}}}, "dev")
