"""Fixtures for unit tests: a settable clock, in-memory deps, a minimal Lambda context."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from batch_api.adapters.memory import (
    MemoryBlobStore,
    MemoryJournal,
    MemoryMetadataStore,
    RecordingEventSink,
    RecordingWorkflow,
)
from batch_api.config import Settings
from batch_api.deps import Deps

T0 = 1_750_000_000


class FixedClock:
    """Time stands still until a test moves it."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _no_upstream() -> object:
    raise AssertionError("unit tests of the API never call the upstream")


def make_deps(clock: FixedClock, **settings: object) -> Deps:
    return Deps(
        settings=Settings(**settings),  # type: ignore[arg-type]
        metadata=MemoryMetadataStore(),
        blobs=MemoryBlobStore(),
        journal=MemoryJournal(),
        events=RecordingEventSink(),
        workflow=RecordingWorkflow(),
        upstream_factory=_no_upstream,  # type: ignore[arg-type]
        clock=clock,
    )


@pytest.fixture
def clock() -> FixedClock:
    return FixedClock()


@pytest.fixture
def deps(clock: FixedClock) -> Deps:
    return make_deps(clock)


@dataclass
class LambdaContext:
    function_name: str = "batch-api-test"
    memory_limit_in_mb: int = 512
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:batch-api-test"
    aws_request_id: str = "00000000-0000-0000-0000-000000000000"

    def get_remaining_time_in_millis(self) -> int:
        return 30_000


@pytest.fixture
def lambda_context() -> LambdaContext:
    return LambdaContext()
