"""One typed settings model, read from `BATCH_API_*` environment variables at the entry points only.

Nothing below the entry points (CLI, Lambda handlers) reads `os.environ`; they pass `Settings` down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from batch_api.webhooks import policy as webhook_policy
from batch_api.webhooks.endpoints import WebhookEndpoint


def redact_url(url: str | None) -> str | None:
    """The URL with any `user:password@` replaced by `***@`, for logs and messages."""
    if not url:
        return url
    parts = urlsplit(url)
    if "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))
    if "@" in url and not parts.netloc:
        # not scheme://host (say "user:password@host/v1", which reads as scheme "user"): whatever
        # comes before the last @ may be a secret
        return "***@" + url.rpartition("@")[2]
    return url


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BATCH_API_", extra="ignore")

    # local server
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = Path("./.batch-api")
    public_base_url: str | None = (
        None  # how clients reach this server (download links); default http://host:port
    )

    # upstream model endpoint
    upstream: Literal["http", "mock"] | None = None  # None: "http" when upstream_url is set, else "mock"
    upstream_url: str | None = None  # an OpenAI-compatible base URL, e.g. http://localhost:8001/v1
    upstream_api_key: SecretStr | None = None
    upstream_max_in_flight: int = Field(default=128, ge=1, le=10_000)  # attempts in flight, all batches
    capacity_log_interval_seconds: float = Field(default=30.0, gt=0)  # how often upstream load is logged
    upstreams_file: Path | None = None  # TOML: several upstreams, routed by model (upstreams/routing.py)
    upstreams_json: str | None = None  # the same upstreams as a JSON list (how the AWS stack passes them)
    upstream_timeout_seconds: float = Field(default=600.0, gt=0)
    upstream_connect_timeout_seconds: float = Field(default=10.0, gt=0)
    upstream_max_retries: int = Field(default=5, ge=0, le=20)
    upstream_backoff_base_seconds: float = Field(default=0.5, ge=0)
    upstream_backoff_max_seconds: float = Field(default=60.0, ge=0)
    mock_latency_seconds: float = Field(default=0.0, ge=0)

    # workflow
    chunk_max_lines: int = Field(default=1000, ge=1)
    chunk_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    chunk_concurrency: int = Field(default=4, ge=1, le=1000)  # chunks of one batch processed at once
    requests_per_chunk: int = Field(default=32, ge=1, le=1024)  # requests in flight per chunk
    completion_window_seconds: int = Field(default=86400, ge=1)  # the length of the "24h" window
    progress_interval_seconds: float = Field(default=1.0, gt=0)  # how often counts and cancel are checked
    # how long finished results may wait before they are journaled: 0 = at once (local files, cheap appends);
    # on S3, where each append is a PUT, the stack sets 1 s
    journal_flush_interval_seconds: float = Field(default=0.0, ge=0, le=60)
    # validation errors kept in Batch.errors; 500 short entries keep a batch well under DynamoDB's 400 KB item
    max_batch_errors: int = Field(default=500, ge=1, le=2000)

    # API
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list
    )  # empty: no auth, one local project
    # one HTTP request body: fits a 64 MiB Uploads part with its multipart framing; bigger files: Uploads API
    max_request_bytes: int = Field(default=80 * 1024 * 1024, ge=1024)
    # the largest Upload: 8 GiB as OpenAI's; on AWS the stack sets what completes within the API's time
    max_upload_bytes: int = Field(default=8 * 1024**3, ge=0, le=8 * 1024**3)
    max_inline_download_bytes: int = Field(default=8 * 1024 * 1024, ge=0)  # bigger: 302 to a signed link
    file_sweep_interval_seconds: float = Field(default=60.0, gt=0)
    # local server: requests whose bodies are read and resolved at once (each on its own thread); more wait
    http_concurrency: int = Field(default=16, ge=1, le=256)

    # webhooks (batch_api/webhooks): endpoints as a JSON list (BATCH_API_WEBHOOKS; on AWS the stack sets
    # it from cdk.json, without secrets) and/or a TOML or JSON file of [[webhooks]] tables
    webhooks: Annotated[list[WebhookEndpoint], NoDecode] = Field(default_factory=list)
    webhooks_file: Path | None = None
    webhook_secrets_secret_name: str | None = None  # AWS: Secrets Manager JSON {endpoint name: whsec_...}
    webhook_queue_url: str | None = None  # AWS: the delivery queue (retries are messages sent back to it)
    webhook_backoff_base_seconds: float = Field(default=webhook_policy.BASE_SECONDS, gt=0)
    webhook_backoff_max_seconds: float = Field(default=webhook_policy.MAX_DELAY_SECONDS, gt=0, le=43_200)
    webhook_timeout_seconds: float = Field(default=webhook_policy.TIMEOUT_SECONDS, gt=0, le=60)
    webhook_window_seconds: float = Field(default=webhook_policy.WINDOW_SECONDS, gt=0)

    log_level: str = "INFO"

    # storage and workflow backend: "local" (SQLite, data dir, in-process runner) or "aws"
    backend: Literal["local", "aws"] = "local"
    aws_endpoint_url: str | None = None  # e.g. a moto server for tests; None: the real AWS endpoints
    aws_region: str | None = None
    # with backend "aws" the names are required (no defaults: a missing variable fails at start)
    table_name: str | None = None
    bucket_name: str | None = None
    state_machine_arn: str | None = None  # None with backend "aws": the workflow runs in-process
    event_bus_name: str | None = None
    event_source: str = "batch-api"
    upstream_secret_name: str | None = None  # Secrets Manager secret holding the upstream API key
    api_keys_secret_name: str | None = None  # Secrets Manager secret holding the client API keys (AWS)
    # a role the API assumes to sign download links, so they live their whole stated lifetime (AWS)
    download_signer_role_arn: str | None = None

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("webhooks", mode="before")
    @classmethod
    def _webhooks_json(cls, value: object) -> object:
        if isinstance(value, str):
            import orjson

            return orjson.loads(value) if value.strip() else []
        return value

    def webhook_retry_policy(self) -> webhook_policy.RetryPolicy:
        return webhook_policy.RetryPolicy(
            window_seconds=self.webhook_window_seconds,
            base_seconds=self.webhook_backoff_base_seconds,
            max_delay_seconds=self.webhook_backoff_max_seconds,
            timeout_seconds=self.webhook_timeout_seconds,
        )

    @model_validator(mode="after")
    def _aws_resources_named(self) -> Settings:
        if self.backend == "aws":
            missing = [
                f"BATCH_API_{name.upper()} (--{name.replace('_', '-')})"
                for name in ("table_name", "bucket_name", "event_bus_name")
                if not getattr(self, name)
            ]
            if missing:
                raise ValueError(f"the aws backend needs {', '.join(missing)}")
        return self

    def aws_names(self) -> tuple[str, str, str]:
        """(table, bucket, event bus) of the aws backend; the validator guarantees them."""
        if self.table_name is None or self.bucket_name is None or self.event_bus_name is None:
            raise ValueError("the aws backend needs a table, a bucket and an event bus name")
        return self.table_name, self.bucket_name, self.event_bus_name

    @model_validator(mode="after")
    def _one_upstream_credential(self) -> Settings:
        if self.upstream_url and self.upstream_api_key and "@" in urlsplit(self.upstream_url).netloc:
            raise ValueError(
                "the upstream URL carries credentials (user:password@) and an upstream API key is set too; "
                "give one of them"
            )
        return self

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, redact_url(value) if name == "upstream_url" else value

    @property
    def upstream_kind(self) -> Literal["http", "mock"]:
        if self.upstream is not None:
            return self.upstream
        return "http" if self.upstream_url else "mock"

    @property
    def base_url(self) -> str:
        if self.public_base_url:
            return self.public_base_url.rstrip("/")
        return f"http://{self.host}:{self.port}"
