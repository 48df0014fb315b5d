"""The one way a batch ends (`workflow.terminal`): the conditional terminal commit, the outbox mark and
what follows it, on the in-memory fakes."""

from __future__ import annotations

from typing import Any

import pytest

from batch_api.contract.errors import ConditionFailed, NotFound
from batch_api.contract.models import BatchRecord
from batch_api.deps import Deps
from batch_api.service import files
from batch_api.workflow import terminal

pytestmark = pytest.mark.unit


def _batch(deps: Deps, batch_id: str, input_file_id: str = "file-in", **fields: Any) -> BatchRecord:
    record = BatchRecord(
        id=batch_id,
        project_id="p1",
        endpoint="/v1/chat/completions",
        input_file_id=input_file_id,
        created_at=deps.now(),
        expires_at=deps.now() + 86400,
        **{"status": "in_progress", **fields},
    )
    deps.metadata.create_batch(record)
    return record


def test_an_unknown_batch_is_not_found_by_its_id(deps: Deps) -> None:
    with pytest.raises(NotFound) as raised:
        terminal.get_batch(deps, "p1", "batch_nope")
    assert raised.value.param == "batch_id"
    assert raised.value.message == "No batch found with id 'batch_nope'."


def test_another_projects_batch_is_not_found(deps: Deps) -> None:
    _batch(deps, "batch_1")
    with pytest.raises(NotFound):
        terminal.get_batch(deps, "p2", "batch_1")


def test_end_batch_decides_again_after_a_lost_race_and_gives_up_after_its_attempts(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    _batch(deps, "batch_1")
    decided: list[str] = []

    def always_moved(*args: Any, **kwargs: Any) -> Any:
        raise ConditionFailed("moved")

    monkeypatch.setattr(deps.metadata, "update_batch", always_moved)
    with pytest.raises(ConditionFailed) as raised:
        terminal.end_batch(
            deps, "p1", "batch_1", lambda b: decided.append(b.status) or {"status": "completed"}
        )
    assert str(raised.value) == "batch_1"
    assert len(decided) == terminal.END_ATTEMPTS


def test_end_batch_commits_the_decision_with_the_outbox_mark_and_announces_it(deps: Deps) -> None:
    _batch(deps, "batch_1")
    final = terminal.end_batch(deps, "p1", "batch_1", lambda b: {"status": "completed", "completed_at": 5})
    assert (final.status, final.completed_at) == ("completed", 5)
    assert [kind for kind, _ in deps.events.events] == ["batch.completed"]  # type: ignore[attr-defined]
    stored = deps.metadata.get_batch("p1", "batch_1")
    assert stored is not None and stored.event_pending is False


def test_after_terminal_drops_an_input_body_kept_only_for_the_batch(deps: Deps) -> None:
    kept = files.create_file(deps, "p1", "in.jsonl", "batch", b'{"a": 1}\n')
    _batch(deps, "batch_1", input_file_id=kept.id)
    files.delete_file(deps, "p1", kept.id)  # deleted while the batch runs: its body is kept for it
    assert deps.blobs.list_keys(kept.blob_key) == [kept.blob_key]
    ended = deps.metadata.update_batch(
        "p1", "batch_1", {"status": "completed"}, expected_status={"in_progress"}
    )

    terminal.after_terminal(deps, ended)

    assert deps.blobs.list_keys(kept.blob_key) == []


def test_announce_pending_goes_on_past_a_batch_it_cannot_announce(
    deps: Deps, monkeypatch: pytest.MonkeyPatch
) -> None:
    for batch_id in ("batch_1", "batch_2", "batch_3"):
        _batch(deps, batch_id, status="completed", event_pending=True)
    publish = deps.events.publish

    def flaky(kind: str, detail: dict[str, Any]) -> None:
        if detail["id"] == "batch_1":
            raise OSError("bus unavailable")
        publish(kind, detail)

    monkeypatch.setattr(deps.events, "publish", flaky)
    assert terminal.announce_pending(deps) == 2
    assert sorted(d["id"] for _, d in deps.events.events) == ["batch_2", "batch_3"]  # type: ignore[attr-defined]
    assert [b.id for b in deps.metadata.list_unannounced_batches()] == ["batch_1"]


@pytest.mark.parametrize("status", ["failed", "completed", "expired", "cancelled"])
def test_a_batch_stops_holding_its_input_however_it_ends(deps: Deps, status: str) -> None:
    from batch_api.service import batches

    kept = files.create_file(deps, "p1", "in.jsonl", "batch", b'{"a": 1}\n')
    batch = batches.create_batch(deps, "p1", "/v1/chat/completions", kept.id, "24h")
    assert deps.metadata.input_holders("p1", kept.id) == [batch.id]
    files.delete_file(deps, "p1", kept.id)
    assert deps.blobs.exists(kept.blob_key)  # held: kept for the batch

    terminal.end_batch(deps, "p1", batch.id, lambda b: {"status": status, f"{status}_at": 5})
    assert deps.metadata.input_holders("p1", kept.id) == []
    assert not deps.blobs.exists(kept.blob_key)  # its end removed the body kept for it
