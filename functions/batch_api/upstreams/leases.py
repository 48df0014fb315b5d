"""Shares of an upstream's capacity across processes (the chunk workers on AWS): the rule that
decides how many slots a worker gets. The stores (`ports.CapacityLeases`) apply it atomically.

A worker asks for `want` slots (its requests per chunk) for one batch. It gets at most what is free
under the upstream's `limit`, and at most the batch's fair share: the limit split evenly between the
batches holding or waiting for slots, less what the batch already holds. A batch that gets nothing
registers as waiting, so the next grant to another batch already counts it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

LEASE_SECONDS = 120  # a worker renews its lease well within this; a dead worker's slots come back after it
WAIT_SECONDS = 10  # how long a worker that got no slot is told to wait before asking again
WAITING_SECONDS = 60  # how long a batch that got nothing counts as waiting


@dataclass(frozen=True)
class Lease:
    holder: str  # the worker (one chunk invocation)
    batch_id: str
    slots: int
    expires_at: float


def grant(want: int, limit: int, batch_id: str, leases: Iterable[Lease], waiting: Iterable[str]) -> int:
    """Slots to grant `batch_id` now, given the live `leases` and the batches `waiting` for slots."""
    live = list(leases)
    held = sum(lease.slots for lease in live)
    held_by_batch = sum(lease.slots for lease in live if lease.batch_id == batch_id)
    batches = {lease.batch_id for lease in live} | set(waiting) | {batch_id}
    share = max(1, math.ceil(limit / len(batches)))
    return max(0, min(want, limit - held, share - held_by_batch))
