"""The periodic sweep: remove what has expired so that nothing grows forever.

One pass removes expired files (`files.sweep_expired_files`), the parts of expired uploads
(`uploads.sweep_expired_uploads`) and expired idempotency keys (the store's purge; on DynamoDB, TTL
does that), and announces the terminal events a crash left unpublished (`terminal.announce_pending`). Each task runs even if another fails; a failure is logged, and the next pass tries again.
Chunk progress needs no sweep: finalize deletes it with the journals.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from batch_api.deps import Deps
from batch_api.service.files import sweep_expired_files
from batch_api.service.uploads import sweep_expired_uploads
from batch_api.workflow.terminal import announce_pending

logger = logging.getLogger(__name__)

# Records of each kind one pass handles at most; the next pass takes the rest.
SWEEP_LIMIT = 1000


def sweep(deps: Deps, limit: int = SWEEP_LIMIT) -> dict[str, int]:
    """One pass; returns how many of each kind it removed (a kind that failed is left out)."""
    tasks: dict[str, Callable[[], int]] = {
        "files": lambda: sweep_expired_files(deps, limit),
        "uploads": lambda: sweep_expired_uploads(deps, limit),
        "idempotency_keys": lambda: deps.metadata.purge_expired_idempotency_keys(deps.now()),
        "unannounced_events": lambda: announce_pending(deps),
    }
    removed: dict[str, int] = {}
    for kind, task in tasks.items():
        try:
            removed[kind] = task()
        except Exception:
            logger.exception("sweep of %s failed; the next pass tries again", kind.replace("_", " "))
    done = {kind: count for kind, count in removed.items() if count}
    if done:
        logger.info("sweep handled %s", ", ".join(f"{kind}: {count}" for kind, count in done.items()))
    return removed
