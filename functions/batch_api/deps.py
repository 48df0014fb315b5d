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
    # whether some upstream serves a model (validation fails a batch whose model none serves)
    serves_model: Callable[[str], bool] = field(default=lambda _model: True)

    def now(self) -> int:
        return int(self.clock())
