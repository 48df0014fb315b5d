"""Secrets from Secrets Manager, through Powertools parameters (cached per container): the upstreams'
API keys, and the API keys clients authenticate with.

The upstream secret holds the key as a plain string, or as JSON `{"api_key": "..."}`; the client keys
secret a comma- or newline-separated string, or JSON `{"api_keys": [...]}`. Values are never logged,
and errors name the secret, not its content.
"""

from __future__ import annotations

import threading

import orjson
from aws_lambda_powertools.utilities.parameters import SecretsProvider
from pydantic import SecretStr

from batch_api.adapters.aws.clients import aws_client
from batch_api.config import Settings

# A rotated key is picked up within this time; a chunk invocation reads it once, from the cache.
SECRET_MAX_AGE_SECONDS = 300
JSON_KEY_FIELD = "api_key"
API_KEYS_FIELD = "api_keys"  # the client keys secret as JSON: {"api_keys": ["...", ...]}

_providers: dict[tuple[str | None, str | None], SecretsProvider] = {}
_providers_lock = threading.Lock()


class UpstreamSecretError(ValueError):
    """The secret exists but holds no usable API key."""


class ApiKeysSecretError(ValueError):
    """The client API keys secret exists but holds no usable key."""


def _provider(settings: Settings) -> SecretsProvider:
    """One provider (and so one cache) per endpoint and region."""
    place = (settings.aws_endpoint_url, settings.aws_region)
    with _providers_lock:
        provider = _providers.get(place)
        if provider is None:
            provider = SecretsProvider(boto3_client=aws_client(settings, "secretsmanager"))
            _providers[place] = provider
        return provider


def parse_api_key(secret_name: str, value: str | bytes) -> SecretStr:
    """The key in a secret's value: the whole (stripped) string, or the `api_key` of a JSON object."""
    text = value.decode("utf-8") if isinstance(value, bytes) else value
    text = text.strip()
    if text.startswith("{"):
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError:
            document = None  # not JSON after all: a key that happens to start with "{"
        if isinstance(document, dict):
            key = document.get(JSON_KEY_FIELD)
            if not isinstance(key, str) or not key.strip():
                raise UpstreamSecretError(
                    f"Secret {secret_name!r} is a JSON object without a non-empty string field "
                    f"{JSON_KEY_FIELD!r}; store the upstream API key as plain text or as "
                    f'{{"{JSON_KEY_FIELD}": "..."}}.'
                )
            return SecretStr(key.strip())
    if not text:
        raise UpstreamSecretError(f"Secret {secret_name!r} is empty.")
    return SecretStr(text)


def read_upstream_key(settings: Settings, secret_name: str) -> SecretStr:
    """The upstream API key held in the secret `secret_name` (cached for SECRET_MAX_AGE_SECONDS)."""
    value = _provider(settings).get(secret_name, max_age=SECRET_MAX_AGE_SECONDS)
    if value is None:
        raise UpstreamSecretError(f"Secret {secret_name!r} has no value.")
    if isinstance(value, dict):  # only with a transform, which we do not ask for
        raise UpstreamSecretError(f"Secret {secret_name!r} could not be read as text.")
    return parse_api_key(secret_name, value)


def parse_api_keys(secret_name: str, value: str | bytes) -> list[SecretStr]:
    """The client API keys in a secret's value: separated by commas or newlines, or the `api_keys`
    list of a JSON object. At least one key, or `ApiKeysSecretError`."""
    text = (value.decode("utf-8") if isinstance(value, bytes) else value).strip()
    keys: list[str] = []
    if text.startswith("{"):
        try:
            document = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ApiKeysSecretError(f"Secret {secret_name!r} is not valid JSON.") from exc
        listed = document.get(API_KEYS_FIELD) if isinstance(document, dict) else None
        if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
            raise ApiKeysSecretError(
                f"Secret {secret_name!r} is a JSON object without a list of strings {API_KEYS_FIELD!r}."
            )
        keys = [k.strip() for k in listed if k.strip()]
    else:
        keys = [k.strip() for k in text.replace("\n", ",").split(",") if k.strip()]
    if not keys:
        raise ApiKeysSecretError(f"Secret {secret_name!r} holds no API key.")
    return [SecretStr(k) for k in keys]


def client_api_keys(settings: Settings, secret_name: str) -> list[SecretStr]:
    """The API keys clients must present, from the secret `secret_name` (cached for
    SECRET_MAX_AGE_SECONDS, so an added or revoked key takes effect within that time)."""
    value = _provider(settings).get(secret_name, max_age=SECRET_MAX_AGE_SECONDS)
    if value is None or isinstance(value, dict):
        raise ApiKeysSecretError(f"Secret {secret_name!r} could not be read as text.")
    return parse_api_keys(secret_name, value)


def clear_cache() -> None:
    """Forget cached values and providers (tests; a new endpoint)."""
    with _providers_lock:
        for provider in _providers.values():
            provider.clear_cache()
        _providers.clear()


class WebhookSecretsError(ValueError):
    """The webhook secrets secret is not a JSON object of endpoint name -> whsec_ secret."""


def parse_webhook_secrets(secret_name: str, value: str | bytes) -> dict[str, str]:
    """`{"endpoint name": "whsec_...", ...}`; values are checked when they sign, never logged."""
    try:
        document = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise WebhookSecretsError(f"Secret {secret_name!r} is not valid JSON.") from exc
    if not isinstance(document, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in document.items()
    ):
        raise WebhookSecretsError(
            f'Secret {secret_name!r} must be a JSON object of endpoint name -> "whsec_..." secret.'
        )
    return document


def webhook_secrets(settings: Settings, secret_name: str) -> dict[str, str]:
    """The webhook endpoints' secrets by name (cached for SECRET_MAX_AGE_SECONDS: a rotated or added
    secret is used within that time)."""
    value = _provider(settings).get(secret_name, max_age=SECRET_MAX_AGE_SECONDS)
    if value is None or isinstance(value, dict):
        raise WebhookSecretsError(f"Secret {secret_name!r} could not be read as text.")
    return parse_webhook_secrets(secret_name, value)
