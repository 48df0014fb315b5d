"""Per-environment settings from the cdk.json context."""

from __future__ import annotations

import json
from typing import Any

import pytest
from infra.config import ConfigError, EnvConfig, load_env_config

from tests.infra.helpers import CDK_JSON

pytestmark = [pytest.mark.infra, pytest.mark.unit]

CONTEXT: dict[str, Any] = json.loads(CDK_JSON.read_text())["context"]


def test_cdk_json_runs_the_app_as_a_module_and_enables_result_writer_v2() -> None:
    cdk = json.loads(CDK_JSON.read_text())
    assert cdk["app"].endswith("-m infra.app")  # `python infra/app.py` would shadow the constructs library
    assert CONTEXT["@aws-cdk/aws-stepfunctions:useDistributedMapResultWriterV2"] is True


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_every_environment_in_cdk_json_is_valid(name: str) -> None:
    config = load_env_config(CONTEXT, name)
    assert config.name == name
    assert config.stack_name == f"BatchApi-{name}"
    assert config.bus_name == f"batch-api-{name}"


def test_dev_is_disposable_and_prod_is_kept() -> None:
    assert load_env_config(CONTEXT, "dev").removal_policy == "destroy"
    assert load_env_config(CONTEXT, "prod").removal_policy == "retain"
    assert (
        load_env_config(CONTEXT, "prod").map_max_concurrency
        > load_env_config(CONTEXT, "dev").map_max_concurrency
    )


def test_default_environment_is_dev() -> None:
    assert load_env_config(CONTEXT).name == "dev"
    assert load_env_config(CONTEXT, None).name == "dev"


def test_unknown_environment_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown environment 'staging'.*dev, prod.*-c env="):
        load_env_config(CONTEXT, "staging")


def test_missing_environments_object() -> None:
    with pytest.raises(ConfigError, match='no "environments"'):
        load_env_config({}, "dev")


def test_typo_in_a_setting_names_the_field() -> None:
    context = {"environments": {"dev": {**CONTEXT["environments"]["dev"], "map_max_concurency": 5}}}
    with pytest.raises(ConfigError, match="map_max_concurency"):
        load_env_config(context, "dev")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("log_retention_days", 10),  # CloudWatch Logs has no 10-day retention
        ("removal_policy", "snapshot"),
        ("map_max_concurrency", 0),
        ("architecture", "arm"),
        ("account", "not-an-account"),
    ],
)
def test_invalid_values_are_rejected(field: str, value: object) -> None:
    context = {"environments": {"dev": {**CONTEXT["environments"]["dev"], field: value}}}
    with pytest.raises(ConfigError, match=field):
        load_env_config(context, "dev")


def test_defaults_are_safe_for_an_unlisted_environment() -> None:
    config = load_env_config({"environments": {"test": {}}}, "test")
    assert config == EnvConfig(name="test")
    assert config.removal_policy == "retain"
    assert config.architecture == "arm64"
    assert config.log_retention_name == "ONE_MONTH"


def test_every_environment_has_an_api_keys_secret() -> None:
    """Without client API keys the API would serve anyone: there is a secret name even when unset."""
    assert (
        load_env_config({"environments": {"test": {}}}, "test").api_keys_secret == "batch-api/test/api-keys"
    )
    for name in ("dev", "prod"):
        config = load_env_config(CONTEXT, name)
        assert config.api_keys_secret == CONTEXT["environments"][name]["api_keys_secret_name"]
    with pytest.raises(ConfigError, match="api_keys_secret_name"):
        load_env_config({"environments": {"test": {"api_keys_secret_name": ""}}}, "test")
