"""Which upstream serves a batch: named upstreams, each with the models it serves and its capacity.

Without a file, the settings' single upstream (`--upstream-url`, or the built-in mock) serves every
model. With `upstreams_file` (TOML), each `[[upstreams]]` table is one upstream:

    [[upstreams]]
    name = "vllm-a"
    base_url = "http://gpu-a:8000/v1"
    api_key_env = "VLLM_A_KEY"        # optional: the environment variable holding its API key
                                      # (or api_key = "...", or on AWS api_key_secret = "<secret name>")
    models = ["meta-llama/Llama-3.1-8B-Instruct"]   # omitted or ["*"]: any model; "discover": ask it
    max_in_flight = 64                # attempts in flight at most, across every batch
    requests_per_minute = 6000        # optional
    tokens_per_minute = 2000000       # optional: estimated from each request, corrected from `usage`

    [[upstreams]]
    name = "mock"
    kind = "mock"                     # the built-in deterministic mock
    models = ["gpt-4o-mini"]

    [[upstreams]]
    name = "bedrock"
    kind = "bedrock"                  # Amazon Bedrock (upstreams/bedrock.py), the AWS credential chain
    region = "us-east-1"              # optional: the process's own region by default
    max_in_flight = 32
    [upstreams.models]                # the name a batch uses -> a Bedrock model id, inference profile
    "claude-haiku" = "us.anthropic.claude-3-5-haiku-20241022-v1:0"   # id, or either's ARN
    "titan-embed" = "amazon.titan-embed-text-v2:0"

The same tables as a JSON list in `upstreams_json` (`BATCH_API_UPSTREAMS_JSON`) are how the AWS stack
hands its `cdk.json` upstreams to the Lambdas; there each key is a Secrets Manager secret
(`api_key_secret`), read when a worker opens a client and cached for five minutes (rotation is
followed).

A batch goes to the first upstream that lists its model, else to the first one that serves any model;
a model none of them serves fails the batch at validation (`model_not_found`).

`models = "discover"` asks the upstream (`GET <base_url>/models`) at start and again when the list is
older than `DISCOVERY_MAX_AGE_SECONDS`; a failed refresh keeps the last list (an upstream that never
answered serves no model, and says so in the log).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from batch_api.config import Settings, redact_url
from batch_api.ports import BedrockRuntimeFactory, Upstream
from batch_api.upstreams.bedrock import BedrockUpstream, bedrock_target
from batch_api.upstreams.capacity import CapacityGate, GateStats
from batch_api.upstreams.gated import GatedUpstream
from batch_api.upstreams.mock import MockUpstream
from batch_api.upstreams.openai_http import (
    RESERVED_FILE_DESCRIPTORS,
    OpenAIHttpUpstream,
    check_base_url,
    connection_budget,
    join_url,
    split_credentials,
)

ANY_MODEL = "*"
DEFAULT_UPSTREAM = "default"  # the name of the settings' single upstream
KEY_SOURCES = ("api_key", "api_key_env", "api_key_secret")
DISCOVER = "discover"
DISCOVERY_MAX_AGE_SECONDS = 300.0
DISCOVERY_TIMEOUT_SECONDS = 10.0

logger = logging.getLogger(__name__)

SecretReader = Callable[[str], str]  # secret name -> the API key it holds


class UpstreamSpec(BaseModel):
    """One upstream of the file (or the one the settings describe)."""

    model_config = ConfigDict(extra="forbid")

    # names key the capacity leases and the metrics' Upstream dimension: plain characters
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    kind: Literal["http", "mock", "bedrock"] = "http"
    base_url: str | None = None
    region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$")  # bedrock: its region
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    api_key_secret: str | None = Field(default=None, min_length=1)  # a Secrets Manager secret (AWS)
    # bedrock: a map of the names batches use -> Bedrock model ids (a list: the ids themselves)
    models: list[str] | dict[str, str] | Literal["discover"] = Field(
        default_factory=lambda: [ANY_MODEL], min_length=1
    )
    max_in_flight: int = Field(default=128, ge=1, le=10_000)
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _complete(self) -> UpstreamSpec:
        if self.kind == "bedrock":
            self._check_bedrock()
        elif isinstance(self.models, dict):
            raise ValueError(
                f"upstream {self.name!r}: a map of models (name -> model id) is for kind 'bedrock'; "
                "list the models this upstream serves"
            )
        elif self.region is not None:
            raise ValueError(f"upstream {self.name!r}: region is for kind 'bedrock'")
        if self.kind == "http":
            if not self.base_url:
                raise ValueError(f"upstream {self.name!r} needs a base_url")
            check_base_url(self.base_url)
        given = [name for name in KEY_SOURCES if getattr(self, name) is not None]
        if len(given) > 1:
            raise ValueError(f"upstream {self.name!r}: give only one of {', '.join(given)}")
        if given and self.base_url and split_credentials(self.base_url)[1] is not None:
            raise ValueError(
                f"upstream {self.name!r}: the base_url carries credentials and {given[0]} gives a key "
                "too; give one"
            )
        if self.models == DISCOVER and self.kind == "mock":
            self.models = [ANY_MODEL]  # the mock answers any model
        return self

    def _check_bedrock(self) -> None:
        """Bedrock takes its credentials from the AWS chain and IAM limits it to the models named here,
        so: no URL or key, and every model spelt out."""
        given = [name for name in ("base_url", *KEY_SOURCES) if getattr(self, name) is not None]
        if given:
            raise ValueError(
                f"upstream {self.name!r}: a bedrock upstream takes no {', '.join(given)} (it calls Amazon "
                "Bedrock with the AWS credentials of the process: the function's role on AWS)"
            )
        if self.models == DISCOVER or ANY_MODEL in self.models:
            raise ValueError(
                f"upstream {self.name!r}: a bedrock upstream names its models (a map of the names batches "
                "use to Bedrock model ids), so that IAM can allow exactly those"
            )
        for name, model_id in self.model_ids.items():
            if not name:
                raise ValueError(f"upstream {self.name!r}: a model name is empty")
            try:
                bedrock_target(model_id)
            except ValueError as exc:
                raise ValueError(f"upstream {self.name!r}, model {name!r}: {exc}") from None

    @property
    def model_ids(self) -> dict[str, str]:
        """Bedrock: each model name -> the model id it is called with (a listed model is its own id)."""
        if isinstance(self.models, dict):
            return dict(self.models)
        return {} if self.models == DISCOVER else {model: model for model in self.models}

    def key(self, environ: Mapping[str, str], secrets: SecretReader | None = None) -> str | None:
        """The API key: given, from the environment, or read from its secret (each call: the reader
        caches and follows rotation). A missing variable or an unreadable secret raises."""
        if self.api_key_secret is not None:
            if secrets is None:
                raise ValueError(
                    f"upstream {self.name!r}: api_key_secret needs the aws backend (Secrets Manager)"
                )
            return secrets(self.api_key_secret)
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        if self.api_key_env is not None:
            value = environ.get(self.api_key_env)
            if not value:
                raise ValueError(
                    f"upstream {self.name!r}: environment variable {self.api_key_env} is not set"
                )
            return value
        return None

    def describe(self) -> str:
        where = "the built-in mock" if self.kind == "mock" else redact_url(self.base_url)
        if self.kind == "bedrock":
            where = f"Amazon Bedrock in {self.region or 'the default region'}"
            models = ", ".join(
                name if name == model_id else f"{name} -> {model_id}"
                for name, model_id in self.model_ids.items()
            )
        elif self.models == DISCOVER:
            models = "models discovered from it"
        else:
            models = "any model" if ANY_MODEL in self.models else ", ".join(self.models)
        return f"{self.name} ({where}; {models}; at most {self.max_in_flight} in flight)"


def discover_models(base_url: str, api_key: str | None) -> list[str]:
    """The model ids an OpenAI-compatible server lists (`GET <base_url>/models`)."""
    bare, basic_auth = split_credentials(base_url)
    request = urllib.request.Request(join_url(bare, "/v1/models"), headers={"Accept": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    elif basic_auth:
        request.add_header("Authorization", basic_auth)
    with urllib.request.urlopen(request, timeout=DISCOVERY_TIMEOUT_SECONDS) as answer:
        payload = orjson.loads(answer.read())
    data = payload.get("data") if isinstance(payload, dict) else None
    if not isinstance(data, list):
        raise ValueError("the answer has no 'data' list")
    return [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)]


class UpstreamFile(BaseModel):
    """The upstreams file (and the stack's list): at least one upstream, names unique."""

    model_config = ConfigDict(extra="forbid")

    upstreams: list[UpstreamSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_names(self) -> UpstreamFile:
        names = [spec.name for spec in self.upstreams]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique: {', '.join(duplicates)}")
        return self


def load_specs(settings: Settings) -> list[UpstreamSpec]:
    """The upstreams `settings` describe: its `upstreams_file` or `upstreams_json`, else its single
    upstream. A bad file or list raises `ValueError` naming where it came from and the problem."""
    if settings.upstreams_file is not None and settings.upstreams_json is not None:
        raise ValueError("give the upstreams as a file or as JSON (BATCH_API_UPSTREAMS_JSON), not both")
    if settings.upstreams_json is not None:
        where = "BATCH_API_UPSTREAMS_JSON"
        try:
            data: Any = {"upstreams": orjson.loads(settings.upstreams_json)}
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    elif settings.upstreams_file is not None:
        path = Path(settings.upstreams_file)
        where = f"the upstreams file {path}"
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ValueError(f"cannot read {where}: {exc}") from exc
    else:
        secret = settings.upstream_secret_name
        return [
            UpstreamSpec(
                name=DEFAULT_UPSTREAM,
                kind=settings.upstream_kind,
                base_url=settings.upstream_url,
                api_key=None if secret else settings.upstream_api_key,
                api_key_secret=secret,
                max_in_flight=settings.upstream_max_in_flight,
            )
        ]
    try:
        return UpstreamFile.model_validate(data).upstreams
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error['loc']) or 'file'}: {error['msg']}" for error in exc.errors()
        )
        raise ValueError(f"{where} is not valid: {problems}") from exc


class UpstreamPool:
    """`ports.UpstreamFactory` over several upstreams: routes by model, and every client of one upstream
    shares that upstream's `CapacityGate`."""

    def __init__(
        self,
        specs: list[UpstreamSpec],
        settings: Settings,
        environ: Mapping[str, str] | None = None,
        *,
        secrets: SecretReader | None = None,
        discover_now: bool = True,
        bedrock: Callable[[], BedrockRuntimeFactory] | None = None,
    ) -> None:
        """`secrets` reads the keys of upstreams with an `api_key_secret` (AWS), when a client is made;
        without it such an upstream fails now. `discover_now`: list the models of "discover"
        upstreams at once (the local server, to log them); else at the first routing (a Lambda).
        `bedrock` makes the Bedrock clients (`adapters.aws.bedrock`), asked for only when an upstream is
        of kind bedrock; without it such an upstream fails now."""
        self.specs = specs
        self.settings = settings
        environ = os.environ if environ is None else environ
        self._secrets = secrets
        # keys given or in the environment are read now (a missing variable fails at start); secrets later
        self._keys: dict[str, str | None] = {}
        for spec in specs:
            if spec.api_key_secret is None:
                self._keys[spec.name] = spec.key(environ)
            elif secrets is None:
                spec.key(environ)  # raises now, naming the upstream: a secret needs a reader
        self._discovered: dict[str, tuple[float, list[str]]] = {}  # name -> (when, models)
        self._discovery_lock = threading.Lock()
        self.clock: Callable[[], float] = time.monotonic
        if discover_now:
            for spec in specs:
                if spec.models == DISCOVER:
                    self._refresh(spec)
        # Each attempt in flight holds a connection, and the process may open only so many files: an
        # upstream allowed more in flight than that is held to it here (else connections, and the
        # journal's writes with them, would fail for want of a file descriptor)
        self.max_connections = connection_budget()
        for spec in specs:
            if spec.kind == "http" and spec.max_in_flight > self.max_connections:
                logger.warning(
                    "upstream %s: max_in_flight %d is more than the %d connections this process can open "
                    "(its limit of open files less %d kept for other files); at most %d in flight from here",
                    spec.name,
                    spec.max_in_flight,
                    self.max_connections,
                    RESERVED_FILE_DESCRIPTORS,
                    self.max_connections,
                )
        # Bedrock: its clients, each upstream's region (a missing one fails now), and a thread per call
        # in flight (boto3 blocks), started as they are needed
        self._bedrock: BedrockRuntimeFactory | None = None
        self._regions: dict[str, str] = {}
        self._executors: dict[str, ThreadPoolExecutor] = {}
        for spec in specs:
            if spec.kind != "bedrock":
                continue
            if self._bedrock is None:
                if bedrock is None:
                    raise ValueError(
                        f"upstream {spec.name!r} is of kind bedrock, and this process has no Bedrock client"
                    )
                self._bedrock = bedrock()
            try:
                self._regions[spec.name] = self._bedrock.region(spec.region)
            except ValueError as exc:
                raise ValueError(f"upstream {spec.name!r}: {exc}") from None
            self._executors[spec.name] = ThreadPoolExecutor(
                max_workers=min(spec.max_in_flight, self.max_connections),
                thread_name_prefix=f"bedrock-{spec.name}",
            )
        self.gates = {
            spec.name: CapacityGate(
                spec.name,
                spec.max_in_flight if spec.kind == "mock" else min(spec.max_in_flight, self.max_connections),
                requests_per_minute=spec.requests_per_minute,
                tokens_per_minute=spec.tokens_per_minute,
            )
            for spec in specs
        }

    def models_of(self, spec: UpstreamSpec) -> list[str]:
        """The models `spec` serves: as listed, or as it last said (refreshed when stale)."""
        if isinstance(spec.models, list):
            return spec.models
        if isinstance(spec.models, dict):
            return list(spec.models)
        when, models = self._discovered.get(spec.name, (float("-inf"), []))
        if self.clock() - when > DISCOVERY_MAX_AGE_SECONDS:
            models = self._refresh(spec)
        return models

    def _refresh(self, spec: UpstreamSpec) -> list[str]:
        with self._discovery_lock:
            when, known = self._discovered.get(spec.name, (float("-inf"), []))
            if self.clock() - when <= DISCOVERY_MAX_AGE_SECONDS:
                return known  # another thread refreshed it meanwhile
            try:
                models = discover_models(spec.base_url or "", self._key(spec))
            except Exception as exc:  # unreachable, a bad answer, an unreadable secret: keep what we had
                logger.warning(
                    "upstream %s: listing its models failed (%s); %s",
                    spec.name,
                    exc,
                    f"keeping the {len(known)} known" if known else "it serves no model until it answers",
                )
                models = known
            else:
                logger.info("upstream %s serves %d model(s): %s", spec.name, len(models), ", ".join(models))
            # a failure is retried after a tenth of the age, not at every batch
            stamp = self.clock() if models is not known else self.clock() - DISCOVERY_MAX_AGE_SECONDS * 0.9
            self._discovered[spec.name] = (stamp, models)
            return models

    def _key(self, spec: UpstreamSpec) -> str | None:
        if spec.api_key_secret is not None:
            return spec.key({}, self._secrets)
        return self._keys[spec.name]

    def route(self, model: str | None) -> UpstreamSpec | None:
        """The upstream for `model`: the first that lists it, else the first that serves any model."""
        if model is not None:
            for spec in self.specs:
                if model in self.models_of(spec):
                    return spec
        for spec in self.specs:
            if isinstance(spec.models, list) and ANY_MODEL in spec.models:
                return spec
        return None

    def serves(self, model: str) -> bool:
        return self.route(model) is not None

    def load_report(self, since: dict[str, GateStats]) -> list[str]:
        """One line per upstream that admitted attempts since the last report (`since`: each upstream's
        stats at that report, updated here): in flight, the effective limit, waiting, the mean latency
        of the attempts answered since that report, 429s."""
        lines = []
        for name, gate in self.gates.items():
            stats = gate.stats()
            last = since.get(name)
            if stats.admitted == (last.admitted if last else 0) and not stats.waiting:
                continue
            since[name] = stats
            answered = stats.answered - (last.answered if last else 0)
            seconds = stats.answer_seconds - (last.answer_seconds if last else 0.0)
            latency = (
                f"mean latency {seconds / answered * 1000:.0f} ms over {answered} answer(s)"
                if answered
                else "no answer"
            )
            lines.append(
                f"upstream {name}: {stats.in_flight} in flight, limit {stats.limit:.1f} of "
                f"{gate.max_in_flight}, {stats.waiting} waiting in {stats.waiting_batches} batch(es), "
                f"{latency} since the last report, "
                f"{stats.admitted} attempts and {stats.throttled} answered 429/503 since start"
            )
        return lines

    def __call__(
        self, *, model: str | None = None, batch_id: str | None = None, rate_share: float = 1.0
    ) -> Upstream:
        spec = self.route(model)
        if spec is None:  # validation refuses such batches; a batch planned before a config change
            raise LookupError(f"no upstream serves model {model!r}")
        gate = self.gates[spec.name]
        # one chunk at a time per Lambda container: the process's gate takes that worker's share
        gate.share_rates(rate_share)
        inner: Upstream
        if spec.kind == "mock":
            inner = MockUpstream(latency_seconds=self.settings.mock_latency_seconds)
            return GatedUpstream(inner, gate, batch_id or "")
        settings = self.settings
        if spec.kind == "bedrock":
            assert self._bedrock is not None  # made in __init__ for every bedrock upstream
            region = self._regions[spec.name]
            return BedrockUpstream(
                self._bedrock(region, gate.max_in_flight),
                spec.model_ids,
                executor=self._executors[spec.name],
                region=region,
                max_retries=settings.upstream_max_retries,
                backoff_base=settings.upstream_backoff_base_seconds,
                backoff_max=settings.upstream_backoff_max_seconds,
                gate=gate,
                batch_id=batch_id or "",
            )
        assert spec.base_url is not None  # the spec's validator
        return OpenAIHttpUpstream(
            spec.base_url,
            self._key(spec),
            timeout=settings.upstream_timeout_seconds,
            connect_timeout=settings.upstream_connect_timeout_seconds,
            max_retries=settings.upstream_max_retries,
            backoff_base=settings.upstream_backoff_base_seconds,
            backoff_max=settings.upstream_backoff_max_seconds,
            # the chunks on one loop share one session per upstream (`upstreams.loops`), and its gate never
            # lets more than `max_in_flight` (within the open-file budget) through: one connection each,
            # opened as they are needed
            max_connections=gate.max_in_flight,
            gate=gate,
            batch_id=batch_id or "",
        )
