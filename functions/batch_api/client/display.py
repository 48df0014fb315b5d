"""What the client commands show a person: a live progress bar on stderr when stderr is a terminal
(rich), plain lines otherwise, and tables and summaries on stdout. With --json nothing here writes to
stdout."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

PLAIN_PROGRESS_EVERY_SECONDS = 60.0  # without a terminal: a counts line at most this often
MAX_ERRORS_SHOWN = 10


class RateColumn(ProgressColumn):
    """Requests finished per second, from rich's own estimate over the recent polls."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("  -  req/s" if speed is None else f"{speed:5.1f} req/s", style="cyan")


class FailedColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        failed = int(task.fields.get("failed", 0))
        return Text(f"{failed} failed", style="red" if failed else "dim")


def _counts(batch: Any) -> tuple[int, int, int]:
    """(done, failed, total) of a batch; done counts the failed requests too."""
    counts = batch.request_counts
    if counts is None:
        return 0, 0, 0
    return counts.completed + counts.failed, counts.failed, counts.total


def _clock() -> str:
    return datetime.now().strftime("%H:%M:%S")


def _when(stamp: int | None) -> str:
    return datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


class Ui:
    """stdout for results, stderr for what happens meanwhile; live bars only on a terminal."""

    def __init__(self, json_output: bool) -> None:
        self.json = json_output
        self.live = sys.stderr.isatty()
        self.err = Console(stderr=True, highlight=False, force_terminal=self.live, soft_wrap=True)
        self.out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)

    def note(self, message: str) -> None:
        """A line about what is happening, on stderr."""
        self.err.print(message, markup=False)

    def result(self, message: str = "", style: str | None = None) -> None:
        """A line of the result, on stdout (never with --json)."""
        if not self.json:
            self.out.print(message, markup=False, style=style)

    @contextmanager
    def transfer(self, description: str, total: int | None) -> Iterator[Callable[[int], None]]:
        """A bytes progress bar on a terminal; yields `advance(nbytes)`."""
        if not self.live:
            yield lambda _: None
            return
        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=self.err,
            transient=True,
        )
        with progress:
            task = progress.add_task(description, total=total)
            yield lambda nbytes: progress.advance(task, nbytes)

    @contextmanager
    def following(self, batch_id: str) -> Iterator[BatchView]:
        view = BatchView(self, batch_id)
        try:
            yield view
        finally:
            view.close()

    def print_block(self, renderable: Any) -> None:
        """A table or grid on stdout, without the padding rich leaves at the ends of its lines."""
        if self.json:
            return
        with self.out.capture() as captured:
            self.out.print(renderable)
        for line in captured.get().splitlines():
            self.out.file.write(line.rstrip() + "\n")
        self.out.file.flush()

    def batch_details(self, batch: Any) -> None:
        done, failed, total = _counts(batch)
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        rows = [
            ("id", batch.id),
            ("status", batch.status),
            ("endpoint", batch.endpoint),
            ("model", getattr(batch, "model", None) or "-"),
            ("requests", f"{done}/{total} done, {failed} failed"),
            ("created", _when(batch.created_at)),
            ("expires", _when(batch.expires_at)),
            ("input file", batch.input_file_id),
            ("output file", batch.output_file_id or "-"),
            ("error file", batch.error_file_id or "-"),
        ]
        for stamp in (
            "in_progress_at",
            "finalizing_at",
            "completed_at",
            "failed_at",
            "expired_at",
            "cancelled_at",
        ):
            if getattr(batch, stamp, None):
                rows.append((stamp.removesuffix("_at").replace("_", " "), _when(getattr(batch, stamp))))
        if batch.metadata:
            rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in batch.metadata.items())))
        for name, value in rows:
            grid.add_row(name, Text(str(value)))
        self.print_block(grid)
        self.validation_errors(batch)

    def validation_errors(self, batch: Any) -> None:
        errors = batch.errors.data if batch.errors and batch.errors.data else []
        for error in errors[:MAX_ERRORS_SHOWN]:
            where = f"line {error.line}: " if error.line else ""
            self.result(f"  {where}{error.code}: {error.message}")
        if len(errors) > MAX_ERRORS_SHOWN:
            self.result(
                f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more (batch-api status {batch.id} --json)"
            )

    def summary(self, batch: Any, downloaded: dict[str, tuple[Path, int]] | None = None) -> None:
        """The end of a batch, on stdout: counts, time and rate, the files written, the errors."""
        done, failed, total = _counts(batch)
        took = ""
        ended = batch.completed_at or batch.expired_at or batch.cancelled_at or batch.failed_at
        if ended and batch.in_progress_at:
            seconds = max(ended - batch.in_progress_at, 0)
            rate = f", {done / seconds:.1f}/s" if seconds else ""
            took = f" in {seconds}s{rate}"
        if batch.status == "failed":
            self.result(f"{batch.id} failed: its input did not pass validation", style="red")
            self.validation_errors(batch)
            return
        style = "green" if batch.status == "completed" else "yellow"
        self.result(
            f"{batch.id} {batch.status}{took}: {total} requests, {done - failed} succeeded, {failed} failed",
            style=style,
        )
        if batch.status in ("expired", "cancelled") and total > done:
            self.result(f"  {total - done} requests never ran (in the error file as batch_{batch.status})")
        if downloaded is not None:
            for kind, label in (("output", "output"), ("errors", "errors")):
                if kind in downloaded:
                    path, lines = downloaded[kind]
                    self.result(f"  {label:<7} {path} ({lines} line{'' if lines == 1 else 's'})")
                else:
                    self.result(f"  {label:<7} none")

    def batches_table(self, batches: list[Any]) -> None:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("ID", "STATUS", "ENDPOINT", "MODEL", "CREATED", "DONE/TOTAL", "FAILED"):
            table.add_column(column, no_wrap=True)
        for batch in batches:
            done, failed, total = _counts(batch)
            table.add_row(
                batch.id,
                batch.status,
                batch.endpoint,
                getattr(batch, "model", None) or "-",
                _when(batch.created_at),
                f"{done}/{total}",
                str(failed),
            )
        self.print_block(table)

    def files_table(self, files: list[Any]) -> None:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("ID", "PURPOSE", "BYTES", "FILENAME", "CREATED", "EXPIRES"):
            table.add_column(column, no_wrap=True)
        for file in files:
            table.add_row(
                file.id,
                file.purpose,
                str(file.bytes),
                Text(file.filename),
                _when(file.created_at),
                _when(getattr(file, "expires_at", None)),
            )
        self.print_block(table)


class BatchView:
    """A batch being followed: a live bar (done/total, rate, ETA, failed) on a terminal, with each status
    change printed above it; without a terminal, one line per status change and a counts line now and then."""

    def __init__(self, ui: Ui, batch_id: str) -> None:
        self.ui = ui
        self.batch_id = batch_id
        self.status: str | None = None
        self.last_plain = 0.0
        self.last_counts: tuple[int, int, int] | None = None
        self.progress: Progress | None = None
        self.task: Any = None
        if ui.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description:<11}"),
                BarColumn(),
                MofNCompleteColumn(),
                RateColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                FailedColumn(),
                TimeElapsedColumn(),
                console=ui.err,
                transient=True,
            )
            self.progress.start()
            self.task = self.progress.add_task("", total=None, failed=0)

    def update(self, batch: Any) -> None:
        done, failed, total = _counts(batch)
        changed = batch.status != self.status
        if self.progress is not None:
            if changed:
                before = f"{self.status} -> " if self.status else ""
                self.progress.console.print(
                    f"{_clock()} {self.batch_id}: {before}{batch.status}", markup=False, highlight=False
                )
            self.progress.update(
                self.task,
                description=batch.status,
                total=total or None,
                completed=done,
                failed=failed,
            )
        else:
            now = time.monotonic()
            counts = (done, failed, total)
            due = now - self.last_plain >= PLAIN_PROGRESS_EVERY_SECONDS and counts != self.last_counts
            if changed or due:
                counted = f" ({done}/{total} done, {failed} failed)" if total else ""
                self.ui.note(f"{_clock()} {self.batch_id}: {batch.status}{counted}")
                self.last_plain, self.last_counts = now, counts
        self.status = batch.status

    def lost(self, reason: str) -> None:
        self.ui.note(f"{_clock()} {self.batch_id}: cannot reach the API ({reason}); still trying")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
