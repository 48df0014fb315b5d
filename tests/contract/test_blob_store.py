"""Contract: BlobStore. Every adapter must behave as the in-memory reference does."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from batch_api.adapters.local.filesystem import TEMP_PREFIX, FilesystemBlobStore, verify_download
from batch_api.ports import BlobStore

pytestmark = pytest.mark.contract


class Boom(Exception):
    pass


def failing_after(chunks: list[bytes]) -> Iterator[bytes]:
    yield from chunks
    raise Boom("the source broke mid-stream")


def test_put_get_size_exists(blob_store: BlobStore) -> None:
    blob_store.put("files/file-1", b"hello\n")

    assert blob_store.get("files/file-1") == b"hello\n"
    assert blob_store.size("files/file-1") == 6
    assert blob_store.exists("files/file-1")
    assert not blob_store.exists("files/file-2")


def test_put_replaces_whole(blob_store: BlobStore) -> None:
    blob_store.put("files/file-1", b"a much longer first version")
    blob_store.put("files/file-1", b"short")
    assert blob_store.get("files/file-1") == b"short"


def test_empty_object(blob_store: BlobStore) -> None:
    blob_store.put("files/empty", b"")
    assert blob_store.get("files/empty") == b""
    assert blob_store.size("files/empty") == 0
    assert list(blob_store.iter_range("files/empty")) == []


def test_absent_keys_raise_key_error(blob_store: BlobStore) -> None:
    with pytest.raises(KeyError):
        blob_store.get("files/missing")
    with pytest.raises(KeyError):
        blob_store.size("files/missing")
    with pytest.raises(KeyError):
        list(blob_store.iter_range("files/missing"))


def test_write_stream_returns_size_and_concatenates(blob_store: BlobStore) -> None:
    size = blob_store.write_stream("files/file-1", iter([b"ab", b"", b"cde", b"f" * 1000]))
    assert size == 1005
    assert blob_store.get("files/file-1") == b"abcde" + b"f" * 1000


def test_concatenate_writes_the_sources_in_the_order_given(blob_store: BlobStore) -> None:
    pieces = {"uploads/u/parts/a": b"first,", "uploads/u/parts/b": b"", "uploads/u/parts/c": b"x" * 3000}
    for key, data in pieces.items():
        blob_store.put(key, data)
    order = ["uploads/u/parts/c", "uploads/u/parts/b", "uploads/u/parts/a"]
    seen: list[bytes] = []

    size = blob_store.concatenate("files/f", [(k, len(pieces[k])) for k in order], on_bytes=seen.append)

    assert size == 3006
    assert blob_store.get("files/f") == b"x" * 3000 + b"first,"
    assert b"".join(seen) == b"x" * 3000 + b"first,"  # every byte, in order
    assert blob_store.get("uploads/u/parts/a") == b"first,"  # the sources stay


def test_concatenate_without_observer_and_of_nothing(blob_store: BlobStore) -> None:
    blob_store.put("uploads/u/parts/a", b"abc")
    assert blob_store.concatenate("files/f", [("uploads/u/parts/a", 3)] * 2) == 6
    assert blob_store.get("files/f") == b"abcabc"
    assert blob_store.concatenate("files/empty", []) == 0
    assert blob_store.get("files/empty") == b""


@pytest.mark.parametrize("missing_at", [0, 1])
def test_concatenate_with_an_absent_source_is_a_key_error_and_writes_nothing(
    blob_store: BlobStore, missing_at: int
) -> None:
    blob_store.put("uploads/u/parts/a", b"abc")
    sources = [("uploads/u/parts/a", 3)]
    sources.insert(missing_at, ("uploads/u/parts/gone", 3))
    with pytest.raises(KeyError):
        blob_store.concatenate("files/f", sources)
    assert not blob_store.exists("files/f")
    assert blob_store.list_keys("files/") == []


def test_failing_write_stream_leaves_no_object(blob_store: BlobStore) -> None:
    with pytest.raises(Boom):
        blob_store.write_stream("files/new", failing_after([b"partial"]))

    assert not blob_store.exists("files/new")
    assert blob_store.list_keys("") == []


def test_failing_write_stream_keeps_the_old_object(blob_store: BlobStore) -> None:
    blob_store.put("files/file-1", b"old")
    with pytest.raises(Boom):
        blob_store.write_stream("files/file-1", failing_after([b"new", b"er"]))

    assert blob_store.get("files/file-1") == b"old"
    assert blob_store.list_keys("files/") == ["files/file-1"]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (0, None, b"0123456789"),
        (3, None, b"3456789"),
        (3, 7, b"3456"),
        (0, 100, b"0123456789"),
        (5, 5, b""),
        (10, None, b""),
        (12, 20, b""),
    ],
)
def test_iter_range(blob_store: BlobStore, start: int, end: int | None, expected: bytes) -> None:
    blob_store.put("files/digits", b"0123456789")
    assert b"".join(blob_store.iter_range("files/digits", start, end)) == expected


def test_iter_range_streams_in_chunk_size_pieces(blob_store: BlobStore) -> None:
    blob_store.put("files/digits", b"0123456789")
    pieces = list(blob_store.iter_range("files/digits", 1, 9, chunk_size=3))
    assert pieces == [b"123", b"456", b"78"]


def test_delete_is_quiet_for_absent_keys(blob_store: BlobStore) -> None:
    blob_store.put("files/file-1", b"x")
    blob_store.delete("files/file-1")
    blob_store.delete("files/file-1")
    blob_store.delete("files/never")
    assert not blob_store.exists("files/file-1")


def test_list_keys_sorted_under_prefix(blob_store: BlobStore) -> None:
    for key in ["batches/b1/parts/00001.out.jsonl", "batches/b1/manifest.json", "batches/b10/x", "files/f"]:
        blob_store.put(key, b"x")

    assert blob_store.list_keys("batches/b1/") == [
        "batches/b1/manifest.json",
        "batches/b1/parts/00001.out.jsonl",
    ]
    assert blob_store.list_keys("batches/b1") == [
        "batches/b1/manifest.json",
        "batches/b1/parts/00001.out.jsonl",
        "batches/b10/x",
    ]
    assert blob_store.list_keys("batches/b1/parts/00001") == ["batches/b1/parts/00001.out.jsonl"]
    assert blob_store.list_keys("") == sorted(
        ["batches/b1/parts/00001.out.jsonl", "batches/b1/manifest.json", "batches/b10/x", "files/f"]
    )
    assert blob_store.list_keys("nothing/") == []


def test_delete_prefix_removes_only_that_prefix(blob_store: BlobStore) -> None:
    for key in ["uploads/u1/parts/p1", "uploads/u1/parts/p2", "uploads/u10/parts/p1", "files/f"]:
        blob_store.put(key, b"x")

    blob_store.delete_prefix("uploads/u1/")
    assert blob_store.list_keys("") == ["files/f", "uploads/u10/parts/p1"]
    blob_store.delete_prefix("uploads/absent/")
    assert blob_store.list_keys("") == ["files/f", "uploads/u10/parts/p1"]


def test_set_expiry_keeps_the_object_readable(blob_store: BlobStore) -> None:
    blob_store.put("files/f", b"x")
    blob_store.set_expiry("files/f", 1)
    assert blob_store.get("files/f") == b"x"


def test_objects_survive_reopening(open_blob_store: Callable[[], BlobStore]) -> None:
    open_blob_store().put("files/f", b"kept")
    assert open_blob_store().get("files/f") == b"kept"


def test_concurrent_writers_never_expose_a_partial_object(blob_store: BlobStore) -> None:
    versions = [bytes([65 + i]) * 50_000 for i in range(4)]
    blob_store.put("files/hot", versions[0])
    seen: set[bytes] = set()
    stop = threading.Event()

    def write(version: bytes) -> None:
        for _ in range(10):
            blob_store.put("files/hot", version)

    def read() -> None:
        while not stop.is_set():
            seen.add(blob_store.get("files/hot"))

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(v,)) for v in versions]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join()
    stop.set()
    reader.join()

    assert seen <= set(versions)


# ---------------------------------------------------------------- filesystem specifics


def files_on_disk(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize(
    "key",
    [
        "",
        "../escape",
        "files/../../escape",
        "/etc/passwd",
        "files//double",
        "files/./x",
        f"files/{TEMP_PREFIX}x",
    ],
)
def test_keys_that_escape_or_collide_are_rejected(tmp_path: Path, key: str) -> None:
    store = FilesystemBlobStore(tmp_path / "data")
    with pytest.raises(ValueError):
        store.put(key, b"x")
    with pytest.raises(ValueError):
        store.path_for(key)
    assert not (tmp_path / "escape").exists()


def test_path_for_maps_keys_under_root(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "data")
    store.put("files/file-1", b"body")
    assert store.path_for("files/file-1") == (tmp_path / "data" / "files" / "file-1").resolve()
    assert store.path_for("files/file-1").read_bytes() == b"body"


def test_failing_write_stream_leaves_no_temp_file(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "data")
    store.put("files/file-1", b"old")
    with pytest.raises(Boom):
        store.write_stream("files/file-1", failing_after([b"new"]))
    with pytest.raises(Boom):
        store.write_stream("files/file-2", failing_after([]))

    assert files_on_disk(tmp_path / "data") == ["files/file-1"]


def test_list_keys_skips_stray_temp_files(tmp_path: Path) -> None:
    """A temp file left by a kill -9 mid-write is never listed as an object; delete_prefix clears it."""
    store = FilesystemBlobStore(tmp_path / "data")
    store.put("batches/b1/parts/00000.out.jsonl", b"x")
    (
        store.path_for("batches/b1/parts/00000.out.jsonl").parent / f"{TEMP_PREFIX}abc-00001.out.jsonl"
    ).write_bytes(b"torn")

    assert store.list_keys("batches/") == ["batches/b1/parts/00000.out.jsonl"]
    store.delete_prefix("batches/b1/")
    assert files_on_disk(tmp_path / "data") == []


def test_write_stream_does_not_buffer_the_stream(tmp_path: Path) -> None:
    """Bytes reach the temp file as they arrive, not after the iterator ends."""
    store = FilesystemBlobStore(tmp_path / "data")
    temp_sizes: list[int] = []

    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"x" * 100_000
            temps = [p for p in (tmp_path / "data" / "files").iterdir() if p.name.startswith(TEMP_PREFIX)]
            temp_sizes.append(os.stat(temps[0]).st_size if temps else -1)

    store.write_stream("files/big", chunks())
    # the file object buffers a little, but the temp file grows while the stream is still running
    assert temp_sizes[-1] >= 200_000


def test_iter_range_keeps_reading_the_object_it_opened(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "data")
    store.put("files/f", b"A" * 10)
    stream = store.iter_range("files/f", chunk_size=4)
    assert next(stream) == b"AAAA"
    store.put("files/f", b"B" * 10)
    assert b"".join(stream) == b"A" * 6


def test_iter_range_raises_key_error_at_call(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "data")
    with pytest.raises(KeyError):
        store.iter_range("files/missing")


def test_download_url_is_none_without_signing(tmp_path: Path) -> None:
    assert FilesystemBlobStore(tmp_path).download_url("files/f", filename="a.jsonl", expires_in=60) is None
    assert (
        FilesystemBlobStore(tmp_path, base_url="http://h").download_url(
            "files/f", filename="a", expires_in=60
        )
        is None
    )


def test_download_url_is_signed_and_verifiable(tmp_path: Path) -> None:
    key = b"secret"
    store = FilesystemBlobStore(
        tmp_path, base_url="http://127.0.0.1:8000/", signing_key=key, clock=lambda: 1000.5
    )
    url = store.download_url("files/file-1", filename="my results & more.jsonl", expires_in=60)
    assert url is not None

    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "http://127.0.0.1:8000/_blobs/files/file-1"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["expires"] == "1060"
    assert query["filename"] == "my results & more.jsonl"
    blob_key = unquote(parts.path.removeprefix("/_blobs/"))

    def verify(**overrides: object) -> bool:
        args: dict[str, object] = {
            "signing_key": key,
            "key": blob_key,
            "expires": query["expires"],
            "filename": query["filename"],
            "signature": query["signature"],
            "now": 1059,
        }
        args.update(overrides)
        return verify_download(**args)  # type: ignore[arg-type]

    assert verify()
    assert verify(now=1060)
    assert not verify(now=1061)  # expired
    assert not verify(key="files/file-2")
    assert not verify(filename="other.jsonl")
    assert not verify(expires="9999")  # extending the link breaks the signature
    assert not verify(expires="soon")
    assert not verify(signing_key=b"other")
    assert not verify(signature="0" * 64)
