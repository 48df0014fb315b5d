"""BlobStore and ResultJournal on a local data directory: the local twin of the S3 bucket.

Keys are the same as in S3 (`keys.py`) and map to paths under the root. Objects are written to a
temp file beside their final path and renamed into place, so a reader (or a crash) never sees a
partial object. Temp files are named `.tmp-*`, a segment no key may use, so listings skip them.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote

from batch_api.adapters.concat import streamed

TEMP_PREFIX = ".tmp-"
_READ_BLOCK = 1 << 16


def _check_key(key: str, *, allow_empty: bool = False) -> list[str]:
    """The key's path segments; ValueError for anything that could escape the root or hide a temp file."""
    if not key:
        if allow_empty:
            return []
        raise ValueError("empty blob key")
    if key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"invalid blob key {key!r}")
    segments = key.split("/")
    for segment in segments:
        if segment in ("", ".", "..") or segment.startswith(TEMP_PREFIX):
            raise ValueError(f"invalid blob key {key!r}")
    return segments


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _signature(signing_key: bytes, key: str, expires: int, filename: str) -> str:
    # NUL separators: keys cannot contain NUL and expires is digits, so the message is unambiguous.
    message = b"\x00".join((key.encode(), str(expires).encode(), filename.encode()))
    return hmac.new(signing_key, message, hashlib.sha256).hexdigest()


def verify_download(
    signing_key: bytes, key: str, expires: int | str, filename: str, signature: str, now: float
) -> bool:
    """True when `signature` is ours for (key, expires, filename) and the link has not expired at `now`."""
    try:
        expires_at = int(expires)
    except (TypeError, ValueError):
        return False
    if now > expires_at:
        return False
    expected = _signature(signing_key, key, expires_at, filename)
    return hmac.compare_digest(expected, signature)


class FilesystemBlobStore:
    """ports.BlobStore on a directory; behaves as `MemoryBlobStore` (the contract suite checks it)."""

    def __init__(
        self,
        root: Path,
        *,
        base_url: str | None = None,
        signing_key: bytes | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.base_url = base_url.rstrip("/") if base_url else None
        self.signing_key = signing_key
        self._clock = clock

    def path_for(self, key: str) -> Path:
        """Where the object lives on disk (the local HTTP server streams downloads from here)."""
        return self.root.joinpath(*_check_key(key))

    # ------------------------------------------------------------ writes

    def put(self, key: str, data: bytes) -> None:
        self.write_stream(key, (data,))

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(8)}-{path.name}")
        size = 0
        try:
            with open(temp, "xb") as out:
                for chunk in chunks:
                    out.write(chunk)
                    size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)
        return size

    def concatenate(
        self,
        key: str,
        sources: Sequence[tuple[str, int]],
        *,
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> int:
        return self.write_stream(key, streamed(self, sources, on_bytes))

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        for key in self.list_keys(prefix):
            self.delete(key)
        if prefix.endswith("/"):
            # A directory prefix: also drop the (now empty) directories and any stray temp files.
            shutil.rmtree(self.path_for(prefix.rstrip("/")), ignore_errors=True)

    def set_expiry(self, key: str, expires_at: int) -> None:
        """No-op: the local sweep deletes files whose metadata says they expired."""

    def clear_expiry(self, key: str) -> None:
        """No-op, as `set_expiry`."""

    # ------------------------------------------------------------ reads

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self.path_for(key), "rb")  # the caller owns (and closes) the handle
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise KeyError(key) from exc

    def get(self, key: str) -> bytes:
        with self._open(key) as source:
            return source.read()

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        # Opened now, not on first next(): KeyError surfaces at the call, and the stream keeps
        # reading the object it opened even if a writer replaces the key meanwhile.
        source = self._open(key)
        return self._stream(source, start, end, chunk_size)

    @staticmethod
    def _stream(source: BinaryIO, start: int, end: int | None, chunk_size: int) -> Iterator[bytes]:
        with source:
            size = os.fstat(source.fileno()).st_size
            stop = size if end is None else min(end, size)
            position = max(start, 0)
            source.seek(position)
            while position < stop:
                data = source.read(min(chunk_size, stop - position))
                if not data:
                    break
                position += len(data)
                yield data

    def size(self, key: str) -> int:
        path = self.path_for(key)
        if not path.is_file():
            raise KeyError(key)
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        # Walk only the deepest directory the prefix names fully; filter the rest by string prefix.
        directory_part = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*_check_key(directory_part, allow_empty=True))
        if not base.is_dir():
            return []
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(TEMP_PREFIX)]
            relative = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(TEMP_PREFIX):
                    continue
                key = name if relative == "." else f"{relative}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def download_url(self, key: str, *, filename: str, expires_in: int) -> str | None:
        """A signed link to this server's `/_blobs/` route, or None when links are not configured."""
        if self.base_url is None or self.signing_key is None:
            return None
        _check_key(key)
        expires = int(self._clock()) + expires_in
        signature = _signature(self.signing_key, key, expires, filename)
        return (
            f"{self.base_url}/_blobs/{quote(key, safe='/')}"
            f"?expires={expires}&filename={quote(filename, safe='')}&signature={signature}"
        )


class _JournalFile:
    """Per-file state: its path, a lock, and whether this process has already cut off a torn tail."""

    __slots__ = ("checked", "lock", "name", "path")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = os.fspath(path)
        self.lock = threading.Lock()
        self.checked = False


def _truncate_torn_tail(path: Path) -> None:
    """Cut the file back to its last b"\\n", dropping a line a crash left half-written."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return
    try:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return
        end = size
        keep = 0
        while end > 0:
            start = max(0, end - _READ_BLOCK)
            block = os.pread(fd, end - start, start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            end = start
        os.ftruncate(fd, keep)
    finally:
        os.close(fd)


class FilesystemJournal:
    """ports.ResultJournal as one append-only JSONL file per (batch, chunk).

    Each append is one `os.write` on an O_APPEND descriptor: a kill -9 can tear at most the last
    line, which read() skips and the next append (first one in a new process) cuts off. No fsync by
    default: a killed process's writes are already in the OS page cache and survive; fsync only
    guards against power loss, at the cost of a disk flush per append (`fsync=True` to pay it).
    """

    def __init__(self, root: Path, *, fsync: bool = False) -> None:
        self.root = Path(root)
        self.fsync = fsync
        self._lock = threading.Lock()
        # (batch id, chunk index) -> its file's state: an append finds its path without building it
        self._files: dict[tuple[str, int], _JournalFile] = {}

    def _batch_dir(self, batch_id: str) -> Path:
        _check_key(batch_id)
        if "/" in batch_id:
            raise ValueError(f"invalid batch id {batch_id!r}")
        return self.root / "batches" / batch_id / "journal"

    def path_for(self, batch_id: str, chunk_index: int) -> Path:
        return self._batch_dir(batch_id) / f"{chunk_index:05d}.jsonl"

    def _state(self, batch_id: str, chunk_index: int) -> _JournalFile:
        key = (batch_id, chunk_index)
        with self._lock:
            state = self._files.get(key)
        if state is None:
            path = self.path_for(batch_id, chunk_index)  # checks the id, outside the lock
            with self._lock:
                state = self._files.setdefault(key, _JournalFile(path))
        return state

    def append(self, batch_id: str, chunk_index: int, lines: list[bytes]) -> None:
        for line in lines:
            if not line.endswith(b"\n") or line.count(b"\n") != 1:
                raise ValueError("each journal line must end with exactly one b'\\n'")
        if not lines:
            return
        data = b"".join(lines)
        state = self._state(batch_id, chunk_index)
        with state.lock:
            if not state.checked:
                state.path.parent.mkdir(parents=True, exist_ok=True)
                _truncate_torn_tail(state.path)
                state.checked = True
            fd = os.open(state.name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, data)
                while written < len(data):  # a short write (rare on regular files): finish it
                    written += os.write(fd, data[written:])
                if self.fsync:
                    os.fsync(fd)
            except BaseException:
                state.checked = False  # the tail may be torn now; check again before the next append
                raise
            finally:
                os.close(fd)

    def read(self, batch_id: str, chunk_index: int) -> Iterator[bytes]:
        path = self.path_for(batch_id, chunk_index)
        try:
            source = open(path, "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            return
        with source:
            for line in source:
                if line.endswith(b"\n"):
                    yield line

    def batch_ids(self) -> list[str]:
        """Batches that have a journal directory, sorted. Not part of the port: the local runner uses it
        at start to drop journals a crash left behind after their batch ended."""
        base = self.root / "batches"
        if not base.is_dir():
            return []
        return sorted(
            entry.name
            for entry in base.iterdir()
            if (entry / "journal").is_dir() and not entry.name.startswith(TEMP_PREFIX)
        )

    def delete_batch(self, batch_id: str) -> None:
        directory = self._batch_dir(batch_id)
        with self._lock:
            for key in [key for key in self._files if key[0] == batch_id]:
                del self._files[key]
        shutil.rmtree(directory, ignore_errors=True)
