"""Concatenation by streaming, for stores that have nothing faster (the local file and memory stores)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any


def streamed(
    store: Any, sources: Sequence[tuple[str, int]], on_bytes: Callable[[bytes], None] | None
) -> Iterator[bytes]:
    """The sources' bytes in order, each source opened before the first byte is written (an absent one
    is a `KeyError` before anything exists), shown to `on_bytes` as they pass."""
    for key, _size in sources:
        store.size(key)
    for key, _size in sources:
        for chunk in store.iter_range(key):
            if on_bytes is not None:
                on_bytes(chunk)
            yield chunk
