"""The one way a batch ends: commit the terminal status, then announce it, then clean up.

- `end_batch` decides the terminal changes from the batch as it is stored, and commits them only if the
  status is still the one it decided from. A cancel that lands in between makes it decide again, so a
  batch that answered `cancelling` always ends `cancelled`.
- The commit marks the batch `event_pending` in the same conditional write (a transactional outbox).
  `after_terminal` publishes the event and clears the mark, then drops what the batch no longer needs.
  A crash between the commit and the publish leaves the mark: the step's retry (AWS), the next start's
  resume and the periodic sweep (`announce_pending`) publish it. So an event is only ever announced for
  a status the batch has reached, and delivery is at least once (a crash after the publish and before
  the mark is cleared publishes again; consumers deduplicate on batch id and status).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from batch_api.contract.errors import ConditionFailed, NotFound
from batch_api.contract.models import BatchRecord
from batch_api.deps import Deps
from batch_api.service.files import release_input_file

logger = logging.getLogger(__name__)

# Each lost race means the status moved on (a cancel, another run); there are only a few statuses.
END_ATTEMPTS = 10

Decide = Callable[[BatchRecord], dict[str, Any]]


def get_batch(deps: Deps, project_id: str, batch_id: str) -> BatchRecord:
    batch = deps.metadata.get_batch(project_id, batch_id)
    if batch is None:
        raise NotFound(f"No batch found with id '{batch_id}'.", param="batch_id")
    return batch


def end_batch(deps: Deps, project_id: str, batch_id: str, decide: Decide) -> BatchRecord:
    """Commit `decide(current)` (the terminal changes, status included) while the batch is still in the
    status `decide` saw, then `after_terminal`. A batch already terminal is only cleaned up."""
    for _ in range(END_ATTEMPTS):
        current = get_batch(deps, project_id, batch_id)
        if current.is_terminal:
            after_terminal(deps, current)
            return current
        changes = {**decide(current), "event_pending": True}
        try:
            final = deps.metadata.update_batch(
                project_id, batch_id, changes, expected_status={current.status}
            )
        except ConditionFailed:
            continue  # the status moved since we read it: decide again from the new one
        after_terminal(deps, final)
        return final
    raise ConditionFailed(batch_id)


def after_terminal(deps: Deps, batch: BatchRecord) -> None:
    """Everything after the terminal commit, each part safe to repeat: announce the status if it is not
    yet (`event_pending`), drop an input body that was kept only for this batch, the chunk progress
    records (the stored counts are final) and then the journals. The journals go last: a local restart
    that finds journals of an ended batch finishes this (`LocalWorkflow.resume`)."""
    if batch.event_pending:
        announce(deps, batch)
    release_input_file(deps, batch.project_id, batch.input_file_id)
    deps.metadata.delete_chunk_progress(batch.id)
    deps.journal.delete_batch(batch.id)


def announce(deps: Deps, batch: BatchRecord) -> None:
    """Publish the terminal event of `batch`, then clear its `event_pending` mark. A failed publish
    raises and leaves the mark for the next attempt."""
    deps.events.publish(f"batch.{batch.status}", batch.event_detail())
    try:
        deps.metadata.update_batch(
            batch.project_id, batch.id, {"event_pending": False}, expected_status={batch.status}
        )
    except ConditionFailed:  # cannot happen to a terminal batch; the event is out either way
        logger.warning("batch %s changed status while its event was announced", batch.id)


def announce_pending(deps: Deps) -> int:
    """Finish `after_terminal` for every ended batch whose event a crash left unpublished; return how
    many were announced."""
    announced = 0
    for batch in deps.metadata.list_unannounced_batches():
        try:
            after_terminal(deps, batch)
        except Exception:
            logger.exception(
                "announcing batch %s %s failed; the next sweep tries again", batch.id, batch.status
            )
            continue
        announced += 1
    return announced
