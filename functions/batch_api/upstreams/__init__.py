"""Upstream model clients: a real OpenAI-compatible HTTP client and a deterministic mock.

`make_upstream_factory` picks one from the settings. The workflow calls the factory once per event
loop (each chunk worker runs its own loop) and closes what it gets with `await client.aclose()`.
"""

from __future__ import annotations

from batch_api.config import Settings
from batch_api.ports import Upstream, UpstreamFactory
from batch_api.upstreams.mock import MockUpstream
from batch_api.upstreams.openai_http import OpenAIHttpUpstream, check_base_url

__all__ = ["MockUpstream", "OpenAIHttpUpstream", "make_upstream_factory"]


def make_upstream_factory(settings: Settings) -> UpstreamFactory:
    """A factory of fresh clients as `settings.upstream_kind` says ("http" needs `upstream_url`)."""
    if settings.upstream_kind == "mock":
        latency = settings.mock_latency_seconds

        def make_mock() -> Upstream:
            return MockUpstream(latency_seconds=latency)

        return make_mock

    base_url = settings.upstream_url
    if not base_url:
        raise ValueError("BATCH_API_UPSTREAM_URL must be set when the upstream is 'http'")
    check_base_url(base_url)  # fail at wiring time, not in the first chunk
    api_key = settings.upstream_api_key.get_secret_value() if settings.upstream_api_key else None
    # A chunk keeps `requests_per_chunk` requests in flight on its own client: one connection each,
    # so no request waits for the pool (aiohttp counts pool waits against the total timeout).
    max_connections = settings.requests_per_chunk

    def make_http() -> Upstream:
        return OpenAIHttpUpstream(
            base_url,
            api_key,
            timeout=settings.upstream_timeout_seconds,
            connect_timeout=settings.upstream_connect_timeout_seconds,
            max_retries=settings.upstream_max_retries,
            backoff_base=settings.upstream_backoff_base_seconds,
            backoff_max=settings.upstream_backoff_max_seconds,
            max_connections=max_connections,
        )

    return make_http
