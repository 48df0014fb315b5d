"""Bearer API keys -> project id.

With no keys configured the server is a single-user local tool: every caller is project "local"
(the SDK still sends some token, which is ignored). With keys, each key is its own project, named by
a hash of the key so the key itself is never stored with the records.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Mapping, Sequence

from pydantic import SecretStr

from batch_api.contract.errors import AuthenticationFailed

KeysProvider = Callable[[], Sequence[SecretStr]]

LOCAL_PROJECT_ID = "local"


def project_id_for_key(key: str) -> str:
    return "proj_" + hashlib.sha256(key.encode()).hexdigest()[:16]


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def _masked(key: str) -> str:
    return f"{key[:3]}***{key[-4:]}" if len(key) > 8 else "***"


def authenticate(headers: Mapping[str, str], api_keys: Sequence[SecretStr]) -> str:
    """The project id of the caller; `AuthenticationFailed` (401) for a missing or unknown key. With no
    keys at all (the local tool's default) every caller is the one local project."""
    if not api_keys:
        return LOCAL_PROJECT_ID
    authorization = _header(headers, "authorization") or ""
    scheme, _, presented = authorization.strip().partition(" ")
    presented = presented.strip()
    if scheme.lower() != "bearer" or not presented:
        raise AuthenticationFailed(
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            code="missing_api_key",
        )
    candidate = presented.encode()
    matched: str | None = None
    for secret in api_keys:
        key = secret.get_secret_value()
        # Compare against every key, so the time taken does not tell which one (or how much) matched.
        if hmac.compare_digest(candidate, key.encode()):
            matched = key
    if matched is None:
        raise AuthenticationFailed(f"Incorrect API key provided: {_masked(presented)}.")
    return project_id_for_key(matched)
