"""Contract: ResultJournal. Every adapter must behave as the in-memory reference does."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from batch_api.adapters.local.filesystem import FilesystemJournal
from batch_api.ports import ResultJournal

pytestmark = pytest.mark.contract


def line(n: int) -> bytes:
    return b'{"custom_id": "req-%d"}\n' % n


def test_read_returns_appended_lines_in_order(journal: ResultJournal) -> None:
    journal.append("batch_1", 0, [line(1), line(2)])
    journal.append("batch_1", 0, [line(3)])
    journal.append("batch_1", 0, [])

    assert list(journal.read("batch_1", 0)) == [line(1), line(2), line(3)]


def test_chunks_and_batches_are_separate(journal: ResultJournal) -> None:
    journal.append("batch_1", 0, [line(1)])
    journal.append("batch_1", 1, [line(2)])
    journal.append("batch_2", 0, [line(3)])

    assert list(journal.read("batch_1", 0)) == [line(1)]
    assert list(journal.read("batch_1", 1)) == [line(2)]
    assert list(journal.read("batch_2", 0)) == [line(3)]
    assert list(journal.read("batch_1", 7)) == []
    assert list(journal.read("batch_none", 0)) == []


def test_delete_batch_removes_only_that_batch(journal: ResultJournal) -> None:
    journal.append("batch_1", 0, [line(1)])
    journal.append("batch_1", 3, [line(2)])
    journal.append("batch_2", 0, [line(3)])

    journal.delete_batch("batch_1")
    journal.delete_batch("batch_never")

    assert list(journal.read("batch_1", 0)) == []
    assert list(journal.read("batch_1", 3)) == []
    assert list(journal.read("batch_2", 0)) == [line(3)]
    journal.append("batch_1", 0, [line(4)])  # a deleted batch's journal can start again
    assert list(journal.read("batch_1", 0)) == [line(4)]


def test_concurrent_appends_keep_every_line_whole(journal: ResultJournal) -> None:
    def worker(chunk: int, writer: int) -> None:
        for i in range(50):
            journal.append("batch_1", chunk, [line(writer * 1000 + i), line(writer * 1000 + i + 500)])

    threads = [threading.Thread(target=worker, args=(w % 2, w)) for w in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    for chunk in (0, 1):
        got = list(journal.read("batch_1", chunk))
        expected = {line(w * 1000 + i + d) for w in range(chunk, 6, 2) for i in range(50) for d in (0, 500)}
        assert len(got) == len(expected) and set(got) == expected


def test_lines_survive_reopening(open_journal: Callable[[], ResultJournal]) -> None:
    open_journal().append("batch_1", 0, [line(1), line(2)])
    reopened = open_journal()
    assert list(reopened.read("batch_1", 0)) == [line(1), line(2)]
    reopened.append("batch_1", 0, [line(3)])
    assert list(open_journal().read("batch_1", 0)) == [line(1), line(2), line(3)]


# ---------------------------------------------------------------- filesystem specifics


def test_journal_file_layout(tmp_path: Path) -> None:
    journal = FilesystemJournal(tmp_path)
    journal.append("batch_1", 12, [line(1)])
    assert (tmp_path / "batches" / "batch_1" / "journal" / "00012.jsonl").read_bytes() == line(1)


def test_torn_tail_is_skipped_on_read_and_cut_before_the_next_append(tmp_path: Path) -> None:
    """A kill -9 mid-append leaves half a line; a new process must neither read it nor glue onto it."""
    FilesystemJournal(tmp_path).append("batch_1", 0, [line(1), line(2)])
    path = tmp_path / "batches" / "batch_1" / "journal" / "00000.jsonl"
    with open(path, "ab") as torn:
        torn.write(b'{"custom_id": "req-')

    restarted = FilesystemJournal(tmp_path)
    assert list(restarted.read("batch_1", 0)) == [line(1), line(2)]
    restarted.append("batch_1", 0, [line(3)])
    assert path.read_bytes() == line(1) + line(2) + line(3)
    assert list(restarted.read("batch_1", 0)) == [line(1), line(2), line(3)]


def test_torn_only_line_is_cut_to_empty(tmp_path: Path) -> None:
    path = tmp_path / "batches" / "batch_1" / "journal" / "00000.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 200_000)  # longer than one backwards-scan block, no newline at all

    journal = FilesystemJournal(tmp_path)
    assert list(journal.read("batch_1", 0)) == []
    journal.append("batch_1", 0, [line(1)])
    assert path.read_bytes() == line(1)


def test_torn_tail_after_a_long_last_line(tmp_path: Path) -> None:
    long_line = b'{"pad": "' + b"y" * 150_000 + b'"}\n'
    path = tmp_path / "batches" / "batch_1" / "journal" / "00000.jsonl"
    path.parent.mkdir(parents=True)
    path.write_bytes(long_line + b"z" * 100_000)

    journal = FilesystemJournal(tmp_path)
    journal.append("batch_1", 0, [line(1)])
    assert list(journal.read("batch_1", 0)) == [long_line, line(1)]


@pytest.mark.parametrize("bad", [b"no newline", b"two\nlines\n", b""])
def test_append_rejects_lines_that_would_not_read_back_as_one(tmp_path: Path, bad: bytes) -> None:
    journal = FilesystemJournal(tmp_path)
    with pytest.raises(ValueError):
        journal.append("batch_1", 0, [line(1), bad])
    assert list(journal.read("batch_1", 0)) == []  # nothing written: the check runs first


def test_batch_ids_lists_the_batches_that_have_journals(tmp_path: Path) -> None:
    """Not a port method: the local runner uses it at start to drop journals left by a crash."""
    journal = FilesystemJournal(tmp_path)
    assert journal.batch_ids() == []
    journal.append("batch_2", 0, [line(1)])
    journal.append("batch_1", 3, [line(2)])
    journal.append("batch_3", 0, [line(3)])
    journal.delete_batch("batch_3")
    assert journal.batch_ids() == ["batch_1", "batch_2"]


def test_batch_ids_cannot_escape_the_root(tmp_path: Path) -> None:
    journal = FilesystemJournal(tmp_path / "data")
    for batch_id in ("..", "../x", "a/b", ""):
        with pytest.raises(ValueError):
            journal.append(batch_id, 0, [line(1)])


def test_fsync_option_writes_the_same_bytes(tmp_path: Path) -> None:
    journal = FilesystemJournal(tmp_path, fsync=True)
    journal.append("batch_1", 0, [line(1)])
    assert list(journal.read("batch_1", 0)) == [line(1)]


def test_appends_survive_kill_9(tmp_path: Path) -> None:
    script = f"""
import os, signal
from pathlib import Path
from batch_api.adapters.local.filesystem import FilesystemJournal
FilesystemJournal(Path({str(tmp_path)!r})).append("batch_1", 0, [b'{{"a": 1}}\\n', b'{{"a": 2}}\\n'])
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = subprocess.run([sys.executable, "-c", script], check=False, timeout=60)
    assert result.returncode == -signal.SIGKILL

    assert list(FilesystemJournal(tmp_path).read("batch_1", 0)) == [b'{"a": 1}\n', b'{"a": 2}\n']
