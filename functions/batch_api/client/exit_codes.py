"""The exit codes of the client commands, in one place: what a script branches on."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    COMPLETED = 0  # the batch completed, or the command did what it was asked
    FAILED = 1  # the batch failed (its input did not pass validation)
    USAGE = 2  # bad arguments, an unreadable or inconsistent input file, no API key
    EXPIRED = 3  # the batch expired before it finished (partial results kept)
    CANCELLED = 4  # the batch was cancelled (partial results kept)
    CONNECTION = 5  # the API could not be reached (refused, DNS, timeout)
    API_ERROR = 6  # the API answered with an error (unknown id, bad key, 409, 5xx...)
    NOT_FINISHED = 7  # `status`/`download`: the batch has not reached a terminal status yet
    INTERRUPTED = 130  # Ctrl-C (a batch being waited for keeps running)
    BROKEN_PIPE = 141  # stdout closed early (`| head`): what a shell reports for SIGPIPE


TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})

_BY_STATUS = {
    "completed": ExitCode.COMPLETED,
    "failed": ExitCode.FAILED,
    "expired": ExitCode.EXPIRED,
    "cancelled": ExitCode.CANCELLED,
}


def for_status(status: str) -> ExitCode:
    """The exit code that reports a batch in `status`; NOT_FINISHED while it is still running."""
    return _BY_STATUS.get(status, ExitCode.NOT_FINISHED)


HELP = """\
exit codes:
  0    completed (or, for commands that do not follow a batch, success)
  1    the batch failed (validation)
  2    usage error (arguments, input file, missing API key)
  3    the batch expired
  4    the batch was cancelled
  5    connection error: the API could not be reached
  6    the API answered with an error (e.g. unknown id, bad API key)
  7    status/download: the batch is still running
  130  interrupted (Ctrl-C); a batch being waited for keeps running"""
