"""The client subcommands of `batch-api`, added to its parser. Standard library only: building the
parser must not import the SDK (`batch-api serve` builds it too)."""

from __future__ import annotations

import argparse
from typing import Any

from batch_api.client.exit_codes import HELP as EXIT_CODES_HELP
from batch_api.client.inputs import DEFAULT_PART_SIZE

CONNECTION_HELP = """\
connection:
  --base-url or OPENAI_BASE_URL (default https://api.openai.com/v1), e.g. http://127.0.0.1:8000/v1
  --api-key or OPENAI_API_KEY (any value for a `batch-api serve` without --api-key)"""

BATCH_STATUSES = (
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
)


def _positive(kind: type[Any]) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0: {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def add_client_commands(commands: Any) -> None:
    """Add submit, status, wait, download, cancel, ls and files to `commands` (a subparsers action).
    Every one sets `client_command` to its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", default=None, help="the API's base URL (env OPENAI_BASE_URL)")
    common.add_argument(
        "--api-key", default=None, help="the API key (env OPENAI_API_KEY; prefer it: flags show in ps)"
    )
    common.add_argument(
        "--json", action="store_true", help="print the result as one JSON object on stdout and nothing else"
    )
    following = argparse.ArgumentParser(add_help=False)
    following.add_argument(
        "--interval", type=_positive(float), default=2.0, help="seconds between polls of the batch (2)"
    )
    downloading = argparse.ArgumentParser(add_help=False)
    downloading.add_argument(
        "--output-dir",
        default=".",
        help="where to write BATCH_ID_output.jsonl and BATCH_ID_errors.jsonl (default: the current directory)",
    )

    def add(name: str, parents: list[argparse.ArgumentParser], **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(
            name,
            parents=[common, *parents],
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=f"{CONNECTION_HELP}\n\n{EXIT_CODES_HELP}",
            **kwargs,
        )
        parser.set_defaults(client_command=name)
        return parser

    submit = add(
        "submit",
        [following, downloading],
        help="upload a JSONL file of requests and create a batch",
        description="Upload FILE (through the Uploads API when it is larger than one part) and create a "
        "batch of its requests. With --wait, follow it to the end and download its output and error files.",
    )
    submit.add_argument(
        "file", metavar="FILE.jsonl", help="one request per line: custom_id, method, url, body"
    )
    submit.add_argument("--endpoint", default=None, help="the batch's endpoint (default: the lines' url)")
    submit.add_argument(
        "--completion-window", default="24h", help="(default 24h, the only value OpenAI takes)"
    )
    submit.add_argument(
        "--metadata",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="metadata pairs for the batch (repeatable)",
    )
    submit.add_argument(
        "--output-expires-after",
        type=_positive(int),
        default=None,
        metavar="SECONDS",
        help="the output and error files expire this long after they are created (3600..2592000)",
    )
    submit.add_argument(
        "--wait", action="store_true", help="follow the batch to the end and download its files"
    )
    submit.add_argument(
        "--part-size",
        type=_positive(int),
        default=DEFAULT_PART_SIZE,
        metavar="BYTES",
        help="larger files go through the Uploads API in parts of this size; a server that refuses "
        "a part as too large is asked for the size it takes (default 4 MiB)",
    )

    status = add("status", [], help="show a batch")
    status.add_argument("batch_id", metavar="BATCH_ID")

    wait = add(
        "wait",
        [following],
        help="follow a batch to its end with a live progress bar",
        description="Poll the batch until it ends, showing done/total, rate, ETA, failures and status "
        "changes. Ctrl-C stops waiting; the batch keeps running.",
    )
    wait.add_argument("batch_id", metavar="BATCH_ID")

    download = add("download", [downloading], help="download a finished batch's output and error files")
    download.add_argument("batch_id", metavar="BATCH_ID")

    cancel = add("cancel", [], help="cancel a batch (it ends 'cancelled' with its partial results)")
    cancel.add_argument("batch_id", metavar="BATCH_ID")

    listing = add("ls", [], help="list batches, newest first")
    listing.add_argument("--limit", type=_positive(int), default=20, help="how many to show (20)")
    listing.add_argument("--status", choices=BATCH_STATUSES, default=None, help="only batches in this status")

    files = commands.add_parser("files", help="list or delete files")
    file_commands = files.add_subparsers(dest="files_command", required=True)
    files_ls = file_commands.add_parser(
        "ls",
        parents=[common],
        help="list files, newest first",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{CONNECTION_HELP}\n\n{EXIT_CODES_HELP}",
    )
    files_ls.add_argument(
        "--purpose", default=None, help="only files of this purpose (e.g. batch, batch_output)"
    )
    files_ls.add_argument("--limit", type=_positive(int), default=20, help="how many to show (20)")
    files_ls.set_defaults(client_command="files ls")
    files_rm = file_commands.add_parser(
        "rm",
        parents=[common],
        help="delete files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"{CONNECTION_HELP}\n\n{EXIT_CODES_HELP}",
    )
    files_rm.add_argument("file_ids", nargs="+", metavar="FILE_ID")
    files_rm.set_defaults(client_command="files rm")
