"""Per-environment settings, read from the `environments` object of the cdk.json context.

`cdk synth -c env=prod` picks one; the default is dev. A typo in cdk.json fails the synth with the
field's name instead of deploying something half-configured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from batch_api.upstreams.openai_http import connection_budget
from batch_api.upstreams.routing import DEFAULT_UPSTREAM, UpstreamFile, UpstreamSpec
from batch_api.webhooks.endpoints import WebhookEndpoint
from batch_api.webhooks.sender import AddressGuard, RefusedUrl

DEFAULT_ENV = "dev"

# the day counts CloudWatch Logs accepts, by their aws_logs.RetentionDays member name
LOG_RETENTION_DAYS: dict[int, str] = {
    1: "ONE_DAY",
    3: "THREE_DAYS",
    5: "FIVE_DAYS",
    7: "ONE_WEEK",
    14: "TWO_WEEKS",
    30: "ONE_MONTH",
    60: "TWO_MONTHS",
    90: "THREE_MONTHS",
    120: "FOUR_MONTHS",
    150: "FIVE_MONTHS",
    180: "SIX_MONTHS",
    365: "ONE_YEAR",
    400: "THIRTEEN_MONTHS",
    545: "EIGHTEEN_MONTHS",
    731: "TWO_YEARS",
    1827: "FIVE_YEARS",
    3653: "TEN_YEARS",
}
ENV_NAME_PATTERN = r"^[a-z][a-z0-9-]{0,19}$"
UPSTREAMS_JSON_MAX_CHARS = 2048  # Lambda's 4 KB of environment, shared with the other variables
WEBHOOKS_JSON_MAX_CHARS = 2048  # the delivery function's environment holds no upstreams
LAMBDA_OPEN_FILES = 1024  # a Lambda function's limit of open files, which it cannot raise
# the requests one worker can keep in flight: one connection each, within its open files (less those
# kept for the AWS SDK, the runtime and the journal: batch_api.upstreams.openai_http)
LAMBDA_MAX_REQUESTS_PER_CHUNK = connection_budget(LAMBDA_OPEN_FILES)


class ConfigError(ValueError):
    """cdk.json context does not describe the requested environment correctly."""


class EnvConfig(BaseModel):
    """One deployment environment (dev, prod, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=ENV_NAME_PATTERN)
    account: str | None = Field(default=None, pattern=r"^\d{12}$")
    region: str | None = None

    # The model servers, routed by model: each the tables of the local upstreams file
    # (batch_api.upstreams.routing.UpstreamSpec: name, base_url, models, max_in_flight,
    # requests_per_minute, tokens_per_minute), its key in an existing Secrets Manager secret
    # (`api_key_secret`; a key itself would land in the functions' environment, so none is taken).
    upstreams: list[dict[str, Any]] | None = Field(default=None, min_length=1)
    # or one upstream serving every model ("default"): its URL (None: the deterministic mock, for
    # demos only), the secret holding its key, and its limit of requests in flight
    upstream_url: str | None = None
    upstream_secret_name: str | None = None
    # an existing Secrets Manager secret holding the client API keys (comma-separated, or JSON
    # {"api_keys": [...]}); None: batch-api/<env>/api-keys. There is no "off": without keys the API
    # would serve anyone on the internet as one project.
    api_keys_secret_name: str | None = Field(default=None, min_length=1)

    # Webhook endpoints: each {"name", "url", "project"} (project: a project id, "proj_" + the first 16 hex
    # digits of the SHA-256 of its API key; absent: every project). https only. Their whsec_ secrets live
    # in the secret `webhook_secrets_secret_name` (None: batch-api/<env>/webhook-secrets) as JSON
    # {"<name>": "whsec_..."}, never here.
    webhooks: list[dict[str, Any]] = Field(default_factory=list)
    webhook_secrets_secret_name: str | None = Field(default=None, min_length=1)

    map_max_concurrency: int = Field(default=10, ge=1, le=10_000)  # Distributed Map MaxConcurrency
    chunk_max_lines: int = Field(default=1000, ge=1, le=50_000)
    # requests in flight per worker; more than its open files allow would fail connections and journal writes
    requests_per_chunk: int = Field(default=32, ge=1)
    # Lambda reserved concurrency. The API's is kept for it, so workers can never starve it of slots
    # (and caps it); the workers' caps the chunks running at once across every batch, so the requests
    # in flight to the upstream stay at most worker_reserved_concurrency x requests_per_chunk. Both come
    # out of the account's concurrency, which must keep at least 100 unreserved (a new account's quota
    # of 10 cannot reserve anything: ask for an increase first, or leave these unset).
    upstream_max_in_flight: int | None = Field(default=None, ge=1, le=10_000)
    api_reserved_concurrency: int | None = Field(default=None, ge=1, le=10_000)
    worker_reserved_concurrency: int | None = Field(default=None, ge=1, le=10_000)

    api_memory_mb: int = Field(default=1024, ge=128, le=10_240)
    worker_memory_mb: int = Field(default=1769, ge=128, le=10_240)  # 1769 MB = one full vCPU
    step_memory_mb: int = Field(default=1024, ge=128, le=10_240)  # validate, finalize, fail

    api_throttle_rate_limit: int = Field(default=100, ge=1)  # steady requests/s on the stage
    api_throttle_burst_limit: int = Field(default=200, ge=1)

    # where alarms go: an existing SNS topic, or (None) one the stack creates, subscribing alarm_email
    alarm_topic_arn: str | None = Field(default=None, pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:.+$")
    alarm_email: str | None = Field(default=None, pattern=r"^[^@\s]+@[^@\s]+$")

    log_retention_days: int = Field(default=30, ge=1)
    removal_policy: Literal["destroy", "retain"] = "retain"
    architecture: Literal["arm64", "x86_64"] = "arm64"

    @field_validator("log_retention_days")
    @classmethod
    def _known_retention(cls, value: int) -> int:
        if value not in LOG_RETENTION_DAYS:
            raise ValueError(f"must be one of {sorted(LOG_RETENTION_DAYS)} (what CloudWatch Logs accepts)")
        return value

    @field_validator("requests_per_chunk")
    @classmethod
    def _within_open_files(cls, value: int) -> int:
        if value > LAMBDA_MAX_REQUESTS_PER_CHUNK:
            raise ValueError(
                f"at most {LAMBDA_MAX_REQUESTS_PER_CHUNK}: each request in flight holds a connection, and a "
                f"Lambda function may open {LAMBDA_OPEN_FILES} files, some of them kept for the AWS SDK and "
                "the runtime"
            )
        return value

    @field_validator("upstreams")
    @classmethod
    def _valid_upstreams(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        if value is None:
            return None
        for raw in value:
            given = sorted({"api_key", "api_key_env"} & set(raw))
            if given:
                raise ValueError(
                    f"upstream {raw.get('name')!r}: {', '.join(given)} is not taken on AWS (it would land "
                    "in the functions' environment); put the key in a secret and name it in api_key_secret"
                )
        UpstreamFile.model_validate({"upstreams": value})  # what the functions will read, checked now
        return value

    @field_validator("webhooks")
    @classmethod
    def _valid_webhooks(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        guard = AddressGuard.public()
        for raw in value:
            if "secret" in raw:
                raise ValueError(
                    f"webhook {raw.get('name')!r}: a secret is not taken in cdk.json (it would land in the "
                    "function's environment); put it in the webhook secrets secret under the endpoint's name"
                )
            if not raw.get("name"):
                raise ValueError(f"webhook {raw.get('url')!r}: give it a name (its secret is found by it)")
            endpoint = WebhookEndpoint.model_validate(raw)
            try:
                guard.check_url(endpoint.url)
            except RefusedUrl as exc:
                raise ValueError(f"webhook {endpoint.key!r}: {exc}") from None
        names = [raw["name"] for raw in value]
        if len(set(names)) != len(names):
            raise ValueError("two webhooks have the same name")
        if len(json.dumps(value, separators=(",", ":"))) > WEBHOOKS_JSON_MAX_CHARS:
            raise ValueError(f"the webhooks take more than {WEBHOOKS_JSON_MAX_CHARS:,} characters as JSON")
        return value

    @model_validator(mode="after")
    def _one_way_to_give_upstreams(self) -> EnvConfig:
        single = [
            name
            for name in ("upstream_url", "upstream_secret_name", "upstream_max_in_flight")
            if getattr(self, name) is not None
        ]
        if self.upstreams is not None and single:
            raise ValueError(f"give the upstreams list or {', '.join(single)}, not both")
        if len(self.upstreams_json) > UPSTREAMS_JSON_MAX_CHARS:
            raise ValueError(
                f"the upstreams take {len(self.upstreams_json):,} characters as JSON; the functions' "
                f"environment (4 KB in all) leaves them {UPSTREAMS_JSON_MAX_CHARS:,}"
            )
        return self

    @property
    def upstream_specs(self) -> list[UpstreamSpec]:
        """The upstreams, each checked as the functions will read it."""
        if self.upstreams is not None:
            return UpstreamFile.model_validate({"upstreams": self.upstreams}).upstreams
        return [
            UpstreamSpec(
                name=DEFAULT_UPSTREAM,
                kind="http" if self.upstream_url else "mock",
                base_url=self.upstream_url,
                api_key_secret=self.upstream_secret_name,
                max_in_flight=self.upstream_max_in_flight
                or UpstreamSpec.model_fields["max_in_flight"].default,
            )
        ]

    @property
    def upstreams_json(self) -> str:
        """The upstreams as the functions read them (BATCH_API_UPSTREAMS_JSON)."""
        specs = [spec.model_dump(mode="json", exclude_defaults=True) for spec in self.upstream_specs]
        return json.dumps(specs, separators=(",", ":"))

    @property
    def log_retention_name(self) -> str:
        """The aws_logs.RetentionDays member for `log_retention_days`."""
        return LOG_RETENTION_DAYS[self.log_retention_days]

    @property
    def api_keys_secret(self) -> str:
        """The name of the secret holding the client API keys."""
        return self.api_keys_secret_name or f"batch-api/{self.name}/api-keys"

    @property
    def webhooks_json(self) -> str:
        """The endpoints as the delivery function reads them (BATCH_API_WEBHOOKS)."""
        return json.dumps(self.webhooks, separators=(",", ":"))

    @property
    def webhook_secrets(self) -> str:
        """The name of the secret holding the webhook endpoints' whsec_ secrets."""
        return self.webhook_secrets_secret_name or f"batch-api/{self.name}/webhook-secrets"

    @property
    def stack_name(self) -> str:
        return f"BatchApi-{self.name}"

    @property
    def bus_name(self) -> str:
        return f"batch-api-{self.name}"


def load_env_config(context: Mapping[str, Any], env_name: str | None = None) -> EnvConfig:
    """The `EnvConfig` for `env_name` (default dev) from a cdk.json-shaped `context` mapping."""
    name = env_name or DEFAULT_ENV
    environments = context.get("environments")
    if not isinstance(environments, Mapping) or not environments:
        raise ConfigError('cdk.json context has no "environments" object')
    if name not in environments:
        known = ", ".join(sorted(environments))
        raise ConfigError(f"unknown environment {name!r}: cdk.json defines {known} (use -c env=<name>)")
    raw = environments[name]
    if not isinstance(raw, Mapping):
        raise ConfigError(f'cdk.json context "environments.{name}" must be an object')
    try:
        return EnvConfig.model_validate({**raw, "name": name})
    except ValidationError as exc:
        raise ConfigError(f'cdk.json context "environments.{name}" is invalid:\n{exc}') from exc
