"""Wires the AWS adapters (DynamoDB, S3, Step Functions, EventBridge) into `Deps`, in one place.

Used by the Lambda entry points and by `batch-api serve` with backend "aws" (which passes its
in-process workflow). Building makes no AWS call: clients connect on first use, and upstream API
keys are read from Secrets Manager only when a worker opens an upstream client, so functions that
never call an upstream (the API) neither need nor read the secrets.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from batch_api.config import Settings
from batch_api.deps import Deps
from batch_api.ports import BedrockRuntimeFactory, Clock, UpstreamFactory, UpstreamRoute, Workflow
from batch_api.upstreams import UpstreamPool, make_upstream_factory

if TYPE_CHECKING:
    import boto3

    from batch_api.webhooks.queue import QueueDelivery
    from batch_api.webhooks.sender import Post


def build_aws_deps(
    settings: Settings,
    *,
    workflow: Workflow | None = None,
    session: boto3.session.Session | None = None,
    upstream_factory: UpstreamFactory | None = None,
    route: Callable[[str | None], UpstreamRoute | None] | None = None,
    clock: Clock | None = None,
    shared_capacity: bool = False,
) -> Deps:
    """Deps on the AWS adapters. `workflow` None: Step Functions on `settings.state_machine_arn`
    (required then). `upstream_factory` None: the settings' upstreams (`aws_upstream_pool`), which
    also route models (else `route` does). `shared_capacity`: each upstream's capacity is shared
    with other processes through leases on the table (the Lambda workers)."""
    from batch_api.adapters.aws.clients import aws_clients
    from batch_api.adapters.aws.dynamodb import DynamoMetadataStore
    from batch_api.adapters.aws.eventbridge import EventBridgeSink
    from batch_api.adapters.aws.s3 import S3BlobStore, S3Journal
    from batch_api.adapters.aws.stepfunctions import StepFunctionsWorkflow

    table, bucket, bus = settings.aws_names()
    clients = aws_clients(settings, session=session)
    if workflow is None:
        if not settings.state_machine_arn:
            raise ValueError(
                "BATCH_API_STATE_MACHINE_ARN must be set to start batches on AWS "
                "(or pass a workflow that runs them in-process)"
            )
        workflow = StepFunctionsWorkflow(clients.stepfunctions, settings.state_machine_arn)
    from batch_api.adapters.aws.leases import DynamoCapacityLeases

    metadata = DynamoMetadataStore(clients.dynamodb.Table(table))
    link_signer = None
    if settings.download_signer_role_arn:
        from batch_api.adapters.aws.links import AssumedRoleSigner

        link_signer = AssumedRoleSigner(clients.sts, settings.download_signer_role_arn, clients.s3_with)
    if upstream_factory is None:
        pool = aws_upstream_pool(settings)
        upstream_factory, route = pool, pool.route
    deps = Deps(
        settings=settings,
        metadata=metadata,
        blobs=S3BlobStore(clients.s3, bucket, link_signer=link_signer),
        journal=S3Journal(clients.s3, bucket),
        events=EventBridgeSink(clients.events, bus, source=settings.event_source),
        workflow=workflow,
        upstream_factory=upstream_factory,
        route=route,
        # the Lambda workers share the upstream through leases on the table; one process needs none
        leases=DynamoCapacityLeases(metadata.table) if shared_capacity else None,
    )
    if clock is not None:
        deps.clock = clock
    return deps


def aws_upstream_pool(settings: Settings) -> UpstreamPool:
    """The settings' upstreams (`upstreams_json` from the stack, or the single upstream), checked now
    (a bad URL or list fails at wiring time, not in the first chunk). Keys held in Secrets Manager
    (`api_key_secret`, or the single upstream's `upstream_secret_name`) are read when a worker opens a
    client, through a cache, so a rotated secret is picked up without a cold start and functions that
    never call an upstream (the API) never read them; models to discover are listed at first use."""

    def read_secret(name: str) -> str:
        from batch_api.adapters.aws.secrets import read_upstream_key

        return read_upstream_key(settings, name).get_secret_value()

    return make_upstream_factory(
        settings, secrets=read_secret, discover_now=False, bedrock=lambda: bedrock_clients(settings)
    )


def bedrock_clients(settings: Settings) -> BedrockRuntimeFactory:
    """The Bedrock clients (boto3, the AWS credential chain), for upstreams of kind bedrock: imported
    only when one is configured, so a local server without boto3 runs every other kind."""
    try:
        from batch_api.adapters.aws.bedrock import BedrockClients
    except ImportError as exc:  # boto3 is the aws extra locally
        raise ValueError(
            f"an upstream of kind bedrock needs the AWS SDK ({exc}): pip install 'batch-api[aws]'"
        ) from exc
    return BedrockClients(settings)


def build_webhook_delivery(
    settings: Settings,
    *,
    session: boto3.session.Session | None = None,
    post: Post | None = None,
    clock: Clock | None = None,
    on_gave_up: Callable[[str, str], None] = lambda endpoint, event_id: None,
) -> QueueDelivery:
    """The delivery function's logic: the settings' endpoints (`BATCH_API_WEBHOOKS`, set by the stack
    from cdk.json), their secrets from `webhook_secrets_secret_name`, retries through the queue at
    `webhook_queue_url`, and attempts through the public-address guard (`post` None) over https."""
    import time

    from batch_api.adapters.aws.clients import aws_client
    from batch_api.adapters.aws.secrets import webhook_secrets
    from batch_api.adapters.aws.sqs import SqsDeliveryQueue
    from batch_api.webhooks.endpoints import Endpoints
    from batch_api.webhooks.queue import QueueDelivery
    from batch_api.webhooks.sender import AddressGuard, WebhookSender

    if not settings.webhook_queue_url:
        raise ValueError("BATCH_API_WEBHOOK_QUEUE_URL must be set for the webhook delivery")
    secret_name = settings.webhook_secrets_secret_name
    policy = settings.webhook_retry_policy()
    if post is None:
        post = WebhookSender(AddressGuard.public(), timeout_seconds=policy.timeout_seconds).post
    return QueueDelivery(
        endpoints=Endpoints(settings.webhooks),
        secrets=(lambda: webhook_secrets(settings, secret_name)) if secret_name else dict,
        queue=SqsDeliveryQueue(aws_client(settings, "sqs", session), settings.webhook_queue_url),
        post=post,
        policy=policy,
        clock=clock or time.time,
        on_gave_up=on_gave_up,
    )
