"""The inputs and outputs of the workflow steps: what the state machine passes between its states (and
the local runner between its calls), typed.

Each step parses its input with these models, so a renamed or missing key fails at the start of the
step with a message naming the field, not as a `KeyError` in the middle of an execution. Inputs ignore
fields they do not use: Step Functions hands a state's whole input on (finalize receives what validate
returned; the chunk loop adds the previous `result`). The Distributed Map's `item_selector`
(`infra/constructs/workflow.py`) builds `ProcessInput`; a test holds the two together.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

from batch_api.contract.models import ChunkPlan

StepT = TypeVar("StepT", bound=BaseModel)


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Output(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def state(self) -> dict[str, Any]:
        """The JSON the step hands back to the state machine (absent fields left out)."""
        return self.model_dump(mode="json", exclude_none=True)


class BatchRef(_Input):
    """Input of validate and finalize (and the start of every execution)."""

    project_id: str
    batch_id: str


class ProcessInput(BatchRef):
    """One chunk of the manifest, as the Distributed Map's item selector builds it."""

    chunk: ChunkPlan


class StepError(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    code: str | None = None
    message: str | None = None


class CatchFailure(BaseModel):
    """What a state's Catch puts at `$.failure`: the error name and its cause (often Lambda's JSON)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    Error: str | None = None
    Cause: str | None = None


class FailInput(BatchRef):
    """Input of fail: an explicit `error` (the local runner), or the `failure` a Catch recorded."""

    error: StepError | None = None
    failure: CatchFailure | None = None


class ValidateOutput(_Output):
    project_id: str
    batch_id: str
    next: Literal["process", "finalize", "done"]
    manifest_key: str | None = None  # with "process" and "finalize"
    chunk_count: int | None = None  # with "process" and "finalize"
    status: str | None = None  # the terminal status, with "done"


class ProcessOutput(_Output):
    project_id: str
    batch_id: str
    index: int
    done: bool  # false: call again (the invocation's time ran low); the journal is the cursor
    # > 0: the upstream had no capacity for this chunk now; wait this long before calling again
    wait_seconds: int = 0
    stopped: Literal["cancelled", "expired", "input_missing"] | None = None  # requests left unrun

    def state(self) -> dict[str, Any]:
        return self.model_dump(mode="json")  # `stopped` is always there, null when nothing was left


class FinalizeOutput(_Output):
    project_id: str
    batch_id: str
    status: str | None  # the terminal status; None when the batch does not exist (fail only)


class HousekeepingOutput(_Output):
    removed: dict[str, int]


def parse_step(model: type[StepT], event: StepT | Mapping[str, Any]) -> StepT:
    """`event` as `model` (a step called with the model itself passes it through)."""
    if isinstance(event, model):
        return event
    return model.model_validate(event)
