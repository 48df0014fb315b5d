"""Fixtures for unit tests: a settable clock, in-memory deps, a minimal Lambda context."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from batch_api.deps import Deps
from tests.unit.builders import FakeClock, make_deps


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def deps(clock: FakeClock) -> Deps:
    return make_deps(clock=clock)


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
