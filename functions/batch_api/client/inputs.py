"""Pure logic of the client commands: what they read from their arguments, the input file and the
API's answers. Standard library only."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

MIB = 1024 * 1024
# One request of this size fits this server on AWS (4,638,720 bytes with the multipart fields), the
# local server and api.openai.com (64 MB parts), so a file larger than one part goes through the Uploads API.
DEFAULT_PART_SIZE = 4 * MIB
MIN_PART_SIZE = 64 * 1024  # below this a server that refuses every part is not going to take the file
_PART_SIZE_HINT = re.compile(r"part_size=(\d+)")


class UsageError(Exception):
    """The arguments or the input file are wrong: nothing was sent."""


def infer_endpoint(lines: Iterable[bytes]) -> str:
    """The endpoint every request line names in its `url`. Blank lines are skipped; a line that is not a
    JSON object with a string `url`, or whose `url` differs from the first line's, is a UsageError
    naming its 1-based number."""
    endpoint: str | None = None
    first_line = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            request = json.loads(raw)
        except ValueError:
            raise UsageError(f"line {number} is not valid JSON; pass --endpoint to submit it as is") from None
        url = request.get("url") if isinstance(request, dict) else None
        if not isinstance(url, str) or not url:
            raise UsageError(f'line {number} has no "url"; pass --endpoint to submit it as is')
        if endpoint is None:
            endpoint, first_line = url, number
        elif url != endpoint:
            raise UsageError(
                f'line {number} has "url" {url!r} but line {first_line} has {endpoint!r}: '
                "a batch has one endpoint"
            )
    if endpoint is None:
        raise UsageError("the file has no request lines")
    return endpoint


def infer_endpoint_of_file(path: Path) -> str:
    with path.open("rb") as lines:
        try:
            return infer_endpoint(lines)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None


def parse_metadata(pairs: Iterable[str]) -> dict[str, str]:
    """`key=value` arguments as a dict; the value may hold `=` itself. The server checks the limits."""
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--metadata {pair!r}: expected key=value")
        if key in metadata:
            raise UsageError(f"--metadata: key {key!r} given twice")
        metadata[key] = value
    return metadata


def part_size_hint(message: str) -> int | None:
    """The part size a 413 names (this server says `part_size=N`), or None."""
    match = _PART_SIZE_HINT.search(message)
    return int(match.group(1)) if match else None


def smaller_part_size(refused: int, message: str) -> int:
    """The part size to try after a part of `refused` bytes was answered 413 with `message`: the size
    the server names when it is smaller, else half. ValueError when that falls below MIN_PART_SIZE."""
    hint = part_size_hint(message)
    size = hint if hint is not None and 0 < hint < refused else refused // 2
    if size < MIN_PART_SIZE:
        raise ValueError(f"the server refused a part of {refused} bytes as too large")
    return size


def output_paths(directory: Path, batch_id: str) -> dict[str, Path]:
    """Where a batch's output and error files are written."""
    return {
        "output": directory / f"{batch_id}_output.jsonl",
        "errors": directory / f"{batch_id}_errors.jsonl",
    }
