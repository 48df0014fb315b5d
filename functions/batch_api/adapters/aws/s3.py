"""BlobStore and ResultJournal on one S3 bucket (keys as in `keys.py`, the same as the local data dir).

S3 gives us atomic whole-object writes (a reader sees the old object or the new one), strongly
consistent reads and listings, ranged GETs, and multipart uploads for streams. Expiry is a tag the
bucket's lifecycle rules act on (`expire-days=N`, one rule per N in 1..30; see docs/architecture.md#aws-facts-the-code-leans-on).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import quote

from botocore.exceptions import ClientError

EXPIRE_DAYS_TAG = "expire-days"
HELD = "held"  # the tag's value while a running batch reads the object: no rule matches it
MIN_EXPIRE_DAYS = 1
MAX_EXPIRE_DAYS = 30
DEFAULT_PART_SIZE = 8 * 1024 * 1024  # S3 wants >= 5 MiB for every part but the last
MIN_PART_BYTES = 5 * 1024 * 1024
MAX_COPY_PART_BYTES = 5 * 1024**3  # UploadPartCopy copies at most 5 GiB into one part
MAX_PARTS = 10_000
# Concatenation: objects fetched ahead of the writer (while their bytes in memory stay under the byte
# bound) and parts uploaded at once; what lets an Upload's complete finish within the API's time.
CONCAT_READERS = 8
CONCAT_READ_AHEAD_BYTES = 64 * 1024 * 1024
CONCAT_WRITERS = 4
MAX_PRESIGN_SECONDS = 7 * 86400  # SigV4 presigned URLs live at most 7 days
_DELETE_BATCH = 1000  # DeleteObjects takes at most 1000 keys
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_INVALID_RANGE = frozenset({"InvalidRange", "416"})


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int | None:
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return int(status) if status is not None else None


def _is_not_found(exc: ClientError) -> bool:
    """The key is missing (NoSuchKey; HEAD answers carry no body, only "404"). NoSuchBucket is not this."""
    return _error_code(exc) in _NOT_FOUND


def expire_days(expires_at: int, now: float) -> int:
    """Whole days until `expires_at`, rounded up (never early), within the bucket's rules 1..30."""
    days = math.ceil((expires_at - now) / 86400)
    return max(MIN_EXPIRE_DAYS, min(MAX_EXPIRE_DAYS, days))


def content_disposition(filename: str) -> str:
    """`attachment` with an ASCII fallback name and the exact name in RFC 5987 form."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\' else "_" for c in filename) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _exact_pieces(body: Any, chunk_size: int) -> Iterator[bytes]:
    """Read a StreamingBody in pieces of exactly `chunk_size` (the last may be shorter)."""
    buffer = bytearray()
    while True:
        data = body.read(chunk_size - len(buffer))
        if not data:
            break
        buffer += data
        if len(buffer) >= chunk_size:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


class S3BlobStore:
    """ports.BlobStore on a bucket; behaves as `MemoryBlobStore` (the contract suite checks it).

    `client` is a boto3 S3 client. `presign_client` (default: `client`) signs download URLs, for a
    deployment whose clients reach S3 through another endpoint than the code does (a moto server
    in tests). It should be built with `signature_version="s3v4"` and the bucket's region.
    `link_signer`, when given, gives the client to sign a link of a given lifetime with instead
    (`links.AssumedRoleSigner`: credentials that outlive the link).
    """

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        presign_client: Any | None = None,
        link_signer: Callable[[int], Any] | None = None,
        clock: Callable[[], float] = time.time,
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.presign_client = presign_client if presign_client is not None else client
        self.link_signer = link_signer
        self._clock = clock
        self.part_size = part_size

    # ------------------------------------------------------------ writes

    def put(self, key: str, data: bytes) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data))

    def write_stream(self, key: str, chunks: Iterable[bytes]) -> int:
        """A single PutObject for a stream shorter than one part; otherwise a multipart upload fed
        part by part as the stream arrives, aborted on any failure so no partial object appears.

        Hand-written rather than s3transfer's `upload_fileobj`: measured side by side
        (`bench/results/s3_writes.md`), that holds ~90-115 MiB more for a 200 MB stream, this ~10 MiB.
        """
        iterator = iter(chunks)
        buffer = bytearray()
        for chunk in iterator:
            buffer += chunk
            if len(buffer) >= self.part_size:
                break
        else:
            self.put(key, bytes(buffer))
            return len(buffer)

        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts: list[dict[str, Any]] = []
            size = 0

            def send(data: bytes) -> None:
                nonlocal size
                number = len(parts) + 1
                answer = self.client.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
                )
                parts.append({"PartNumber": number, "ETag": answer["ETag"]})
                size += len(data)

            send(bytes(buffer))
            buffer.clear()
            for chunk in iterator:
                buffer += chunk
                if len(buffer) >= self.part_size:
                    send(bytes(buffer))
                    buffer.clear()
            if buffer:
                send(bytes(buffer))
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            # if the abort fails too, the bucket's abort-incomplete-multipart rule cleans up
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        return size

    def concatenate(
        self,
        key: str,
        sources: Sequence[tuple[str, int]],
        *,
        on_bytes: Callable[[bytes], None] | None = None,
    ) -> int:
        """One multipart upload. Server-side (`UploadPartCopy`, one part per source, no byte through
        this process) when nobody needs to see the bytes and the sources can be parts: every one but
        the last at least 5 MiB, none over 5 GiB. Otherwise the sources are read `CONCAT_READERS` at a
        time and re-cut into `part_size` parts uploaded `CONCAT_WRITERS` at a time. Aborted on any
        failure, so no partial object appears."""
        sizes = [size for _key, size in sources]
        copyable = (
            on_bytes is None
            and 0 < len(sources) <= MAX_PARTS
            and all(size >= MIN_PART_BYTES for size in sizes[:-1])
            and all(0 < size <= MAX_COPY_PART_BYTES for size in sizes)
        )
        if copyable:
            return self._multipart(key, lambda upload: self._copy_parts(key, upload, sources))
        if sum(sizes) < self.part_size:
            data = b"".join(self._fetched(sources))
            if on_bytes is not None:
                on_bytes(data)
            self.put(key, data)
            return len(data)
        return self._multipart(key, lambda upload: self._cut_parts(key, upload, sources, on_bytes))

    def _multipart(self, key: str, send_parts: Callable[[str], list[dict[str, Any]]]) -> int:
        upload_id = self.client.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        try:
            parts = send_parts(upload_id)
            self.client.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)
            raise
        return self.size(key)

    def _copy_parts(
        self, key: str, upload_id: str, sources: Sequence[tuple[str, int]]
    ) -> list[dict[str, Any]]:
        def copy(number: int, source: str) -> dict[str, Any]:
            try:
                answer = self.client.upload_part_copy(
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": source},
                )
            except ClientError as exc:
                if _is_not_found(exc):
                    raise KeyError(source) from exc
                raise
            return {"PartNumber": number, "ETag": answer["CopyPartResult"]["ETag"]}

        with ThreadPoolExecutor(max_workers=CONCAT_READERS, thread_name_prefix="s3-copy") as pool:
            futures = [pool.submit(copy, n, source) for n, (source, _size) in enumerate(sources, 1)]
            try:
                return [future.result() for future in futures]
            finally:
                for future in futures:
                    future.cancel()

    def _fetched(self, sources: Sequence[tuple[str, int]]) -> Iterator[bytes]:
        """Each source's bytes in order: up to `CONCAT_READERS` GETs in flight, while the objects
        fetched ahead add up to less than `CONCAT_READ_AHEAD_BYTES` (one at least)."""
        with ThreadPoolExecutor(max_workers=CONCAT_READERS, thread_name_prefix="s3-read") as pool:
            window: deque[tuple[Future[bytes], int]] = deque()
            ahead = 0
            try:
                for key, size in sources:
                    while window and (
                        len(window) >= CONCAT_READERS or ahead + size > CONCAT_READ_AHEAD_BYTES
                    ):
                        future, held = window.popleft()
                        ahead -= held
                        yield future.result()
                    window.append((pool.submit(self.get, key), size))
                    ahead += size
                while window:
                    yield window.popleft()[0].result()
            finally:
                for future, _size in window:
                    future.cancel()

    def _cut_parts(
        self,
        key: str,
        upload_id: str,
        sources: Sequence[tuple[str, int]],
        on_bytes: Callable[[bytes], None] | None,
    ) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []

        def send(number: int, data: bytes) -> dict[str, Any]:
            answer = self.client.upload_part(
                Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=data
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}

        with ThreadPoolExecutor(max_workers=CONCAT_WRITERS, thread_name_prefix="s3-part") as pool:
            sending: deque[Future[dict[str, Any]]] = deque()
            number = 0

            def submit(data: bytes) -> None:
                nonlocal number
                number += 1
                sending.append(pool.submit(send, number, data))
                if len(sending) >= CONCAT_WRITERS:
                    parts.append(sending.popleft().result())

            try:
                buffer = bytearray()
                for data in self._fetched(sources):
                    if on_bytes is not None:
                        on_bytes(data)
                    buffer += data
                    while len(buffer) >= self.part_size:
                        submit(bytes(buffer[: self.part_size]))
                        del buffer[: self.part_size]
                if buffer or number == 0:
                    submit(bytes(buffer))
                while sending:
                    parts.append(sending.popleft().result())
            finally:
                for future in sending:
                    future.cancel()
        return parts

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=key)  # absent is fine for S3 too

    def delete_prefix(self, prefix: str) -> None:
        keys = self._iter_keys(prefix)
        while batch := list(itertools.islice(keys, _DELETE_BATCH)):
            answer = self.client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            if answer.get("Errors"):
                first = answer["Errors"][0]
                raise RuntimeError(
                    f"S3 could not delete {len(answer['Errors'])} objects under {prefix!r}, "
                    f"first {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def set_expiry(self, key: str, expires_at: int) -> None:
        """Tag `expire-days=N`; the bucket's rule for N deletes the object N days after its creation,
        midnight UTC rounded up: never early. A missing object has nothing to expire (as locally)."""
        days = expire_days(expires_at, self._clock())
        try:
            self.client.put_object_tagging(
                Bucket=self.bucket,
                Key=key,
                Tagging={"TagSet": [{"Key": EXPIRE_DAYS_TAG, "Value": str(days)}]},
            )
        except ClientError as exc:
            if not _is_not_found(exc):
                raise

    def clear_expiry(self, key: str) -> None:
        """Tag `expire-days=held`: no lifecycle rule deletes it (the rules are for 1 to 30 days)."""
        try:
            self.client.put_object_tagging(
                Bucket=self.bucket,
                Key=key,
                Tagging={"TagSet": [{"Key": EXPIRE_DAYS_TAG, "Value": HELD}]},
            )
        except ClientError as exc:
            if not _is_not_found(exc):
                raise

    # ------------------------------------------------------------ reads

    def get(self, key: str) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):
                raise KeyError(key) from exc
            raise
        body = answer["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def iter_range(
        self, key: str, start: int = 0, end: int | None = None, chunk_size: int = 1 << 20
    ) -> Iterator[bytes]:
        # The GET is sent now, not on first next(): KeyError surfaces at the call, and the stream
        # keeps reading the object version it opened even if a writer replaces the key meanwhile.
        # One ranged GET read in pieces: Powertools' S3Object would issue the same GET and add a
        # seekable wrapper these sequential readers never use, and could not report KeyError up front.
        start = max(start, 0)
        if end is not None and end <= start:
            self.size(key)  # nothing to read, but an absent key is still a KeyError
            return iter(())
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if start > 0 or end is not None:
            kwargs["Range"] = f"bytes={start}-" if end is None else f"bytes={start}-{end - 1}"
        try:
            answer = self.client.get_object(**kwargs)
        except ClientError as exc:
            if _is_not_found(exc):
                raise KeyError(key) from exc
            if _error_code(exc) in _INVALID_RANGE or _status(exc) == 416:
                return iter(())  # the range starts at or past the end of the object
            raise
        return self._stream(answer["Body"], chunk_size)

    @staticmethod
    def _stream(body: Any, chunk_size: int) -> Iterator[bytes]:
        try:
            yield from _exact_pieces(body, chunk_size)
        finally:
            body.close()

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except ClientError as exc:
            if _is_not_found(exc):
                raise KeyError(key) from exc
            raise

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except KeyError:
            return False
        return True

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(self._iter_keys(prefix))

    def download_url(self, key: str, *, filename: str, expires_in: int) -> str | None:
        """A presigned GET that downloads as `filename`. It works for its whole lifetime only if the
        credentials that sign it live as long: with a `link_signer` they do; with the function's own
        temporary credentials (a Lambda role) it may stop earlier, when those expire."""
        lifetime = max(1, min(int(expires_in), MAX_PRESIGN_SECONDS))
        signer = self.link_signer(lifetime) if self.link_signer is not None else self.presign_client
        url: str = signer.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self.bucket,
                "Key": key,
                "ResponseContentDisposition": content_disposition(filename),
            },
            ExpiresIn=lifetime,
        )
        return url


def _lines(data: bytes) -> Iterator[bytes]:
    """The newline-terminated lines of a segment (bytes.splitlines would also split on CR and others)."""
    start = 0
    while (end := data.find(b"\n", start)) >= 0:
        yield data[start : end + 1]
        start = end + 1


def _check_line(line: bytes) -> None:
    if not line.endswith(b"\n") or line.count(b"\n") != 1:
        raise ValueError("each journal line must end with exactly one b'\\n'")


class S3Journal:
    """ports.ResultJournal on S3. S3 has no append, so each append is one segment object:

        batches/{batch_id}/journal/{chunk_index:05d}/{time_ns:020d}-{random}.jsonl

    A PUT is atomic, so there is no torn tail to handle. Segment names sort in the order they were
    written (within a process strictly; across processes by clock), and read() streams the
    segments in that order, fetching a few ahead in parallel (a chunk can have one segment per
    request, and finalize reads every chunk).
    """

    def __init__(self, client: Any, bucket: str, *, read_ahead: int = 8) -> None:
        self.client = client
        self.bucket = bucket
        self.read_ahead = max(1, read_ahead)
        self._lock = threading.Lock()
        self._last_ns = 0

    @staticmethod
    def _batch_prefix(batch_id: str) -> str:
        if not batch_id or "/" in batch_id or batch_id in (".", ".."):
            raise ValueError(f"invalid batch id {batch_id!r}")
        return f"batches/{batch_id}/journal/"

    def _chunk_prefix(self, batch_id: str, chunk_index: int) -> str:
        return f"{self._batch_prefix(batch_id)}{chunk_index:05d}/"

    def _segment_name(self) -> str:
        with self._lock:
            self._last_ns = max(time.time_ns(), self._last_ns + 1)
            stamp = self._last_ns
        return f"{stamp:020d}-{os.urandom(6).hex()}.jsonl"

    def append(self, batch_id: str, chunk_index: int, lines: list[bytes]) -> None:
        for line in lines:
            _check_line(line)
        if not lines:
            return
        key = self._chunk_prefix(batch_id, chunk_index) + self._segment_name()
        self.client.put_object(Bucket=self.bucket, Key=key, Body=b"".join(lines))

    def _segment_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield item["Key"]

    def _fetch(self, key: str) -> bytes:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            if _is_not_found(exc):  # deleted between the listing and the GET (delete_batch ran)
                return b""
            raise
        body = answer["Body"]
        try:
            return bytes(body.read())
        finally:
            body.close()

    def read(self, batch_id: str, chunk_index: int) -> Iterator[bytes]:
        keys = self._segment_keys(self._chunk_prefix(batch_id, chunk_index))
        with ThreadPoolExecutor(max_workers=self.read_ahead, thread_name_prefix="journal-read") as pool:
            window: deque[Future[bytes]] = deque()
            try:
                for key in keys:
                    window.append(pool.submit(self._fetch, key))
                    if len(window) >= self.read_ahead:
                        yield from _lines(window.popleft().result())
                while window:
                    yield from _lines(window.popleft().result())
            finally:
                for future in window:
                    future.cancel()

    def delete_batch(self, batch_id: str) -> None:
        S3BlobStore(self.client, self.bucket).delete_prefix(self._batch_prefix(batch_id))
