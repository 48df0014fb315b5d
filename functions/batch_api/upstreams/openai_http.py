"""The HTTP client for an OpenAI-compatible model server (OpenAI, vLLM, llama.cpp, Ollama, ...).

One pool of keep-alive connections (`http1.ConnectionPool`) per client, created lazily inside the
running event loop, or shared by every client of the same upstream on a kept loop (`loops`). The pool
speaks just the HTTP/1.1 this path needs, for a little over half the CPU per request of a bare aiohttp
loop (`bench/results/upstream_client.md`).

Retries follow what OpenAI asks of its clients: 408, 409, 429 and 5xx, timeouts and connection
errors, with exponential backoff and full jitter, honouring `Retry-After` / `retry-after-ms` and
`x-should-retry`. `send` never raises for upstream or transport failures: the caller gets an
`UpstreamResponse` that says what happened, to be written to the batch's output or error file.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import logging
import random
import resource
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import orjson

from batch_api.config import redact_url
from batch_api.contract.ids import new_request_id
from batch_api.ports import DEADLINE_PASSED, UpstreamResponse
from batch_api.upstreams import loops
from batch_api.upstreams.capacity import CapacityGate, answer_tokens, estimate_tokens
from batch_api.upstreams.http1 import AnswerTimeout, ConnectionPool, ConnectTimeout, HttpError

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 409, 429})
# A server asking for a longer pause than this is treated as asking for this long: a batch keeps
# moving, and the next attempt will be told again if the server still needs more time.
MIN_RETRY_AFTER_CAP_SECONDS = 60.0
# Upstream error pages (HTML from a proxy, say) are kept in the error file, but not whole.
MAX_ERROR_TEXT_CHARS = 2000
USER_AGENT = "batch-api"
# Open files a process keeps for other things than upstream connections: the AWS SDK's connection
# pools (S3 and DynamoDB, up to 32 each: `adapters.aws.clients`), the journal's reads, the runtime's
# own sockets, pipes and logs. The chunk worker had 15-16 of them open (bench/results/worker_throughput.md).
RESERVED_FILE_DESCRIPTORS = 128


def connection_budget(open_files: int | None = None) -> int:
    """How many upstream connections this process can hold open: its limit of open files
    (`open_files`, default the soft RLIMIT_NOFILE; Lambda's is 1,024 and cannot be raised) less
    RESERVED_FILE_DESCRIPTORS, at least 1. Each request in flight holds a connection of its own
    (HTTP/1.1); past the limit, new connections, and the journal's S3 PUTs with them, fail with
    "Too many open files"."""
    if open_files is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_files = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(1, open_files - RESERVED_FILE_DESCRIPTORS)


def join_url(base_url: str, endpoint: str) -> str:
    """`base_url` + `endpoint`, dropping the endpoint's "/v1" when the base already ends in "/v1".

    Users give base URLs the way the openai SDK takes them ("http://host:8001/v1"); batch
    endpoints are written with the version ("/v1/chat/completions").
    """
    base = base_url.rstrip("/")
    path = endpoint if endpoint.startswith("/") else f"/{endpoint}"
    if base.endswith("/v1") and (path == "/v1" or path.startswith("/v1/")):
        path = path[3:]
    return base + path


def check_base_url(base_url: str) -> str:
    """The host[:port] of an http(s) base URL; `ValueError` for anything else."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"upstream base URL must be an http(s) URL, got {redact_url(base_url)!r}")
    try:
        parts.port  # noqa: B018 - raises for a port out of range or not a number
    except ValueError:
        raise ValueError(f"upstream base URL has an invalid port: {redact_url(base_url)!r}") from None
    return parts.netloc.rpartition("@")[2]  # never echo credentials embedded in a URL


def split_credentials(base_url: str) -> tuple[str, str | None]:
    """The URL without its `user:password@`, and the Basic `Authorization` value they make (None when
    the URL has none). The client keeps only the bare URL, so no message or log can show them."""
    parts = urlsplit(base_url)
    if "@" not in parts.netloc:
        return base_url, None
    userinfo = f"{unquote(parts.username or '')}:{unquote(parts.password or '')}"
    bare = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, "Basic " + base64.b64encode(userinfo.encode()).decode("ascii")


def in_time(delay: float, deadline: float | None) -> bool:
    """Whether a retry after `delay` seconds would still start before `deadline` (None: no deadline)."""
    return deadline is None or time.monotonic() + delay < deadline


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The pause the server asked for, from `retry-after-ms` or `Retry-After` (seconds or HTTP-date).

    None when absent or unreadable; never negative.
    """
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis)
        except ValueError:
            value = float("nan")
        if value >= 0:  # NaN compares false
            return value / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # an HTTP-date is GMT by definition
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
        return max(0.0, seconds)
    return seconds if seconds >= 0 else None


def should_retry(status: int, headers: Mapping[str, str]) -> bool:
    """OpenAI's rule for an error answer: the server may say so explicitly with `x-should-retry`;
    otherwise by status. A success is never retried."""
    if status < 400:
        return False
    explicit = headers.get("x-should-retry")
    if explicit == "true":
        return True
    if explicit == "false":
        return False
    return status in RETRYABLE_STATUSES or status >= 500


def backoff_seconds(
    retry_index: int,
    headers: Mapping[str, str] | None = None,
    *,
    base: float,
    cap: float,
    rng: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number `retry_index` (0-based): what the server asked for (capped
    at the larger of `cap` and MIN_RETRY_AFTER_CAP_SECONDS); else full jitter over base * 2**retry_index,
    capped at `cap`. Every upstream client's retries wait this long (HTTP, Bedrock)."""
    if headers:
        asked = retry_after_seconds(headers)
        if asked is not None:
            return min(asked, max(cap, MIN_RETRY_AFTER_CAP_SECONDS))
    return rng() * min(cap, base * (2**retry_index))


def _error_envelope(text: str) -> dict[str, Any]:
    if len(text) > MAX_ERROR_TEXT_CHARS:
        text = text[:MAX_ERROR_TEXT_CHARS] + "... (truncated)"
    return {"error": {"message": text or "(empty response body)", "type": "upstream_error"}}


class OpenAIHttpUpstream:
    """`ports.Upstream` over HTTP. Create it and call `send` inside one event loop; `await aclose()`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 600.0,
        connect_timeout: float = 10.0,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        max_connections: int = 64,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
        gate: CapacityGate | None = None,
        batch_id: str = "",
    ) -> None:
        self._host = check_base_url(base_url)
        base_url, basic_auth = split_credentials(base_url)
        if basic_auth is not None and api_key:
            raise ValueError("the upstream URL carries credentials and an API key is given too; give one")
        self.base_url = base_url
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_connections = max_connections
        self._sleep = sleep
        self._rng = rng
        self._gate = gate  # the upstream's shared capacity: one slot per attempt
        self._batch_id = batch_id
        self._headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        elif basic_auth is not None:
            self._headers["Authorization"] = basic_auth
        self._paths: dict[str, str] = {}
        self._session: ConnectionPool | None = None
        self._shared = False  # the session is the kept loop's, for the next chunk too: not ours to close

    @property
    def gate(self) -> CapacityGate | None:
        """The upstream's capacity gate this client takes its slots from."""
        return self._gate

    def __repr__(self) -> str:  # the default repr would show the headers, key included
        return f"OpenAIHttpUpstream(base_url={self.base_url!r}, max_retries={self.max_retries})"

    def _client(self) -> ConnectionPool:
        """The connection pool, made on first use so that it binds to the loop that uses it: on a kept
        loop (`upstreams.loops`) the one every client with these settings shares, so connections
        outlive the chunk; else this client's own."""
        if self._session is None:
            key = (
                self.base_url,
                tuple(sorted(self._headers.items())),
                self.max_connections,
                self.connect_timeout,
            )
            shared = loops.shared_session(key, self._new_session)
            self._session, self._shared = (
                (shared, True) if shared is not None else (self._new_session(), False)
            )
        return self._session

    def _new_session(self) -> ConnectionPool:
        return ConnectionPool(
            self.base_url,
            self._headers,
            max_connections=self.max_connections,
            connect_timeout=self.connect_timeout,
        )

    def _path(self, endpoint: str) -> str:
        """The request path below the base URL's own path (the pool adds that)."""
        path = self._paths.get(endpoint)
        if path is None:
            base_path = urlsplit(self.base_url).path.rstrip("/")
            path = self._paths[endpoint] = join_url(base_path or "/", endpoint)[len(base_path) :]
        return path

    def backoff(self, retry_index: int, headers: Mapping[str, str] | None = None) -> float:
        """Seconds to wait before retry number `retry_index` (0-based): what the server asked for,
        capped; else full jitter over base * 2**retry_index, capped at backoff_max."""
        return backoff_seconds(
            retry_index, headers, base=self.backoff_base, cap=self.backoff_max, rng=self._rng
        )

    async def send(self, endpoint: str, body: bytes, deadline: float | None = None) -> UpstreamResponse:
        path = self._path(endpoint)
        session = self._client()
        tokens = estimate_tokens(body) if self._gate is not None and self._gate.counts_tokens else 0
        attempt = 0
        while True:
            attempt += 1
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return self._transport_failure(
                    "upstream_timeout", "no time was left to send it", max(1, attempt - 1)
                )
            retries_left = attempt <= self.max_retries
            # tokens are reserved once per request; every attempt counts as a request
            answer, failure = await self._attempt(session, path, body, tokens if attempt == 1 else 0, left)
            if answer is not None:
                status, headers, raw = answer
                if should_retry(status, headers) and retries_left:
                    delay = self.backoff(attempt - 1, headers)
                    if in_time(delay, deadline):
                        await self._pause(attempt, f"HTTP {status}", delay)
                        continue
                response = self._http_answer(status, headers, raw, attempt)
                if tokens and self._gate is not None:
                    self._gate.used_tokens(tokens, answer_tokens(response.body))
                return response
            code, detail = failure
            delay = self.backoff(attempt - 1, None)
            if not retries_left or not in_time(delay, deadline):
                return self._transport_failure(code, detail, attempt)
            await self._pause(attempt, code, delay)

    async def _attempt(
        self, session: ConnectionPool, path: str, body: bytes, tokens: int, left: float | None
    ) -> tuple[tuple[int, Mapping[str, str], bytes] | None, tuple[str, str]]:
        """One POST, paced by the upstream's rates and holding a slot of its gate (if any) only while
        it is on the wire: (status, headers, body) of the answer, or None and (error code, detail).
        `left`: the seconds the caller has left, which the attempt's timeout never passes."""
        admitted = 0.0
        began = time.monotonic()
        if self._gate is not None:
            await self._gate.pace(tokens)
            admitted = await self._gate.acquire(self._batch_id)
        status: int | None = None
        headers: Mapping[str, str] | None = None
        timeout = self.timeout  # unless the caller has less time left
        if left is not None:
            left -= time.monotonic() - began  # spent waiting for the rates and a slot
        clipped = left is not None and left < self.timeout
        if clipped:
            timeout = max(left or 0.0, 0.001)
        try:
            response = await session.post(path, body, timeout)
            status, headers = response.status, response.headers
            return (status, headers, response.body), ("", "")
        except ConnectTimeout:
            return None, ("upstream_timeout", f"could not connect within {self.connect_timeout:g} s")
        except AnswerTimeout:
            if clipped:
                return None, ("upstream_timeout", DEADLINE_PASSED)
            return None, ("upstream_timeout", f"no complete answer within {self.timeout:g} s")
        except HttpError as exc:
            return None, ("upstream_connection_error", str(exc))
        finally:
            if self._gate is not None:
                self._gate.release(admitted, status, headers)

    async def _pause(self, attempt: int, reason: str, delay: float) -> None:
        logger.info("upstream %s: %s on attempt %d, retrying in %.2f s", self._host, reason, attempt, delay)
        await self._sleep(delay)

    def _http_answer(
        self, status: int, headers: Mapping[str, str], raw: bytes, attempts: int
    ) -> UpstreamResponse:
        request_id = headers.get("x-request-id") or new_request_id()
        try:
            parsed: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            parsed = None
        if 200 <= status < 300:
            if not isinstance(parsed, dict):
                snippet = raw[:200].decode("utf-8", "replace")
                return UpstreamResponse(
                    status_code=None,
                    request_id=request_id,
                    error_code="upstream_invalid_response",
                    error_message=f"{self._host} answered HTTP {status} with a body that is not a JSON object: {snippet!r}",
                    attempts=attempts,
                    headers=headers,
                )
        elif not isinstance(parsed, dict):
            parsed = _error_envelope(raw.decode("utf-8", "replace"))
        return UpstreamResponse(
            status_code=status, body=parsed, request_id=request_id, attempts=attempts, headers=headers
        )

    def _transport_failure(self, code: str, detail: str, attempts: int) -> UpstreamResponse:
        noun = "attempt" if attempts == 1 else "attempts"
        message = f"request to {self._host} failed after {attempts} {noun}: {detail}"
        logger.warning("upstream %s", message)
        return UpstreamResponse(status_code=None, error_code=code, error_message=message, attempts=attempts)

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            if not self._shared:
                await session.close()

    async def __aenter__(self) -> OpenAIHttpUpstream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
