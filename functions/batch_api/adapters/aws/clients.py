"""boto3 clients for the AWS adapters, built in one place from the settings.

Creating a client makes no AWS call, so a Lambda's cold start stays offline; the first request does.
`settings.aws_endpoint_url` points every client at one endpoint (a moto server in tests).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

from batch_api.config import Settings

# Standard retry mode backs off on throttling and transient errors of every service; a step that
# still fails is retried by the state machine, the API answers 500 and the SDK retries.
MAX_ATTEMPTS = 6
# The process step reads, journals and checkpoints from one thread, a multipart write_stream may
# overlap: a small pool is plenty, but more than botocore's default 10 costs nothing.
MAX_POOL_CONNECTIONS = 32
CONNECT_TIMEOUT_SECONDS = 5
READ_TIMEOUT_SECONDS = 60


def client_config(settings: Settings, *, s3: bool = False) -> Config:
    """The botocore Config every client uses. S3 addressing: virtual-hosted on AWS (presigned URLs
    of buckets in any region then work without a redirect), path style against a custom endpoint
    (a moto server on localhost has no bucket subdomains)."""
    options: dict[str, Any] = {
        "retries": {"mode": "standard", "max_attempts": MAX_ATTEMPTS},
        "max_pool_connections": MAX_POOL_CONNECTIONS,
        "connect_timeout": CONNECT_TIMEOUT_SECONDS,
        "read_timeout": READ_TIMEOUT_SECONDS,
    }
    if s3:
        options["signature_version"] = "s3v4"
        options["s3"] = {"addressing_style": "path" if settings.aws_endpoint_url else "virtual"}
    return Config(**options)


def aws_client(settings: Settings, service: str, session: boto3.session.Session | None = None) -> Any:
    """One low-level client for `service` with the settings' endpoint, region and Config."""
    session = session or boto3.session.Session()
    return session.client(
        service,  # type: ignore[call-overload]
        endpoint_url=settings.aws_endpoint_url,
        region_name=settings.aws_region,
        config=client_config(settings, s3=service == "s3"),
    )


class PerThreadDynamoDB:
    """The DynamoDB resource, one per thread: `Table(name)` gives a table whose calls each thread makes
    on a resource of its own.

    A boto3 resource is not thread-safe: its client turns `Key(...)`/`Attr(...)` conditions into
    expressions with one shared builder that every call resets, so two threads querying at once can
    send each other's placeholders (seen as "Query condition missed key schema element: pk" under the
    local server's threads). Lambda runs one event at a time, but the local server and a worker's
    overlapping calls do not.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._local = threading.local()
        self._lock = threading.Lock()  # a boto3 session must not build two resources at once

    def resource(self) -> Any:
        resource = getattr(self._local, "resource", None)
        if resource is None:
            with self._lock:
                resource = self._local.resource = self._make()
        return resource

    def table(self, name: str) -> Any:
        """This thread's Table `name` (made once per thread)."""
        tables = getattr(self._local, "tables", None)
        if tables is None:
            tables = self._local.tables = {}
        table = tables.get(name)
        if table is None:
            table = tables[name] = self.resource().Table(name)
        return table

    def Table(self, name: str) -> _ThreadTable:  # the boto3 resource's spelling
        return _ThreadTable(self, name)


class _ThreadTable:
    """A DynamoDB Table whose every attribute comes from the calling thread's resource."""

    def __init__(self, resources: PerThreadDynamoDB, name: str) -> None:
        self._resources = resources
        self.name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._resources.table(self.name), attribute)


@dataclass(frozen=True)
class AwsClients:
    """The clients the adapters take. `dynamodb` gives tables (`dynamodb.Table(name)`) that are safe to
    use from several threads."""

    dynamodb: Any
    s3: Any
    stepfunctions: Any
    events: Any
    sts: Any
    # an S3 client on given STS credentials (the download links' signer role)
    s3_with: Callable[[dict[str, Any]], Any]


def aws_clients(settings: Settings, session: boto3.session.Session | None = None) -> AwsClients:
    """Every client the adapters need, from one session (sessions are not thread-safe to share while
    creating clients; the clients themselves are)."""
    session = session or boto3.session.Session()
    return AwsClients(
        dynamodb=PerThreadDynamoDB(
            lambda: session.resource(
                "dynamodb",
                endpoint_url=settings.aws_endpoint_url,
                region_name=settings.aws_region,
                config=client_config(settings),
            )
        ),
        s3=aws_client(settings, "s3", session),
        stepfunctions=aws_client(settings, "stepfunctions", session),
        events=aws_client(settings, "events", session),
        sts=aws_client(settings, "sts", session),
        s3_with=lambda credentials: aws_client(
            settings,
            "s3",
            boto3.session.Session(
                aws_access_key_id=credentials["AccessKeyId"],
                aws_secret_access_key=credentials["SecretAccessKey"],
                aws_session_token=credentials["SessionToken"],
            ),
        ),
    )
