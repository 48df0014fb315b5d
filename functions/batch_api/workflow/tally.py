"""What a chunk's journal holds: the requests done, and their counts and usage.

Read by `process` (to skip what is done and report progress) and by `finalize` (to count).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from batch_api.contract.models import ChunkPlan, ChunkProgress, Usage
from batch_api.deps import Deps
from batch_api.workflow.lines import NO_TOKENS, Tokens, as_usage, is_success, parse_line, tokens_of

DUPLICATE, SUCCESS, FAILURE = 0, 1, 2  # the kinds of journal lines


@dataclass
class ChunkTally:
    """Counts over the whole journal of a chunk; the first line per custom_id wins (a duplicate can only
    come from a retried append)."""

    done_ids: set[str] = field(default_factory=set)
    completed: int = 0
    failed: int = 0
    tokens: list[int] = field(default_factory=lambda: list(NO_TOKENS))  # summed, in `Tokens` order
    # per journal line read, in order: SUCCESS, FAILURE, or DUPLICATE (a custom_id seen before), so
    # finalize can sort the lines into the output and error files without parsing them again
    line_kinds: bytearray = field(default_factory=bytearray)

    @property
    def usage(self) -> Usage:
        return as_usage((self.tokens[0], self.tokens[1], self.tokens[2], self.tokens[3], self.tokens[4]))

    def add(self, custom_id: str, success: bool, tokens: Tokens) -> int:
        """Count one result; its kind (DUPLICATE when the custom_id was counted already)."""
        if custom_id in self.done_ids:
            return DUPLICATE
        self.done_ids.add(custom_id)
        if success:
            self.completed += 1
            summed = self.tokens
            for i, value in enumerate(tokens):
                summed[i] += value
            return SUCCESS
        self.failed += 1
        return FAILURE

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
        tokens = tokens_of(endpoint, obj["response"]["body"]) if success else NO_TOKENS  # failures: none
        tally.line_kinds.append(tally.add(obj["custom_id"], success, tokens))
    return tally
