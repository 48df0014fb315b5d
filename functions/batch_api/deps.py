"""The bundle of ports a use case or workflow step runs against. Built in one place per entry point
(`local/bootstrap.py` for the local server, the Lambda handlers' module scope on AWS)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from batch_api.config import Settings
from batch_api.ports import (
    BlobStore,
    CapacityLeases,
    Clock,
    EventSink,
    MetadataStore,
    ResultJournal,
    UpstreamFactory,
    UpstreamRoute,
    Workflow,
)


@dataclass
class Deps:
    settings: Settings
    metadata: MetadataStore
    blobs: BlobStore
    journal: ResultJournal
    events: EventSink
    workflow: Workflow
    upstream_factory: UpstreamFactory
    clock: Clock = field(default=time.time)
    # upstream capacity shared with workers in other processes (the Lambda workers); None: this
    # process's capacity gate is the whole story (the local server)
    leases: CapacityLeases | None = None
    # the upstream serving a model, None when none does (validation then fails the batch); None here:
    # one upstream serving every model, named "default", with the settings' limit
    route: Callable[[str | None], UpstreamRoute | None] | None = None

    def now(self) -> int:
        return int(self.clock())

    def upstream_for(self, model: str | None) -> UpstreamRoute | None:
        """The upstream `model` is routed to (its name keys the capacity leases), or None."""
        if self.route is None:
            return _SingleUpstream("default", self.settings.upstream_max_in_flight)
        return self.route(model)


@dataclass(frozen=True)
class _SingleUpstream:
    name: str
    max_in_flight: int
