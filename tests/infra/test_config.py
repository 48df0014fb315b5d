"""Per-environment settings from the cdk.json context."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from infra.config import LAMBDA_MAX_REQUESTS_PER_CHUNK, ConfigError, EnvConfig, load_env_config
from infra.constructs.workflow import STEP_TIMEOUT

from batch_api.contract.models import MAX_REQUESTS_PER_BATCH
from batch_api.upstreams.openai_http import RESERVED_FILE_DESCRIPTORS
from batch_api.workflow.process import TIME_MARGIN_FLOOR_SECONDS
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


def test_a_worker_is_never_asked_for_more_requests_in_flight_than_its_open_files_allow() -> None:
    """A Lambda may open 1,024 files; each request in flight holds a connection, and the AWS SDK and the
    runtime keep some: at 1,024 in flight the journal's PUTs failed with EMFILE
    (bench/results/worker_throughput.md)."""
    dev = CONTEXT["environments"]["dev"]
    assert LAMBDA_MAX_REQUESTS_PER_CHUNK == 1024 - RESERVED_FILE_DESCRIPTORS
    most = {"environments": {"dev": {**dev, "requests_per_chunk": LAMBDA_MAX_REQUESTS_PER_CHUNK}}}
    assert load_env_config(most).requests_per_chunk == LAMBDA_MAX_REQUESTS_PER_CHUNK
    for value in (LAMBDA_MAX_REQUESTS_PER_CHUNK + 1, 1024):
        context = {"environments": {"dev": {**dev, "requests_per_chunk": value}}}
        with pytest.raises(ConfigError, match=r"requests_per_chunk[\s\S]*at most 896.*1024 files"):
            load_env_config(context)
    for name in ("dev", "prod"):
        assert load_env_config(CONTEXT, name).requests_per_chunk <= LAMBDA_MAX_REQUESTS_PER_CHUNK


def test_prod_fills_its_upstream_with_a_largest_batch_whose_chunks_each_end_in_one_invocation() -> None:
    """The prod settings of docs/cost-model.md: a batch of the most requests there can be is as many
    chunks as workers its upstream's limit holds at `requests_per_chunk` each (so none of them loops
    waiting for capacity), and a chunk at 2 s of upstream latency (L / R x 2 s, plus the ~10 s the
    gate's slow start and the last answers took in bench/results/worker_throughput.md) ends well within
    one invocation's time, before the worker's margin for requests in flight."""
    prod = load_env_config(CONTEXT, "prod")
    [upstream] = prod.upstream_specs
    chunks = math.ceil(MAX_REQUESTS_PER_BATCH / prod.chunk_max_lines)
    assert chunks * prod.requests_per_chunk <= upstream.max_in_flight
    assert chunks <= prod.map_max_concurrency
    chunk_seconds = prod.chunk_max_lines / prod.requests_per_chunk * 2.0 + 10
    assert chunk_seconds < (STEP_TIMEOUT.to_seconds() - TIME_MARGIN_FLOOR_SECONDS) / 2


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


# ------------------------------------------------------------------ upstreams


def _env(**settings: Any) -> dict[str, Any]:
    return {"environments": {"test": settings}}


def test_one_upstream_can_still_be_given_by_its_url_secret_and_limit() -> None:
    config = load_env_config(
        _env(
            upstream_url="https://llm.internal/v1", upstream_secret_name="team/key", upstream_max_in_flight=9
        ),
        "test",
    )
    [spec] = config.upstream_specs
    assert (spec.name, spec.kind, spec.base_url, spec.api_key_secret, spec.max_in_flight, spec.models) == (
        "default",
        "http",
        "https://llm.internal/v1",
        "team/key",
        9,
        ["*"],
    )
    [mock] = load_env_config(_env(), "test").upstream_specs  # nothing set: the demo mock
    assert (mock.kind, mock.max_in_flight) == ("mock", 128)


def test_the_upstreams_list_is_checked_as_the_functions_will_read_it() -> None:
    fleet = [
        {"name": "vllm", "base_url": "http://gpu:8000/v1", "api_key_secret": "s/vllm", "models": ["llama"]},
        {"name": "rest", "base_url": "https://api.openai.com/v1", "requests_per_minute": 500},
    ]
    config = load_env_config(_env(upstreams=fleet), "test")
    assert [(s.name, s.models, s.requests_per_minute) for s in config.upstream_specs] == [
        ("vllm", ["llama"], None),
        ("rest", ["*"], 500),
    ]
    assert json.loads(config.upstreams_json) == [
        {"name": "vllm", "base_url": "http://gpu:8000/v1", "api_key_secret": "s/vllm", "models": ["llama"]},
        {"name": "rest", "base_url": "https://api.openai.com/v1", "requests_per_minute": 500},
    ]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"upstreams": [{"name": "a", "base_url": "http://x/v1", "api_key": "sk-1"}]},
            "api_key is not taken",
        ),
        (
            {"upstreams": [{"name": "a", "base_url": "http://x/v1", "api_key_env": "K"}]},
            "api_key_env is not taken",
        ),
        ({"upstreams": [{"name": "a"}]}, "needs a base_url"),
        ({"upstreams": [{"name": "a", "kind": "mock"}, {"name": "a", "kind": "mock"}]}, "unique: a"),
        ({"upstreams": [{"name": "a", "kind": "mock", "max_in_flight": 0}]}, "max_in_flight"),
        ({"upstreams": []}, "upstreams"),
        ({"upstreams": [{"name": "a", "kind": "mock"}], "upstream_url": "http://x/v1"}, "not both"),
        ({"upstreams": [{"name": "a", "kind": "mock"}], "upstream_max_in_flight": 5}, "not both"),
        (
            {"upstreams": [{"name": f"u{i}", "kind": "mock", "models": ["m" * 60]} for i in range(30)]},
            "4 KB",
        ),
    ],
)
def test_bad_upstreams_fail_the_synth_naming_the_problem(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_env_config(_env(**settings), "test")


@pytest.mark.parametrize(
    ("webhook", "message"),
    [
        ({"name": "a", "url": "http://hooks.example.com/x"}, "only https"),
        ({"name": "a", "url": "https://169.254.169.254/latest"}, "not a public address"),
        ({"name": "a", "url": "https://10.0.0.8/in"}, "not a public address"),
        ({"name": "a", "url": "https://h.example.com", "secret": "whsec_x"}, "secret is not taken"),
        ({"url": "https://h.example.com"}, "give it a name"),
    ],
)
def test_bad_webhooks_fail_the_synth_naming_the_problem(webhook: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_env_config({"environments": {"dev": {"webhooks": [webhook]}}}, "dev")


def test_webhooks_default_to_a_secret_named_for_the_environment() -> None:
    config = load_env_config(
        {"environments": {"dev": {"webhooks": [{"name": "a", "url": "https://h.example.com"}]}}}
    )
    assert config.webhook_secrets == "batch-api/dev/webhook-secrets"
    assert json.loads(config.webhooks_json) == [{"name": "a", "url": "https://h.example.com"}]
