"""Identifiers in OpenAI's shapes: `file-...`, `batch_...`, `upload_...`, `part_...`, `batch_req_...`."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time

_last_micros = 0
_lock = threading.Lock()


def _token() -> str:
    """24 hex chars: 14 of microseconds since the epoch (strictly increasing in this process), 10 random.

    Ids created one after another sort in creation order, so lists ordered by (created_at, id) keep
    the order in which objects were made even within one second.
    """
    global _last_micros
    with _lock:
        micros = max(time.time_ns() // 1000, _last_micros + 1)
        _last_micros = micros
    return f"{micros:014x}{secrets.token_hex(5)}"


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


def upload_file_id(upload_id: str) -> str:
    """Deterministic id of the file an upload completes into: a retried complete finds the same file."""
    digest = hashlib.sha256(f"{upload_id}\x00file".encode()).hexdigest()[:24]
    return f"file-{digest}"
