"""The step models (contract/steps.py) against the sample events in events/workflow/: every sample
parses with its step's model, and what a step answers is what the next state reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from batch_api.contract.steps import (
    BatchRef,
    FailInput,
    FinalizeOutput,
    ProcessInput,
    ProcessOutput,
    ValidateOutput,
    parse_step,
)

pytestmark = pytest.mark.unit

EVENTS = Path(__file__).resolve().parents[2] / "events" / "workflow"
MODEL_OF_SAMPLE = {
    "validate.json": BatchRef,
    "process.json": ProcessInput,
    "finalize.json": BatchRef,
    "fail.json": FailInput,
    "fail_from_catch.json": FailInput,
}


def sample(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((EVENTS / name).read_text())
    return loaded


@pytest.mark.parametrize("name", sorted(MODEL_OF_SAMPLE))
def test_every_sample_parses_with_its_steps_model(name: str) -> None:
    event = sample(name)
    parsed = parse_step(MODEL_OF_SAMPLE[name], event)
    dumped = parsed.model_dump(mode="json", exclude_none=True)
    assert {k: v for k, v in event.items() if k in dumped} == dumped  # nothing the step uses is lost


def test_the_samples_are_the_steps_plus_the_scheduled_sweep() -> None:
    assert sorted(p.name for p in EVENTS.glob("*.json")) == sorted([*MODEL_OF_SAMPLE, "housekeeping.json"])


def test_what_validate_answers_is_what_finalize_and_the_map_read() -> None:
    answer = ValidateOutput(
        project_id="p", batch_id="b", next="process", manifest_key="batches/b/manifest.json", chunk_count=2
    ).state()
    assert parse_step(BatchRef, answer) == BatchRef(project_id="p", batch_id="b")  # finalize's input
    assert answer["manifest_key"] == "batches/b/manifest.json"  # the Map's ItemReader
    assert "status" not in answer  # absent fields are left out, not null


def test_the_chunk_loop_hands_process_its_previous_answer_and_it_is_ignored() -> None:
    event = sample("process.json")
    previous = ProcessOutput(project_id="p", batch_id="b", index=0, done=False).state()
    assert parse_step(ProcessInput, {**event, "result": previous}) == parse_step(ProcessInput, event)


@pytest.mark.parametrize(
    ("model", "event", "field"),
    [
        (BatchRef, {"project_id": "p"}, "batch_id"),
        (ProcessInput, {"project_id": "p", "batch_id": "b"}, "chunk"),
        (ProcessInput, {"project_id": "p", "batch_id": "b", "chunk": {"index": 0}}, "chunk.start"),
    ],
)
def test_a_missing_key_fails_at_the_start_of_the_step_naming_it(
    model: type[Any], event: dict[str, Any], field: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        parse_step(model, event)
    assert field in {".".join(str(part) for part in error["loc"]) for error in raised.value.errors()}


def test_outputs_refuse_unknown_fields_and_statuses() -> None:
    with pytest.raises(ValidationError):
        ValidateOutput(project_id="p", batch_id="b", next="elsewhere")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        FinalizeOutput(project_id="p", batch_id="b", status="completed", extra=1)  # type: ignore[call-arg]
