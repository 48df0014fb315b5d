"""Upstream model clients: a real OpenAI-compatible HTTP client, Amazon Bedrock, and a deterministic mock.

`make_upstream_factory` picks one from the settings. The workflow calls the factory once per event
loop (each chunk worker runs its own loop) and closes what it gets with `await client.aclose()`.
"""

from __future__ import annotations

from collections.abc import Callable

from batch_api.config import Settings
from batch_api.ports import BedrockRuntimeFactory
from batch_api.upstreams.mock import MockUpstream
from batch_api.upstreams.openai_http import OpenAIHttpUpstream
from batch_api.upstreams.routing import SecretReader, UpstreamPool, load_specs

__all__ = ["MockUpstream", "OpenAIHttpUpstream", "UpstreamPool", "make_upstream_factory"]


def make_upstream_factory(
    settings: Settings,
    *,
    secrets: SecretReader | None = None,
    discover_now: bool = True,
    bedrock: Callable[[], BedrockRuntimeFactory] | None = None,
) -> UpstreamPool:
    """The upstreams `settings` describe (`upstreams_file` or `upstreams_json`, else the single
    `upstream_url` or the mock), checked now (a bad URL or file fails at start, not in the first
    chunk). `secrets` reads keys held in Secrets Manager (the aws backend); `bedrock` makes the
    Bedrock clients, when an upstream is of kind bedrock."""
    single = settings.upstreams_file is None and settings.upstreams_json is None
    if single and settings.upstream_kind == "http" and not settings.upstream_url:
        raise ValueError("BATCH_API_UPSTREAM_URL must be set when the upstream is 'http'")
    return UpstreamPool(
        load_specs(settings), settings, secrets=secrets, discover_now=discover_now, bedrock=bedrock
    )
