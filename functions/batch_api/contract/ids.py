"""Identifiers in OpenAI's shapes: `file-...`, `batch_...`, `upload_...`, `part_...`, `batch_req_...`."""

from __future__ import annotations

import hashlib
import secrets


def _token(nbytes: int = 12) -> str:
    return secrets.token_hex(nbytes)


def new_file_id() -> str:
    return f"file-{_token()}"


def new_batch_id() -> str:
    return f"batch_{_token()}"


def new_upload_id() -> str:
    return f"upload_{_token()}"


def new_part_id() -> str:
    return f"part_{_token()}"


def new_request_id() -> str:
    return f"req_{_token()}"


def batch_request_id(batch_id: str, custom_id: str) -> str:
    """Stable per (batch, custom_id), so a retried request writes the same line."""
    digest = hashlib.sha256(f"{batch_id}\x00{custom_id}".encode()).hexdigest()[:24]
    return f"batch_req_{digest}"


def output_file_id(batch_id: str, kind: str) -> str:
    """Deterministic id of a batch's output ("output") or error ("error") file: finalize may run twice."""
    digest = hashlib.sha256(f"{batch_id}\x00{kind}".encode()).hexdigest()[:24]
    return f"file-{digest}"
