"""Wires the local adapters into `Deps`, in one place."""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any

from batch_api.adapters.local.events import LogEventSink
from batch_api.adapters.local.filesystem import FilesystemBlobStore, FilesystemJournal
from batch_api.adapters.local.sqlite import SqliteMetadataStore
from batch_api.config import Settings
from batch_api.deps import Deps
from batch_api.upstreams import make_upstream_factory
from batch_api.webhooks.endpoints import Endpoints, WebhookConfigError, load_file, with_key_projects
from batch_api.webhooks.outbox import OutboxDeliverer
from batch_api.workflow.runner_local import LocalWorkflow

logger = logging.getLogger(__name__)


class DataDirLocked(Exception):
    """Another process already serves this data directory."""


@dataclass
class LocalApp:
    settings: Settings
    deps: Deps
    workflow: LocalWorkflow
    blobs: FilesystemBlobStore
    signing_key: bytes
    api_factory: Callable[[], Any]  # builds one API resolver; the server builds one per worker thread
    lock_handle: IO[str]
    webhooks: OutboxDeliverer | None = None  # None: no webhook endpoints configured

    def close(self) -> None:
        self.workflow.stop()
        if self.webhooks is not None:
            self.webhooks.stop()
        self.lock_handle.close()


def webhook_endpoints(settings: Settings) -> Endpoints:
    """The endpoints of the settings and the webhooks file, a project given as an API key turned into
    its project id. `WebhookConfigError` names what is wrong."""
    from batch_api.handlers.auth import project_id_for_key

    listed = list(settings.webhooks)
    if settings.webhooks_file is not None:
        listed += load_file(settings.webhooks_file)
    from batch_api.webhooks.sender import AddressGuard, RefusedUrl

    for endpoint in listed:
        if endpoint.secret is None:
            raise WebhookConfigError(f"{endpoint.describe()} has no secret (whsec_...)")
        try:
            AddressGuard.local().check_url(endpoint.url)
        except RefusedUrl as exc:
            raise WebhookConfigError(f"{endpoint.describe()}: {exc}") from None
    keys = [key.get_secret_value() for key in settings.api_keys]
    return Endpoints(with_key_projects(listed, keys, project_id_for_key))


def _with_webhooks(deps: Deps, data_dir: Path, endpoints: Endpoints) -> OutboxDeliverer:
    """Route the terminal events through a durable outbox in the data directory, delivered by a thread
    (started by the caller, after the lock is held and before `resume` announces anything)."""
    from batch_api.adapters.local.webhook_outbox import SqliteWebhookOutbox
    from batch_api.webhooks.outbox import OutboxEventSink
    from batch_api.webhooks.sender import AddressGuard, WebhookSender

    settings = deps.settings
    policy = settings.webhook_retry_policy()
    outbox = SqliteWebhookOutbox(data_dir / "webhooks.sqlite3")
    sender = WebhookSender(AddressGuard.local(), timeout_seconds=policy.timeout_seconds)
    deliverer = OutboxDeliverer(outbox, endpoints, sender.post, policy, clock=deps.clock)
    deps.events = OutboxEventSink(
        deps.events, outbox, endpoints, clock=deps.clock, on_enqueued=deliverer.wake
    )
    for endpoint in endpoints.all():
        logger.info("%s", endpoint.describe())
    return deliverer


def _signing_key(data_dir: Path) -> bytes:
    """A per-data-directory secret for download links, kept across restarts so links stay valid."""
    path = data_dir / "signing.key"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _lock(data_dir: Path) -> IO[str]:
    handle = (data_dir / "server.lock").open("a+")  # not "w": a failed start must not erase the pid
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        handle.seek(0)
        holder = handle.read().strip() or "?"
        handle.close()
        raise DataDirLocked(f"another batch-api process (pid {holder}) is using {data_dir}") from exc
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def build_local_app(settings: Settings) -> LocalApp:
    from batch_api.handlers.api import create_app

    # a bad upstream URL or file fails now, before the lock
    if settings.backend == "aws":
        from batch_api.bootstrap_aws import aws_upstream_pool

        upstreams = aws_upstream_pool(settings)  # keys may be Secrets Manager secrets
    else:
        from batch_api.bootstrap_aws import bedrock_clients

        upstreams = make_upstream_factory(settings, bedrock=lambda: bedrock_clients(settings))
    endpoints = webhook_endpoints(settings)  # a bad webhook fails now too
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    lock_handle = _lock(data_dir)
    signing_key = _signing_key(data_dir)
    blobs = FilesystemBlobStore(data_dir / "blobs", base_url=settings.base_url, signing_key=signing_key)
    workflow = LocalWorkflow()
    deps: Deps
    if settings.backend == "aws":
        # The AWS adapters (DynamoDB, S3, EventBridge) against settings.aws_endpoint_url, with the
        # workflow steps run in-process: the API and steps of the Lambda deployment, on one machine.
        from batch_api.bootstrap_aws import build_aws_deps

        deps = build_aws_deps(settings, workflow=workflow, upstream_factory=upstreams)
    else:
        deps = Deps(
            settings=settings,
            metadata=SqliteMetadataStore(data_dir / "metadata.sqlite3"),
            blobs=blobs,
            journal=FilesystemJournal(data_dir / "journal"),
            events=LogEventSink(data_dir / "events.jsonl"),
            workflow=workflow,
            upstream_factory=upstreams,
        )
    deps.route = upstreams.route
    webhooks = _with_webhooks(deps, data_dir, endpoints) if endpoints else None
    workflow.bind(deps)
    return LocalApp(
        settings=settings,
        deps=deps,
        workflow=workflow,
        blobs=blobs,
        signing_key=signing_key,
        api_factory=partial(create_app, deps),
        lock_handle=lock_handle,
        webhooks=webhooks,
    )
