"""Where bodies live in the blob store: the same keys in S3 and under the local data directory
(docs/architecture.md#data-layout). Not to be confused with API keys (`handlers/auth.py`)."""

from __future__ import annotations

import hashlib


def file_key(file_id: str) -> str:
    return f"files/{file_id}"


def stitched_file_key(file_id: str, part_ids: list[str]) -> str:
    """The body of a completed upload: one object per list of parts, so two completes of one upload
    that name different parts (or orders) never write the same object."""
    digest = hashlib.sha256("\n".join(part_ids).encode()).hexdigest()[:16]
    return f"files/{file_id}.{digest}"


def upload_part_key(upload_id: str, part_id: str) -> str:
    return f"uploads/{upload_id}/parts/{part_id}"


def upload_prefix(upload_id: str) -> str:
    return f"uploads/{upload_id}/"


def manifest_key(batch_id: str) -> str:
    return f"batches/{batch_id}/manifest.json"


def batch_prefix(batch_id: str) -> str:
    return f"batches/{batch_id}/"
