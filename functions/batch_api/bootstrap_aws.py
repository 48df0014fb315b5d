"""Wires the AWS adapters (DynamoDB, S3, Step Functions, EventBridge) into `Deps`, in one place.

Used by the Lambda entry points and by `batch-api serve` with backend "aws" (which passes its
in-process workflow). Building makes no AWS call: clients connect on first use, and the upstream
API key is read from Secrets Manager only when a worker opens an upstream client, so functions that
never call the upstream (the API) neither need nor read the secret.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from batch_api.config import Settings
from batch_api.deps import Deps
from batch_api.ports import Clock, Upstream, UpstreamFactory, Workflow
from batch_api.upstreams import make_upstream_factory

if TYPE_CHECKING:
    import boto3


def build_aws_deps(
    settings: Settings,
    *,
    workflow: Workflow | None = None,
    session: boto3.session.Session | None = None,
    upstream_factory: UpstreamFactory | None = None,
    clock: Clock | None = None,
    shared_capacity: bool = False,
) -> Deps:
    """Deps on the AWS adapters. `workflow` None: Step Functions on `settings.state_machine_arn`
    (required then). `upstream_factory` None: from the settings, keyed from Secrets Manager when
    `settings.upstream_secret_name` is set. `shared_capacity`: the upstream's capacity is shared with
    other processes through leases on the table (the Lambda workers)."""
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
    deps = Deps(
        settings=settings,
        metadata=metadata,
        blobs=S3BlobStore(clients.s3, bucket),
        journal=S3Journal(clients.s3, bucket),
        events=EventBridgeSink(clients.events, bus, source=settings.event_source),
        workflow=workflow,
        upstream_factory=upstream_factory or aws_upstream_factory(settings),
        # the Lambda workers share the upstream through leases on the table; one process needs none
        leases=DynamoCapacityLeases(metadata.table) if shared_capacity else None,
    )
    if clock is not None:
        deps.clock = clock
    return deps


def aws_upstream_factory(settings: Settings) -> UpstreamFactory:
    """`make_upstream_factory`, with the API key looked up (through a cache) each time a client is
    made, so a rotated secret is picked up without a cold start. One pool per key value, so the
    clients of one container share their upstream's capacity gate."""
    checked = make_upstream_factory(settings)  # fails now on a bad URL, not in the first chunk
    if settings.upstream_kind == "mock" or not settings.upstream_secret_name:
        return checked
    pools: dict[str, UpstreamFactory] = {}

    def make(*, model: str | None = None, batch_id: str | None = None) -> Upstream:
        from batch_api.adapters.aws.secrets import upstream_api_key

        key = upstream_api_key(settings)
        value = key.get_secret_value() if key is not None else ""
        pool = pools.get(value)
        if pool is None:
            pools.clear()  # a rotated key: the old pool is done with
            pool = pools[value] = make_upstream_factory(settings.model_copy(update={"upstream_api_key": key}))
        return pool(model=model, batch_id=batch_id)

    return make
