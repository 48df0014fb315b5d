"""Webhook endpoints: where a project's terminal batch events go.

An endpoint is a URL, the `whsec_` secret its events are signed with, and the project whose batches it
hears about (a project id such as `proj_...` or `local`; locally also one of the server's API keys;
none: every project). Locally they come from `--webhook URL,SECRET[,PROJECT]`, a TOML or JSON file
(`--webhooks-file`) or `BATCH_API_WEBHOOKS` (JSON); on AWS from the environment's settings in cdk.json,
with the secrets in one Secrets Manager secret, by endpoint name.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from batch_api.webhooks.events import secret_key

NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"


class WebhookEndpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(min_length=1)
    # the secret itself (locally); on AWS it lives in the webhook secrets secret under `name`
    secret: SecretStr | None = None
    # a project id ("proj_...", "local"); None: the endpoint hears every project's batches
    project: str | None = None
    # names the endpoint in the outbox, logs and the AWS secret; default: derived from url and project
    name: str | None = Field(default=None, pattern=NAME_PATTERN)

    @field_validator("secret")
    @classmethod
    def _whsec(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            secret_key(value.get_secret_value())  # raises with what is wrong, never the value
        return value

    @property
    def key(self) -> str:
        """The endpoint's stable name."""
        if self.name:
            return self.name
        digest = hashlib.sha256(f"{self.url}\n{self.project or '*'}".encode()).hexdigest()[:12]
        return f"wh_{digest}"

    def hears(self, project_id: str) -> bool:
        return self.project is None or self.project == project_id

    def describe(self) -> str:
        return (
            f"webhook {self.key} -> {self.url} ({'every project' if self.project is None else self.project})"
        )


class WebhookList(BaseModel):
    webhooks: list[WebhookEndpoint] = Field(default_factory=list)


class WebhookConfigError(ValueError):
    """A webhook flag, file or setting is not usable; the message names it (never a secret)."""


def parse_flag(value: str) -> WebhookEndpoint:
    """`URL,SECRET[,PROJECT]` (PROJECT: a project id, or one of the server's API keys, which
    `with_key_projects` turns into its project id)."""
    parts = value.split(",")
    secret_at = next((i for i, part in enumerate(parts) if part.strip().startswith("whsec_")), None)
    if secret_at is None or secret_at == 0 or len(parts) > secret_at + 2:
        raise WebhookConfigError("--webhook takes URL,SECRET or URL,SECRET,PROJECT (SECRET: whsec_...)")
    url = ",".join(parts[:secret_at]).strip()
    project = parts[secret_at + 1].strip() if len(parts) == secret_at + 2 else None
    try:
        return WebhookEndpoint(url=url, secret=SecretStr(parts[secret_at].strip()), project=project or None)
    except ValidationError as exc:
        raise WebhookConfigError(f"--webhook for {url}: {_reasons(exc)}") from None


def load_file(path: Path) -> list[WebhookEndpoint]:
    """`[[webhooks]]` tables of a TOML file, or `{"webhooks": [...]}` / a list in a JSON file."""
    try:
        text = Path(path).read_text()
        data: Any = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as exc:
        raise WebhookConfigError(f"cannot read the webhooks file {path}: {exc}") from None
    if isinstance(data, list):
        data = {"webhooks": data}
    try:
        return WebhookList.model_validate(data).webhooks
    except ValidationError as exc:
        raise WebhookConfigError(f"the webhooks file {path} is invalid: {_reasons(exc)}") from None


def _reasons(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in item['loc']) or 'value'}: {item['msg']}"
        for item in error.errors(include_input=False, include_url=False)
    )


class Endpoints:
    """The configured endpoints, by name, and which hear a project."""

    def __init__(self, endpoints: Iterable[WebhookEndpoint]) -> None:
        self._by_key: dict[str, WebhookEndpoint] = {}
        for endpoint in endpoints:
            if endpoint.key in self._by_key:
                raise WebhookConfigError(f"two webhook endpoints are named {endpoint.key!r}")
            self._by_key[endpoint.key] = endpoint

    def __bool__(self) -> bool:
        return bool(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def all(self) -> Sequence[WebhookEndpoint]:
        return list(self._by_key.values())

    def for_project(self, project_id: str) -> list[WebhookEndpoint]:
        return [e for e in self._by_key.values() if e.hears(project_id)]

    def get(self, key: str) -> WebhookEndpoint | None:
        return self._by_key.get(key)


def with_key_projects(
    endpoints: Iterable[WebhookEndpoint], api_keys: Iterable[str], project_for_key: Callable[[str], str]
) -> list[WebhookEndpoint]:
    """The endpoints with a `project` that is one of `api_keys` given as that key's project id (the
    name stays what it was, so the outbox rows keep their endpoint)."""
    keys = set(api_keys)
    return [
        e.model_copy(update={"project": project_for_key(e.project), "name": e.key})
        if e.project is not None and e.project in keys
        else e
        for e in endpoints
    ]
