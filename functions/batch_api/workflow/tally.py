"""What a chunk's journal holds: the requests done, and their counts and usage.

Read by `process` (to skip what is done and report progress) and by `finalize` (to count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batch_api.contract.models import ChunkPlan, ChunkProgress, Usage
from batch_api.deps import Deps
from batch_api.workflow.lines import is_success, parse_line, usage_of


@dataclass
class ChunkTally:
    """Counts over the whole journal of a chunk; the first line per custom_id wins (a duplicate can only
    come from a retried append)."""

    done_ids: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    usage: Usage = field(default_factory=Usage)

    def add(self, custom_id: str, success: bool, usage: Usage) -> None:
        if custom_id in self.done_ids:
            return
        self.done_ids.add(custom_id)
        if success:
            self.completed += 1
            self.usage = self.usage.add(usage)
        else:
            self.failed += 1

    def progress(self, plan: ChunkPlan) -> ChunkProgress:
        return ChunkProgress(
            index=plan.index,
            completed=self.completed,
            failed=self.failed,
            usage=self.usage,
            done=len(self.done_ids) >= plan.lines,
        )


def read_tally(deps: Deps, batch_id: str, index: int, endpoint: str) -> ChunkTally:
    """Tally what the chunk's journal already holds."""
    tally = ChunkTally()
    for line in deps.journal.read(batch_id, index):
        obj = parse_line(line)
        success = is_success(obj)
        body = obj["response"]["body"] if success else None  # a failed line has no usage
        tally.add(obj["custom_id"], success, usage_of(endpoint, body))
    return tally
